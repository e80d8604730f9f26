"""Is a reflinked XFS file really sharing blocks?  The reference-count B+tree says.

Why: dracut copies every initramfs it builds into /boot with ``cp --reflink=auto``, so on a
Red Hat family guest whose /boot and /var/tmp are one XFS filesystem (reflink is on by default
since RHEL 8) the initramfs carries the reflink inode flag although its twin in /var/tmp was
deleted long ago.  The flag stays set after the sharing ends; what counts is the refcount
B+tree, which holds a record for every extent with more than one owner (and for copy-on-write
staging extents, a separate domain flagged in the record's start block).  A file none of
whose blocks appears there owns them alone, so rewriting them in place or appending new blocks
changes nobody else's data, and no refcount record needs to change.

Read only: every block is checked (magic ``R3FC``, level, record count, CRC, block number,
UUID, owner AG) and the walk is bounded.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from vmferry.guest.errors import CorruptGuestError, GuestLimitError, GuestWriteRefusedError
from vmferry.guest.fs.xfs_layout import cksum_ok

if TYPE_CHECKING:
    from vmferry.guest.fs.xfs import XfsFilesystem

AGF_REFCOUNT_ROOT = 88  # then agf_refcount_level
AGF_CRC = 216
HDR = 56  # refcount B+trees exist only on v5 filesystems: long CRC header always
COW_FLAG = 1 << 31
MAX_BLOCKS = 1 << 18
INCOMPAT_META_UUID = 0x4


def check_unshared(fs: XfsFilesystem, extents: list[tuple[int, int, int, bool]], path: str) -> None:
    """Refuse when any of ``extents`` (file block, fs block, count, unwritten) is shared."""
    sb = fs.sb
    mask = (1 << sb.agblklog) - 1
    by_ag: dict[int, list[tuple[int, int]]] = {}
    for _, fsb, count, _ in extents:
        by_ag.setdefault(fsb >> sb.agblklog, []).append((fsb & mask, count))
    for agno, ranges in sorted(by_ag.items()):
        for start, count, refs in _records(fs, agno):
            cow = bool(start & COW_FLAG)
            start &= ~COW_FLAG
            for agbno, n in ranges:
                if start < agbno + n and agbno < start + count:
                    what = "is staged for copy-on-write" if cow else f"has {refs} owners"
                    raise GuestWriteRefusedError(
                        f"{path}: AG {agno} block {max(start, agbno)} of the file {what} "
                        "(reflink): vmferry does not write shared blocks",
                        hint="nothing was written; copy the file without --reflink in the guest",
                    )


def _records(fs: XfsFilesystem, agno: int) -> list[tuple[int, int, int]]:
    """Every (start block, count, refcount) record of AG ``agno``'s refcount B+tree."""
    sb = fs.sb
    agf_off = agno * sb.agblocks * sb.blocksize + sb.sectsize
    agf = fs.dev.read(agf_off, sb.sectsize)
    if agf[:4] != b"XAGF" or struct.unpack_from(">I", agf, 8)[0] != agno:
        raise CorruptGuestError(f"XFS AG {agno}: bad AGF")
    if not cksum_ok(agf, AGF_CRC):
        raise CorruptGuestError(f"XFS AG {agno}: AGF checksum mismatch")
    root, levels = struct.unpack_from(">II", agf, AGF_REFCOUNT_ROOT)
    if not 1 <= levels <= 8:
        raise CorruptGuestError(f"XFS AG {agno}: refcount B+tree level {levels}")
    uuid = sb.meta_uuid if sb.features_incompat & INCOMPAT_META_UUID else sb.uuid
    bs = sb.blocksize
    leaf_max, node_max = (bs - HDR) // 12, (bs - HDR) // 8
    out: list[tuple[int, int, int]] = []
    budget = [MAX_BLOCKS]

    def walk(agbno: int, level: int) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise GuestLimitError(f"XFS AG {agno}: refcount B+tree is too large")
        if not 0 < agbno < sb.agblocks:
            raise CorruptGuestError(f"XFS AG {agno}: refcount B+tree block {agbno} out of range")
        off = (agno * sb.agblocks + agbno) * bs
        blk = fs.dev.read(off, bs)
        blevel, numrecs = struct.unpack_from(">HH", blk, 4)
        blkno, _lsn, buuid, owner = struct.unpack_from(">QQ16sI", blk, 16)
        cap = leaf_max if level == 0 else node_max
        if (
            blk[:4] != b"R3FC"
            or blevel != level
            or numrecs > cap
            or not cksum_ok(blk, 52)
            or blkno != off // 512
            or buuid != uuid
            or owner != agno
        ):
            raise CorruptGuestError(f"XFS AG {agno}: refcount B+tree block {agbno} is damaged")
        if level == 0:
            out.extend(struct.unpack_from(">III", blk, HDR + 12 * i) for i in range(numrecs))
            return
        for ptr in struct.unpack_from(f">{numrecs}I", blk, HDR + 4 * node_max):
            walk(ptr, level - 1)

    walk(root, levels - 1)
    return out
