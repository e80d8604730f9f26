"""Is an XFS log clean?  The question every offline XFS writer must answer first.

A filesystem that was not cleanly unmounted keeps metadata changes in its log; the kernel replays
them at the next mount, over whatever an offline tool wrote in between.  So vmferry writes an XFS
filesystem only when its log ends with an unmount record, decided the way the kernel's log
recovery (and ``xfs_repair``) find the log head:

* every 512-byte basic block (BB) of the log starts with the cycle number it was written in
  (a record header holds its magic there and the cycle right after); the head is where the
  cycle drops from ``c`` to ``c - 1``, found by binary search and then verified block by block
  over the last 2 MiB before the head (the most the kernel can have had in flight);
* the last record header before the head must be an unmount record: one operation carrying
  the unmount flag, ending exactly at the head, written for this filesystem's UUID.

Anything else (an external log, a cycle pattern that is not two clean halves, garbage after
the record) is refused as "not known clean": the answer is never a guess.
"""

from __future__ import annotations

import struct

from vmferry.guest.errors import CorruptGuestError, GuestWriteRefusedError
from vmferry.guest.fs.xfs_layout import XfsSuperblock
from vmferry.guest.overlay import ReadableDisk

BB = 512
HEADER_MAGIC = 0xFEEDBABE
VERSION_2 = 0x2
HEADER_CYCLE_SIZE = 32 << 10  # a v2 record header covers this much data per header block
MAX_RECORD = 256 << 10  # XLOG_MAX_RECORD_BSIZE
VERIFY_WINDOW = (2 << 20) // BB  # 8 in-flight log buffers of 256 KiB
UNMOUNT_TRANS = 0x20
_DIRTY_HINT = (
    "mount the filesystem once (or boot the guest) so the kernel replays its log, shut down "
    "cleanly, and retry; nothing was written"
)


def log_offset(sb: XfsSuperblock) -> tuple[int, int]:
    """(byte offset, byte size) of the internal log, bounds-checked against the geometry."""
    if sb.logstart == 0:
        raise GuestWriteRefusedError(
            "the XFS log is on an external device; vmferry cannot check that it is clean"
        )
    agno, agbno = sb.logstart >> sb.agblklog, sb.logstart & ((1 << sb.agblklog) - 1)
    if agno >= sb.agcount or sb.logblocks == 0 or agbno + sb.logblocks > sb.agblocks:
        raise CorruptGuestError("the XFS log lies outside its allocation group")
    return (agno * sb.agblocks + agbno) * sb.blocksize, sb.logblocks * sb.blocksize


def check_log_clean(dev: ReadableDisk, sb: XfsSuperblock) -> None:
    """Return when the log ends with an unmount record; raise ``GuestWriteRefusedError`` if not."""
    start, size = log_offset(sb)
    if start + size > dev.virtual_size:
        raise CorruptGuestError("the XFS log runs past the end of the filesystem")
    log = _Log(dev, start, size // BB)
    head = _find_head(log)
    rec = _last_header(log, head)
    hdr = log.block(rec)
    (magic, rec_cycle, version, length, _lsn, _tail, _crc, _prev, nops) = struct.unpack_from(
        ">IIIIQQIiI", hdr
    )
    h_size = struct.unpack_from(">I", hdr, 320)[0]
    fs_uuid = hdr[304:320]
    if magic != HEADER_MAGIC or length > MAX_RECORD or length % BB:
        raise _dirty("its last record header is damaged")
    if fs_uuid not in (sb.uuid, bytes(16)):
        raise _dirty("its last record belongs to another filesystem")
    hblks = 1
    if version & VERSION_2 and h_size > HEADER_CYCLE_SIZE:
        if h_size > MAX_RECORD:
            raise _dirty("its last record header is damaged")
        hblks = -(-h_size // HEADER_CYCLE_SIZE)
    after = (rec + hblks + length // BB) % log.nbb
    if after != head % log.nbb or nops != 1 or rec_cycle != log.cycles(head - 1, head)[0]:
        raise _dirty("its last record is not an unmount record")
    op = log.block(rec + hblks)
    if not op[9] & UNMOUNT_TRANS:  # xlog_op_header.oh_flags
        raise _dirty("its last record is not an unmount record")


class _Log:
    """The log as an array of basic blocks."""

    def __init__(self, dev: ReadableDisk, start: int, nbb: int) -> None:
        self.dev, self.start, self.nbb = dev, start, nbb

    def block(self, i: int) -> bytes:
        return self.dev.read(self.start + (i % self.nbb) * BB, BB)

    def cycles(self, lo: int, hi: int) -> list[int]:
        """Cycle numbers of BBs ``lo``..``hi - 1`` (inside the log), read in one go."""
        data = self.dev.read(self.start + lo * BB, (hi - lo) * BB)
        out = []
        for at in range(0, len(data), BB):
            word, second = struct.unpack_from(">II", data, at)
            out.append(second if word == HEADER_MAGIC else word)
        return out


def _find_head(log: _Log) -> int:
    """The first BB of the cycle being written (``nbb`` when the log ends a full cycle)."""
    nbb = log.nbb
    first, last = log.cycles(0, 1)[0], log.cycles(nbb - 1, nbb)[0]
    if first == last:
        head = nbb
    elif first == last + 1:
        lo, hi = 0, nbb - 1  # cycle(lo) == first, cycle(hi) == last
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if log.cycles(mid, mid + 1)[0] == first:
                lo = mid
            else:
                hi = mid
        head = hi
    else:
        raise _dirty(f"its cycle numbers jump from {first} to {last}")
    if any(c != first for c in log.cycles(max(0, head - VERIFY_WINDOW), head)):
        raise _dirty("blocks before its head were written in another cycle")
    if any(c != last for c in log.cycles(head, min(nbb, head + VERIFY_WINDOW))):
        raise _dirty("blocks after its head were written in another cycle")
    return head


def _last_header(log: _Log, head: int) -> int:
    """The BB of the last record header before ``head`` (searched back, wrapping once)."""
    for k in range(1, min(log.nbb, VERIFY_WINDOW) + 1):
        i = (head - k) % log.nbb
        if struct.unpack_from(">I", log.block(i))[0] == HEADER_MAGIC:
            return i
    raise _dirty("no record header lies before its head")


def _dirty(why: str) -> GuestWriteRefusedError:
    return GuestWriteRefusedError(
        f"the XFS log is not known to be clean ({why}): the filesystem was not cleanly "
        "unmounted or vmferry cannot tell",
        hint=_DIRTY_HINT,
    )
