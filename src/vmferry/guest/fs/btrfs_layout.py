"""btrfs on-disk structures and numbers, little-endian, as the kernel's ``btrfs_tree.h`` says.

Only what a reader needs: the superblock, tree node headers and items, and the item bodies a
path walk touches (chunks, root items, inodes, directory entries, file extents, references).
Validation is the reader's job (``btrfs_volume``), which knows where the bytes came from.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmferry._layout import Layout, raw, u8, u16, u32, u64
from vmferry.guest.errors import CorruptGuestError

SUPER_OFFSET = 0x10000
SUPER_SIZE = 4096
MAGIC = b"_BHRfS_M"
SYS_CHUNK_ARRAY_MAX = 2048
MAX_LEVEL = 8  # levels 0..7
HEADER_SIZE = 101
ITEM_SIZE = 25  # key + data offset + data size, in a leaf
KEY_PTR_SIZE = 33  # key + child block + generation, in a node
KEY_SIZE = 17
U64_MAX = (1 << 64) - 1

# tree and object ids
ROOT_TREE = 1
CHUNK_TREE = 3
FS_TREE = 5
ROOT_TREE_DIR = 6
FIRST_FREE_OBJECTID = 256
LAST_FREE_OBJECTID = U64_MAX - 256
FIRST_CHUNK_TREE_OBJECTID = 256
EMPTY_SUBVOL_DIR = 2  # the inode number the kernel shows for a snapshot's stale nested subvolume

# key types
INODE_ITEM = 1
INODE_REF = 12
INODE_EXTREF = 13
DIR_ITEM = 84
DIR_INDEX = 96
EXTENT_DATA = 108
ROOT_ITEM = 132
ROOT_BACKREF = 144
ROOT_REF = 156
CHUNK_ITEM = 228

INCOMPAT = {
    1 << 0: "mixed_backref",
    1 << 1: "default_subvol",
    1 << 2: "mixed_groups",
    1 << 3: "compress_lzo",
    1 << 4: "compress_zstd",
    1 << 5: "big_metadata",
    1 << 6: "extended_iref",
    1 << 7: "raid56",
    1 << 8: "skinny_metadata",
    1 << 9: "no_holes",
    1 << 10: "metadata_uuid",
    1 << 11: "raid1c34",
    1 << 12: "zoned",
    1 << 13: "extent_tree_v2",
    1 << 14: "raid_stripe_tree",
    1 << 16: "simple_quota",
}
# What changes nothing for a reader of the fs trees on one device.  raid56/raid1c34 are
# multi-device profiles, zoned moves the superblock, extent_tree_v2 and raid_stripe_tree change
# how logical addresses map: all refused by name.
INCOMPAT_READ_OK = {
    "mixed_backref",
    "default_subvol",
    "mixed_groups",
    "compress_lzo",
    "compress_zstd",
    "big_metadata",
    "extended_iref",
    "skinny_metadata",
    "no_holes",
    "metadata_uuid",
    "simple_quota",
}

CSUM_TYPES = {0: "crc32c", 1: "xxhash64", 2: "sha256", 3: "blake2b"}

# block group / chunk type bits
BG_DATA, BG_SYSTEM, BG_METADATA = 1, 2, 4
BG_PROFILES = {
    1 << 3: "raid0",
    1 << 4: "raid1",
    1 << 5: "dup",
    1 << 6: "raid10",
    1 << 7: "raid5",
    1 << 8: "raid6",
    1 << 9: "raid1c3",
    1 << 10: "raid1c4",
}
BG_DUP = 1 << 5

# directory entry types (btrfs_dir_item.type)
FT_NAMES = {1: "file", 2: "dir", 3: "chr", 4: "blk", 5: "fifo", 6: "sock", 7: "symlink"}

# file extents
EXTENT_INLINE, EXTENT_REG, EXTENT_PREALLOC = 0, 1, 2
COMPRESSION = {0: "none", 1: "zlib", 2: "lzo", 3: "zstd"}


class DevItem(Layout, byteorder="<", size=98):
    devid: int = u64()
    total_bytes: int = u64()
    bytes_used: int = u64()
    io_align: int = u32()
    io_width: int = u32()
    sector_size: int = u32()
    type: int = u64()
    generation: int = u64()
    start_offset: int = u64()
    dev_group: int = u32()
    seek_speed: int = u8()
    bandwidth: int = u8()
    uuid: bytes = raw(16)
    fsid: bytes = raw(16)


class Superblock(Layout, byteorder="<", size=0x32B):
    csum: bytes = raw(32)
    fsid: bytes = raw(16)
    bytenr: int = u64()
    flags: int = u64()
    magic: bytes = raw(8)
    generation: int = u64()
    root: int = u64()
    chunk_root: int = u64()
    log_root: int = u64()
    log_root_transid: int = u64()
    total_bytes: int = u64()
    bytes_used: int = u64()
    root_dir_objectid: int = u64()
    num_devices: int = u64()
    sectorsize: int = u32()
    nodesize: int = u32()
    leafsize: int = u32()
    stripesize: int = u32()
    sys_chunk_array_size: int = u32()
    chunk_root_generation: int = u64()
    compat_flags: int = u64()
    compat_ro_flags: int = u64()
    incompat_flags: int = u64()
    csum_type: int = u16()
    root_level: int = u8()
    chunk_root_level: int = u8()
    log_root_level: int = u8()
    dev_item: bytes = raw(DevItem.size)
    label: bytes = raw(256)
    cache_generation: int = u64()
    uuid_tree_generation: int = u64()
    metadata_uuid: bytes = raw(16)
    nr_global_roots: int = u64()
    reserved: bytes = raw(216)


SYS_CHUNK_ARRAY_AT = Superblock.size


class NodeHeader(Layout, byteorder="<", size=HEADER_SIZE):
    csum: bytes = raw(32)
    fsid: bytes = raw(16)
    bytenr: int = u64()
    flags: int = u64()
    chunk_tree_uuid: bytes = raw(16)
    generation: int = u64()
    owner: int = u64()
    nritems: int = u32()
    level: int = u8()


class InodeItem(Layout, byteorder="<", size=160):
    generation: int = u64()
    transid: int = u64()
    size: int = u64()
    nbytes: int = u64()
    block_group: int = u64()
    nlink: int = u32()
    uid: int = u32()
    gid: int = u32()
    mode: int = u32()
    rdev: int = u64()
    flags: int = u64()
    sequence: int = u64()
    reserved: bytes = raw(32)
    times: bytes = raw(48)


class ChunkItem(Layout, byteorder="<", size=48):
    length: int = u64()
    owner: int = u64()
    stripe_len: int = u64()
    type: int = u64()
    io_align: int = u32()
    io_width: int = u32()
    sector_size: int = u32()
    num_stripes: int = u16()
    sub_stripes: int = u16()


STRIPE_SIZE = 32  # devid u64, offset u64, dev uuid


class FileExtentHead(Layout, byteorder="<", size=21):
    generation: int = u64()
    ram_bytes: int = u64()
    compression: int = u8()
    encryption: int = u8()
    other_encoding: int = u16()
    type: int = u8()


class FileExtentRegular(Layout, byteorder="<", size=32):
    disk_bytenr: int = u64()
    disk_num_bytes: int = u64()
    offset: int = u64()
    num_bytes: int = u64()


# root item: the few fields a reader needs, at their offsets (the item grew over the years)
ROOT_ITEM_MIN = 239
ROOT_DIRID_AT = 168
ROOT_BYTENR_AT = 176
ROOT_GENERATION_AT = 160
ROOT_FLAGS_AT = 208
ROOT_LEVEL_AT = 238
ROOT_UUID_AT, ROOT_PARENT_UUID_AT, ROOT_ITEM_V2_SIZE = 247, 263, 439
ROOT_SUBVOL_RDONLY = 1

Key = tuple[int, int, int]  # objectid, type, offset: ordered exactly as btrfs orders keys
_KEY = struct.Struct("<QBQ")


def unpack_key(buf: bytes, at: int) -> Key:
    return _KEY.unpack_from(buf, at)  # type: ignore[return-value]


@dataclass(frozen=True)
class DirEntryRaw:
    """One name in a DIR_ITEM / DIR_INDEX item."""

    location: Key
    type: int
    name: bytes


def parse_dir_items(data: bytes, where: str) -> list[DirEntryRaw]:
    """Every entry packed in one DIR_ITEM/DIR_INDEX body (hash collisions share an item)."""
    out: list[DirEntryRaw] = []
    pos = 0
    while pos < len(data):
        if pos + 30 > len(data):
            raise CorruptGuestError(f"btrfs {where}: directory entry header overruns its item")
        location = unpack_key(data, pos)
        data_len, name_len, ftype = struct.unpack_from("<HHB", data, pos + 25)
        end = pos + 30 + name_len + data_len
        if name_len == 0 or end > len(data):
            raise CorruptGuestError(f"btrfs {where}: directory entry overruns its item")
        out.append(DirEntryRaw(location, ftype, data[pos + 30 : pos + 30 + name_len]))
        pos = end
    return out


def parse_inode_refs(data: bytes, where: str) -> list[tuple[int, bytes]]:
    """``(index, name)`` of each link in an INODE_REF body (the parent is the key's offset)."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        if pos + 10 > len(data):
            raise CorruptGuestError(f"btrfs {where}: inode reference overruns its item")
        index, name_len = struct.unpack_from("<QH", data, pos)
        if pos + 10 + name_len > len(data):
            raise CorruptGuestError(f"btrfs {where}: inode reference name overruns its item")
        out.append((index, data[pos + 10 : pos + 10 + name_len]))
        pos += 10 + name_len
    return out


def parse_inode_extrefs(data: bytes, where: str) -> list[tuple[int, int, bytes]]:
    """``(parent, index, name)`` of each link in an INODE_EXTREF body (many hard links)."""
    out: list[tuple[int, int, bytes]] = []
    pos = 0
    while pos < len(data):
        if pos + 18 > len(data):
            raise CorruptGuestError(f"btrfs {where}: extended inode reference overruns")
        parent, index, name_len = struct.unpack_from("<QQH", data, pos)
        if pos + 18 + name_len > len(data):
            raise CorruptGuestError(f"btrfs {where}: extended inode reference name overruns")
        out.append((parent, index, data[pos + 18 : pos + 18 + name_len]))
        pos += 18 + name_len
    return out


def parse_root_ref(data: bytes, where: str) -> tuple[int, bytes]:
    """``(dirid, name)`` of a ROOT_REF / ROOT_BACKREF body."""
    if len(data) < 18:
        raise CorruptGuestError(f"btrfs {where}: root reference too short")
    dirid, _seq, name_len = struct.unpack_from("<QQH", data)
    if 18 + name_len > len(data) or name_len == 0:
        raise CorruptGuestError(f"btrfs {where}: root reference name overruns")
    return dirid, data[18 : 18 + name_len]


def flag_names(mask: int, table: dict[int, str]) -> list[str]:
    return [table.get(1 << i, f"bit{i}") for i in range(64) if mask & (1 << i)]
