"""XFS block allocation: free extents taken out of the AG free-space B+trees for a growing file.

Why: driver injection appends a cpio archive (hundreds of KiB to tens of MiB) to an initramfs,
and on Red Hat family guests that file lives on XFS.  Growing a file past the blocks it owns
means taking free extents, and XFS records free space twice per allocation group: the by-block
B+tree (``bnobt``, records sorted by start) and the by-count B+tree (``cntbt``, sorted by
length then start).  Both must describe the same extents, and the AGF (free block count,
longest free extent) and the superblock's free block count must add up; ``xfs_repair -n``
checks all of it.

How: every free-space record of every AG is read and cross-checked first (both trees agree,
their sum is the AGF's count, the longest is the AGF's longest); the extents are chosen on that
in-memory copy (the free extent holding the block after the file's end, so the file grows
contiguously; else the smallest extent that holds the rest, in the file's AG first; else the
largest ones); then each taken piece is removed from both trees record by record, through
write-back buffers, so nothing reaches the disk until every change is known to fit.
Record removal and insertion are done in any B+tree depth as long as no block must split or
merge (leaves keep between half and all of their capacity, node keys follow their child's
first record); a change that would need a split or merge is refused, nothing written.

The reverse-mapping records of the new blocks are :mod:`.xfs_rmap`'s job (the caller knows the
owner).  Refused by name: realtime sections, quota accounting.  The AGFL is never touched: no
split means no new B+tree block.  Each AG keeps a reserve (``agblocks // 64 + 16`` blocks, or
``// 32`` with rmapbt: room for the kernel's per-AG metadata reservations and free-list
refills), and the filesystem keeps ``min(5 %, 8192 blocks)`` free, so a grown file never leaves
the guest unable to boot.
"""

from __future__ import annotations

import bisect
import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vmferry.guest.errors import CorruptGuestError, GuestLimitError, GuestWriteRefusedError
from vmferry.guest.fs.xfs_layout import cksum_ok, set_cksum

if TYPE_CHECKING:
    from vmferry.guest.fs.xfs import XfsFilesystem

_REFUSED = "nothing was written"
INCOMPAT_META_UUID = 0x4
RO_COMPAT_RMAPBT = 0x2
QUOTA_ACCOUNTING = 0x1 | 0x8 | 0x40  # user, project, group accounting

# AGF fields (byte offsets)
AGF_SEQNO, AGF_LENGTH, AGF_ROOTS, AGF_LEVELS = 8, 12, 16, 28
AGF_FREEBLKS, AGF_LONGEST, AGF_UUID, AGF_CRC = 52, 56, 64, 216
SB_FDBLOCKS, SB_CRC = 144, 224
BTREE_CRC = 52
MAX_LEVELS = 8
MAX_TREE_BLOCKS = 1 << 18
MAX_EXTLEN = (1 << 21) - 1  # a data fork extent record counts 21 bits of blocks
MAX_PIECES = 64  # extents one allocation may add (more means free space is in crumbs)
MAX_ATTEMPTS = 32  # other free extents tried when one would make a B+tree block split or merge


class ReshapeRefused(GuestWriteRefusedError):
    """A B+tree block would have to split or merge; taking another free extent may avoid it."""

    extent: tuple[int, int] | None = None  # (AG, start) of the free extent being taken
    crowd: frozenset[tuple[int, int]] = frozenset()  # the free extents of the offending leaf


class Buffers:
    """Metadata blocks read once, edited in memory, written together once the plan is whole."""

    def __init__(self, fs: XfsFilesystem) -> None:
        self.fs = fs
        self._bufs: dict[int, bytearray] = {}
        self._dirty: dict[int, int | None] = {}  # offset -> CRC field offset (v5) or None

    def read(self, offset: int, size: int, what: str) -> bytearray:
        buf = self._bufs.get(offset)
        if buf is None:
            if offset < 0 or offset + size > self.fs.dev.virtual_size:
                raise CorruptGuestError(f"XFS {what} at byte {offset} lies past the filesystem")
            buf = self._bufs[offset] = bytearray(self.fs.dev.read(offset, size))
        return buf

    def mark(self, offset: int, crc_at: int | None) -> None:
        self._dirty[offset] = crc_at if self.fs.v5 else None

    def adopt(self, other: Buffers) -> None:
        """Take over ``other``'s buffers and edits (a trial plan that worked)."""
        self._bufs.update(other._bufs)
        self._dirty.update(other._dirty)

    def writes(self) -> list[tuple[int, bytes]]:
        """Every edited buffer, checksummed, in the order first edited."""
        out = []
        for offset, crc_at in self._dirty.items():
            buf = self._bufs[offset]
            if crc_at is not None:
                set_cksum(buf, crc_at)
            out.append((offset, bytes(buf)))
        return out


