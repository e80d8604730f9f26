"""Proxmox VE ``qemu-server`` config (``/etc/pve/qemu-server/<vmid>.conf``).

With a ``vmid``, volumes are named the way a Proxmox *directory* storage names them,
``<storage>:<vmid>/<file>`` with the file at ``<storage path>/images/<vmid>/<file>`` (files
named ``vm-<vmid>-disk-<n>.<ext>``, as ``qm`` allocates them), and the config is ``<vmid>.conf``:
copying the files there makes a VM Proxmox starts.  ``vmferry migrate`` names its outputs so
(VMID 100 unless ``--vmid``).  Without one (``vm convert`` without ``--vmid``, whose disks are
converted separately), volumes are written as ``<storage>:<file>`` and the disks still have to
be imported (``qm disk import``).  Proxmox has one SCSI controller model per VM (``scsihw``),
which translation ensures.

A VMID is valid where Proxmox's own ``pve-vmid`` format accepts it: 100 to 999999999 written
without a leading zero (ids below 100 are reserved).  A directory storage takes only volume files
ending ``.raw``, ``.qcow2`` or ``.vmdk`` (Proxmox's format names), so a raw disk is ``.raw``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from vmferry.errors import UsageError
from vmferry.vm.model import Disk, VmModel

if TYPE_CHECKING:
    from vmferry.vm.targets import TargetProfile

_SCSIHW = {
    "virtio-scsi": "virtio-scsi-pci",
    "pvscsi": "pvscsi",
    "lsi53c895a": "lsi",
    "megasas": "megasas",
}
_OSTYPE = (
    ("win11", "win11"),
    ("win10", "win10"),
    ("windows2019", "win10"),
    ("windows2016", "win10"),
    ("2k22", "win11"),
    ("2k19", "win10"),
    ("windows7", "win7"),
    ("win7", "win7"),
    ("win", "win10"),
    ("linux", "l26"),
    ("rhel", "l26"),
    ("centos", "l26"),
    ("ubuntu", "l26"),
    ("debian", "l26"),
    ("fedora", "l26"),
    ("sles", "l26"),
    ("photon", "l26"),
    ("l26", "l26"),
)


def proxmox_name(name: str) -> str:
    """Proxmox VM names must be DNS names: letters, digits, '-' and '.'."""
    cleaned = re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip("-.") or "vm"
    return cleaned[:63]


def proxmox_bridge(network: str | None) -> str:
    """A Linux bridge name (≤15 chars, no spaces); anything else falls back to ``vmbr0``."""
    if network and re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", network):
        return network
    return "vmbr0"


def _slot_key(d: Disk) -> str:
    if d.controller == "ide":
        return f"ide{d.bus * 2 + d.unit}"
    if d.controller == "sata":
        return f"sata{d.unit}"
    if d.controller == "virtio":
        return f"virtio{d.unit}"
    return f"scsi{d.unit}"


#: the VMID ``vmferry migrate`` writes unless told (Proxmox's first free id on a new host)
DEFAULT_VMID = 100
#: Proxmox's VMID range (``pve-vmid``: ``[1-9][0-9]{2,8}``)
VMID_MIN, VMID_MAX = 100, 999_999_999
#: the files a directory storage accepts as VM images, by their Proxmox format name
DIR_STORAGE_FORMATS = ("raw", "qcow2", "vmdk")


def check_vmid(vmid: object) -> int:
    """``vmid`` when it is a VMID Proxmox accepts; a UsageError saying the range otherwise."""
    if isinstance(vmid, bool) or not isinstance(vmid, int):
        raise UsageError(
            f"a VMID is a whole number, not {vmid!r}", hint=f"{VMID_MIN} to {VMID_MAX}"
        )
    if not VMID_MIN <= vmid <= VMID_MAX:
        raise UsageError(
            f"VMID {vmid} is outside Proxmox's range {VMID_MIN}-{VMID_MAX}",
            hint="ids below 100 are reserved by Proxmox; `pvesh get /cluster/nextid` gives a "
            "free one",
        )
    return vmid


def parse_vmid(text: str) -> int:
    """A VMID as typed (``--vmid``): ASCII digits without sign or leading zero, as Proxmox's
    ``pve-vmid`` format reads it; a UsageError saying what is wrong otherwise."""
    digits = text.strip()
    if not (digits.isascii() and digits.isdigit()):
        raise UsageError(
            f"{text!r} is not a VMID", hint=f"a whole number from {VMID_MIN} to {VMID_MAX}"
        )
    if len(digits) > len(str(VMID_MAX)):  # before int(): no huge conversions
        raise UsageError(f"VMID {digits} is outside Proxmox's range {VMID_MIN}-{VMID_MAX}")
    if digits[0] == "0" and digits != "0":
        raise UsageError(
            f"VMID {digits!r} has a leading zero, which Proxmox refuses",
            hint=f"write {int(digits)}",
        )
    return check_vmid(int(digits))


def vmid_for(target: TargetProfile, vmid: int | None) -> int | None:
    """The VMID a migration to ``target`` uses: ``vmid`` (checked) or DEFAULT_VMID for Proxmox,
    None for every other target, where asking for one is a usage error rather than ignored."""
    if target.writer != "proxmox":
        if vmid is not None:
            raise UsageError(
                f"a VMID (--vmid) is for Proxmox targets only, not {target.name}",
                hint="drop the VMID, or migrate to proxmox",
            )
        return None
    return DEFAULT_VMID if vmid is None else check_vmid(vmid)


def proxmox_disk_file(vmid: int, n: int, ext: str) -> str:
    """The file name Proxmox gives disk ``n`` of VM ``vmid`` on a directory storage."""
    return f"vm-{vmid}-disk-{n}.{ext}"


def import_note(vmid: int, storage: str = "local") -> str:
    """What the admin does with the files ``migrate`` wrote for VM ``vmid``."""
    where = f" (/var/lib/vz/images/{vmid}/)" if storage == "local" else ""
    return (
        f"Proxmox: check that VMID {vmid} is free (`pvesh get /cluster/nextid --vmid {vmid}` "
        f"fails when it is taken; --vmid picks another), then copy {vmid}.conf to "
        f"/etc/pve/qemu-server/ and the disks to the '{storage}' storage's images/{vmid}/"
        f"{where}; for another storage rename the '{storage}:' volumes in {vmid}.conf"
    )


def name_disks_for_vmid(vm: VmModel, vmid: int) -> list[str]:
    """Rename the fitted model's disk files to Proxmox's ``vm-<vmid>-disk-<n>.<fmt>`` (n counts
    the disks in config order); returns one sentence per rename, for the choices list."""
    choices: list[str] = []
    n = 0
    for d in vm.disks:
        if not d.path:
            continue  # a blank disk: Proxmox allocates it (``<storage>:<GiB>``)
        fmt = (d.format or "").lower()
        new = proxmox_disk_file(vmid, n, fmt)
        n += 1
        if fmt in DIR_STORAGE_FORMATS and new != d.path:
            choices.append(f"disk {d.path} → file {new} (Proxmox's name for VM {vmid}'s disk)")
            d.path = new
    return choices


def write_proxmox(vm: VmModel, storage: str = "local", vmid: int | None = None) -> dict[str, str]:
    if vmid is not None:
        check_vmid(vmid)  # it names a file: never "-1.conf" or "True.conf"
    lines = [f"name: {proxmox_name(vm.name)}", f"memory: {vm.memory_mb}"]
    cores = vm.cores_per_socket or vm.cpus
    lines += [f"cores: {cores}", f"sockets: {vm.cpus // cores}"]
    if vm.cpus != cores * (vm.cpus // cores):
        lines.append(f"vcpus: {vm.cpus}")
    guest = (vm.guest_os or "").lower()
    ostype = next((t for key, t in _OSTYPE if key in guest), "other")
    lines.append(f"ostype: {ostype}")
    if vm.uuid:
        lines.append(f"smbios1: uuid={vm.uuid}")
    if vm.firmware == "uefi":
        lines += [
            "bios: ovmf",
            "machine: q35",
            f"efidisk0: {storage}:1,efitype=4m,pre-enrolled-keys={1 if vm.secure_boot else 0}",
        ]
    scsi = {d.controller_model for d in vm.disks + vm.cdroms if d.controller == "scsi"}
    if scsi:
        lines.append(f"scsihw: {_SCSIHW.get(next(iter(scsi)), 'virtio-scsi-pci')}")
    order = []
    for d in sorted(vm.disks, key=lambda d: d.boot_order or 1 << 20):
        key = _slot_key(d)
        new_gib = -(-(d.size_bytes or 1024**3) // 1024**3)
        where = f"{vmid}/{d.path}" if vmid is not None and d.path else d.path
        vol = f"{storage}:{where}" if d.path else f"{storage}:{new_gib}"
        size = f",size={_size(d.size_bytes)}" if d.size_bytes else ""
        lines.append(f"{key}: {vol}{size}")
        if d.boot_order is not None:
            order.append(key)
    for cd in vm.cdroms:
        key = _slot_key(cd)
        volume = f"{storage}:iso/{cd.path.split('/')[-1]}" if cd.path else "none"
        lines.append(f"{key}: {volume},media=cdrom")
    for i, nic in enumerate(vm.nics):
        mac = f"={nic.mac.upper()}" if nic.mac else ""
        lines.append(f"net{i}: {nic.model}{mac},bridge={proxmox_bridge(nic.network)}")
    for port in vm.serial_ports:
        lines.append(f"serial{port.index}: socket")
    if order:
        lines.append("boot: order=" + ";".join(order))
    name = f"{vmid}.conf" if vmid is not None else f"{proxmox_name(vm.name)}.conf"
    return {name: "\n".join(lines) + "\n"}


def _size(size: int) -> str:
    for unit, mult in (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size % mult == 0:
            return f"{size // mult}{unit}"
    return f"{-(-size // 1024)}K"
