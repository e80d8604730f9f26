"""XFS reverse-mapping B+tree (``rmapbt``) records for blocks a growing file takes.

Why: on filesystems made with ``rmapbt=1`` every allocated extent has a record saying who owns
it (inode, file offset).  ``xfs_repair`` rebuilds the records it expects from every inode's
extent map, merging extents that are contiguous in both the disk and the file, and wants each
expected record covered by one on-disk record of the same owner.  So a file that grows in
place (its last extent gets longer) has its last record lengthened, and a new extent gets a new
record.

The rmapbt is an *overlapping* B+tree: node entries hold a low key (the child's first record)
and a high key (the largest ``(last block, owner, last offset)`` below it), so every edit
refreshes both keys up to the root.  A record inserted into a full leaf would split it: the
allocation is planned again elsewhere, and refused (nothing written) if no place avoids it.
"""

from __future__ import annotations

import bisect
import struct
from typing import TYPE_CHECKING

from vmferry.guest.errors import CorruptGuestError
from vmferry.guest.fs.xfs_alloc import BTREE_CRC, Buffers, agf_offset, meta_uuid, reshape
from vmferry.guest.fs.xfs_layout import cksum_ok

if TYPE_CHECKING:
    from vmferry.guest.fs.xfs import XfsFilesystem

AGF_RMAP_ROOT, AGF_RMAP_LEVEL = 24, 36
HDR, REC, KEY = 56, 24, 20
OFF_MASK = (1 << 54) - 1
UNWRITTEN = 1 << 61
ATTR_FORK = 1 << 63
BMBT_BLOCK = 1 << 62
NON_INODE = 1 << 63
Rec = tuple[int, int, int, int]  # start block, block count, owner, offset (with flags)
Key = tuple[int, int, int]  # start block, owner, offset (without the unwritten flag)


def low_key(r: Rec) -> Key:
    return (r[0], r[2], r[3] & ~UNWRITTEN)


def high_key(r: Rec) -> Key:
    adj = r[1] - 1
    off = r[3] & ~UNWRITTEN
    if not r[2] & NON_INODE and not off & BMBT_BLOCK:
        off = ((off & OFF_MASK) + adj) | (off & ~OFF_MASK)
    return (r[0] + adj, r[2], off)


def _cmp_key(k: Key) -> Key:
    """Keys compare on block, owner and the offset bits alone (flags excluded)."""
    return (k[0], k[1], k[2] & OFF_MASK)


