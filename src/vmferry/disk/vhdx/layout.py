"""VHDX on-disk structures and constants (MS-VHDX v1.0), declared once for read and write.

Everything is little-endian.  GUIDs are stored in Microsoft's mixed-endian layout, which is
``uuid.UUID(bytes_le=...)``.  Checksums are CRC-32C over the whole structure with the checksum
field zeroed.
"""

from __future__ import annotations

import uuid

import crc32c as _crc32c

from vmferry._layout import Layout, raw, u16, u32, u64

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

FILE_ID_SIGNATURE = b"vhdxfile"
HEADER_SIGNATURE = b"head"
REGION_SIGNATURE = b"regi"
METADATA_SIGNATURE = b"metadata"
LOG_ENTRY_SIGNATURE = b"loge"
LOG_DESC_SIGNATURE = b"desc"
LOG_ZERO_SIGNATURE = b"zero"
LOG_DATA_SIGNATURE = b"data"

HEADER_OFFSETS = (64 * KiB, 128 * KiB)
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
HEADER_SIZE = 4 * KiB
REGION_TABLE_SIZE = 64 * KiB
HEADER_AREA_END = 1 * MiB
LOG_SECTOR = 4 * KiB
MAX_REGION_ENTRIES = 2047
MAX_METADATA_ENTRIES = 2047
METADATA_TABLE_SIZE = 64 * KiB
MAX_METADATA_ITEM = 1 * MiB
MAX_VIRTUAL_SIZE = 64 * TiB
MIN_BLOCK = 1 * MiB
MAX_BLOCK = 256 * MiB
SECTOR_BITMAP_BLOCK = 1 * MiB

# Payload block states (MS-VHDX 2.5.1.1); 5 is the 0.95-draft value of UNMAPPED.
PAYLOAD_NOT_PRESENT = 0
PAYLOAD_UNDEFINED = 1
PAYLOAD_ZERO = 2
PAYLOAD_UNMAPPED = 3
PAYLOAD_UNMAPPED_V095 = 5
PAYLOAD_FULLY_PRESENT = 6
PAYLOAD_PARTIALLY_PRESENT = 7
PAYLOAD_STATE_NAMES = {
    0: "NOT_PRESENT",
    1: "UNDEFINED",
    2: "ZERO",
    3: "UNMAPPED",
    5: "UNMAPPED(v0.95)",
    6: "FULLY_PRESENT",
    7: "PARTIALLY_PRESENT",
}
# Sector bitmap block states (MS-VHDX 2.5.1.2).
SB_NOT_PRESENT = 0
SB_PRESENT = 6

BAT_STATE_MASK = 0x7
BAT_OFFSET_MASK = ~((1 << 20) - 1) & 0xFFFFFFFFFFFFFFFF


def guid(text: str) -> uuid.UUID:
    return uuid.UUID(text)


BAT_REGION = guid("2dc27766-f623-4200-9d64-115e9bfd4a08")
METADATA_REGION = guid("8b7ca206-4790-4b9a-b8fe-575f050f886e")
KNOWN_REGIONS = {BAT_REGION: "BAT", METADATA_REGION: "metadata"}

MD_FILE_PARAMETERS = guid("caa16737-fa36-4d43-b3b6-33f0aa44e76b")
MD_VIRTUAL_DISK_SIZE = guid("2fa54224-cd1b-4876-b211-5dbed83bf4b8")
MD_PAGE83 = guid("beca12ab-b2e6-4523-93ef-c309e000c746")
MD_LOGICAL_SECTOR = guid("8141bf1d-a96f-4709-ba47-f233a8faab5f")
MD_PHYSICAL_SECTOR = guid("cda348c7-445d-4471-9cc9-e9885251c556")
MD_PARENT_LOCATOR = guid("a8d35f2d-b30b-454d-abf7-d3d84834ab0c")
KNOWN_METADATA = {
    MD_FILE_PARAMETERS: "file parameters",
    MD_VIRTUAL_DISK_SIZE: "virtual disk size",
    MD_PAGE83: "virtual disk id",
    MD_LOGICAL_SECTOR: "logical sector size",
    MD_PHYSICAL_SECTOR: "physical sector size",
    MD_PARENT_LOCATOR: "parent locator",
}
PARENT_LOCATOR_VHDX = guid("b04aefb7-d19e-4a81-b789-25b8e9445913")

MD_FLAG_IS_USER = 1
MD_FLAG_IS_VIRTUAL_DISK = 2
MD_FLAG_IS_REQUIRED = 4
FP_LEAVE_BLOCKS_ALLOCATED = 1
FP_HAS_PARENT = 2
REGION_REQUIRED = 1

ZERO_GUID = bytes(16)


def guid_from_le(data: bytes) -> uuid.UUID:
    return uuid.UUID(bytes_le=bytes(data))


