"""qcow2 on-disk structures and constants (qemu docs/interop/qcow2.txt), big-endian throughout.

The header is a fixed 72-byte version-2 part, a 32-byte version-3 part, then optional
"additional fields" (only ``compression_type`` is defined) up to ``header_length``, then header
extensions (type, length, data padded to 8) ending with a zero type, then the backing file name.
All of it lives in the first cluster.
"""

from __future__ import annotations

import sys
from array import array

from vmferry._layout import Layout, raw, u8, u16, u32, u64

MAGIC = b"QFI\xfb"
V2_HEADER_SIZE = 72
V3_HEADER_SIZE = 104
#: what we write for version 3: the 104 bytes, the compression type byte and 7 padding bytes
V3_HEADER_WRITE_SIZE = 112

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # qemu's implementation limit (2 MiB clusters)
MAX_BACKING_NAME = 1023
MAX_L1_BYTES = 32 * 1024 * 1024  # qemu's QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 * 1024 * 1024  # qemu's QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA = 1024
MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024

# incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)
INCOMPAT_NAMES = {
    0: "dirty bit",
    1: "corrupt bit",
    2: "external data file",
    3: "compression type",
    4: "extended L2 entries",
}
# compatible and autoclear bits
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# table entries
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55
FLAG_COPIED = 1 << 63  # refcount is exactly one (L1 and standard L2 entries)
FLAG_COMPRESSED = 1 << 62
FLAG_ZERO = 1  # standard cluster descriptor bit 0 (version 3, not with extended L2)
L2_RESERVED_MASK = 0x3F00_0000_0000_01FE  # bits 1-8 and 56-61 of a standard descriptor
SUBCLUSTERS = 32  # per cluster with extended L2 entries


class HeaderV2(Layout, byteorder=">", size=V2_HEADER_SIZE):
    magic: bytes = raw(4)
    version: int = u32()
    backing_file_offset: int = u64()
    backing_file_size: int = u32()
    cluster_bits: int = u32()
    size: int = u64()
    crypt_method: int = u32()
    l1_size: int = u32()
    l1_table_offset: int = u64()
    refcount_table_offset: int = u64()
    refcount_table_clusters: int = u32()
    nb_snapshots: int = u32()
    snapshots_offset: int = u64()


class HeaderV3(Layout, byteorder=">", size=V3_HEADER_SIZE - V2_HEADER_SIZE):
    incompatible_features: int = u64()
    compatible_features: int = u64()
    autoclear_features: int = u64()
    refcount_order: int = u32()
    header_length: int = u32()


class ExtHeader(Layout, byteorder=">", size=8):
    type: int = u32()
    length: int = u32()


class SnapshotHeader(Layout, byteorder=">", size=40):
    l1_table_offset: int = u64()
    l1_size: int = u32()
    id_str_size: int = u16()
    name_size: int = u16()
    date_sec: int = u32()
    date_nsec: int = u32()
    vm_clock_nsec: int = u64()
    vm_state_size: int = u32()
    extra_data_size: int = u32()


class BitmapsExt(Layout, byteorder=">", size=24):
    nb_bitmaps: int = u32()
    reserved: int = u32()
    bitmap_directory_size: int = u64()
    bitmap_directory_offset: int = u64()


class BitmapDirEntry(Layout, byteorder=">", size=24):
    bitmap_table_offset: int = u64()
    bitmap_table_size: int = u32()
    flags: int = u32()
    type: int = u8()
    granularity_bits: int = u8()
    name_size: int = u16()
    extra_data_size: int = u32()


_BIG = sys.byteorder == "big"


def be64_array(buf: bytes | bytearray | memoryview) -> array:
    """A table of big-endian u64 entries as a native ``array('Q')`` (one copy, C speed)."""
    table = array("Q")
    table.frombytes(buf)
    if not _BIG:
        table.byteswap()
    return table


def be64_bytes(table: array, start: int = 0, stop: int | None = None) -> bytes:
    """The big-endian bytes of ``table[start:stop]``."""
    part = table[start:stop]
    if not _BIG:
        part.byteswap()
    return part.tobytes()


_RC_TYPECODES = {3: "B", 4: "H", 5: "I", 6: "Q"}


def refcount_typecode(order: int) -> str | None:
    """array typecode for byte-aligned refcount widths; None for 1/2/4-bit refcounts."""
    code = _RC_TYPECODES.get(order)
    if code is not None and array(code).itemsize * 8 != 1 << order:
        return None
    return code


def decode_refcounts(buf: bytes, order: int) -> list[int] | array:
    """Every refcount of one block (any width 1..64 bits, big-endian, bit 0 = LSB)."""
    code = refcount_typecode(order)
    if code is not None:
        block = array(code)
        block.frombytes(buf)
        if not _BIG and block.itemsize > 1:
            block.byteswap()
        return block
    bits = 1 << order
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    return [(b >> (i * bits)) & mask for b in buf for i in range(per_byte)]


def encode_refcounts(block: array) -> bytes:
    if not _BIG and block.itemsize > 1:
        block = array(block.typecode, block)
        block.byteswap()
    return block.tobytes()
