"""XFS file content: rewritten inside the blocks the file owns, extended into new ones.

Why in place first: the fix rules rewrite small configuration files (fstab, grub.cfg) whose new
content is a few bytes longer or shorter than the old, and XFS gives every regular file at least
one whole block.  Rewriting data inside the file's own extents and changing ``di_size`` touches
no allocation structure at all, so there is nothing to get half right.  Blocks past the new end
of file stay allocated to the file: XFS allows that (speculative preallocation leaves the same
shape) and ``xfs_repair`` accepts it.  Content past the last block the file owns (an initramfs
growing by an appended driver archive) gets new blocks from :mod:`.xfs_alloc`, added to the
inode's in-inode extent list.

What is refused, before anything is written (``GuestWriteRefusedError`` with the reason):
content over a hole or an unwritten extent, growth that cannot be allocated (see
:mod:`.xfs_alloc`) or would overflow the in-inode extent list, growth of a file whose extent map
is a B+tree, realtime, immutable/append-only files, files sharing blocks (reflink flag and a
record in the reference-count B+tree: :mod:`.xfs_refcount`), version 1 inodes, unknown feature
bits and log-incompat bits (items only a dirty log holds), and a log that is not known to be
clean (:mod:`vmferry.guest.fs.xfs_log`). New entries are :mod:`vmferry.guest.fs.xfs_create`'s
job.

v5 (CRC) inodes are verified before and checksummed after the rewrite; ``di_changecount`` is
bumped, ``di_lsn`` is left alone (no log record describes this change, and a clean log is never
replayed), mtime/ctime become now, in the bigtime encoding when the inode has that flag.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from vmferry.guest.errors import CorruptGuestError, GuestWriteRefusedError
from vmferry.guest.fs import clock, xfs_alloc, xfs_refcount, xfs_rmap
from vmferry.guest.fs.xfs_layout import (
    BIGTIME_EPOCH_OFFSET,
    DIFLAG2_BIGTIME,
    DIFLAG2_REFLINK,
    DIFLAG_APPEND,
    DIFLAG_IMMUTABLE,
    DIFLAG_REALTIME,
    DINODE_V3_CRC,
    FEATURES2,
    FMT_BTREE,
    FMT_EXTENTS,
    FMT_LOCAL,
    INCOMPAT,
    LOG_INCOMPAT,
    RO_COMPAT,
    VERSION_BITS,
    DinodeV3,
    bmbt_pack,
    cksum_ok,
    names,
    set_cksum,
)
from vmferry.guest.fs.xfs_log import check_log_clean

if TYPE_CHECKING:
    from vmferry.guest.fs.xfs import XfsFilesystem, XfsInode
    from vmferry.guest.overlay import WritableDisk

#: feature bits whose presence changes nothing an in-place content rewrite touches
INCOMPAT_WRITE_OK = {"ftype", "sparse_inodes", "meta_uuid", "bigtime"}
RO_COMPAT_WRITE_OK = {"finobt", "rmapbt", "reflink", "inobtcount"}
VERSION_BITS_WRITE_OK = {
    "attr", "nlink", "quota", "align", "dalign", "logv2", "sector", "extflg", "dirv2", "morebits"
}  # fmt: skip
FEATURES2_WRITE_OK = {"lazysbcount", "attr2", "projid32", "crc", "ftype"}
INCOMPAT_META_UUID = 0x4
RO_COMPAT_REFLINK = 0x4
MAX_WRITE = 256 << 20  # configuration files and initramfs archives, not disk images
CORE_SIZE, CORE_MTIME, CORE_CTIME, CORE_SIZE_AT = 96, 40, 48, 56
CORE_NBLOCKS, CORE_NEXTENTS = 64, 76
_REFUSED = "nothing was written"


def check_writable(fs: XfsFilesystem) -> None:
    """Refuse (named) unless vmferry can write this filesystem without a half-edit."""
    if getattr(fs.dev, "write", None) is None:
        raise GuestWriteRefusedError("this filesystem was opened read-only")
    sb = fs.sb
    if not 9 <= sb.sectlog <= 15 or sb.sectsize != 1 << sb.sectlog:
        raise CorruptGuestError(f"XFS sector size {sb.sectsize} is impossible")
    if sb.inprogress:
        raise GuestWriteRefusedError("mkfs.xfs never finished on this filesystem")
    if fs.v5:
        bad = [n for n in names(sb.features_incompat, INCOMPAT) if n not in INCOMPAT_WRITE_OK]
        bad += [n for n in names(sb.features_ro_compat, RO_COMPAT) if n not in RO_COMPAT_WRITE_OK]
        if sb.features_log_incompat:
            log = names(sb.features_log_incompat, LOG_INCOMPAT)
            raise GuestWriteRefusedError(
                f"the XFS log holds items that need log feature(s) {', '.join(log)}: the "
                "filesystem was not cleanly unmounted",
                hint="mount and cleanly unmount it (or boot the guest) first; " + _REFUSED,
            )
    else:
        bad = [
            n for n in names(sb.versionnum & 0xFFF0, VERSION_BITS) if n not in VERSION_BITS_WRITE_OK
        ]
        if sb.versionnum & 0x8000:
            bad += [n for n in names(sb.features2, FEATURES2) if n not in FEATURES2_WRITE_OK]
    if bad:
        raise GuestWriteRefusedError(
            f"vmferry does not write XFS filesystems with feature(s) {', '.join(bad)}",
            hint=_REFUSED,
        )
    if not fs.log_known_clean:
        check_log_clean(fs.dev, sb)
        fs.log_known_clean = True


def write_file(fs: XfsFilesystem, path: str, data: bytes, *, append: bool = False) -> None:
    """Replace (or extend) the content of the regular file ``path`` inside its own blocks."""
    node, writes, inode = plan_rewrite(fs, path, data, append=append)
    dev: WritableDisk = fs.dev  # type: ignore[assignment]  # check_writable saw .write
    for offset, chunk in writes:  # data first, then the inode that makes it visible
        dev.write(offset, chunk)
    dev.write(node.offset, inode)


def plan_rewrite(
    fs: XfsFilesystem, path: str, data: bytes, *, append: bool = False
) -> tuple[XfsInode, list[tuple[int, bytes]], bytes]:
    """(inode, data writes, new inode bytes) for ``data`` as the content of ``path``.

    With ``append`` the data goes after the current end of file instead: the partial last
    block is completed and blocks the file already owns past its end are filled.  Every check
    happens here, so calling it alone (``check_write_file``) tells whether the write would be
    refused, and nothing is written until all of it is known to fit.
    """
    check_writable(fs)
    node = fs.resolve(path)
    if node.kind != "file":
        raise GuestWriteRefusedError(f"{path}: not a regular file", hint=_REFUSED)
    reflinked = _check_inode(fs, node, path)
    bs = fs.block_size
    extents = _checked_extents(fs, node, path)
    if reflinked:  # the flag outlives the sharing (dracut's cp --reflink=auto): look
        xfs_refcount.check_unshared(fs, extents, path)
    first = node.core.size // bs if append else 0  # first file block written
    payload = data
    if append:
        payload = _block_head(fs, extents, first, node.core.size % bs) + data
    if len(payload) > MAX_WRITE:
        raise GuestWriteRefusedError(f"{path}: {len(payload)} bytes is over {MAX_WRITE}")
    new_size = first * bs + len(payload)
    need = -(-new_size // bs)
    writes: list[tuple[int, bytes]] = []
    covered = first  # file blocks [first, covered) are mapped
    for fileoff, fsb, count, unwritten in extents:
        if covered >= need:
            break
        if fileoff + count <= covered:
            continue
        if fileoff > covered:
            raise _no_room(path, new_size, f"block {covered} of the file is a hole")
        if unwritten:
            raise _no_room(path, new_size, f"block {covered} of the file is unwritten")
        skip = covered - fileoff
        n = min(count - skip, need - covered)
        chunk = payload[(covered - first) * bs : (covered - first + n) * bs]
        writes.append((fs._fsb_offset(fsb + skip), chunk.ljust(n * bs, b"\0")))
        covered += n
    if covered < need:
        return _grown(fs, node, path, extents, payload, first, covered, need, writes, new_size)
    return node, writes, _rewritten_inode(node, new_size)


def _grown(
    fs: XfsFilesystem, node: XfsInode, path: str, extents: list[tuple[int, int, int, bool]],
    payload: bytes, first: int, covered: int, need: int, writes: list[tuple[int, bytes]],
    new_size: int,
) -> tuple[XfsInode, list[tuple[int, bytes]], bytes]:  # fmt: skip
    """The plan when file blocks ``[covered, need)`` must be allocated (past every extent)."""
    bs = fs.block_size
    if node.core.format != FMT_EXTENTS:
        raise _no_room(
            path, new_size, "its extent map is a B+tree, and vmferry only extends in-inode maps"
        )
    count = need - covered
    sb = fs.sb
    goal = extents[-1][1] + extents[-1][2] if extents else None
    home_ag = node.ino >> (sb.agblklog + sb.inopblog)
    bufs = xfs_alloc.Buffers(fs)

    def rmap(trial: xfs_alloc.Buffers, pieces: list[tuple[int, int]]) -> None:
        if xfs_alloc.has_rmapbt(fs):  # who owns the new blocks, for the reverse-mapping B+tree
            xfs_rmap.record_growth(
                fs, trial, node.ino, extents, merged_extents(extents, covered, pieces)
            )

    pieces = xfs_alloc.allocate(fs, bufs, count, goal, home_ag, path, rmap)
    recs = merged_extents(extents, covered, pieces)
    pos = covered
    for fsb, n in pieces:
        chunk = payload[(pos - first) * bs : (pos - first + n) * bs]
        writes.append((fs._fsb_offset(fsb), chunk.ljust(n * bs, b"\0")))
        pos += n
    if len(recs) * 16 > len(node.fork):
        raise _no_room(
            path, new_size, f"{len(recs)} extents would overflow the inode (a B+tree extent map "
            "would be needed)",
        )  # fmt: skip
    raw = bytearray(node.raw)
    start = 176 if node.core.version == 3 else 100  # the data fork opens the literal area
    fork = b"".join(bmbt_pack(*r) for r in recs)
    raw[start : start + len(node.fork)] = fork.ljust(len(node.fork), b"\0")
    struct.pack_into(">Q", raw, CORE_NBLOCKS, node.core.nblocks + count)
    struct.pack_into(">I", raw, CORE_NEXTENTS, len(recs))
    writes += bufs.writes()  # data first, then the allocation records, then the inode
    return node, writes, inode_touched(node, raw, new_size)


def merged_extents(
    extents: list[tuple[int, int, int, bool]], covered: int, pieces: list[tuple[int, int]]
) -> list[tuple[int, int, int, bool]]:
    """The extent list with ``pieces`` mapped from file block ``covered`` on (merged when
    contiguous, records capped at the 21-bit length)."""
    recs = list(extents)
    pos = covered
    for fsb, n in pieces:
        while n:
            last = recs[-1] if recs else None
            if last and not last[3] and last[0] + last[2] == pos and last[1] + last[2] == fsb:
                grow = min(n, xfs_alloc.MAX_EXTLEN - last[2])
                if grow:
                    recs[-1] = (last[0], last[1], last[2] + grow, False)
                    pos, fsb, n = pos + grow, fsb + grow, n - grow
                    continue
            step = min(n, xfs_alloc.MAX_EXTLEN)
            recs.append((pos, fsb, step, False))
            pos, fsb, n = pos + step, fsb + step, n - step
    return recs


def _block_head(
    fs: XfsFilesystem, extents: list[tuple[int, int, int, bool]], block: int, length: int
) -> bytes:
    """The first ``length`` bytes of file block ``block`` (zeros for a hole or unwritten)."""
    if not length:
        return b""
    for fileoff, fsb, count, unwritten in extents:
        if fileoff <= block < fileoff + count and not unwritten:
            return fs._read_fsb(fsb + block - fileoff, 1, "data")[:length]
    return bytes(length)


def _check_inode(fs: XfsFilesystem, node: XfsInode, path: str) -> bool:
    """Refuse inodes vmferry does not write; True when the reflink flag is set."""
    core = node.core
    reflinked = False
    if core.version == 3:
        tail = DinodeV3.unpack(node.raw, CORE_SIZE)
        if not cksum_ok(node.raw, DINODE_V3_CRC):
            raise CorruptGuestError(f"{path}: XFS inode {node.ino} fails its checksum")
        sb = fs.sb
        uuid = sb.meta_uuid if sb.features_incompat & INCOMPAT_META_UUID else sb.uuid
        if tail.ino != node.ino or tail.uuid != uuid:
            raise CorruptGuestError(f"{path}: XFS inode {node.ino} belongs elsewhere")
        reflinked = bool(tail.flags2 & DIFLAG2_REFLINK)
        if reflinked and not sb.features_ro_compat & RO_COMPAT_REFLINK:
            raise CorruptGuestError(f"{path}: XFS inode {node.ino} is reflinked without reflink")
    elif core.version != 2 or fs.v5:
        raise GuestWriteRefusedError(
            f"{path}: vmferry does not write XFS version {core.version} inodes", hint=_REFUSED
        )
    for flag, why in (
        (DIFLAG_REALTIME, "lives on the realtime device"),
        (DIFLAG_IMMUTABLE, "is immutable"),
        (DIFLAG_APPEND, "is append-only"),
    ):
        if core.flags & flag:
            raise GuestWriteRefusedError(f"{path}: the file {why}", hint=_REFUSED)
    if core.format == FMT_LOCAL:
        raise CorruptGuestError(
            f"{path}: XFS inode {node.ino} is a regular file in local format, which XFS never "
            "writes"
        )
    if core.format not in (FMT_EXTENTS, FMT_BTREE):
        raise CorruptGuestError(f"{path}: XFS inode {node.ino} data fork format {core.format}")
    return reflinked


def _rewritten_inode(node: XfsInode, size: int) -> bytes:
    """The inode with the new size, times now, and (v5) change count and checksum."""
    return inode_touched(node, bytearray(node.raw), size)


def inode_touched(node: XfsInode, raw: bytearray, size: int) -> bytes:
    """``raw`` (``node``'s bytes, maybe with a new fork) with size, mtime/ctime, v5 count, CRC."""
    struct.pack_into(">Q", raw, CORE_SIZE_AT, size)
    bigtime = False
    if node.core.version == 3:
        tail = DinodeV3.unpack(raw, CORE_SIZE)
        bigtime = bool(tail.flags2 & DIFLAG2_BIGTIME)
        struct.pack_into(">Q", raw, CORE_SIZE + 8, (tail.changecount + 1) & ((1 << 64) - 1))
    stamp = timestamp(clock.now_ns(), bigtime)
    raw[CORE_MTIME : CORE_MTIME + 8] = stamp
    raw[CORE_CTIME : CORE_CTIME + 8] = stamp
    if node.core.version == 3:
        set_cksum(raw, DINODE_V3_CRC)
    return bytes(raw)


def _checked_extents(
    fs: XfsFilesystem, node: XfsInode, path: str
) -> list[tuple[int, int, int, bool]]:
    """The data fork's extents, refused as corrupt unless sorted, disjoint and inside one AG."""
    out = fs._extents(node)
    sb = fs.sb
    end = 0
    for fileoff, fsb, count, _ in out:
        agbno = fsb & ((1 << sb.agblklog) - 1)
        fs._fsb_offset(fsb)  # raises for a block outside the filesystem
        if count == 0 or fileoff < end or agbno + count > sb.agblocks:
            raise CorruptGuestError(f"{path}: XFS inode {node.ino} has an impossible extent map")
        end = fileoff + count
    return out


def timestamp(ns: int, bigtime: bool) -> bytes:
    sec, nsec = divmod(ns, 1_000_000_000)
    if bigtime:
        return struct.pack(">Q", (sec + BIGTIME_EPOCH_OFFSET) * 1_000_000_000 + nsec)
    if sec >= 1 << 31:
        raise GuestWriteRefusedError(
            "the current time does not fit this XFS inode's 32-bit timestamps", hint=_REFUSED
        )
    return struct.pack(">iI", sec, nsec)


def _no_room(path: str, size: int, why: str) -> GuestWriteRefusedError:
    return GuestWriteRefusedError(
        f"{path}: {size} bytes do not fit the file: {why}",
        hint=_REFUSED,
    )