def guid_text(data: bytes) -> str:
    """Lower-case canonical text of an on-disk GUID."""
    return str(uuid.UUID(bytes_le=bytes(data)))


def new_guid() -> bytes:
    return uuid.uuid4().bytes_le


def crc32c(data: bytes | bytearray | memoryview) -> int:
    return _crc32c.crc32c(data)


def checksum_with_field_zeroed(buf: bytes | bytearray, field_offset: int = 4) -> int:
    """CRC-32C of ``buf`` as if its 4-byte checksum field at ``field_offset`` were zero."""
    tmp = bytearray(buf)
    tmp[field_offset : field_offset + 4] = bytes(4)
    return crc32c(tmp)


def seal(buf: bytearray, field_offset: int = 4) -> bytearray:
    """Fill in the checksum field of a structure in place and return it."""
    buf[field_offset : field_offset + 4] = bytes(4)
    buf[field_offset : field_offset + 4] = crc32c(buf).to_bytes(4, "little")
    return buf


class FileIdentifier(Layout, byteorder="<", size=520):
    signature: bytes = raw(8, FILE_ID_SIGNATURE)
    creator: bytes = raw(512)  # UTF-16LE, NUL padded


class Header(Layout, byteorder="<", size=4096):
    signature: bytes = raw(4, HEADER_SIGNATURE)
    checksum: int = u32()
    sequence_number: int = u64()
    file_write_guid: bytes = raw(16)
    data_write_guid: bytes = raw(16)
    log_guid: bytes = raw(16)
    log_version: int = u16()
    version: int = u16(1)
    log_length: int = u32()
    log_offset: int = u64()
    reserved: bytes = raw(4016)


class RegionTableHeader(Layout, byteorder="<", size=16):
    signature: bytes = raw(4, REGION_SIGNATURE)
    checksum: int = u32()
    entry_count: int = u32()
    reserved: int = u32()


class RegionTableEntry(Layout, byteorder="<", size=32):
    guid: bytes = raw(16)
    file_offset: int = u64()
    length: int = u32()
    required: int = u32()


class MetadataTableHeader(Layout, byteorder="<", size=32):
    signature: bytes = raw(8, METADATA_SIGNATURE)
    reserved: int = u16()
    entry_count: int = u16()
    reserved2: bytes = raw(20)


class MetadataTableEntry(Layout, byteorder="<", size=32):
    item_id: bytes = raw(16)
    offset: int = u32()
    length: int = u32()
    flags: int = u32()
    reserved: int = u32()


class FileParameters(Layout, byteorder="<", size=8):
    block_size: int = u32()
    flags: int = u32()


class ParentLocatorHeader(Layout, byteorder="<", size=20):
    locator_type: bytes = raw(16)
    reserved: int = u16()
    key_value_count: int = u16()


class ParentLocatorEntry(Layout, byteorder="<", size=12):
    key_offset: int = u32()
    value_offset: int = u32()
    key_length: int = u16()
    value_length: int = u16()


class LogEntryHeader(Layout, byteorder="<", size=64):
    signature: bytes = raw(4, LOG_ENTRY_SIGNATURE)
    checksum: int = u32()
    entry_length: int = u32()
    tail: int = u32()
    sequence_number: int = u64()
    descriptor_count: int = u32()
    reserved: int = u32()
    log_guid: bytes = raw(16)
    flushed_file_offset: int = u64()
    last_file_offset: int = u64()


class LogDescriptor(Layout, byteorder="<", size=32):
    """A data ("desc") or zero ("zero") descriptor; the zero form reads the same bytes as
    (reserved, zero_length) in place of (trailing_bytes, leading_bytes)."""

    signature: bytes = raw(4)
    trailing_bytes: bytes = raw(4)
    leading_bytes: bytes = raw(8)
    file_offset: int = u64()
    sequence_number: int = u64()


class LogDataSector(Layout, byteorder="<", size=4096):
    signature: bytes = raw(4, LOG_DATA_SIGNATURE)
    sequence_high: int = u32()
    data: bytes = raw(4084)
    sequence_low: int = u32()


def descriptor_sectors(count: int) -> int:
    """4 KiB sectors holding the entry header (two descriptor slots) and ``count`` descriptors."""
    return (count + 2 + 127) // 128


def chunk_ratio(logical_sector_size: int, block_size: int) -> int:
    return (1 << 23) * logical_sector_size // block_size


def bat_entry_count(virtual_size: int, block_size: int, ratio: int, has_parent: bool) -> int:
    """Entries the BAT must hold (MS-VHDX 2.5): payload entries plus interleaved bitmap ones."""
    data_blocks = -(-virtual_size // block_size)
    if has_parent:
        return -(-data_blocks // ratio) * (ratio + 1)
    if data_blocks == 0:
        return 0
    return data_blocks + (data_blocks - 1) // ratio
