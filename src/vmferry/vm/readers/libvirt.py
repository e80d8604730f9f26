"""libvirt domain XML.

libvirt already is a neutral model, so this reader is mostly renaming.  Two traps: the
``lsilogic`` SCSI model means VMware's LSI Logic in a ``type='vmware'`` domain but QEMU's
lsi53c895a in a KVM one, and a disk without ``<address>`` is placed by its target name
(``sdb`` → unit 1), the same rule libvirt applies.
"""

from __future__ import annotations

from pathlib import Path
from xml.etree.ElementTree import Element

from vmferry.errors import ConfigError
from vmferry.vm.model import Disk, Nic, SerialPort, VmModel, normalize_mac
from vmferry.vm.readers._common import (
    MAX_CPUS,
    MAX_MEMORY_MB,
    format_uuid,
    parse_xml,
    read_limited,
    to_int,
)
from vmferry.vm.targets import canonical_controller, canonical_nic, default_model_for_kind

_UNITS = {
    "b": 1,
    "bytes": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 10**6,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 10**9,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 10**12,
}
_BUS_KIND = {
    "ide": "ide",
    "sata": "sata",
    "scsi": "scsi",
    "virtio": "virtio",
    "xen": "xen",
    "nvme": "nvme",
}
#: Elements that describe the host side or cosmetics; not carried and not worth a report.
_QUIET = {
    "name",
    "uuid",
    "title",
    "description",
    "metadata",
    "memory",
    "currentMemory",
    "vcpu",
    "cpu",
    "os",
    "features",
    "clock",
    "on_poweroff",
    "on_reboot",
    "on_crash",
    "devices",
    "pm",
    "genid",
    "hwuuid",
    "cputune",
    "memoryBacking",
    "resource",
    "seclabel",
    "vcpus",
    "iothreads",
    "sysinfo",
    "keywrap",
    "idmap",
    "numatune",
}
_QUIET_DEVICES = {
    "disk",
    "interface",
    "serial",
    "controller",
    "emulator",
    "input",
    "graphics",
    "video",
    "console",
    "memballoon",
    "channel",
    "rng",
    "panic",
    "audio",
}


def _dev_index(dev: str) -> int:
    """``sdb`` → 1, ``vdaa`` → 26, ``nvme0n2`` → 1: libvirt's own target-name rule."""
    if dev.startswith("nvme") and "n" in dev[4:]:
        return max(int(dev.rsplit("n", 1)[1]) - 1, 0)
    letters = dev[2:] if dev[:2] in ("sd", "hd", "vd") else dev[3:] if dev.startswith("xvd") else ""
    index = 0
    for ch in letters:
        if not "a" <= ch <= "z":
            return 0
        index = index * 26 + (ord(ch) - ord("a") + 1)
    return max(index - 1, 0)


def read_libvirt(path: Path) -> VmModel:
    root = parse_xml(read_limited(path), path)
    return model_from_domain(root, path)


