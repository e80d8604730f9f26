"""Parsing and building the VHDX header, region table and metadata region.

Every size and offset here comes from an untrusted file, so each is checked against the
region that contains it before it is used, and every failure names the structure.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from vmferry.disk.vhdx.layout import (
    BAT_REGION,
    FP_HAS_PARENT,
    FP_LEAVE_BLOCKS_ALLOCATED,
    HEADER_AREA_END,
    HEADER_SIGNATURE,
    KNOWN_METADATA,
    KNOWN_REGIONS,
    MAX_BLOCK,
    MAX_METADATA_ENTRIES,
    MAX_METADATA_ITEM,
    MAX_REGION_ENTRIES,
    MAX_VIRTUAL_SIZE,
    MD_FILE_PARAMETERS,
    MD_FLAG_IS_REQUIRED,
    MD_FLAG_IS_VIRTUAL_DISK,
    MD_LOGICAL_SECTOR,
    MD_PAGE83,
    MD_PARENT_LOCATOR,
    MD_PHYSICAL_SECTOR,
    MD_VIRTUAL_DISK_SIZE,
    METADATA_REGION,
    METADATA_SIGNATURE,
    METADATA_TABLE_SIZE,
    MIN_BLOCK,
    PARENT_LOCATOR_VHDX,
    REGION_REQUIRED,
    REGION_SIGNATURE,
    REGION_TABLE_SIZE,
    FileParameters,
    Header,
    MetadataTableEntry,
    MetadataTableHeader,
    MiB,
    ParentLocatorEntry,
    ParentLocatorHeader,
    RegionTableEntry,
    RegionTableHeader,
    checksum_with_field_zeroed,
    guid_from_le,
    seal,
)
from vmferry.errors import CorruptImageError, UnsupportedFeatureError

Reader = Callable[[int, int, str], bytes]


# --- headers ------------------------------------------------------------------------------------


def header_is_valid(buf: bytes) -> bool:
    """Signature and CRC-32C of one 4 KiB header copy."""
    if len(buf) < Header.size or buf[:4] != HEADER_SIGNATURE:
        return False
    hdr = Header.unpack(buf)
    return checksum_with_field_zeroed(buf[: Header.size]) == hdr.checksum


def pick_header(copies: list[bytes | None]) -> tuple[int, Header]:
    """The current header: the valid copy with the higher sequence number."""
    valid = [
        (Header.unpack(buf).sequence_number, i)
        for i, buf in enumerate(copies)
        if buf is not None and header_is_valid(buf)
    ]
    if not valid:
        raise CorruptImageError("both VHDX headers are invalid (bad signature or CRC-32C)")
    _seq, index = max(valid)
    buf = copies[index]
    assert buf is not None
    return index, Header.unpack(buf)


def pack_header(hdr: Header) -> bytes:
    return bytes(seal(bytearray(hdr.replace(checksum=0).pack())))


# --- region table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    guid: uuid.UUID
    offset: int
    length: int
    required: bool

    @property
    def end(self) -> int:
        return self.offset + self.length


def region_table_is_valid(buf: bytes) -> bool:
    if len(buf) < REGION_TABLE_SIZE or buf[:4] != REGION_SIGNATURE:
        return False
    hdr = RegionTableHeader.unpack(buf)
    return checksum_with_field_zeroed(buf[:REGION_TABLE_SIZE]) == hdr.checksum


def parse_region_table(buf: bytes, file_size: int) -> dict[uuid.UUID, Region]:
    """BAT and metadata regions from a validated table; unknown required regions refuse."""
    hdr = RegionTableHeader.unpack(buf)
    if hdr.entry_count > MAX_REGION_ENTRIES:
        raise CorruptImageError(f"region table claims {hdr.entry_count} entries (max 2047)")
    regions: dict[uuid.UUID, Region] = {}
    for i in range(hdr.entry_count):
        ent = RegionTableEntry.unpack(buf, RegionTableHeader.size + i * RegionTableEntry.size)
        gid = guid_from_le(ent.guid)
        region = Region(gid, ent.file_offset, ent.length, bool(ent.required & REGION_REQUIRED))
        name = KNOWN_REGIONS.get(gid)
        if name is None:
            if region.required:
                raise UnsupportedFeatureError(
                    f"VHDX has an unknown required region {gid}",
                    features=[f"region:{gid}"],
                )
            continue
        if gid in regions:
            raise CorruptImageError(f"region table lists the {name} region twice")
        if region.offset % MiB or region.length % MiB or region.length == 0:
            raise CorruptImageError(
                f"{name} region at {region.offset:#x} (+{region.length:#x}) is not 1 MiB aligned"
            )
        if region.offset < HEADER_AREA_END:
            raise CorruptImageError(f"{name} region at {region.offset:#x} overlaps the headers")
        regions[gid] = region
    for gid, name in KNOWN_REGIONS.items():
        if gid not in regions:
            raise CorruptImageError(f"region table has no {name} region")
    bat, meta = regions[BAT_REGION], regions[METADATA_REGION]
    if bat.offset < meta.end and meta.offset < bat.end:
        raise CorruptImageError("BAT and metadata regions overlap")
    return regions


def pack_region_table(regions: list[Region]) -> bytes:
    buf = bytearray(REGION_TABLE_SIZE)
    buf[: RegionTableHeader.size] = RegionTableHeader(entry_count=len(regions)).pack()
    for i, r in enumerate(regions):
        off = RegionTableHeader.size + i * RegionTableEntry.size
        ent = RegionTableEntry(r.guid.bytes_le, r.offset, r.length, int(r.required))
        buf[off : off + RegionTableEntry.size] = ent.pack()
    return bytes(seal(buf))


# --- metadata -----------------------------------------------------------------------------------


@dataclass
class Metadata:
    block_size: int
    leave_blocks_allocated: bool
    has_parent: bool
    virtual_size: int
    disk_id: str
    logical_sector_size: int
    physical_sector_size: int
    parent_locator: dict[str, str] | None = None
    locator_type: str | None = None
    items: list[tuple[str, int, int, int]] = field(default_factory=list)  # id, off, len, flags
    parent_locator_entry: tuple[int, int] | None = None  # (offset in region, length)


def parse_metadata(read: Reader, region: Region) -> Metadata:
    table = read(region.offset, METADATA_TABLE_SIZE, "VHDX metadata table")
    hdr = MetadataTableHeader.unpack(table)
    if hdr.signature != METADATA_SIGNATURE:
        raise CorruptImageError("VHDX metadata table has no 'metadata' signature")
    if hdr.entry_count > MAX_METADATA_ENTRIES:
        raise CorruptImageError(f"metadata table claims {hdr.entry_count} entries (max 2047)")
    found: dict[uuid.UUID, tuple[int, int, int]] = {}
    items: list[tuple[str, int, int, int]] = []
    for i in range(hdr.entry_count):
        ent = MetadataTableEntry.unpack(table, MetadataTableHeader.size + i * 32)
        gid = guid_from_le(ent.item_id)
        items.append((str(gid), ent.offset, ent.length, ent.flags))
        if ent.length and (ent.offset < METADATA_TABLE_SIZE or ent.length > MAX_METADATA_ITEM):
            raise CorruptImageError(
                f"metadata item {gid} at {ent.offset:#x} (+{ent.length}) is outside the item area"
            )
        if ent.offset + ent.length > region.length:
            raise CorruptImageError(
                f"metadata item {gid} at {ent.offset:#x} (+{ent.length}) "
                f"extends past the metadata region ({region.length:#x} bytes)"
            )
        if gid not in KNOWN_METADATA:
            if ent.flags & MD_FLAG_IS_REQUIRED:
                raise UnsupportedFeatureError(
                    f"VHDX has an unknown required metadata item {gid}",
                    features=[f"metadata:{gid}"],
                )
            continue
        if gid in found:
            raise CorruptImageError(f"metadata table lists {KNOWN_METADATA[gid]} twice")
        found[gid] = (ent.offset, ent.length, ent.flags)

    def item(gid: uuid.UUID, size: int | None) -> bytes:
        if gid not in found:
            raise CorruptImageError(f"VHDX metadata has no {KNOWN_METADATA[gid]} item")
        off, length, _flags = found[gid]
        if size is not None and length < size:
            raise CorruptImageError(f"VHDX {KNOWN_METADATA[gid]} item is {length} bytes")
        return read(region.offset + off, size or length, f"VHDX {KNOWN_METADATA[gid]}")

    fp = FileParameters.unpack(item(MD_FILE_PARAMETERS, 8))
    bs = fp.block_size
    if bs < MIN_BLOCK or bs > MAX_BLOCK or bs & (bs - 1):
        raise CorruptImageError(f"VHDX block size {bs} is not a power of two in 1..256 MiB")
    vsize = int.from_bytes(item(MD_VIRTUAL_DISK_SIZE, 8), "little")
    disk_id = str(guid_from_le(item(MD_PAGE83, 16)))
    lss = int.from_bytes(item(MD_LOGICAL_SECTOR, 4), "little")
    pss = int.from_bytes(item(MD_PHYSICAL_SECTOR, 4), "little")
    if lss not in (512, 4096):
        raise CorruptImageError(f"VHDX logical sector size {lss} is not 512 or 4096")
    if pss not in (512, 4096):
        raise CorruptImageError(f"VHDX physical sector size {pss} is not 512 or 4096")
    if vsize > MAX_VIRTUAL_SIZE or vsize % lss:
        raise CorruptImageError(
            f"VHDX virtual size {vsize} is over 64 TiB or not a multiple of the sector size"
        )
    md = Metadata(
        block_size=bs,
        leave_blocks_allocated=bool(fp.flags & FP_LEAVE_BLOCKS_ALLOCATED),
        has_parent=bool(fp.flags & FP_HAS_PARENT),
        virtual_size=vsize,
        disk_id=disk_id,
        logical_sector_size=lss,
        physical_sector_size=pss,
        items=items,
    )
    if MD_PARENT_LOCATOR in found:
        off, length, _flags = found[MD_PARENT_LOCATOR]
        md.parent_locator_entry = (off, length)
        blob = read(region.offset + off, length, "VHDX parent locator")
        md.locator_type, md.parent_locator = parse_parent_locator(blob)
    elif md.has_parent:
        raise CorruptImageError("differencing VHDX has no parent locator")
    return md


def parse_parent_locator(blob: bytes) -> tuple[str, dict[str, str]]:
    if len(blob) < ParentLocatorHeader.size:
        raise CorruptImageError("VHDX parent locator is shorter than its header")
    hdr = ParentLocatorHeader.unpack(blob)
    ltype = str(guid_from_le(hdr.locator_type))
    count = hdr.key_value_count
    if ParentLocatorHeader.size + count * ParentLocatorEntry.size > len(blob):
        raise CorruptImageError(f"VHDX parent locator claims {count} entries, more than fit")
    pairs: dict[str, str] = {}
    for i in range(count):
        ent = ParentLocatorEntry.unpack(blob, ParentLocatorHeader.size + i * 12)
        key = _utf16(blob, ent.key_offset, ent.key_length, "key")
        value = _utf16(blob, ent.value_offset, ent.value_length, f"value of {key!r}")
        if key in pairs:
            raise CorruptImageError(f"VHDX parent locator has key {key!r} twice")
        pairs[key] = value
    return ltype, pairs


def _utf16(blob: bytes, off: int, length: int, what: str) -> str:
    if off + length > len(blob) or length % 2 or length == 0:
        raise CorruptImageError(f"VHDX parent locator {what} at {off} (+{length}) is malformed")
    try:
        return blob[off : off + length].decode("utf-16-le")
    except UnicodeDecodeError as exc:
        raise CorruptImageError(f"VHDX parent locator {what} is not valid UTF-16") from exc


def pack_parent_locator(pairs: Mapping[str, str]) -> bytes:
    count = len(pairs)
    head = bytearray(ParentLocatorHeader(PARENT_LOCATOR_VHDX.bytes_le, 0, count).pack())
    strings = bytearray()
    base = ParentLocatorHeader.size + count * ParentLocatorEntry.size
    entries = bytearray()
    for key, value in pairs.items():
        k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
        if len(k) > 0xFFFF or len(v) > 0xFFFF:
            raise CorruptImageError(f"parent locator value for {key!r} is too long")
        koff = base + len(strings)
        strings += k
        voff = base + len(strings)
        strings += v
        entries += ParentLocatorEntry(koff, voff, len(k), len(v)).pack()
    return bytes(head + entries + strings)


def pack_metadata_region(
    *,
    block_size: int,
    flags: int,
    virtual_size: int,
    disk_id: bytes,
    logical_sector_size: int,
    physical_sector_size: int,
    parent_locator: Mapping[str, str] | None,
) -> bytes:
    """Table plus items, laid out the way Hyper-V does: items from 64 KiB on."""
    items: list[tuple[uuid.UUID, bytes, int]] = [
        (MD_FILE_PARAMETERS, FileParameters(block_size, flags).pack(), MD_FLAG_IS_REQUIRED),
        (
            MD_VIRTUAL_DISK_SIZE,
            virtual_size.to_bytes(8, "little"),
            MD_FLAG_IS_REQUIRED | MD_FLAG_IS_VIRTUAL_DISK,
        ),
        (MD_PAGE83, disk_id, MD_FLAG_IS_REQUIRED | MD_FLAG_IS_VIRTUAL_DISK),
        (
            MD_LOGICAL_SECTOR,
            logical_sector_size.to_bytes(4, "little"),
            MD_FLAG_IS_REQUIRED | MD_FLAG_IS_VIRTUAL_DISK,
        ),
        (
            MD_PHYSICAL_SECTOR,
            physical_sector_size.to_bytes(4, "little"),
            MD_FLAG_IS_REQUIRED | MD_FLAG_IS_VIRTUAL_DISK,
        ),
    ]
    if parent_locator is not None:
        items.append((MD_PARENT_LOCATOR, pack_parent_locator(parent_locator), MD_FLAG_IS_REQUIRED))
    table = bytearray(METADATA_TABLE_SIZE)
    table[:32] = MetadataTableHeader(entry_count=len(items)).pack()
    data = bytearray()
    for i, (gid, blob, fl) in enumerate(items):
        off = METADATA_TABLE_SIZE + len(data)
        ent = MetadataTableEntry(gid.bytes_le, off, len(blob), fl)
        table[32 + i * 32 : 64 + i * 32] = ent.pack()
        data += blob
        data += bytes(-len(data) % 8)
    return bytes(table + data)
