"""XFS on-disk structures and feature names, shared by the reader, the writer and the log check.

Everything on disk is big-endian except the CRC32C fields, which XFS stores little-endian.
Feature tables name every bit vmferry knows so a refusal can say which feature is in the way.
"""

from __future__ import annotations

import struct

import crc32c as _crc32c

from vmferry._layout import Layout, raw, u8, u16, u32, u64

INCOMPAT = {
    0x1: "ftype",
    0x2: "sparse_inodes",
    0x4: "meta_uuid",
    0x8: "bigtime",
    0x10: "needsrepair",
    0x20: "nrext64",
}
INCOMPAT_READ_OK = {"ftype", "sparse_inodes", "meta_uuid", "bigtime"}
FTYPE = {1: "file", 2: "dir", 3: "chr", 4: "blk", 5: "fifo", 6: "sock", 7: "symlink"}


class XfsSuperblock(Layout, byteorder=">", size=264):
    magic: bytes = raw(4)
    blocksize: int = u32()
    dblocks: int = u64()
    rblocks: int = u64()
    rextents: int = u64()
    uuid: bytes = raw(16)
    logstart: int = u64()
    rootino: int = u64()
    rbmino: int = u64()
    rsumino: int = u64()
    rextsize: int = u32()
    agblocks: int = u32()
    agcount: int = u32()
    rbmblocks: int = u32()
    logblocks: int = u32()
    versionnum: int = u16()
    sectsize: int = u16()
    inodesize: int = u16()
    inopblock: int = u16()
    fname: bytes = raw(12)
    blocklog: int = u8()
    sectlog: int = u8()
    inodelog: int = u8()
    inopblog: int = u8()
    agblklog: int = u8()
    rextslog: int = u8()
    inprogress: int = u8()
    imax_pct: int = u8()
    icount: int = u64()
    ifree: int = u64()
    fdblocks: int = u64()
    frextents: int = u64()
    uquotino: int = u64()
    gquotino: int = u64()
    qflags: int = u16()
    flags: int = u8()
    shared_vn: int = u8()
    inoalignmt: int = u32()
    unit: int = u32()
    width: int = u32()
    dirblklog: int = u8()
    logsectlog: int = u8()
    logsectsize: int = u16()
    logsunit: int = u32()
    features2: int = u32()
    bad_features2: int = u32()
    features_compat: int = u32()
    features_ro_compat: int = u32()
    features_incompat: int = u32()
    features_log_incompat: int = u32()
    crc: int = u32()
    spino_align: int = u32()
    pquotino: int = u64()
    lsn: int = u64()
    meta_uuid: bytes = raw(16)


class DinodeCore(Layout, byteorder=">", size=96):
    magic: bytes = raw(2)
    mode: int = u16()
    version: int = u8()
    format: int = u8()
    onlink: int = u16()
    uid: int = u32()
    gid: int = u32()
    nlink: int = u32()
    projid: int = u32()
    big_nextents: int = u64()
    times: bytes = raw(24)
    size: int = u64()
    nblocks: int = u64()
    extsize: int = u32()
    nextents: int = u32()
    anextents: int = u16()
    forkoff: int = u8()
    aformat: int = u8()
    dmevmask: int = u32()
    dmstate: int = u16()
    flags: int = u16()
    gen: int = u32()


FMT_LOCAL, FMT_EXTENTS, FMT_BTREE = 1, 2, 3


def bmbt_rec(buf: bytes, at: int) -> tuple[int, int, int, bool]:
    l0, l1 = struct.unpack_from(">QQ", buf, at)
    unwritten = bool(l0 >> 63)
    startoff = (l0 >> 9) & ((1 << 54) - 1)
    startblock = ((l0 & 0x1FF) << 43) | (l1 >> 21)
    count = l1 & ((1 << 21) - 1)
    return startoff, startblock, count, unwritten


def bmbt_pack(startoff: int, startblock: int, count: int, unwritten: bool) -> bytes:
    """One data fork extent record (the inverse of :func:`bmbt_rec`)."""
    l0 = (int(unwritten) << 63) | (startoff << 9) | (startblock >> 43)
    l1 = ((startblock & ((1 << 43) - 1)) << 21) | count
    return struct.pack(">QQ", l0, l1)


def bits(mask: int) -> list[int]:
    return [1 << i for i in range(32) if mask & (1 << i)]


#: read-only-compatible features (v5); none changes what an in-place content rewrite touches
RO_COMPAT = {0x1: "finobt", 0x2: "rmapbt", 0x4: "reflink", 0x8: "inobtcount"}
#: log-incompatible features: set only while the log holds items that need them
LOG_INCOMPAT = {0x1: "logged_xattrs"}
#: v4 ``versionnum`` feature bits above the version nibble
VERSION_BITS = {
    0x10: "attr",
    0x20: "nlink",
    0x40: "quota",
    0x80: "align",
    0x100: "dalign",
    0x200: "shared",
    0x400: "logv2",
    0x800: "sector",
    0x1000: "extflg",
    0x2000: "dirv2",
    0x4000: "borg",
    0x8000: "morebits",
}
#: v4 ``features2`` bits
FEATURES2 = {
    0x2: "lazysbcount",
    0x8: "attr2",
    0x10: "parent",
    0x80: "projid32",
    0x100: "crc",
    0x200: "ftype",
}

# di_flags and di_flags2
DIFLAG_REALTIME = 0x1
DIFLAG_IMMUTABLE = 0x8
DIFLAG_APPEND = 0x10
DIFLAG2_REFLINK = 0x2
DIFLAG2_BIGTIME = 0x8
DIFLAG2_NREXT64 = 0x10

DINODE_V3_CRC = 100  # offset of di_crc in a version 3 inode
DINODE_V3_SIZE = 176  # core of a version 3 inode: the literal area starts here
DINODE_V2_SIZE = 100
BIGTIME_EPOCH_OFFSET = 1 << 31  # bigtime counts nanoseconds from 1901-12-13T20:45:52Z


class DinodeV3(Layout, byteorder=">", size=80):
    """The part of a version 3 (v5 filesystem) inode after the 96-byte common core."""

    next_unlinked: int = u32()
    crc: int = u32()  # little-endian on disk: read and written with xfs_cksum helpers
    changecount: int = u64()
    lsn: int = u64()
    flags2: int = u64()
    cowextsize: int = u32()
    pad2: bytes = raw(12)
    crtime: bytes = raw(8)
    ino: int = u64()
    uuid: bytes = raw(16)


def xfs_cksum(buf: bytes | bytearray, at: int) -> int:
    """CRC32C of ``buf`` with its 4-byte checksum field at ``at`` taken as zero."""
    crc = _crc32c.crc32c(bytes(buf[:at]))
    crc = _crc32c.crc32c(b"\0\0\0\0", crc)
    return _crc32c.crc32c(bytes(buf[at + 4 :]), crc)


def cksum_ok(buf: bytes | bytearray, at: int) -> bool:
    return struct.unpack_from("<I", buf, at)[0] == xfs_cksum(buf, at)


def set_cksum(buf: bytearray, at: int) -> None:
    struct.pack_into("<I", buf, at, xfs_cksum(buf, at))


def names(mask: int, table: dict[int, str]) -> list[str]:
    """Feature names of the bits set in ``mask`` (unknown bits as hex)."""
    return [table.get(b, hex(b)) for b in bits(mask)]