def model_from_domain(root: Element, path: Path | str) -> VmModel:
    if root.tag != "domain":
        raise ConfigError(f"root element is <{root.tag}>, not <domain>", path=str(path))
    vm = VmModel(name=root.findtext("name") or Path(path).stem, source_format="libvirt")
    vm.uuid = format_uuid(root.findtext("uuid"))
    mem = root.find("memory")
    if mem is not None:
        unit = _UNITS.get((mem.get("unit") or "KiB").lower())
        if unit is None:
            raise ConfigError(f"memory unit {mem.get('unit')!r} unknown", path=str(path))
        size = to_int(mem.text, "memory", path, hi=MAX_MEMORY_MB * 1024**2 // unit)
        vm.memory_mb = size * unit // 1024**2
    vm.cpus = to_int(root.findtext("vcpu") or "1", "vcpu", path, lo=1, hi=MAX_CPUS)
    topo = root.find("cpu/topology")
    if topo is not None and topo.get("cores"):
        vm.cores_per_socket = to_int(
            topo.get("cores"), "cpu/topology/@cores", path, lo=1, hi=MAX_CPUS
        )
    os_el = root.find("os")
    if os_el is not None:
        loader = os_el.find("loader")
        if os_el.get("firmware") == "efi" or (
            loader is not None and loader.get("type") == "pflash"
        ):
            vm.firmware = "uefi"
        sb = os_el.find("firmware/feature[@name='secure-boot']")
        vm.secure_boot = (sb is not None and sb.get("enabled") == "yes") or (
            loader is not None and loader.get("secure") == "yes"
        )
    for os_id in root.iter("{http://libosinfo.org/xmlns/libvirt/domain/1.0}os"):
        vm.guest_os = os_id.get("id")
    is_vmware = root.get("type") == "vmware"
    scsi_models = {
        int(c.get("index", "0")): c.get("model")
        for c in root.findall("devices/controller[@type='scsi']")
    }
    devices = root.find("devices")
    for dev in list(devices) if devices is not None else []:
        if dev.tag == "disk":
            _read_disk(dev, vm, scsi_models, is_vmware, path)
        elif dev.tag == "interface":
            _read_nic(dev, vm, default_model="pcnet" if is_vmware else None)
        elif dev.tag == "serial":
            target = dev.find("target")
            port = (
                int(target.get("port", "0"))
                if target is not None and target.get("port", "").isdigit()
                else len(vm.serial_ports)
            )
            src = dev.find("source")
            vm.serial_ports.append(
                SerialPort(
                    index=port,
                    kind=dev.get("type", "pty"),
                    target=src.get("path") if src is not None else None,
                )
            )
        elif dev.tag not in _QUIET_DEVICES:
            vm.unsupported.append(
                f"devices/{dev.tag}" + (f" type={dev.get('type')}" if dev.get("type") else "")
            )
    for el in root:
        if el.tag not in _QUIET:
            vm.unsupported.append(el.tag)
    return vm


def _read_disk(
    dev: Element, vm: VmModel, scsi_models: dict[int, str | None], is_vmware: bool, path: Path | str
) -> None:
    device = dev.get("device", "disk")
    target = dev.find("target")
    if device not in ("disk", "cdrom") or target is None:
        vm.unsupported.append(f"devices/disk device={device}")
        return
    tdev = target.get("dev", "")
    bus = target.get("bus") or {"hd": "ide", "sd": "scsi", "vd": "virtio", "xv": "xen"}.get(
        tdev[:2], ""
    )
    kind = _BUS_KIND.get(bus)
    if kind is None:
        vm.unsupported.append(f"devices/disk bus={bus} dev={tdev}")
        return
    addr = dev.find("address")
    index = _dev_index(tdev)
    if addr is not None and addr.get("type") == "drive":
        ctrl = to_int(addr.get("controller", "0"), "address/@controller", path, hi=255)
        ide_bus = to_int(addr.get("bus", "0"), "address/@bus", path, hi=255)
        unit = to_int(addr.get("unit", "0"), "address/@unit", path, hi=65535)
        slot_bus = ide_bus if kind == "ide" else ctrl
    elif kind == "ide":
        slot_bus, unit = divmod(index, 2)
    elif kind in ("virtio", "xen"):
        slot_bus, unit = 0, index
    else:
        slot_bus, unit = 0, index
    if kind == "scsi":
        raw = scsi_models.get(slot_bus) or ("lsilogic" if is_vmware else "lsi53c895a")
        model = (
            "lsilogic"
            if (raw == "lsilogic" and is_vmware)
            else ("lsi53c895a" if raw == "lsilogic" else canonical_controller(raw))
        )
        if model is None:
            vm.unsupported.append(f"devices/controller[@type='scsi'] model={raw}")
            model = raw
    else:
        model = default_model_for_kind(kind)
    src = dev.find("source")
    src_path = None
    if src is not None:
        src_path = src.get("file") or src.get("dev") or src.get("volume") or src.get("name")
        if src.get("protocol"):
            vm.unsupported.append(f"devices/disk network source protocol={src.get('protocol')}")
    drv = dev.find("driver")
    boot = dev.find("boot")
    disk = Disk(
        path=src_path,
        controller=kind,
        controller_model=model,
        bus=slot_bus,
        unit=unit,
        format=drv.get("type") if drv is not None else None,
        device=device,
        boot_order=to_int(boot.get("order"), "boot/@order", path, hi=65535)
        if boot is not None and boot.get("order")
        else None,
    )
    if dev.find("backingStore/source") is not None:
        bs = dev.find("backingStore/source")
        disk.parent = bs.get("file") or bs.get("dev")
    (vm.cdroms if device == "cdrom" else vm.disks).append(disk)


def _read_nic(dev: Element, vm: VmModel, default_model: str | None) -> None:
    """``default_model``: what the hypervisor picks when libvirt omits <model> (VMware: vlance)."""
    mac_el = dev.find("mac")
    model_el = dev.find("model")
    src = dev.find("source")
    raw_model = model_el.get("type") if model_el is not None else None
    model = canonical_nic(raw_model) if raw_model else default_model
    if raw_model and model is None:
        vm.unsupported.append(f"devices/interface model={raw_model}")
        model = raw_model
    network = None
    if src is not None:
        network = src.get("network") or src.get("bridge") or src.get("dev") or src.get("portgroup")
    mac = mac_el.get("address") if mac_el is not None else None
    vm.nics.append(
        Nic(
            mac=normalize_mac(mac),
            model=model,
            network=network,
            mac_static=mac_el is not None and mac_el.get("type") != "generated",
        )
    )
