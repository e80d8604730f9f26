"""VMware ``.vmx`` (and the ``.vmsd`` snapshot list next to it).

A ``.vmx`` is ``key = "value"`` lines; keys are case-insensitive to VMware, values may carry
``|XX`` hex escapes, and the ``.encoding`` line names the charset.  Devices are spread over many
keys (``scsi0.virtualDev``, ``scsi0:1.fileName``, ``ethernet0.generatedAddress``), so the reader
first builds a dictionary, then consumes keys as it understands them; whatever is left that is
not runtime noise (scheduling, tools, PCI placement) is reported as unsupported.
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
from vmferry.vm.readers.vmdk_descriptor import enrich_from_descriptor
from vmferry.vm.targets import canonical_nic

_LINE = re.compile(r'^\s*([^=\s]+)\s*=\s*(?:"(.*)"|(\S*))\s*$')
_ESCAPE = re.compile(r"\|([0-9A-Fa-f]{2})")
_DEVICE = re.compile(r"^(ide|scsi|sata|nvme)(\d+):(\d+)\.(\w+)$")
_NIC = re.compile(r"^ethernet(\d+)\.(\w+)$")
_SERIAL = re.compile(r"^serial(\d+)\.(\w+)$")

#: Keys (prefixes) that describe runtime state, scheduling, tools or PCI placement: nothing a
#: target can or should reproduce, so they are dropped without a report.
_IGNORED = re.compile(
    r"^(\.encoding|config\.version|virtualhw\.|sched\.|tools\.|toolscripts\.|toolsinstallmanager\.|"
    r"vmotion\.|migrate\.|numa\.|monitor\.|checkpoint\.|guestinfo\.|uuid\.location|vc\.uuid|"
    r"vmci0\.|pcibridge\d+|.*\.pcislotnumber|cleanshutdown|softpoweroff|extendedconfigfile|nvram|"
    r"svga\.|hpet0\.|usb|ehci|floppy\d\.|remotedisplay\.|vmxstats\.|powertype\.|bios\.bootretry|"
    r"vm\.createdate|vm\.genid|replay\.|ftcpt\.|viv\.|chipset\.|isolation\.|msg\.|mks\.|sound\.|"
    r"cpuid\.coresPerSocket\.cookie|scsi\d+\.saswwid|nvme\d+\.subnqnuuid|gui\.|hgfs\.|vmx\.|"
    r"annotation|uuid\.action|ethernet\d+\.(checkmacaddress|wakeonpcktrcv|uptcompatibility|generatedaddressoffset|"
    r"allowguestconnectioncontrol|pcislotnumber|features|dvs\.\w+)|.*\.redo$|.*\.startconnected$|"
    r".*\.allowguestconnectioncontrol$|.*\.autodetect$|filesearchpath|workingdir|pciSlotNumber|cpuid\.corespersocket\.cookie|"
    r"bios\.forcesetuponce|disk\.enableuuid|policy\.|debugstub|rtc\.|time\.|timetracker\.|log\.|"
    r"svga|autoanswer|checkpoint)",
    re.IGNORECASE,
)

_CDROM_TYPES = {"cdrom-image", "cdrom-raw", "atapi-cdrom"}
_DISK_TYPES = {
    "scsi-hardDisk".lower(),
    "disk",
    "ata-harddisk",
    "plaindisk",
    "rawdisk",
    "scsi-passthru",
}
#: Order in which VMware-sourced disks are listed (and the first one taken as boot disk when the
#: config does not say): the order virt-v2v reports them in.
_KIND_ORDER = {"scsi": 0, "sata": 1, "nvme": 2, "ide": 3}
_VMX_SCSI_MODELS = {
    "lsilogic": "lsilogic",
    "lsisas1068": "lsisas1068",
    "pvscsi": "pvscsi",
    "buslogic": "buslogic",
    "": "lsilogic",
}


def parse_vmx_text(data: bytes, path: Path | str) -> dict[str, str]:
    """``key → value`` with keys lower-cased and ``|XX`` escapes decoded."""
    encoding = "utf-8"
    head = data[:4096].decode("ascii", "replace")
    m = re.search(r'^\s*\.encoding\s*=\s*"([^"]+)"', head, re.MULTILINE | re.IGNORECASE)
    if m:
        encoding = m.group(1).strip()
    try:
        text = data.decode(encoding)
    except (LookupError, UnicodeDecodeError):
        text = data.decode("latin-1")
    if "\0" in text:
        raise ConfigError("file holds NUL bytes; not a .vmx text file", path=str(path))
    values: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _LINE.match(stripped)
        if not match:
            raise ConfigError(
                f"line {lineno} is not 'key = \"value\"': {stripped[:60]!r}", path=str(path)
            )
        raw = match.group(2) if match.group(2) is not None else match.group(3)
        values[match.group(1).lower()] = _ESCAPE.sub(lambda e: chr(int(e.group(1), 16)), raw)
    return values


def read_vmx(path: Path) -> VmModel:
    data = read_limited(path)
    values = parse_vmx_text(data, path)
    used: set[str] = set()

    def take(key: str, default: str | None = None) -> str | None:
        key = key.lower()
        if key in values:
            used.add(key)
            return values[key]
        return default

    name = take("displayName") or path.stem
    vm = VmModel(name=name, source_format="vmx")
    vm.memory_mb = to_int(take("memSize", "0"), "memSize", path, hi=MAX_MEMORY_MB)
    vm.cpus = to_int(take("numvcpus", "1"), "numvcpus", path, lo=1, hi=MAX_CPUS)
    cps = take("cpuid.coresPerSocket")
    vm.cores_per_socket = (
        to_int(cps, "cpuid.coresPerSocket", path, lo=1, hi=MAX_CPUS) if cps else None
    )
    fw = (take("firmware", "bios") or "bios").lower()
    if fw not in ("bios", "efi"):
        vm.unsupported.append(f'firmware = "{fw}"')
    vm.firmware = "uefi" if fw == "efi" else "bios"
    vm.secure_boot = to_bool(take("uefi.secureBoot.enabled", "false"))
    vm.guest_os = take("guestOS")
    vm.uuid = format_uuid(take("uuid.bios"))

    _read_disks(values, take, vm, path)
    for disk in vm.disks:
        enrich_from_descriptor(disk, path.parent)
    _consume_controllers(values, take)
    _read_nics(values, take, vm)
    _read_serials(values, take, vm)

    for key in sorted(values):
        if key in used or _IGNORED.match(key):
            continue
        if key.endswith(".present") and not to_bool(values[key]):
            continue
        vm.unsupported.append(f'{key} = "{values[key][:80]}"')

    vmsd = path.with_suffix(".vmsd")
    if vmsd.is_file():
        _read_vmsd(vmsd, vm)
    return vm


def _read_disks(values: dict[str, str], take, vm: VmModel, path: Path) -> None:
    slots: dict[tuple[str, int, int], dict[str, str]] = {}
    for key in values:
        m = _DEVICE.match(key)
        if m:
            kind, bus, unit, prop = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
            slots.setdefault((kind, bus, unit), {})[prop] = key
    for kind, bus, unit in sorted(slots, key=lambda s: (_KIND_ORDER[s[0]], s[1], s[2])):
        keys = slots[(kind, bus, unit)]
        present = take(keys["present"]) if "present" in keys else "false"
        ctrl_present = take(f"{kind}{bus}.present", "true" if kind == "ide" else "false")
        if not to_bool(present) or not to_bool(ctrl_present):
            for k in keys.values():
                take(k)
            continue
        dev_type = (take(keys["devicetype"]) if "devicetype" in keys else "") or ""
        file_name = take(keys["filename"]) if "filename" in keys else None
        for prop in ("mode", "writethrough"):
            if prop in keys:
                vm.unsupported.append(f'{keys[prop]} = "{take(keys[prop])}"')
        is_cdrom = dev_type.lower() in _CDROM_TYPES or (
            not dev_type and file_name is not None and file_name.lower().endswith(".iso")
        )
        if not is_cdrom and dev_type and dev_type.lower() not in _DISK_TYPES:
            vm.unsupported.append(f"{kind}{bus}:{unit}.deviceType = {dev_type!r}")
            continue
        if kind == "scsi":
            raw_model = (take(f"scsi{bus}.virtualDev", "") or "").lower()
            model = _VMX_SCSI_MODELS.get(raw_model)
            if model is None:
                vm.unsupported.append(f'scsi{bus}.virtualDev = "{raw_model}"')
                model = raw_model
        else:
            model = {"ide": "piix4", "sata": "ahci", "nvme": "nvme"}[kind]
        if is_cdrom and "clientdevice" in keys and to_bool(take(keys["clientdevice"])):
            # Passes the remote console's drive through: not VM hardware (libvirt drops it too).
            vm.unsupported.append(
                f'{kind}{bus}:{unit}.clientDevice = "TRUE" (CD-ROM of the VMware client)'
            )
            continue
        if "clientdevice" in keys:
            take(keys["clientdevice"])
        if file_name in ("", "emptyBackingString", "auto detect"):
            file_name = None
        connected = to_bool(take(keys["startconnected"])) if "startconnected" in keys else True
        disk = Disk(
            path=file_name,
            controller=kind,
            controller_model=model,
            bus=bus,
            unit=unit,
            device="cdrom" if is_cdrom else "disk",
            connected=connected,
        )
        if not is_cdrom and file_name:
            disk.format = "vmdk" if file_name.lower().endswith(".vmdk") else None
        (vm.cdroms if is_cdrom else vm.disks).append(disk)


def _consume_controllers(values: dict[str, str], take) -> None:
    """Controllers are recreated from the disks on them; their own keys need no report."""
    for key in list(values):
        if re.match(r"^(ide|scsi|sata|nvme)\d+\.(present|virtualdev)$", key):
            take(key)


def _read_nics(values: dict[str, str], take, vm: VmModel) -> None:
    indices = sorted({int(m.group(1)) for k in values if (m := _NIC.match(k))})
    for i in indices:
        p = f"ethernet{i}."
        if not to_bool(take(p + "present", "false")):
            for k in [k for k in values if k.startswith(p)]:
                take(k)
            continue
        raw_model = (take(p + "virtualDev", "vlance") or "vlance").lower()
        model = canonical_nic(raw_model)
        if model is None:
            vm.unsupported.append(f'{p}virtualDev = "{raw_model}"')
            model = raw_model
        addr_type = (take(p + "addressType", "generated") or "generated").lower()
        mac = take(p + "address") if addr_type == "static" else take(p + "generatedAddress")
        if addr_type == "static":
            take(p + "generatedAddress")
        network = take(p + "networkName") or take(p + "vnet") or take(p + "opaqueNetwork.id")
        take(p + "connectionType")
        take(p + "opaqueNetwork.type")
        take(p + "startConnected")
        vm.nics.append(
            Nic(
                mac=normalize_mac(mac),
                model=model,
                network=network,
                mac_static=addr_type == "static",
            )
        )


def _read_serials(values: dict[str, str], take, vm: VmModel) -> None:
    indices = sorted({int(m.group(1)) for k in values if (m := _SERIAL.match(k))})
    for i in indices:
        p = f"serial{i}."
        present = to_bool(take(p + "present", "false"))
        kind = (take(p + "fileType", "device") or "device").lower()
        target = take(p + "fileName")
        for k in [k for k in values if k.startswith(p)]:
            take(k)
        if present:
            vm.serial_ports.append(SerialPort(index=i, kind=kind, target=target))


def _read_vmsd(path: Path, vm: VmModel) -> None:
    """The snapshot tree: ``snapshotN.uid/displayName/parent`` plus ``snapshot.current``."""
    values = parse_vmx_text(read_limited(path), path)
    by_index: dict[str, dict[str, str]] = {}
    for key, value in values.items():
        m = re.match(r"^snapshot(\d+)\.(\w+)$", key)
        if m:
            by_index.setdefault(m.group(1), {})[m.group(2)] = value
    for idx in sorted(by_index, key=int):
        snap = by_index[idx]
        if "uid" not in snap:
            continue
        vm.snapshots.append(
            Snapshot(
                id=snap["uid"],
                name=snap.get("displayname", f"snapshot{idx}"),
                parent=snap.get("parent"),
                description=snap.get("description"),
            )
        )
    vm.current_snapshot = values.get("snapshot.current")