def meta_uuid(fs: XfsFilesystem) -> bytes:
    sb = fs.sb
    return sb.meta_uuid if sb.features_incompat & INCOMPAT_META_UUID else sb.uuid


class FreeTree:
    """One free-space B+tree of one AG: by block (``bnobt``) or by count (``cntbt``)."""

    def __init__(
        self, fs: XfsFilesystem, bufs: Buffers, agno: int, length: int, root: int, levels: int,
        by_count: bool,
    ) -> None:  # fmt: skip
        self.fs, self.bufs, self.agno, self.length = fs, bufs, agno, length
        self.root, self.levels, self.by_count = root, levels, by_count
        self.name = "by-count" if by_count else "by-block"
        self.magic = {
            (True, False): b"AB3B",
            (True, True): b"AB3C",
            (False, False): b"ABTB",
            (False, True): b"ABTC",
        }[(fs.v5, by_count)]
        self.hdr = 56 if fs.v5 else 16
        self.leaf_max = (fs.block_size - self.hdr) // 8
        self.node_max = (fs.block_size - self.hdr) // 12
        self.touched: dict[int, bool] = {}  # leaf offset -> is the root
        self._verified: set[int] = set()  # blocks checked when first read (edits follow)
        if not 1 <= levels <= MAX_LEVELS or not 0 < root < length:
            raise CorruptGuestError(f"XFS AG {agno}: {self.name} free-space B+tree root is bad")

    def key(self, rec: tuple[int, int]) -> tuple[int, int]:
        """Sort key of a ``(start, count)`` record."""
        return (rec[1], rec[0]) if self.by_count else (rec[0], 0)

    # --- blocks -------------------------------------------------------------------------------

    def block(self, agbno: int, level: int) -> tuple[int, bytearray]:
        fs = self.fs
        if not 0 < agbno < self.length:
            raise CorruptGuestError(
                f"XFS AG {self.agno}: {self.name} B+tree block {agbno} is out of range"
            )
        off = (self.agno * fs.sb.agblocks + agbno) * fs.block_size
        blk = self.bufs.read(off, fs.block_size, "free-space B+tree block")
        blevel, numrecs = struct.unpack_from(">HH", blk, 4)
        cap = self.leaf_max if level == 0 else self.node_max
        if blk[:4] != self.magic or blevel != level or numrecs > cap:
            raise CorruptGuestError(
                f"XFS AG {self.agno}: {self.name} B+tree block {agbno} is damaged"
            )
        if fs.v5 and off not in self._verified:
            blkno, _lsn, uuid, owner = struct.unpack_from(">QQ16sI", blk, 16)
            if (
                not cksum_ok(blk, BTREE_CRC)
                or blkno != off // 512
                or uuid != meta_uuid(fs)
                or owner != self.agno
            ):
                raise CorruptGuestError(
                    f"XFS AG {self.agno}: {self.name} B+tree block {agbno} fails its checks"
                )
        self._verified.add(off)
        return off, blk

    def _rec(self, blk: bytearray, i: int) -> tuple[int, int]:
        return struct.unpack_from(">II", blk, self.hdr + 8 * i)  # type: ignore[return-value]

    def _ptr(self, blk: bytearray, i: int) -> int:
        return struct.unpack_from(">I", blk, self.hdr + 8 * self.node_max + 4 * i)[0]

    @staticmethod
    def _numrecs(blk: bytearray) -> int:
        return struct.unpack_from(">H", blk, 6)[0]

    # --- reading ------------------------------------------------------------------------------

    def records(self) -> list[tuple[int, int]]:
        """Every record in key order; node keys are checked against their subtrees."""
        out: list[tuple[int, int]] = []
        budget = [MAX_TREE_BLOCKS]

        def walk(agbno: int, level: int, low: tuple[int, int] | None) -> None:
            budget[0] -= 1
            if budget[0] < 0:
                raise GuestLimitError(f"XFS AG {self.agno}: {self.name} B+tree is too large")
            _, blk = self.block(agbno, level)
            n = self._numrecs(blk)
            if n == 0 and agbno != self.root:
                raise CorruptGuestError(f"XFS AG {self.agno}: empty {self.name} B+tree block")
            recs = [self._rec(blk, i) for i in range(n)]
            if low is not None and recs and recs[0] != low:
                raise CorruptGuestError(
                    f"XFS AG {self.agno}: {self.name} B+tree key disagrees with its child"
                )
            if level == 0:
                out.extend(recs)
                return
            for i, key in enumerate(recs):
                walk(self._ptr(blk, i), level - 1, key)

        walk(self.root, self.levels - 1, None)
        keys = [self.key(r) for r in out]
        if any(a >= b for a, b in itertools.pairwise(keys)):
            raise CorruptGuestError(f"XFS AG {self.agno}: {self.name} B+tree is out of order")
        return out

    # --- editing ------------------------------------------------------------------------------

    def _descend(self, key: tuple[int, int]) -> list[list]:  # [offset, block, index] per level
        path: list[list] = []
        agbno, level = self.root, self.levels - 1
        for _ in range(self.levels):
            off, blk = self.block(agbno, level)
            n = self._numrecs(blk)
            keys = [self.key(self._rec(blk, i)) for i in range(n)]
            if level == 0:
                path.append([off, blk, bisect.bisect_left(keys, key)])
                return path
            if n == 0:
                raise CorruptGuestError(f"XFS AG {self.agno}: empty {self.name} B+tree node")
            idx = max(bisect.bisect_right(keys, key) - 1, 0)
            path.append([off, blk, idx])
            agbno, level = self._ptr(blk, idx), level - 1
        raise CorruptGuestError(f"XFS AG {self.agno}: {self.name} B+tree is deeper than its AGF")

    def _leaf_changed(self, path: list[list]) -> None:
        off, blk, idx = path[-1]
        self.bufs.mark(off, BTREE_CRC)
        self.touched[off] = len(path) == 1
        if idx != 0 or self._numrecs(blk) == 0:
            return
        first = blk[self.hdr : self.hdr + 8]  # the new lowest record becomes the parent's key
        for depth in range(len(path) - 2, -1, -1):
            poff, pblk, pidx = path[depth]
            pblk[self.hdr + 8 * pidx : self.hdr + 8 * pidx + 8] = first
            self.bufs.mark(poff, BTREE_CRC)
            if pidx != 0:
                break

    def delete(self, rec: tuple[int, int]) -> None:
        path = self._descend(self.key(rec))
        _, blk, idx = path[-1]
        n = self._numrecs(blk)
        if idx >= n or self._rec(blk, idx) != rec:
            raise CorruptGuestError(
                f"XFS AG {self.agno}: {self.name} B+tree lacks free extent {rec[0]}+{rec[1]}"
            )
        at, end = self.hdr + 8 * idx, self.hdr + 8 * n
        blk[at : end - 8] = blk[at + 8 : end]
        blk[end - 8 : end] = bytes(8)
        struct.pack_into(">H", blk, 6, n - 1)
        self._leaf_changed(path)

    def insert(self, rec: tuple[int, int]) -> None:
        path = self._descend(self.key(rec))
        _, blk, idx = path[-1]
        n = self._numrecs(blk)
        if n >= self.leaf_max:
            e = reshape(
                f"the {self.name} free-space B+tree leaf of AG {self.agno} is full (it would "
                "have to split)"
            )
            e.crowd = self._crowd(blk)
            raise e
        at, end = self.hdr + 8 * idx, self.hdr + 8 * n
        blk[at + 8 : end + 8] = blk[at:end]
        struct.pack_into(">II", blk, at, *rec)
        struct.pack_into(">H", blk, 6, n + 1)
        self._leaf_changed(path)

    def replace(self, old: tuple[int, int], new: tuple[int, int]) -> None:
        """``old`` becomes ``new``: in place when the order allows, else delete and insert."""
        path = self._descend(self.key(old))
        _, blk, idx = path[-1]
        n = self._numrecs(blk)
        if idx >= n or self._rec(blk, idx) != old:
            raise CorruptGuestError(
                f"XFS AG {self.agno}: {self.name} B+tree lacks free extent {old[0]}+{old[1]}"
            )
        k, was = self.key(new), self.key(old)
        root = len(path) == 1  # a root leaf has no neighbour leaves to stay ordered against
        before = self.key(self._rec(blk, idx - 1)) < k if idx else root or k >= was
        after = k < self.key(self._rec(blk, idx + 1)) if idx < n - 1 else root or k <= was
        if before and after:
            struct.pack_into(">II", blk, self.hdr + 8 * idx, *new)
            self._leaf_changed(path)
            return
        self.delete(old)
        self.insert(new)

    def check_shape(self) -> None:
        """Refuse if an edited non-root leaf fell under half full (a merge would be needed)."""
        for off, is_root in self.touched.items():
            n = self._numrecs(self.bufs.read(off, self.fs.block_size, "B+tree block"))
            if not is_root and n < self.leaf_max // 2:
                e = reshape(
                    f"a {self.name} free-space B+tree leaf of AG {self.agno} would fall under "
                    "half full (it would have to merge)"
                )
                e.crowd = self._crowd(self.bufs.read(off, self.fs.block_size, "B+tree block"))
                raise e

    def _crowd(self, blk: bytearray) -> frozenset[tuple[int, int]]:
        """The free extents whose records share the leaf ``blk`` (edited or not)."""
        return frozenset((self.agno, self._rec(blk, i)[0]) for i in range(self._numrecs(blk)))


