"""How a guest names a block device, and which filesystem in the image that name means.

A VMware guest says ``/dev/sda1``; on KVM with virtio-blk the same partition is ``/dev/vda1``,
under an old IDE kernel ``/dev/hda1``.  Names tied to the controller break on migration; UUID=,
LABEL= and LVM names do not.  ``classify`` tells which kind a reference is; ``kernel_partition``
says which partition number a controller-bound name points at (for the single disk we inspect).
"""

from __future__ import annotations

import re

#: Controller-bound names: disk a (the boot disk), partition number optional.
_KERNEL_NAME = re.compile(
    r"^/dev/(?:(?P<scsi>sd|hd|vd|xvd)(?P<letter>[a-z]+)(?P<part>\d*)"
    r"|(?P<nvme>nvme\d+n\d+)(?:p(?P<npart>\d+))?"
    r"|(?P<mmc>mmcblk\d+)(?:p(?P<mpart>\d+))?"
    r"|(?P<cciss>cciss/c\d+d\d+)(?:p(?P<cpart>\d+))?)$"
)

BY_LINK = {
    "/dev/disk/by-uuid/": "uuid",
    "/dev/disk/by-label/": "label",
    "/dev/disk/by-partuuid/": "partuuid",
    "/dev/disk/by-partlabel/": "partlabel",
    "/dev/disk/by-id/": "by-id",
    "/dev/disk/by-path/": "by-path",
}

_NOT_DEVICES = {"proc", "sysfs", "tmpfs", "devpts", "none", "devtmpfs", "shm", "cgroup", "usbfs"}


def classify(spec: str) -> str:
    """One of: path, uuid, label, partuuid, partlabel, lvm, mapper, by-id, by-path, network,
    virtual, other."""
    upper = spec.upper()
    for prefix, kind in (
        ("UUID=", "uuid"),
        ("LABEL=", "label"),
        ("PARTUUID=", "partuuid"),
        ("PARTLABEL=", "partlabel"),
    ):
        if upper.startswith(prefix):
            return kind
    if spec.startswith(("/dev/disk/by-id/dm-name-", "/dev/disk/by-id/dm-uuid-LVM-")):
        return "mapper"  # device-mapper names: LVM's own, not the hypervisor's hardware ids
    for prefix, kind in BY_LINK.items():
        if spec.startswith(prefix):
            return kind
    if _KERNEL_NAME.match(spec):
        return "path"
    if spec.startswith("/dev/mapper/"):
        return "mapper"
    if spec.startswith("/dev/md") or spec.startswith("/dev/dm-"):
        return "other"
    if re.match(r"^/dev/[A-Za-z0-9_.+-]+/[A-Za-z0-9_.+-]+$", spec):
        return "lvm"  # /dev/VolGroup00/LogVol00
    if ":" in spec or spec.startswith("//"):
        return "network"
    if spec in _NOT_DEVICES or not spec.startswith("/"):
        return "virtual"
    return "other"


def kernel_partition(spec: str) -> tuple[str, int | None] | None:
    """For a controller-bound name: (disk name, partition number or None for the whole disk)."""
    m = _KERNEL_NAME.match(spec)
    if not m:
        return None
    if m.group("scsi"):
        part = m.group("part")
        return m.group("scsi") + m.group("letter"), int(part) if part else None
    for disk, part in (("nvme", "npart"), ("mmc", "mpart"), ("cciss", "cpart")):
        if m.group(disk):
            p = m.group(part)
            return m.group(disk), int(p) if p else None
    return None


def is_first_disk(disk: str) -> bool:
    """``sda``, ``hda``, ``vda``, ``xvda``, ``nvme0n1``, ``mmcblk0``, ``cciss/c0d0``."""
    return disk in ("sda", "hda", "vda", "xvda", "nvme0n1", "mmcblk0", "cciss/c0d0")


def lvm_name(spec: str) -> tuple[str, str] | None:
    """(VG, LV) for ``/dev/VG/LV``, ``/dev/mapper/VG-LV`` or ``/dev/disk/by-id/dm-name-VG-LV``.

    Device-mapper names double every ``-`` inside the VG and LV names (``my--vg-root``); a name
    with a further single ``-`` is an LVM-internal layer (``-real``, ``-cow``, ``-tpool``) and
    not a volume a guest mounts, so it gives None.
    """
    for prefix in ("/dev/mapper/", "/dev/disk/by-id/dm-name-"):
        if spec.startswith(prefix):
            parts = _split_dm_name(spec[len(prefix) :])
            return parts if parts is not None and len(parts) == 2 else None
    m = re.match(r"^/dev/([A-Za-z0-9_.+-]+)/([A-Za-z0-9_.+-]+)$", spec)
    if m and m.group(1) not in ("disk", "mapper", "md", "cciss", "block", "char"):
        return m.group(1), m.group(2)
    return None


def _split_dm_name(name: str) -> tuple[str, ...] | None:
    pieces, current, i = [], [], 0
    while i < len(name):
        if name[i] == "-":
            if name[i + 1 : i + 2] == "-":
                current.append("-")
                i += 2
                continue
            pieces.append("".join(current))
            current = []
        else:
            current.append(name[i])
        i += 1
    pieces.append("".join(current))
    return tuple(pieces) if all(pieces) else None
