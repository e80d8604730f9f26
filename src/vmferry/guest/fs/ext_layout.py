"""ext2/3/4 on-disk structures and checksums (little-endian throughout).

Offsets follow the kernel's ``struct ext4_super_block`` / ``ext4_group_desc`` / ``ext4_inode``;
fields vmferry never reads are kept as ``raw`` padding so the sizes stay exact and a repack is
byte-identical.
"""

from __future__ import annotations

import crc32c as _crc32c

from vmferry._layout import Layout, raw, u8, u16, u32, u64

SUPERBLOCK_OFFSET = 1024
EXT_MAGIC = 0xEF53
EXTENT_MAGIC = 0xF30A


class Superblock(Layout, byteorder="<", size=1024):
    inodes_count: int = u32()
    blocks_count_lo: int = u32()
    r_blocks_count_lo: int = u32()
    free_blocks_count_lo: int = u32()
    free_inodes_count: int = u32()
    first_data_block: int = u32()
    log_block_size: int = u32()
    log_cluster_size: int = u32()
    blocks_per_group: int = u32()
    clusters_per_group: int = u32()
    inodes_per_group: int = u32()
    mtime: int = u32()
    wtime: int = u32()
    mnt_count: int = u16()
    max_mnt_count: int = u16()
    magic: int = u16()
    state: int = u16()
    errors: int = u16()
    minor_rev_level: int = u16()
    lastcheck: int = u32()
    checkinterval: int = u32()
    creator_os: int = u32()
    rev_level: int = u32()
    def_resuid: int = u16()
    def_resgid: int = u16()
    first_ino: int = u32()
    inode_size: int = u16()
    block_group_nr: int = u16()
    feature_compat: int = u32()
    feature_incompat: int = u32()
    feature_ro_compat: int = u32()
    uuid: bytes = raw(16)
    volume_name: bytes = raw(16)
    last_mounted: bytes = raw(64)
    algorithm_usage_bitmap: int = u32()
    prealloc_blocks: int = u8()
    prealloc_dir_blocks: int = u8()
    reserved_gdt_blocks: int = u16()
    journal_uuid: bytes = raw(16)
    journal_inum: int = u32()
    journal_dev: int = u32()
    last_orphan: int = u32()
    hash_seed: bytes = raw(16)
    def_hash_version: int = u8()
    jnl_backup_type: int = u8()
    desc_size: int = u16()
    default_mount_opts: int = u32()
    first_meta_bg: int = u32()
    mkfs_time: int = u32()
    jnl_blocks: bytes = raw(68)
    blocks_count_hi: int = u32()
    r_blocks_count_hi: int = u32()
    free_blocks_count_hi: int = u32()
    min_extra_isize: int = u16()
    want_extra_isize: int = u16()
    flags: int = u32()
    raid_stride: int = u16()
    mmp_interval: int = u16()
    mmp_block: int = u64()
    raid_stripe_width: int = u32()
    log_groups_per_flex: int = u8()
    checksum_type: int = u8()
    reserved_pad: int = u16()
    kbytes_written: int = u64()
    _snapshot_to_lpf: bytes = raw(0x26C - 0x180)  # snapshot, error log, mount opts, quota
    prj_quota_inum: int = u32()
    checksum_seed: int = u32()
    _reserved: bytes = raw(0x3FC - 0x274)
    checksum: int = u32()


class GroupDesc(Layout, byteorder="<", size=64):
    """A 64-byte descriptor; 32-byte (non-64bit) descriptors are zero-extended to this."""

    block_bitmap_lo: int = u32()
    inode_bitmap_lo: int = u32()
    inode_table_lo: int = u32()
    free_blocks_count_lo: int = u16()
    free_inodes_count_lo: int = u16()
    used_dirs_count_lo: int = u16()
    flags: int = u16()
    exclude_bitmap_lo: int = u32()
    block_bitmap_csum_lo: int = u16()
    inode_bitmap_csum_lo: int = u16()
    itable_unused_lo: int = u16()
    checksum: int = u16()
    block_bitmap_hi: int = u32()
    inode_bitmap_hi: int = u32()
    inode_table_hi: int = u32()
    free_blocks_count_hi: int = u16()
    free_inodes_count_hi: int = u16()
    used_dirs_count_hi: int = u16()
    itable_unused_hi: int = u16()
    exclude_bitmap_hi: int = u32()
    block_bitmap_csum_hi: int = u16()
    inode_bitmap_csum_hi: int = u16()
    reserved: int = u32()


GD_CHECKSUM_OFFSET = 0x1E
BG_INODE_UNINIT = 0x1
BG_BLOCK_UNINIT = 0x2


class InodeBase(Layout, byteorder="<", size=128):
    mode: int = u16()
    uid: int = u16()
    size_lo: int = u32()
    atime: int = u32()
    ctime: int = u32()
    mtime: int = u32()
    dtime: int = u32()
    gid: int = u16()
    links_count: int = u16()
    blocks_lo: int = u32()
    flags: int = u32()
    osd1: int = u32()
    block: bytes = raw(60)
    generation: int = u32()
    file_acl_lo: int = u32()
    size_high: int = u32()
    obso_faddr: int = u32()
    blocks_high: int = u16()
    file_acl_high: int = u16()
    uid_high: int = u16()
    gid_high: int = u16()
    checksum_lo: int = u16()
    reserved: int = u16()


