"""Partition tables: MBR (primary, extended and logical) and GPT (with CRCs and backup header).

Why our own parser: inspection runs on any disk vmferry opens (a VHDX chain, a VMDK) without
attaching it to the host, so no kernel or libfdisk can do it.  Numbering follows Linux: MBR
primaries are 1-4 whatever slot is empty, logicals start at 5; GPT entries keep their slot
number.  Every pointer is bounds-checked against the disk, the logical chain is bounded, and a
bad GPT header falls back to the backup (with a warning) before giving up.
"""

from __future__ import annotations

import uuid
import zlib
from dataclasses import dataclass, field

from vmferry._layout import Layout, raw, u8, u32, u64
from vmferry.guest.errors import CorruptGuestError, GuestLimitError
from vmferry.guest.overlay import ReadableDisk

SECTOR = 512
MAX_LOGICAL = 128  # Linux itself stops at a few dozen; a longer chain is a loop or garbage
MAX_GPT_ENTRY_BYTES = 1 << 20
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
PROTECTIVE = 0xEE


class MbrEntry(Layout, byteorder="<", size=16):
    status: int = u8()
    chs_first: bytes = raw(3)
    type: int = u8()
    chs_last: bytes = raw(3)
    lba_first: int = u32()
    sectors: int = u32()


class GptHeader(Layout, byteorder="<", size=92):
    signature: bytes = raw(8)
    revision: int = u32()
    header_size: int = u32()
    header_crc: int = u32()
    reserved: int = u32()
    my_lba: int = u64()
    alternate_lba: int = u64()
    first_usable: int = u64()
    last_usable: int = u64()
    disk_guid: bytes = raw(16)
    entries_lba: int = u64()
    num_entries: int = u32()
    entry_size: int = u32()
    entries_crc: int = u32()


class GptEntry(Layout, byteorder="<", size=128):
    type_guid: bytes = raw(16)
    unique_guid: bytes = raw(16)
    first_lba: int = u64()
    last_lba: int = u64()
    attributes: int = u64()
    name: bytes = raw(72)


@dataclass(frozen=True)
class Partition:
    """One partition; offsets in bytes.  ``type`` is a GPT type GUID or an MBR id like ``83``."""

    index: int
    start: int
    size: int
    type: str
    name: str | None = None
    uuid: str | None = None  # GPT unique GUID, or the MBR PARTUUID ``xxxxxxxx-NN``
    container: bool = False  # an MBR extended partition: holds logicals, never a filesystem
    bootable: bool = False

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass
class PartitionTable:
    scheme: str  # "mbr", "gpt" or "none"
    id: str | None
    partitions: list[Partition]
    warnings: list[str] = field(default_factory=list)

    def filesystems(self) -> list[Partition]:
        """Partitions that may hold a filesystem (extended containers left out)."""
        return [p for p in self.partitions if not p.container]


def read_partition_table(disk: ReadableDisk) -> PartitionTable:
    """Parse the disk's table; a disk with none (a bare filesystem) gives scheme ``none``."""
    if disk.virtual_size < SECTOR:
        return PartitionTable("none", None, [])
    mbr = disk.read(0, SECTOR)
    if mbr[510:512] != b"\x55\xaa":
        return PartitionTable("none", None, [])
    entries = [MbrEntry.unpack(mbr, 446 + 16 * i) for i in range(4)]
    if any(e.type == PROTECTIVE for e in entries):
        return _read_gpt(disk)
    if _looks_like_boot_sector(mbr, entries):
        return PartitionTable("none", None, [])
    return _read_mbr(disk, mbr, entries)


# --- MBR --------------------------------------------------------------------------------------


def _looks_like_boot_sector(mbr: bytes, entries: list[MbrEntry]) -> bool:
    """A FAT/NTFS volume boot sector also ends in 55 AA; its "entries" are nonsense."""
    if mbr[3:11] in (b"NTFS    ", b"EXFAT   ") or mbr[82:87] == b"FAT32" or mbr[54:59] == b"FAT12":
        return True
    if mbr[54:59] == b"FAT16":
        return True
    return any(e.status not in (0, 0x80) for e in entries)


def _read_mbr(disk: ReadableDisk, mbr: bytes, entries: list[MbrEntry]) -> PartitionTable:
    signature = int.from_bytes(mbr[440:444], "little")
    table = PartitionTable("mbr", f"0x{signature:08x}", [])
    total = disk.virtual_size // SECTOR
    extended: Partition | None = None
    for slot, e in enumerate(entries, 1):
        if e.type == 0 or e.sectors == 0:
            continue
        part = _mbr_partition(slot, e.lba_first, e, signature, total, container=False)
        if e.type in EXTENDED_TYPES:
            part = Partition(
                part.index, part.start, part.size, part.type, uuid=part.uuid, container=True
            )
            if extended is not None:
                table.warnings.append(f"second extended partition {slot} ignored (Linux does too)")
            else:
                extended = part
        table.partitions.append(part)
    if extended is not None:
        table.partitions.extend(_read_logicals(disk, extended, signature, total, table.warnings))
    return table


def _mbr_partition(
    index: int, first: int, e: MbrEntry, signature: int, total: int, *, container: bool
) -> Partition:
    if first + e.sectors > total:
        raise CorruptGuestError(
            f"MBR partition {index} ends at sector {first + e.sectors}, past the disk "
            f"({total} sectors)"
        )
    return Partition(
        index,
        first * SECTOR,
        e.sectors * SECTOR,
        f"{e.type:x}",
        uuid=f"{signature:08x}-{index:02x}",
        container=container,
        bootable=e.status == 0x80,
    )