@dataclass
class AgFree:
    """One AG's free space as read (and cross-checked), and the edits planned for it."""

    agno: int
    agf_off: int
    length: int
    free: list[tuple[int, int]]  # (start, count), sorted by start
    bno: FreeTree
    cnt: FreeTree
    reserve: int
    taken: int = 0
    pieces: list[tuple[int, int]] = field(default_factory=list)

    @property
    def freeblks(self) -> int:
        return sum(c for _, c in self.free)

    @property
    def usable(self) -> int:
        return max(self.freeblks - self.reserve, 0)


def agf_offset(fs: XfsFilesystem, agno: int) -> int:
    return agno * fs.sb.agblocks * fs.block_size + fs.sb.sectsize


def has_rmapbt(fs: XfsFilesystem) -> bool:
    return fs.v5 and bool(fs.sb.features_ro_compat & RO_COMPAT_RMAPBT)


def check_allocatable(fs: XfsFilesystem) -> None:
    """Refuse (named) the filesystems whose allocation bookkeeping vmferry does not keep."""
    sb = fs.sb
    if sb.qflags & QUOTA_ACCOUNTING:
        raise refuse("quota accounting is on and vmferry does not update quota counts")
    if sb.rblocks:
        raise refuse("the filesystem has a realtime section")


def read_ag(fs: XfsFilesystem, bufs: Buffers, agno: int) -> AgFree:
    """AG ``agno``'s free extents, refused as corrupt unless both trees and the AGF agree."""
    sb = fs.sb
    agf_off = agf_offset(fs, agno)
    agf = bufs.read(agf_off, sb.sectsize, "AGF")
    seqno, length = struct.unpack_from(">II", agf, AGF_SEQNO)
    expect_len = min(sb.agblocks, sb.dblocks - agno * sb.agblocks)
    if agf[:4] != b"XAGF" or seqno != agno or length != expect_len:
        raise CorruptGuestError(f"XFS AG {agno}: bad AGF")
    if fs.v5 and (
        not cksum_ok(agf, AGF_CRC) or bytes(agf[AGF_UUID : AGF_UUID + 16]) != meta_uuid(fs)
    ):
        raise CorruptGuestError(f"XFS AG {agno}: AGF checksum or UUID mismatch")
    bno_root, cnt_root = struct.unpack_from(">II", agf, AGF_ROOTS)
    bno_lv, cnt_lv = struct.unpack_from(">II", agf, AGF_LEVELS)
    freeblks, longest = struct.unpack_from(">II", agf, AGF_FREEBLKS)
    bno = FreeTree(fs, bufs, agno, length, bno_root, bno_lv, by_count=False)
    cnt = FreeTree(fs, bufs, agno, length, cnt_root, cnt_lv, by_count=True)
    free = bno.records()
    end = 0
    for start, count in free:
        if count == 0 or start < end or start + count > length:
            raise CorruptGuestError(f"XFS AG {agno}: free extents overlap or leave the AG")
        end = start + count
    if sorted(cnt.records()) != free:
        raise CorruptGuestError(f"XFS AG {agno}: the two free-space B+trees disagree")
    if sum(c for _, c in free) != freeblks or max((c for _, c in free), default=0) != longest:
        raise CorruptGuestError(f"XFS AG {agno}: the AGF's free counts disagree with its B+trees")
    # the kernel's per-AG reservations (finobt, refcount, rmap B+trees) and AGFL refills
    reserve = sb.agblocks // (32 if has_rmapbt(fs) else 64) + 16
    return AgFree(agno, agf_off, length, free, bno, cnt, reserve)


