"""VirtualBox ``.vbox`` machine settings.

Disks are attached by medium UUID; the MediaRegistry holds the medium tree (a differencing
medium nests inside its parent), so the reader resolves each attachment to a location and its
parent.  The machine's current hardware is the ``Machine/Hardware`` element; the ``Hardware``
inside each ``Snapshot`` is the snapshot's and is not read.
"""

from __future__ import annotations

from pathlib import Path
from xml.etree.ElementTree import Element

from vmferry.errors import ConfigError
from vmferry.vm.model import Disk, Nic, SerialPort, Snapshot, VmModel, normalize_mac
from vmferry.vm.readers._common import (
    MAX_CPUS,
    MAX_MEMORY_MB,
    format_uuid,
    parse_xml,
    read_limited,
    strip_namespaces,
    to_bool,
    to_int,
)
from vmferry.vm.targets import canonical_nic

_CONTROLLERS = {
    "piix3": ("ide", "piix4"),
    "piix4": ("ide", "piix4"),
    "ich6": ("ide", "piix4"),
    "ahci": ("sata", "ahci"),
    "lsilogic": ("scsi", "lsilogic"),
    "buslogic": ("scsi", "buslogic"),
    "lsilogicsas": ("scsi", "lsisas1068"),
    "nvme": ("nvme", "nvme"),
    "virtioscsi": ("scsi", "virtio-scsi"),
}
_NICS = {
    "am79c970a": "pcnet",
    "am79c973": "pcnet",
    "am79c960": "pcnet",
    "82540em": "e1000",
    "82543gc": "e1000",
    "82545em": "e1000",
    "virtio": "virtio",
}
_ATTACHMENTS = (
    "NAT",
    "BridgedInterface",
    "HostOnlyInterface",
    "InternalNetwork",
    "NATNetwork",
    "GenericInterface",
    "CloudNetwork",
    "HostOnlyNetwork",
)
_QUIET_HW = {
    "Memory",
    "Boot",
    "Display",
    "RemoteDisplay",
    "Firmware",
    "BIOS",
    "Network",
    "AudioAdapter",
    "Clipboard",
    "StorageControllers",
    "RTC",
    "CPU",
    "HID",
    "HPET",
    "Chipset",
    "Paravirt",
    "GuestProperties",
    "UART",
    "LPT",
    "DragAndDrop",
    "IO",
    "EmulatedUSB",
    "Platform",
    "USB",
    "VideoCapture",
    "Recording",
    "LongMode",
    "GraphicsAdapter",
    "NVRAM",
    "HardwareVirtEx",
}


def read_vbox(path: Path) -> VmModel:
    root = strip_namespaces(parse_xml(read_limited(path), path))
    if root.tag != "VirtualBox":
        raise ConfigError(f"root element is <{root.tag}>, not <VirtualBox>", path=str(path))
    machine = root.find("Machine")
    if machine is None:
        raise ConfigError("no <Machine> in the .vbox", path=str(path))
    hw = machine.find("Hardware")
    if hw is None:
        raise ConfigError("<Machine> has no <Hardware>", path=str(path))
    vm = VmModel(name=machine.get("name") or path.stem, source_format="vbox")
    vm.uuid = format_uuid(machine.get("uuid"))
    vm.guest_os = machine.get("OSType")
    mem = hw.find("Memory")
    vm.memory_mb = to_int(
        mem.get("RAMSize", "0") if mem is not None else "0",
        "Memory/@RAMSize",
        path,
        hi=MAX_MEMORY_MB,
    )
    cpu = hw.find("CPU")
    vm.cpus = to_int(
        cpu.get("count", "1") if cpu is not None else "1", "CPU/@count", path, lo=1, hi=MAX_CPUS
    )
    fw = next(hw.iter("Firmware"), None)
    if fw is not None and (fw.get("type") or "").upper().startswith("EFI"):
        vm.firmware = "uefi"
    sb = next(hw.iter("SecureBoot"), None)
    vm.secure_boot = sb is not None and to_bool(sb.get("enabled", "false"))
    media = _media_registry(machine)
    _read_storage(hw, media, vm, path)
    _read_network(hw, vm)
    for uart in hw.iter("Port"):
        if to_bool(uart.get("enabled", "false")):
            vm.serial_ports.append(
                SerialPort(
                    index=to_int(uart.get("slot", "0"), "UART/Port/@slot", path, hi=3),
                    kind=(uart.get("hostMode") or "disconnected").lower(),
                    target=uart.get("path"),
                )
            )
    for el in hw:
        if el.tag not in _QUIET_HW:
            vm.unsupported.append(f"Hardware/{el.tag}")
    _read_snapshots(machine, None, vm)
    vm.current_snapshot = format_uuid(machine.get("currentSnapshot"))
    return vm


