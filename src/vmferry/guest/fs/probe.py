"""What is on a partition: filesystem type, UUID and label, as ``blkid -p`` would say.

The fix rules turn ``/dev/sda1`` into ``UUID=...``, so the UUID must be the one the guest's
initramfs will find (the filesystem's, not the partition's).  Only signatures are read here;
opening a filesystem for paths is :func:`open_filesystem`'s job, for the types vmferry reads.
"""

from __future__ import annotations

import uuid as _uuid
from dataclasses import dataclass

from vmferry.guest.errors import CorruptGuestError
from vmferry.guest.fs.btrfs import BtrfsFilesystem
from vmferry.guest.fs.ext import ExtFilesystem
from vmferry.guest.fs.ext_layout import EXT_MAGIC
from vmferry.guest.fs.types import GuestFS
from vmferry.guest.fs.xfs import XfsFilesystem
from vmferry.guest.overlay import ReadableDisk


@dataclass(frozen=True)
class FsSignature:
    type: str  # ext2 | ext3 | ext4 | xfs | swap | vfat | btrfs | LVM2_member | crypto_LUKS
    uuid: str | None
    label: str | None


def _u(b: bytes) -> str:
    return str(_uuid.UUID(bytes=bytes(b)))


def _text(b: bytes) -> str | None:
    s = b.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    return s or None


def probe(dev: ReadableDisk) -> FsSignature | None:
    """The signature on ``dev``, or None when nothing known is there."""
    size = dev.virtual_size
    head = dev.read(0, min(size, 8192))
    if len(head) >= 1024 + 58 and int.from_bytes(head[1024 + 56 : 1024 + 58], "little") == (
        EXT_MAGIC
    ):
        try:
            fs = ExtFilesystem(dev)
        except CorruptGuestError:
            return None
        return FsSignature(fs.version, fs.uuid, fs.label or None)
    if head[:4] == b"XFSB" and len(head) >= 120:
        return FsSignature("xfs", _u(head[32:48]), _text(head[108:120]))
    if head[:6] == b"LUKS\xba\xbe":
        return FsSignature("crypto_LUKS", _text(head[168:208]), None)
    for sector in range(4):
        at = sector * 512
        if head[at : at + 8] == b"LABELONE" and head[at + 24 : at + 32] == b"LVM2 001":
            return FsSignature("LVM2_member", _lvm_uuid(head[at + 32 : at + 64]), None)
    for page in (4096, 8192, 16384, 65536):
        if size >= page and dev.read(page - 10, 10) in (b"SWAPSPACE2", b"SWAP-SPACE"):
            raw = dev.read(1024, 64)
            return FsSignature("swap", _u(raw[12:28]), _text(raw[28:44]))
    fat = _fat(head)
    if fat is not None:
        return fat
    if size >= 0x10000 + 0x140:
        sb = dev.read(0x10000, 0x140)
        if sb[0x40:0x48] == b"_BHRfS_M":
            return FsSignature("btrfs", _u(sb[0x20:0x30]), _text(sb[0x12B : 0x12B + 256]))
    return None


def _lvm_uuid(raw: bytes) -> str:
    s = raw.decode("ascii", "replace")
    parts = (6, 4, 4, 4, 4, 4, 6)
    out, at = [], 0
    for n in parts:
        out.append(s[at : at + n])
        at += n
    return "-".join(out)


def _fat(head: bytes) -> FsSignature | None:
    if len(head) < 512 or head[510:512] != b"\x55\xaa":
        return None
    if head[82:87] == b"FAT32":
        serial, label = head[67:71], head[71:82]
    elif head[54:59] in (b"FAT12", b"FAT16", b"FAT  "):
        serial, label = head[39:43], head[43:54]
    else:
        return None
    vid = int.from_bytes(serial, "little")
    text = _text(label)
    return FsSignature(
        "vfat", f"{vid >> 16:04X}-{vid & 0xFFFF:04X}", None if text == "NO NAME" else text
    )


def open_filesystem(dev: ReadableDisk, sig: FsSignature | None = None) -> GuestFS | None:
    """A path-level reader for ``dev`` when vmferry reads its type (ext2/3/4, XFS read-only)."""
    sig = sig or probe(dev)
    if sig is not None and sig.type in ("ext2", "ext3", "ext4"):
        return ExtFilesystem(dev)
    if sig is not None and sig.type == "xfs":
        return XfsFilesystem(dev)
    if sig is not None and sig.type == "btrfs":
        return BtrfsFilesystem(dev)
    if sig is not None and sig.type == "vfat":
        from vmferry.guest.fs.fat import FatFilesystem  # FAT12/16/32, read and write

        return FatFilesystem(dev)
    return None