def allocate(
    fs: XfsFilesystem,
    bufs: Buffers,
    count: int,
    goal: int | None,
    home_ag: int,
    what: str,
    then: Callable[[Buffers, list[tuple[int, int]]], None] | None = None,
) -> list[tuple[int, int]]:
    """Take ``count`` blocks; returns ``(fs block, count)`` pieces, edits planned in ``bufs``.

    ``goal`` is the filesystem block the caller would like first (the one after the file's
    last block), ``home_ag`` the AG to search first; ``then(trial_buffers, pieces)`` plans the
    caller's own records for the pieces (reverse mapping).  A plan that would make a B+tree
    block split or merge is dropped and made again without the free extent that caused it (up
    to :data:`MAX_ATTEMPTS` times).  Nothing is written here: the edits sit in ``bufs`` until
    the caller writes ``bufs.writes()``.
    """
    check_allocatable(fs)
    avoid: set[tuple[int, int]] = set()
    failure: ReshapeRefused | None = None
    for _ in range(MAX_ATTEMPTS):
        trial = Buffers(fs)
        sources: list[tuple[int, int]] = []
        try:
            pieces = _allocate_once(fs, trial, count, goal, home_ag, what, avoid, sources)
            if then is not None:
                then(trial, pieces)
        except ReshapeRefused as e:
            failure = e
            avoid.update(e.crowd)
            avoid.update([e.extent] if e.extent else sources)
            continue
        bufs.adopt(trial)
        return pieces
    assert failure is not None
    raise failure


