"""OVF 1.x/2.x descriptors and OVA archives (VMware, VirtualBox, XenServer, virt-v2v exports).

An OVF lists hardware as CIM ``Item``s linked by ``InstanceID``/``Parent``; disks point at the
DiskSection, which points at References.  Vendors differ in namespaces and prefixes (OVF 2 uses
``StorageItem``/``EthernetPortItem``, oVirt uses ``Section xsi:type=...``), so every lookup here
goes by local name.  An OVA is a tar: the descriptor is read from the archive in memory and no
member name is ever used as a filesystem path.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path
from xml.etree.ElementTree import Element

from vmferry.errors import ConfigError
from vmferry.vm.model import Disk, Nic, SerialPort, VmModel, normalize_mac
from vmferry.vm.readers._common import (
    MAX_CONFIG_BYTES,
    MAX_CPUS,
    MAX_DISK_BYTES,
    MAX_MEMORY_MB,
    attr,
    child_text,
    children,
    local,
    parse_xml,
    read_limited,
    to_bool,
    to_int,
)
from vmferry.vm.targets import canonical_controller, canonical_nic

_SCSI_SUBTYPES = {
    "lsilogic": "lsilogic",
    "lsilogicsas": "lsisas1068",
    "virtualscsi": "pvscsi",
    "buslogic": "buslogic",
    "virtio-scsi": "virtio-scsi",
    "": "lsilogic",
}
_OTHER_STORAGE = {
    "vmware.sata.ahci": ("sata", "ahci"),
    "ahci": ("sata", "ahci"),
    "vmware.nvme.controller": ("nvme", "nvme"),
    "nvme": ("nvme", "nvme"),
}
#: Resource types that are real hardware but cosmetic for a migration; not reported.
_QUIET_TYPES = {"0", "1", "14", "23", "24", "32768", "34", "35"}
_QUIET_CONFIG = re.compile(
    r"^(tools\.|powerOpInfo\.|slotInfo\.|connectable\.|wakeOnLan|videoRam|use3dRenderer|enable3DSupport|"
    r"graphicsMemory|virtualSMCPresent|virtualICH7MPresent|cpuHot|memoryHot|nestedHV|backing\.writeThrough|"
    r"backing\.diskMode|uptCompatibilityEnabled|numCoresPerSocket|autoDetect|vmxStats|svga\.|"
    r"firmware|bootOptions\.efiSecureBootEnabled|uefi\.secureBoot\.enabled|vmotion\.|sched\.|monitor\.|"
    r"nvram|pciBridge|virtualHW\.|vmware\.tools|guestinfo\.)",
    re.IGNORECASE,
)
_NAMED_UNITS = {
    "bytes": 1,
    "kilobytes": 1024,
    "megabytes": 1024**2,
    "gigabytes": 1024**3,
    "kb": 1024,
    "mb": 1024**2,
    "gb": 1024**3,
}
_FORMATS = {
    "streamoptimized": "vmdk-streamOptimized",
    "monolithicsparse": "vmdk",
    "vmdk": "vmdk",
    "vhd": "vhd",
    "vhdx": "vhdx",
    "qcow2": "qcow2",
    "raw": "raw",
}


def read_ovf(path: Path) -> VmModel:
    return model_from_ovf(read_limited(path), path, source_format="ovf")


def read_ova(path: Path) -> VmModel:
    """The first ``.ovf`` member of the tar, read in memory (never extracted)."""
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for index, member in enumerate(tar):
                if index >= MAX_OVA_SCAN:
                    # The OVF spec puts the descriptor first; do not walk an endless archive.
                    raise ConfigError(
                        f"no .ovf among the first {MAX_OVA_SCAN} members", path=str(path)
                    )
                if member.isfile() and member.name.lower().endswith(".ovf"):
                    if member.size > MAX_CONFIG_BYTES:
                        raise ConfigError(
                            f"OVF member {member.name!r} is {member.size} bytes; refusing",
                            path=str(path),
                        )
                    fh = tar.extractfile(member)
                    if fh is None:
                        break
                    data = fh.read(MAX_CONFIG_BYTES + 1)
                    return model_from_ovf(data, f"{path}:{member.name}", source_format="ova")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ConfigError(f"not a readable OVA (tar) archive: {exc}", path=str(path)) from exc
    raise ConfigError("the OVA holds no .ovf descriptor", path=str(path))


def _units_multiplier(units: str | None, where: str, path: Path | str) -> int:
    if not units:
        return 1
    factors = [f.strip() for f in units.split("*")]
    if factors[0].lower() == "byte":
        total = 1
        for factor in factors[1:]:
            m = re.fullmatch(r"(\d{1,4})(?:\s*\^\s*(\d{1,2}))?", factor)
            if m is None:
                raise ConfigError(
                    f"{where}: allocation units {units!r} not understood", path=str(path)
                )
            total *= int(m.group(1)) ** int(m.group(2) or 1)
            if total > 2**62:
                raise ConfigError(
                    f"{where}: allocation units {units!r} out of range", path=str(path)
                )
        return total
    named = _NAMED_UNITS.get(units.strip().lower())
    if named is None:
        raise ConfigError(f"{where}: allocation units {units!r} not understood", path=str(path))
    return named


def _find_system(root: Element, path: Path | str) -> tuple[Element, list[str]]:
    notes: list[str] = []
    for el in root.iter():
        name = local(el.tag)
        if name == "VirtualSystem" or (
            name == "Content" and "VirtualSystem" in (attr(el, "type") or "")
        ):
            return el, notes
        if name == "VirtualSystemCollection":
            systems = [e for e in el.iter() if local(e.tag) == "VirtualSystem"]
            if systems:
                notes.append(
                    f"VirtualSystemCollection of {len(systems)} systems: only "
                    f"{attr(systems[0], 'id')!r} was read"
                )
                return systems[0], notes
    raise ConfigError("no VirtualSystem in the OVF", path=str(path))


def _section(parent: Element, name: str) -> list[Element]:
    """Sections by element name or by oVirt's ``Section xsi:type='ovf:<name>_Type'``."""
    out = []
    for el in parent:
        tag = local(el.tag)
        if tag == name or (tag == "Section" and (attr(el, "type") or "").endswith(f"{name}_Type")):
            out.append(el)
    return out