def _read_logicals(
    disk: ReadableDisk, ext: Partition, signature: int, total: int, warnings: list[str]
) -> list[Partition]:
    """Follow the EBR chain; each link is relative to the extended partition's start."""
    base = ext.start // SECTOR
    ext_end = ext.end // SECTOR
    out: list[Partition] = []
    seen: set[int] = set()
    ebr_lba = base
    index = 5
    while True:
        if ebr_lba in seen:
            raise CorruptGuestError(f"logical partition chain loops back to sector {ebr_lba}")
        if len(seen) >= MAX_LOGICAL:
            raise GuestLimitError(f"more than {MAX_LOGICAL} logical partitions")
        seen.add(ebr_lba)
        if not base <= ebr_lba < ext_end:
            raise CorruptGuestError(
                f"extended boot record at sector {ebr_lba} lies outside its container"
            )
        ebr = disk.read(ebr_lba * SECTOR, SECTOR)
        if ebr[510:512] != b"\x55\xaa":
            warnings.append(f"extended boot record at sector {ebr_lba} has no signature")
            break
        data, link = MbrEntry.unpack(ebr, 446), MbrEntry.unpack(ebr, 462)
        if data.type != 0 and data.sectors:
            first = ebr_lba + data.lba_first
            if first + data.sectors > ext_end:
                raise CorruptGuestError(
                    f"logical partition {index} ends past its extended partition"
                )
            out.append(_mbr_partition(index, first, data, signature, total, container=False))
            index += 1
        if link.type not in EXTENDED_TYPES or link.sectors == 0:
            break
        ebr_lba = base + link.lba_first
    return out


# --- GPT --------------------------------------------------------------------------------------


def _guid(b: bytes) -> str:
    return str(uuid.UUID(bytes_le=bytes(b))).upper()


def _read_gpt(disk: ReadableDisk) -> PartitionTable:
    for sector in (SECTOR, 4096):
        total = disk.virtual_size // sector
        if total < 3:
            continue
        problems: list[str] = []
        for label, lba in (("primary", 1), ("backup", total - 1)):
            try:
                hdr, entries = _gpt_at(disk, sector, lba, total)
            except CorruptGuestError as exc:
                problems.append(f"{label} GPT: {exc.message}")
                continue
            table = PartitionTable("gpt", _guid(hdr.disk_guid), [])
            if label == "backup" and sector == SECTOR:
                table.warnings.extend(problems)
                table.warnings.append("primary GPT is damaged; read the backup at the disk's end")
            table.partitions = _gpt_partitions(hdr, entries, sector)
            return table
        if sector == SECTOR and problems and disk.read(SECTOR, 8) == b"EFI PART":
            raise CorruptGuestError("; ".join(problems))
    raise CorruptGuestError("protective MBR but no valid GPT header (primary or backup)")


def _gpt_at(disk: ReadableDisk, sector: int, lba: int, total: int) -> tuple[GptHeader, bytes]:
    block = disk.read(lba * sector, sector)
    hdr = GptHeader.unpack(block)
    if hdr.signature != b"EFI PART":
        raise CorruptGuestError(f"no GPT signature at LBA {lba}")
    if not GptHeader.size <= hdr.header_size <= sector:
        raise CorruptGuestError(f"GPT header size {hdr.header_size} is impossible")
    raw_hdr = bytearray(block[: hdr.header_size])
    raw_hdr[16:20] = bytes(4)
    if zlib.crc32(raw_hdr) != hdr.header_crc:
        raise CorruptGuestError(f"GPT header at LBA {lba} fails its CRC32")
    if hdr.my_lba != lba:
        raise CorruptGuestError(f"GPT header at LBA {lba} says it lives at {hdr.my_lba}")
    if hdr.entry_size < GptEntry.size or hdr.entry_size % 8:
        raise CorruptGuestError(f"GPT entry size {hdr.entry_size} is impossible")
    nbytes = hdr.num_entries * hdr.entry_size
    if nbytes > MAX_GPT_ENTRY_BYTES:
        raise GuestLimitError(f"GPT entry array of {nbytes} bytes exceeds {MAX_GPT_ENTRY_BYTES}")
    if hdr.entries_lba * sector + nbytes > total * sector or (hdr.entries_lba < 2 and lba == 1):
        raise CorruptGuestError(f"GPT entry array at LBA {hdr.entries_lba} is outside the disk")
    if hdr.first_usable > hdr.last_usable or hdr.last_usable >= total:
        raise CorruptGuestError("GPT usable range is outside the disk")
    entries = disk.read(hdr.entries_lba * sector, nbytes)
    if zlib.crc32(entries) != hdr.entries_crc:
        raise CorruptGuestError(f"GPT entry array of the header at LBA {lba} fails its CRC32")
    return hdr, entries


def _gpt_partitions(hdr: GptHeader, entries: bytes, sector: int) -> list[Partition]:
    out: list[Partition] = []
    for i in range(hdr.num_entries):
        e = GptEntry.unpack(entries, i * hdr.entry_size)
        if e.type_guid == bytes(16):
            continue
        if not hdr.first_usable <= e.first_lba <= e.last_lba <= hdr.last_usable:
            raise CorruptGuestError(
                f"GPT partition {i + 1} spans LBA {e.first_lba}-{e.last_lba}, outside the "
                f"usable range {hdr.first_usable}-{hdr.last_usable}"
            )
        name = e.name.decode("utf-16-le", "replace").split("\0", 1)[0]
        out.append(
            Partition(
                i + 1,
                e.first_lba * sector,
                (e.last_lba - e.first_lba + 1) * sector,
                _guid(e.type_guid),
                name=name or None,
                uuid=_guid(e.unique_guid),
                bootable=bool(e.attributes & 4),  # legacy BIOS bootable
            )
        )
    return out