INODE_CSUM_LO = 0x7C
INODE_EXTRA_ISIZE = 0x80
INODE_CSUM_HI = 0x82


class ExtentHeader(Layout, byteorder="<", size=12):
    magic: int = u16()
    entries: int = u16()
    max: int = u16()
    depth: int = u16()
    generation: int = u32()


class ExtentLeaf(Layout, byteorder="<", size=12):
    block: int = u32()
    len: int = u16()
    start_hi: int = u16()
    start_lo: int = u32()


class ExtentIndex(Layout, byteorder="<", size=12):
    block: int = u32()
    leaf_lo: int = u32()
    leaf_hi: int = u16()
    unused: int = u16()


class DirEntryHead(Layout, byteorder="<", size=8):
    inode: int = u32()
    rec_len: int = u16()
    name_len: int = u8()
    file_type: int = u8()


# --- feature flags ----------------------------------------------------------------------------

INCOMPAT = {
    0x1: "compression",
    0x2: "filetype",
    0x4: "needs_recovery",
    0x8: "journal_dev",
    0x10: "meta_bg",
    0x40: "extent",
    0x80: "64bit",
    0x100: "mmp",
    0x200: "flex_bg",
    0x400: "ea_inode",
    0x1000: "dirdata",
    0x2000: "metadata_csum_seed",
    0x4000: "large_dir",
    0x8000: "inline_data",
    0x10000: "encrypt",
    0x20000: "casefold",
}
#: Incompatible features a reader can handle (everything else is refused by name).
INCOMPAT_READ_OK = {
    "filetype", "meta_bg", "extent", "64bit", "mmp", "flex_bg", "ea_inode",
    "metadata_csum_seed", "large_dir", "encrypt", "casefold",
}  # fmt: skip

RO_COMPAT = {
    0x1: "sparse_super",
    0x2: "large_file",
    0x4: "btree_dir",
    0x8: "huge_file",
    0x10: "uninit_bg",
    0x20: "dir_nlink",
    0x40: "extra_isize",
    0x80: "has_snapshot",
    0x100: "quota",
    0x200: "bigalloc",
    0x400: "metadata_csum",
    0x800: "replica",
    0x1000: "read-only",
    0x2000: "project",
    0x4000: "shared_blocks",
    0x8000: "verity",
    0x10000: "orphan_present",
}
#: Read-only-compatible features vmferry's writer keeps consistent.
RO_COMPAT_WRITE_OK = {
    "sparse_super", "large_file", "btree_dir", "huge_file", "uninit_bg", "dir_nlink",
    "extra_isize", "metadata_csum", "verity", "orphan_present",
}  # fmt: skip

COMPAT = {
    0x1: "dir_prealloc",
    0x2: "imagic_inodes",
    0x4: "has_journal",
    0x8: "ext_attr",
    0x10: "resize_inode",
    0x20: "dir_index",
    0x40: "lazy_bg",
    0x200: "sparse_super2",
    0x400: "fast_commit",
    0x800: "stable_inodes",
    0x1000: "orphan_file",
}

INCOMPAT_RECOVER = 0x4
INCOMPAT_META_BG = 0x10
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_CSUM_SEED = 0x2000
INCOMPAT_LARGEDIR = 0x4000
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_HUGE_FILE = 0x8
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_METADATA_CSUM = 0x400

COMPAT_DIR_INDEX = 0x20
#: where an htree root's dx_root_info starts: after the '.' (12 bytes) and '..' (12) entries
DX_ROOT_INFO = 0x18

# inode flags
EXT4_INDEX_FL = 0x1000
EXT4_ENCRYPT_FL = 0x800
EXT4_IMMUTABLE_FL = 0x10
EXT4_APPEND_FL = 0x20
EXT4_HUGE_FILE_FL = 0x40000
EXT4_EXTENTS_FL = 0x80000
EXT4_VERITY_FL = 0x100000
EXT4_EA_INODE_FL = 0x200000
EXT4_INLINE_DATA_FL = 0x10000000
EXT4_CASEFOLD_FL = 0x40000000


def feature_names(mask: int, table: dict[int, str]) -> list[str]:
    """Names of the bits set in ``mask``; unknown bits as ``0x...``."""
    out = []
    bit = 1
    while bit <= mask:
        if mask & bit:
            out.append(table.get(bit, f"{bit:#x}"))
        bit <<= 1
    return out


# --- checksums --------------------------------------------------------------------------------


def crc32c_raw(seed: int, data: bytes | bytearray | memoryview) -> int:
    """ext4's ``ext4_chksum``: CRC32C continued from ``seed`` with no final inversion.

    The ``crc32c`` module's value is the inverted form, hence the two XORs.
    """
    return _crc32c.crc32c(data, seed ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def _crc16_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC16 = _crc16_table()


def crc16(crc: int, data: bytes | bytearray | memoryview) -> int:
    """CRC-16 (poly 0x8005, reflected) as ext4's uninit_bg group checksum uses it."""
    for b in bytes(data):
        crc = (crc >> 8) ^ _CRC16[(crc ^ b) & 0xFF]
    return crc