def _default_configuration(root: Element) -> str | None:
    for el in root.iter():
        if local(el.tag) == "Configuration" and to_bool(attr(el, "default", "false")):
            return attr(el, "id")
    return None


def model_from_ovf(data: bytes, path: Path | str, *, source_format: str = "ovf") -> VmModel:
    root = parse_xml(data, path)
    if local(root.tag) != "Envelope":
        raise ConfigError(
            f"root element is <{local(root.tag)}>, not an OVF <Envelope>", path=str(path)
        )
    files = {
        attr(f, "id"): f for ref in _section(root, "References") for f in children(ref, "File")
    }
    files.update(
        {attr(f, "id"): f for f in children(root, "References") for f in children(f, "File")}
    )
    disk_defs = {}
    for section in _section(root, "DiskSection"):
        for d in children(section, "Disk"):
            disk_defs[attr(d, "diskId")] = d
    system, notes = _find_system(root, path)
    for section in _section(system, "DiskSection"):
        for d in children(section, "Disk"):
            disk_defs[attr(d, "diskId")] = d
    name = child_text(system, "Name") or attr(system, "id") or Path(str(path)).stem
    vm = VmModel(name=name, source_format=source_format)
    vm.unsupported.extend(notes)
    os_sections = _section(system, "OperatingSystemSection")
    if os_sections:
        vm.guest_os = (
            attr(os_sections[0], "osType")
            or child_text(os_sections[0], "Description")
            or attr(os_sections[0], "id")
        )
    config_id = _default_configuration(root)
    hw_sections = _section(system, "VirtualHardwareSection")
    if not hw_sections:
        raise ConfigError("VirtualSystem has no VirtualHardwareSection", path=str(path))
    hw = hw_sections[0]
    if len(hw_sections) > 1:
        vm.unsupported.append(
            f"{len(hw_sections)} VirtualHardwareSections: only the first was read"
        )
    items = []
    for item in hw:
        if local(item.tag) not in ("Item", "StorageItem", "EthernetPortItem"):
            continue
        conf = attr(item, "configuration")
        if conf is not None and (config_id is None or config_id not in conf.split()):
            continue
        items.append(item)
    _read_configs(hw, vm, path)
    by_id: dict[str, Element] = {}
    for item in items:
        iid = child_text(item, "InstanceID") or child_text(item, "InstanceId")
        if iid:
            by_id[iid] = item
    disk_items = []
    for item in items:
        rtype = child_text(item, "ResourceType") or ""
        if rtype == "3":
            vm.cpus = to_int(
                child_text(item, "VirtualQuantity") or "1",
                "CPU VirtualQuantity",
                path,
                lo=1,
                hi=MAX_CPUS,
            )
            cps = child_text(item, "CoresPerSocket") or child_text(item, "cpu_per_socket")
            if cps:
                vm.cores_per_socket = to_int(cps, "CoresPerSocket", path, lo=1, hi=MAX_CPUS)
        elif rtype == "4":
            qty = to_int(
                child_text(item, "VirtualQuantity") or "0",
                "memory VirtualQuantity",
                path,
                hi=MAX_MEMORY_MB * 1024**2,
            )
            mult = _units_multiplier(
                child_text(item, "AllocationUnits") or "byte * 2^20", "memory", path
            )
            total = qty * mult
            if total > MAX_MEMORY_MB * 1024**2:
                raise ConfigError(f"memory of {total} bytes is out of range", path=str(path))
            vm.memory_mb = total // 1024**2
        elif rtype in ("15", "16", "17"):
            disk_items.append(item)
        elif rtype == "10":
            _read_nic(item, vm)
        elif rtype == "21":
            vm.serial_ports.append(
                SerialPort(
                    index=len(vm.serial_ports), kind=child_text(item, "ResourceSubType") or "device"
                )
            )
        elif rtype in ("5", "6", "20"):
            pass  # controllers are read through the disks that hang on them
        elif rtype not in _QUIET_TYPES:
            vm.unsupported.append(
                f"Item ResourceType={rtype} ({child_text(item, 'ElementName') or ''})"
            )
    for item in disk_items:
        _read_disk(item, by_id, disk_defs, files, vm, path)
    if _is_xen(hw):
        # XenServer's OVF: every disk is a Xen VBD.  OVF can only place it on IDE (the emulated
        # disk an HVM guest's firmware boots from); a Linux kernel with xen-blkfront unplugs the
        # emulated disks and reads the VBD as /dev/xvdX.  vmferry's model calls that xen-blkfront.
        for d in vm.disks:
            if d.controller == "ide" and d.device == "disk":
                d.controller, d.controller_model = "xen", "xen-blkfront"
    vm.disks.sort(key=lambda d: (_KIND_ORDER.get(d.controller, 9), d.bus, d.unit))
    return vm