class RmapTree:
    """AG ``agno``'s rmapbt, edited through ``bufs`` (the AGF there was already checked)."""

    def __init__(self, fs: XfsFilesystem, bufs: Buffers, agno: int) -> None:
        self.fs, self.bufs, self.agno = fs, bufs, agno
        agf = bufs.read(agf_offset(fs, agno), fs.sb.sectsize, "AGF")
        self.root = struct.unpack_from(">I", agf, AGF_RMAP_ROOT)[0]
        self.levels = struct.unpack_from(">I", agf, AGF_RMAP_LEVEL)[0]
        length = struct.unpack_from(">I", agf, 12)[0]
        if not 1 <= self.levels <= 9 or not 0 < self.root < length:
            raise CorruptGuestError(f"XFS AG {agno}: reverse-mapping B+tree root is bad")
        self.leaf_max = (fs.block_size - HDR) // REC
        self.node_max = (fs.block_size - HDR) // (2 * KEY + 4)
        self._verified: set[int] = set()

    def _block(self, agbno: int, level: int) -> tuple[int, bytearray]:
        fs = self.fs
        if not 0 < agbno < fs.sb.agblocks:
            raise CorruptGuestError(f"XFS AG {self.agno}: rmap B+tree block {agbno} out of range")
        off = (self.agno * fs.sb.agblocks + agbno) * fs.block_size
        blk = self.bufs.read(off, fs.block_size, "rmap B+tree block")
        if off not in self._verified:
            blevel, numrecs = struct.unpack_from(">HH", blk, 4)
            blkno, _lsn, uuid, owner = struct.unpack_from(">QQ16sI", blk, 16)
            cap = self.leaf_max if level == 0 else self.node_max
            if (
                blk[:4] != b"RMB3"
                or blevel != level
                or numrecs > cap
                or not cksum_ok(blk, BTREE_CRC)
                or blkno != off // 512
                or uuid != meta_uuid(fs)
                or owner != self.agno
            ):
                raise CorruptGuestError(
                    f"XFS AG {self.agno}: reverse-mapping B+tree block {agbno} is damaged"
                )
            self._verified.add(off)
        return off, blk

    @staticmethod
    def _n(blk: bytearray) -> int:
        return struct.unpack_from(">H", blk, 6)[0]

    def _rec(self, blk: bytearray, i: int) -> Rec:
        rec: Rec = struct.unpack_from(">IIQQ", blk, HDR + REC * i)  # type: ignore[assignment]
        if rec[1] == 0 or rec[0] + rec[1] > self.fs.sb.agblocks:
            raise CorruptGuestError(f"XFS AG {self.agno}: reverse-mapping record out of range")
        return rec

    def _keys(self, blk: bytearray, i: int) -> tuple[Key, Key]:
        at = HDR + 2 * KEY * i
        lo = struct.unpack_from(">IQQ", blk, at)
        hi = struct.unpack_from(">IQQ", blk, at + KEY)
        return lo, hi  # type: ignore[return-value]

    def _ptr(self, blk: bytearray, i: int) -> int:
        return struct.unpack_from(">I", blk, HDR + 2 * KEY * self.node_max + 4 * i)[0]

    def _descend(self, key: Key) -> list[list]:
        """[offset, block, index] per level; the leaf index is the count of records <= key."""
        path: list[list] = []
        agbno, level = self.root, self.levels - 1
        want = _cmp_key(key)
        for _ in range(self.levels):
            off, blk = self._block(agbno, level)
            n = self._n(blk)
            if level == 0:
                keys = [_cmp_key(low_key(self._rec(blk, i))) for i in range(n)]
                path.append([off, blk, bisect.bisect_right(keys, want)])
                return path
            if n == 0:
                raise CorruptGuestError(f"XFS AG {self.agno}: empty rmap B+tree node")
            keys = [_cmp_key(self._keys(blk, i)[0]) for i in range(n)]
            idx = max(bisect.bisect_right(keys, want) - 1, 0)
            path.append([off, blk, idx])
            agbno, level = self._ptr(blk, idx), level - 1
        raise CorruptGuestError(f"XFS AG {self.agno}: rmap B+tree is deeper than its AGF")

    def _refresh(self, path: list[list]) -> None:
        """Mark the leaf and rewrite every ancestor's low and high key for the edited child."""
        self.bufs.mark(path[-1][0], BTREE_CRC)
        for depth in range(len(path) - 2, -1, -1):
            _, child, _ = path[depth + 1]
            poff, pblk, pidx = path[depth]
            n = self._n(child)
            if n == 0:
                raise CorruptGuestError(f"XFS AG {self.agno}: empty rmap B+tree block")
            if depth + 1 == len(path) - 1:  # the child is the leaf
                recs = [self._rec(child, i) for i in range(n)]
                lo = low_key(recs[0])
                hi = max((high_key(r) for r in recs), key=_cmp_key)
            else:
                pairs = [self._keys(child, i) for i in range(n)]
                lo = pairs[0][0]
                hi = max((p[1] for p in pairs), key=_cmp_key)
            at = HDR + 2 * KEY * pidx
            struct.pack_into(">IQQ", pblk, at, *lo)
            struct.pack_into(">IQQ", pblk, at + KEY, *hi)
            self.bufs.mark(poff, BTREE_CRC)

    def extend(self, start: int, count: int, owner: int, offset: int, grow: int) -> None:
        """The record of ``owner``'s extent ending at ``start + count`` gets ``grow`` blocks."""
        last = (start + count - 1, owner, offset + count - 1)
        path = self._descend((start, owner, offset))
        _, blk, idx = path[-1]
        for i in range(idx - 1, -1, -1):  # the record covering the extent (maybe merged)
            r = self._rec(blk, i)
            plain = not r[3] & (ATTR_FORK | BMBT_BLOCK | UNWRITTEN)
            if r[2] == owner and plain and high_key(r) == last and r[0] <= start:
                struct.pack_into(">I", blk, HDR + REC * i + 4, r[1] + grow)
                self._refresh(path)
                return
        raise CorruptGuestError(
            f"XFS AG {self.agno}: no reverse-mapping record for inode {owner}'s block {start}"
        )

    def insert(self, start: int, count: int, owner: int, offset: int) -> None:
        rec: Rec = (start, count, owner, offset)
        path = self._descend(low_key(rec))
        _, blk, idx = path[-1]
        n = self._n(blk)
        if n >= self.leaf_max:
            raise reshape(
                f"the reverse-mapping B+tree leaf of AG {self.agno} is full (it would have "
                "to split)"
            )
        if idx and self._rec(blk, idx - 1)[0] + self._rec(blk, idx - 1)[1] > start:
            raise CorruptGuestError(f"XFS AG {self.agno}: block {start} is mapped and free")
        at, end = HDR + REC * idx, HDR + REC * n
        blk[at + REC : end + REC] = blk[at:end]
        struct.pack_into(">IIQQ", blk, at, *rec)
        struct.pack_into(">H", blk, 6, n + 1)
        self._refresh(path)


def record_growth(
    fs: XfsFilesystem,
    bufs: Buffers,
    ino: int,
    before: list[tuple[int, int, int, bool]],
    after: list[tuple[int, int, int, bool]],
) -> None:
    """Mirror a data fork change (extents only added, or the last one lengthened) in rmapbt."""
    sb = fs.sb
    mask = (1 << sb.agblklog) - 1
    trees: dict[int, RmapTree] = {}

    def tree(agno: int) -> RmapTree:
        if agno not in trees:
            trees[agno] = RmapTree(fs, bufs, agno)
        return trees[agno]

    old = {(o, b): c for o, b, c, _ in before}
    for fileoff, fsb, count, _ in after:
        was = old.get((fileoff, fsb))
        if was == count:
            continue
        agno, agbno = fsb >> sb.agblklog, fsb & mask
        if was is not None:
            tree(agno).extend(agbno, was, ino, fileoff, count - was)
        else:
            tree(agno).insert(agbno, count, ino, fileoff)
