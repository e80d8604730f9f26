"""VMware ``.vmx``.

A static MAC outside VMware's 00:50:56:00–3F range is refused by ESXi unless
``checkMACAddress = "FALSE"`` is set, so the writer sets it when keeping a foreign MAC.
"""

from __future__ import annotations

from vmferry.vm.model import VmModel

_HW_VERSION = "14"  # ESXi 6.7+: NVMe, pvscsi boot, UEFI secure boot
_NIC_DEV = {"vmxnet3": "vmxnet3", "e1000": "e1000", "e1000e": "e1000e", "pcnet": "vlance"}
_GUEST = (
    ("windows2019", "windows2019srv-64"),
    ("win", "windows9-64"),
    ("rhel9", "rhel9-64"),
    ("rhel8", "rhel8-64"),
    ("rhel", "rhel7-64"),
    ("ubuntu", "ubuntu-64"),
    ("debian", "debian10-64"),
    ("l26", "otherlinux-64"),
    ("linux", "otherlinux-64"),
)


def _q(value: str) -> str:
    return '"' + "".join(f"|{ord(c):02X}" if c in '"|#' or ord(c) < 32 else c for c in value) + '"'


def _vmware_mac(mac: str) -> bool:
    parts = mac.split(":")
    return parts[:3] == ["00", "50", "56"] and int(parts[3], 16) <= 0x3F


def write_vmx(vm: VmModel) -> dict[str, str]:
    kv: list[tuple[str, str]] = [
        (".encoding", "UTF-8"),
        ("config.version", "8"),
        ("virtualHW.version", _HW_VERSION),
        ("displayName", vm.name),
        ("memSize", str(vm.memory_mb)),
        ("numvcpus", str(vm.cpus)),
    ]
    if vm.cores_per_socket:
        kv.append(("cpuid.coresPerSocket", str(vm.cores_per_socket)))
    if vm.firmware == "uefi":
        kv.append(("firmware", "efi"))
        if vm.secure_boot:
            kv.append(("uefi.secureBoot.enabled", "TRUE"))
    guest = (vm.guest_os or "").lower()
    kv.append(
        (
            "guestOS",
            vm.guest_os
            if vm.source_format == "vmx" and vm.guest_os
            else next((g for key, g in _GUEST if key in guest), "other-64"),
        )
    )
    controllers: dict[str, str] = {}
    for d in vm.disks + vm.cdroms:
        prefix = {"scsi": "scsi", "sata": "sata", "ide": "ide", "nvme": "nvme"}[d.controller]
        ctrl = f"{prefix}{d.bus}"
        if ctrl not in controllers:
            controllers[ctrl] = d.controller_model or ""
            if prefix != "ide":
                kv.append((f"{ctrl}.present", "TRUE"))
            if prefix == "scsi":
                kv.append((f"{ctrl}.virtualDev", d.controller_model or "lsilogic"))
        slot = f"{ctrl}:{d.unit}"
        kv.append((f"{slot}.present", "TRUE"))
        if d.device == "cdrom":
            kv.append((f"{slot}.deviceType", "cdrom-image"))
            kv.append((f"{slot}.fileName", d.path or "emptyBackingString"))
            kv.append((f"{slot}.startConnected", "TRUE" if d.path and d.connected else "FALSE"))
        else:
            if prefix == "scsi":
                kv.append((f"{slot}.deviceType", "scsi-hardDisk"))
            kv.append((f"{slot}.fileName", d.path or ""))
    for i, nic in enumerate(vm.nics):
        p = f"ethernet{i}"
        kv += [
            (f"{p}.present", "TRUE"),
            (f"{p}.virtualDev", _NIC_DEV.get(nic.model or "", "e1000e")),
        ]
        if nic.network:
            kv.append((f"{p}.networkName", nic.network))
        if nic.mac:
            kv += [(f"{p}.addressType", "static"), (f"{p}.address", nic.mac)]
            if not _vmware_mac(nic.mac):
                kv.append((f"{p}.checkMACAddress", "FALSE"))
        else:
            kv.append((f"{p}.addressType", "generated"))
    for port in vm.serial_ports:
        p = f"serial{port.index}"
        kv += [
            (f"{p}.present", "TRUE"),
            (
                f"{p}.fileType",
                port.kind if port.kind in ("file", "pipe", "network", "device") else "file",
            ),
        ]
        kv.append((f"{p}.fileName", port.target or f"{vm.name}-serial{port.index}.log"))
    text = "".join(f"{k} = {_q(v)}\n" for k, v in kv)
    return {f"{vm.name}.vmx": text}
