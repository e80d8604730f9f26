"""Proxmox VE ``qemu-server`` configs (``/etc/pve/qemu-server/<vmid>.conf``).

``key: value`` lines; device values are comma lists whose first bare item is the volume
(``local:100/vm-100-disk-0.qcow2``).  ``[name]`` sections are snapshots (each with ``parent:``);
``[PENDING]`` holds changes not yet applied and ``[special:...]`` generated state, neither of
which describes the running machine.  Defaults (512 MiB, 1 core, lsi SCSI) are Proxmox's own.
"""

from __future__ import annotations

import re
from pathlib import Path

from vmferry.errors import ConfigError
from vmferry.vm.model import Disk, Nic, SerialPort, Snapshot, VmModel, normalize_mac
from vmferry.vm.readers._common import (
    MAX_CPUS,
    MAX_MEMORY_MB,
    format_uuid,
    read_limited,
    to_bool,
    to_int,
)
from vmferry.vm.targets import canonical_controller, canonical_nic

_DRIVE = re.compile(r"^(ide|sata|scsi|virtio)(\d+)$")
_NET = re.compile(r"^net(\d+)$")
_SERIAL = re.compile(r"^serial(\d+)$")
_NIC_MODELS = (
    "virtio",
    "e1000",
    "e1000e",
    "rtl8139",
    "vmxnet3",
    "i82551",
    "i82557b",
    "i82559er",
    "ne2k_isa",
    "ne2k_pci",
    "pcnet",
    "e1000-82540em",
    "e1000-82544gc",
    "e1000-82545em",
)
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)$")
_QUIET = {
    "smbios1",
    "vmgenid",
    "numa",
    "meta",
    "digest",
    "ostype",
    "name",
    "memory",
    "cores",
    "sockets",
    "vcpus",
    "bios",
    "boot",
    "bootdisk",
    "scsihw",
    "efidisk0",
    "parent",
    "snaptime",
    "description",
    "agent",
    "balloon",
    "tablet",
    "vga",
    "onboot",
    "startup",
    "ciuser",
    "cipassword",
    "citype",
    "sshkeys",
    "nameserver",
    "searchdomain",
    "cpu",
    "machine",
    "kvm",
    "acpi",
    "localtime",
    "shares",
    "protection",
    "tags",
    "lock",
    "vmstate",
    "runningmachine",
    "runningcpu",
    "cicustom",
    "hotplug",
}
_SCSIHW = {
    "lsi": "lsi53c895a",
    "lsi53c810": "lsi53c895a",
    "virtio-scsi-pci": "virtio-scsi",
    "virtio-scsi-single": "virtio-scsi",
    "megasas": "megasas",
    "pvscsi": "pvscsi",
}


def parse_sections(text: str, path: Path | str) -> dict[str, dict[str, str]]:
    """``{"": main, "snapname": {...}, "PENDING": {...}}``; duplicate keys keep the last value."""
    sections: dict[str, dict[str, str]] = {"": {}}
    current = sections[""]
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"\[([^\]]+)\]", line)
        if m:
            current = sections.setdefault(m.group(1), {})
            continue
        key, sep, value = line.partition(":")
        if not sep or not re.fullmatch(r"[A-Za-z][\w-]*", key.strip()):
            raise ConfigError(f"line {lineno} is not 'key: value': {line[:60]!r}", path=str(path))
        current[key.strip()] = value.strip()
    return sections


def _options(value: str) -> tuple[str | None, dict[str, str]]:
    """Split ``vol,key=val,...`` into (vol, opts); a leading ``key=`` item means no volume."""
    head, opts = None, {}
    for i, part in enumerate(value.split(",")):
        if "=" in part:
            k, _, v = part.partition("=")
            opts[k.strip()] = v.strip()
        elif i == 0:
            head = part.strip()
    return head, opts


def _size(text: str, path: Path | str) -> int:
    m = _SIZE.match(text.strip())
    if not m:
        raise ConfigError(f"size {text[:30]!r} not understood", path=str(path))
    mult = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[m.group(2)]
    value = int(float(m.group(1)) * mult)
    if value > 2**63 - 1:
        raise ConfigError(f"size {text[:30]!r} out of range", path=str(path))
    return value