def _allocate_once(
    fs: XfsFilesystem,
    bufs: Buffers,
    count: int,
    goal: int | None,
    home_ag: int,
    what: str,
    avoid: set[tuple[int, int]],
    sources: list[tuple[int, int]],
) -> list[tuple[int, int]]:
    sb = fs.sb
    ags = [read_ag(fs, bufs, agno) for agno in range(sb.agcount)]
    fdblocks = _fdblocks(fs, bufs)
    counted = sum(a.freeblks for a in ags)
    keep = min(sb.dblocks // 20, 8192)
    usable = sum(a.usable for a in ags)
    if count > usable or counted - count < keep or count > fdblocks:
        raise refuse(
            f"{what} needs {count} more blocks and the filesystem has {counted} free "
            f"({usable} usable: vmferry keeps {keep} free and each AG's metadata reserve)"
        )
    pieces = _choose(fs, ags, count, goal, home_ag, avoid)
    for agno, agbno, n in pieces:
        ag = ags[agno]
        rec = next((r for r in ag.free if r[0] <= agbno and agbno + n <= r[0] + r[1]), None)
        if rec is None:
            raise CorruptGuestError(f"XFS AG {agno}: block {agbno} is not free after all")
        sources.append((agno, rec[0]))
        try:
            _take(ag, rec, agbno, n)
            ag.bno.check_shape()
            ag.cnt.check_shape()
        except ReshapeRefused as e:
            e.extent = (agno, rec[0])
            raise
    for ag in ags:
        if not ag.taken:
            continue
        agf = bufs.read(ag.agf_off, sb.sectsize, "AGF")
        freeblks = struct.unpack_from(">I", agf, AGF_FREEBLKS)[0]
        longest = max((c for _, c in ag.free), default=0)
        struct.pack_into(">II", agf, AGF_FREEBLKS, freeblks - ag.taken, longest)
        bufs.mark(ag.agf_off, AGF_CRC)
    sect = bufs.read(0, sb.sectsize, "superblock")
    struct.pack_into(">Q", sect, SB_FDBLOCKS, fdblocks - count)
    bufs.mark(0, SB_CRC)
    return [((agno << sb.agblklog) | agbno, n) for agno, agbno, n in pieces]


def _fdblocks(fs: XfsFilesystem, bufs: Buffers) -> int:
    sect = bufs.read(0, fs.sb.sectsize, "superblock")
    if fs.v5 and not cksum_ok(sect, SB_CRC):
        raise CorruptGuestError("XFS superblock fails its checksum")
    return struct.unpack_from(">Q", sect, SB_FDBLOCKS)[0]


def _choose(
    fs: XfsFilesystem,
    ags: list[AgFree],
    count: int,
    goal: int | None,
    home_ag: int,
    avoid: set[tuple[int, int]],
) -> list[tuple[int, int, int]]:
    """``(agno, agbno, count)`` pieces; works on copies of the free lists."""
    sb = fs.sb
    free = {a.agno: [r for r in a.free if (a.agno, r[0]) not in avoid] for a in ags}
    usable = {a.agno: a.usable for a in ags}
    order = [(home_ag + i) % sb.agcount for i in range(sb.agcount)]
    pieces: list[tuple[int, int, int]] = []
    left = count
    while left:
        if len(pieces) == MAX_PIECES:
            raise refuse(f"free space is too fragmented (over {MAX_PIECES} pieces needed)")
        pick = None
        if goal is not None:  # the block right after the file: grow contiguously
            agno, agbno = goal >> sb.agblklog, goal & ((1 << sb.agblklog) - 1)
            for start, n in free.get(agno, []):
                if start <= agbno < start + n and usable[agno]:
                    pick = (agno, agbno, min(left, start + n - agbno, usable[agno]))
                    break
        if pick is None:  # the smallest extent holding the rest, home AG first
            for agno in order:
                if usable[agno] < left:
                    continue
                fits = [(n, start) for start, n in free[agno] if n >= left]
                if fits:
                    pick = (agno, min(fits)[1], left)
                    break
        if pick is None:  # the largest extents, as far as they go
            best = max(
                ((n, -agno, start) for agno in order if usable[agno] for start, n in free[agno]),
                default=None,
            )
            if best is None:
                raise refuse(f"no free space left for {left} more blocks")
            n, negag, start = best
            pick = (-negag, start, min(left, n, usable[-negag]))
        agno, agbno, n = pick
        if n <= 0:
            raise refuse(f"no free space left for {left} more blocks")
        free[agno] = _split(free[agno], agbno, n)
        usable[agno] -= n
        pieces.append(pick)
        left -= n
        goal = (agno << sb.agblklog) | (agbno + n)
    return pieces


def _split(free: list[tuple[int, int]], agbno: int, n: int) -> list[tuple[int, int]]:
    out = []
    for start, count in free:
        if start <= agbno and agbno + n <= start + count:
            if agbno > start:
                out.append((start, agbno - start))
            if agbno + n < start + count:
                out.append((agbno + n, start + count - agbno - n))
        else:
            out.append((start, count))
    return out


def _take(ag: AgFree, rec: tuple[int, int], agbno: int, n: int) -> None:
    """Remove ``[agbno, agbno+n)`` from both B+trees (the free extent ``rec`` shrinks)."""
    start, count = rec
    head = (start, agbno - start) if agbno > start else None
    tail = (agbno + n, start + count - agbno - n) if agbno + n < start + count else None
    # by block: the record keeps its place when the head or tail stays; the other is new
    if head:
        ag.bno.replace(rec, head)
        if tail:
            ag.bno.insert(tail)
    elif tail:
        ag.bno.replace(rec, tail)
    else:
        ag.bno.delete(rec)
    # by count: remainders sort elsewhere
    if head or tail:
        ag.cnt.replace(rec, head or tail)  # type: ignore[arg-type]
        if head and tail:
            ag.cnt.insert(tail)
    else:
        ag.cnt.delete(rec)
    ag.free = _split(ag.free, agbno, n)
    ag.taken += n
    ag.pieces.append((agbno, n))


def refuse(why: str) -> GuestWriteRefusedError:
    return GuestWriteRefusedError(f"vmferry cannot allocate XFS blocks: {why}", hint=_REFUSED)


def reshape(why: str) -> ReshapeRefused:
    return ReshapeRefused(f"vmferry cannot allocate XFS blocks: {why}", hint=_REFUSED)