def _media_registry(machine: Element) -> dict[str, tuple[Element, str | None]]:
    """medium uuid → (element, parent uuid), across HardDisks/DVDImages/FloppyImages."""
    out: dict[str, tuple[Element, str | None]] = {}

    def walk(el: Element, parent: str | None) -> None:
        uid = format_uuid(el.get("uuid"))
        if uid:
            out[uid] = (el, parent)
        for c in el:
            if c.tag in ("HardDisk", "Image"):
                walk(c, uid)

    registry = machine.find("MediaRegistry")
    if registry is not None:
        for group in registry:
            for medium in group:
                walk(medium, None)
    return out


def _read_storage(
    hw: Element, media: dict[str, tuple[Element, str | None]], vm: VmModel, path: Path
) -> None:
    counts: dict[str, int] = {}
    ctrls = hw.find("StorageControllers")
    for ctrl in ctrls if ctrls is not None else []:
        ctype = (ctrl.get("type") or "").lower()
        if ctype == "i82078":  # floppy controller
            continue
        kind_model = _CONTROLLERS.get(ctype)
        if kind_model is None:
            vm.unsupported.append(f"StorageController type={ctrl.get('type')}")
            continue
        kind, model = kind_model
        bus_index = counts.get(kind, 0)
        counts[kind] = bus_index + 1
        for att in ctrl.findall("AttachedDevice"):
            dev_type = att.get("type", "HardDisk")
            if dev_type not in ("HardDisk", "DVD"):
                vm.unsupported.append(f"AttachedDevice type={dev_type}")
                continue
            port = to_int(att.get("port", "0"), "AttachedDevice/@port", path, hi=65535)
            device = to_int(att.get("device", "0"), "AttachedDevice/@device", path, hi=65535)
            bus, unit = (port, device) if kind == "ide" else (bus_index, port)
            image = att.find("Image")
            location = fmt = parent_loc = None
            if image is not None:
                uid = format_uuid(image.get("uuid"))
                entry = media.get(uid or "")
                if entry is None:
                    vm.unsupported.append(
                        f"attachment {uid} not in the MediaRegistry (host drive?)"
                    )
                else:
                    medium, parent = entry
                    location, fmt = (
                        medium.get("location"),
                        (medium.get("format") or "").lower() or None,
                    )
                    if parent and parent in media:
                        parent_loc = media[parent][0].get("location")
                    if _encrypted(uid, media):
                        vm.unsupported.append(f"medium {uid} is encrypted (CRYPT/KeyStore)")
            disk = Disk(
                path=location,
                controller=kind,
                controller_model=model,
                bus=bus,
                unit=unit,
                format=fmt,
                device="cdrom" if dev_type == "DVD" else "disk",
                parent=parent_loc,
            )
            (vm.cdroms if dev_type == "DVD" else vm.disks).append(disk)


def _encrypted(uid: str | None, media: dict[str, tuple[Element, str | None]]) -> bool:
    """A medium is encrypted when it or any ancestor carries a key store (depth-bounded)."""
    for _ in range(256):
        entry = media.get(uid or "")
        if entry is None:
            return False
        medium, parent = entry
        if any(p.get("name") == "CRYPT/KeyStore" for p in medium.findall("Property")):
            return True
        uid = parent
    return False


def _read_network(hw: Element, vm: VmModel) -> None:
    net = hw.find("Network")
    for adapter in net.findall("Adapter") if net is not None else []:
        if not to_bool(adapter.get("enabled", "false")):
            continue
        raw = (adapter.get("type") or "Am79C973").lower()
        model = _NICS.get(raw) or canonical_nic(raw)
        if model is None:
            vm.unsupported.append(f"Adapter type={adapter.get('type')}")
            model = raw
        network = None
        for att in adapter:
            if att.tag in _ATTACHMENTS:
                network = att.get("name") or att.tag.lower()
                break
        vm.nics.append(
            Nic(
                mac=normalize_mac(adapter.get("MACAddress")),
                model=model,
                network=network,
                mac_static=True,
            )
        )


def _read_snapshots(parent_el: Element, parent_id: str | None, vm: VmModel) -> None:
    snaps = (
        [parent_el.find("Snapshot")]
        if parent_el.tag == "Machine"
        else list(parent_el.find("Snapshots") or [])
    )
    for snap in snaps:
        if snap is None:
            continue
        uid = format_uuid(snap.get("uuid")) or ""
        vm.snapshots.append(
            Snapshot(
                id=uid,
                name=snap.get("name", ""),
                parent=parent_id,
                description=snap.findtext("Description"),
                created=snap.get("timeStamp"),
            )
        )
        _read_snapshots(snap, uid, vm)