def read_proxmox(path: Path) -> VmModel:
    data = read_limited(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("not UTF-8 text; not a Proxmox config", path=str(path)) from exc
    sections = parse_sections(text, path)
    return model_from_sections(sections, path)


def model_from_sections(sections: dict[str, dict[str, str]], path: Path | str) -> VmModel:
    conf = sections[""]
    vm = VmModel(name=conf.get("name") or Path(str(path)).stem, source_format="proxmox")
    vm.memory_mb = to_int(conf.get("memory", "512"), "memory", path, hi=MAX_MEMORY_MB)
    cores = to_int(conf.get("cores", "1"), "cores", path, lo=1, hi=MAX_CPUS)
    sockets = to_int(conf.get("sockets", "1"), "sockets", path, lo=1, hi=MAX_CPUS)
    vm.cpus = to_int(conf.get("vcpus", str(cores * sockets)), "vcpus", path, lo=1, hi=MAX_CPUS)
    vm.cores_per_socket = cores
    vm.guest_os = conf.get("ostype")
    smbios = _options(conf.get("smbios1", ""))[1]
    vm.uuid = format_uuid(smbios.get("uuid"))
    if conf.get("bios") == "ovmf":
        vm.firmware = "uefi"
        efi = _options(conf.get("efidisk0", ""))[1]
        vm.secure_boot = to_bool(efi.get("pre-enrolled-keys", "0"))
    scsihw = conf.get("scsihw", "lsi")
    scsi_model = _SCSIHW.get(scsihw) or canonical_controller(scsihw)
    if scsi_model is None:
        vm.unsupported.append(f"scsihw: {scsihw}")
        scsi_model = scsihw
    boot_order = _boot_order(conf)
    for key in sorted(conf, key=_device_sort_key):
        value = conf[key]
        if (m := _DRIVE.match(key)) is not None:
            _read_drive(
                m.group(1), int(m.group(2)), key, value, scsi_model, scsihw, boot_order, vm, path
            )
        elif (m := _NET.match(key)) is not None:
            _read_net(key, value, vm)
        elif (m := _SERIAL.match(key)) is not None:
            vm.serial_ports.append(
                SerialPort(
                    index=int(m.group(1)),
                    kind="pty" if value == "socket" else "device",
                    target=value,
                )
            )
        elif key not in _QUIET and not key.startswith("ipconfig"):
            vm.unsupported.append(f"{key}: {value[:80]}")
    vm.disks.sort(key=lambda d: d.boot_order if d.boot_order is not None else 1 << 20)
    for name, snap in sections.items():
        if name == "":
            continue
        if name == "PENDING":
            vm.unsupported.extend(f"[PENDING] {k}: {v[:60]}" for k, v in snap.items())
        elif not name.startswith("special:"):
            vm.snapshots.append(
                Snapshot(
                    id=name,
                    name=name,
                    parent=snap.get("parent"),
                    description=snap.get("description"),
                    created=snap.get("snaptime"),
                )
            )
    vm.current_snapshot = conf.get("parent")
    return vm


def _device_sort_key(key: str) -> tuple[int, str, int]:
    m = re.match(r"^([a-z]+)(\d+)$", key)
    if m:
        return (0, m.group(1), int(m.group(2)))
    return (1, key, 0)


def _boot_order(conf: dict[str, str]) -> dict[str, int]:
    boot = conf.get("boot", "")
    if boot.startswith("order="):
        return {dev: i + 1 for i, dev in enumerate(boot[6:].split(";")) if dev}
    if conf.get("bootdisk"):
        return {conf["bootdisk"]: 1}
    return {}


def _read_drive(
    bus_name: str,
    index: int,
    key: str,
    value: str,
    scsi_model: str,
    scsihw: str,
    boot_order: dict[str, int],
    vm: VmModel,
    path: Path | str,
) -> None:
    volume, opts = _options(value)
    is_cdrom = opts.get("media") == "cdrom"
    if bus_name == "ide":
        kind, model, bus, unit = "ide", "piix4", index // 2, index % 2
    elif bus_name == "sata":
        kind, model, bus, unit = "sata", "ahci", 0, index
    elif bus_name == "virtio":
        kind, model, bus, unit = "virtio", "virtio-blk", 0, index
    elif scsihw == "virtio-scsi-single":
        kind, model, bus, unit = "scsi", scsi_model, index, 0
    elif scsi_model in ("lsi53c895a",):
        kind, model, bus, unit = "scsi", scsi_model, index // 7, index % 7
    else:
        kind, model, bus, unit = "scsi", scsi_model, 0, index
    if volume == "none" or (volume and re.fullmatch(r"[\w.-]+:\d+(?:\.\d+)?", volume)):
        volume = None  # no medium, or "<storage>:<GiB>": a new disk Proxmox allocates
    fmt = opts.get("format")
    if fmt is None and volume and "." in volume.rsplit("/", 1)[-1]:
        fmt = volume.rsplit(".", 1)[-1]
    if "cloudinit" in (volume or ""):
        vm.unsupported.append(f"{key}: cloud-init drive {volume}")
        return
    disk = Disk(
        path=volume,
        controller=kind,
        controller_model=model,
        bus=bus,
        unit=unit,
        format=fmt if not is_cdrom else None,
        device="cdrom" if is_cdrom else "disk",
        size_bytes=_size(opts["size"], path) if "size" in opts and not is_cdrom else None,
        boot_order=boot_order.get(key),
    )
    (vm.cdroms if is_cdrom else vm.disks).append(disk)


def _read_net(key: str, value: str, vm: VmModel) -> None:
    head, opts = _options(value)
    model_key = next((k for k in opts if k in _NIC_MODELS), None)
    raw_model = model_key or opts.get("model") or head  # the bare first item is the model
    mac = opts.get(model_key) if model_key else opts.get("macaddr")
    model = canonical_nic(raw_model)
    if raw_model and model is None:
        vm.unsupported.append(f"{key}: NIC model {raw_model}")
        model = raw_model
    vm.nics.append(
        Nic(
            mac=normalize_mac(mac),
            model=model,
            network=opts.get("bridge"),
            mac_static=normalize_mac(mac) is not None,
        )
    )
    for k in opts:
        if k not in (model_key, "model", "macaddr", "bridge", "firewall"):
            vm.unsupported.append(f"{key}: {k}={opts[k]}")