def _is_xen(hw: Element) -> bool:
    """The hardware section's VirtualSystemType names a Xen family (``xen-3.0-...``)."""
    for system in hw:
        if local(system.tag) == "System":
            for child in system:
                if local(child.tag) == "VirtualSystemType" and child.text:
                    return any(t.strip().lower().startswith("xen") for t in child.text.split())
    return False


MAX_OVA_SCAN = 64
_KIND_ORDER = {"scsi": 0, "sata": 1, "nvme": 2, "ide": 3, "virtio": 4}


def _read_configs(hw: Element, vm: VmModel, path: Path | str) -> None:
    for cfg in hw:
        tag = local(cfg.tag)
        if tag not in ("Config", "ExtraConfig"):
            continue
        key = attr(cfg, "key") or ""
        value = attr(cfg, "value") or ""
        if key == "firmware":
            if value.lower() not in ("efi", "bios"):
                vm.unsupported.append(f"firmware={value}")
            vm.firmware = "uefi" if value.lower() == "efi" else "bios"
        elif key in ("bootOptions.efiSecureBootEnabled", "uefi.secureBoot.enabled"):
            vm.secure_boot = to_bool(value)
        elif not _QUIET_CONFIG.match(key):
            vm.unsupported.append(f"vmw:{tag} {key}={value[:60]}")


def _controller_of(item: Element, by_id: dict[str, Element], vm: VmModel) -> tuple[str, str, int]:
    parent = by_id.get(child_text(item, "Parent") or "")
    if parent is None:
        return "scsi", "lsilogic", 0
    rtype = child_text(parent, "ResourceType")
    sub = (child_text(parent, "ResourceSubType") or "").strip()
    address = child_text(parent, "Address") or "0"
    bus = int(address) if address.isdigit() else 0
    if rtype == "5":
        return "ide", "piix4", bus
    if rtype == "6":
        model = _SCSI_SUBTYPES.get(sub.lower()) or canonical_controller(sub)
        if model is None:
            vm.unsupported.append(f"SCSI controller subtype {sub}")
            model = sub
        return "scsi", model, bus
    kind_model = _OTHER_STORAGE.get(sub.lower())
    if kind_model is None:
        vm.unsupported.append(f"storage controller ResourceType={rtype} subtype={sub}")
        return "sata", "ahci", bus
    return kind_model[0], kind_model[1], bus


def _read_disk(
    item: Element,
    by_id: dict[str, Element],
    disk_defs: dict,
    files: dict,
    vm: VmModel,
    path: Path | str,
) -> None:
    rtype = child_text(item, "ResourceType")
    kind, model, bus = _controller_of(item, by_id, vm)
    unit_text = child_text(item, "AddressOnParent") or "0"
    unit = to_int(unit_text, "AddressOnParent", path, hi=65535) if unit_text.isdigit() else 0
    host = child_text(item, "HostResource") or ""
    boot = child_text(item, "BootOrder")
    disk = Disk(
        path=None,
        controller=kind,
        controller_model=model,
        bus=bus,
        unit=unit,
        device="disk" if rtype == "17" else "cdrom",
        boot_order=to_int(boot, "BootOrder", path, hi=65535) if boot and boot.isdigit() else None,
    )
    if rtype != "17":
        connected = child_text(item, "AutomaticAllocation")
        disk.connected = connected is None or to_bool(connected)
        if host.startswith("ovf:/file/"):
            f = files.get(host.split("/", 3)[-1])
            disk.path = attr(f, "href") if f is not None else None
        vm.cdroms.append(disk)
        return
    disk_id = host.rsplit("/", 1)[-1]
    ddef = disk_defs.get(disk_id)
    if ddef is None:
        # No DiskSection entry: an empty disk to create (size in the Item itself), or oVirt's
        # volume path as HostResource.
        disk.path = host or None
        qty = child_text(item, "VirtualQuantity")
        if qty is not None:
            mult = _units_multiplier(
                child_text(item, "AllocationUnits") or "byte", "disk size", path
            )
            size = to_int(qty, "disk VirtualQuantity", path) * mult
            if size > MAX_DISK_BYTES:
                raise ConfigError(f"disk size {size} bytes is out of range", path=str(path))
            disk.size_bytes = size
        vm.disks.append(disk)
        return
    capacity = attr(ddef, "capacity")
    if capacity is not None:
        if capacity.strip().isdigit():
            mult = _units_multiplier(
                attr(ddef, "capacityAllocationUnits"), f"disk {disk_id} capacity", path
            )
            size = int(capacity) * mult
            if size > MAX_DISK_BYTES:
                raise ConfigError(
                    f"disk {disk_id} capacity {size} bytes is out of range", path=str(path)
                )
            disk.size_bytes = size
        else:
            vm.unsupported.append(f"disk {disk_id} capacity {capacity!r} (property reference)")
    fmt = (attr(ddef, "format") or "").rsplit("#", 1)[-1].rsplit("/", 1)[-1].lower()
    disk.format = _FORMATS.get(fmt.replace(".html", ""), fmt or None)
    volume_format = (attr(ddef, "volume-format") or "").upper()  # oVirt dialect
    if volume_format:
        disk.format = {"RAW": "raw", "COW": "qcow2"}.get(volume_format, volume_format.lower())
    iface = attr(ddef, "disk-interface")
    if iface:
        kind_model = {
            "virtio": ("virtio", "virtio-blk"),
            "virtio_scsi": ("scsi", "virtio-scsi"),
            "ide": ("ide", "piix4"),
            "sata": ("sata", "ahci"),
        }.get(iface.lower())
        if kind_model:
            disk.controller, disk.controller_model = kind_model
    ref = attr(ddef, "fileRef")
    if ref:
        f = files.get(ref)
        if f is None:  # oVirt points fileRef at the href, not the id
            f = next((x for x in files.values() if attr(x, "href") == ref), None)
        if f is None:
            raise ConfigError(f"disk {disk_id} refers to unknown file {ref!r}", path=str(path))
        disk.path = attr(f, "href")
        disk.compression = attr(f, "compression")
    parent_ref = attr(ddef, "parentRef")
    if parent_ref:
        disk.parent = parent_ref
    vm.disks.append(disk)


def _read_nic(item: Element, vm: VmModel) -> None:
    sub = child_text(item, "ResourceSubType") or ""
    model = canonical_nic(sub) if sub else None
    if sub and model is None:
        if sub.isdigit():  # oVirt numeric subtypes: 1 rtl8139, 2 e1000, 3 virtio
            model = {"1": "rtl8139", "2": "e1000", "3": "virtio"}.get(sub)
        if model is None:
            vm.unsupported.append(f"NIC subtype {sub}")
            model = sub
    mac = child_text(item, "Address") or child_text(item, "MACAddress")
    vm.nics.append(
        Nic(
            mac=normalize_mac(mac),
            model=model,
            network=child_text(item, "Connection"),
            mac_static=normalize_mac(mac) is not None,
        )
    )
