"""The VHDX metadata log: finding the active sequence, replaying it, and writing entries.

Why a log at all: a BAT or metadata update spans several 4 KiB sectors that must change
together; VHDX writes the new sector contents to the circular log first, flushes, then writes
them in place.  After a crash the last complete log sequence is replayed, so a reader never
sees half an update.  vmferry replays in memory (an overlay consulted by every read) when it
opens an image read-only, and on disk when it opens it writable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from vmferry.disk.vhdx.layout import (
    LOG_DATA_SIGNATURE,
    LOG_DESC_SIGNATURE,
    LOG_ENTRY_SIGNATURE,
    LOG_SECTOR,
    LOG_ZERO_SIGNATURE,
    LogDataSector,
    LogDescriptor,
    LogEntryHeader,
    checksum_with_field_zeroed,
    descriptor_sectors,
    seal,
)
from vmferry.errors import CorruptImageError

ZERO_SECTOR = bytes(LOG_SECTOR)


@dataclass
class LogEntry:
    """One valid entry found in the log buffer."""

    position: int  # byte offset inside the log
    header: LogEntryHeader
    writes: list[tuple[int, bytes | None, int]]  # (file offset, sector or None=zeros, length)

    @property
    def sequence(self) -> int:
        return self.header.sequence_number

    @property
    def length(self) -> int:
        return self.header.entry_length


@dataclass
class Overlay:
    """Sector contents the log says the file has, over what the file itself holds.

    Built in log order: a zero range drops earlier sector writes it covers, so at read time
    zero ranges are applied first and sector writes on top, which equals replay order.
    """

    sectors: dict[int, bytes] = field(default_factory=dict)
    zeros: list[tuple[int, int]] = field(default_factory=list)
    last_file_offset: int = 0
    flushed_file_offset: int = 0
    entries: int = 0
    sequence: int = 0

    def __bool__(self) -> bool:
        return bool(self.sectors or self.zeros)

    def add_sector(self, offset: int, data: bytes) -> None:
        self.sectors[offset] = data

    def add_zeros(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        end = offset + length
        if len(self.sectors) < length // LOG_SECTOR:
            for key in [k for k in self.sectors if offset <= k < end]:
                del self.sectors[key]
        else:
            for key in range(offset, end, LOG_SECTOR):
                self.sectors.pop(key, None)
        self.zeros.append((offset, length))

    def patch(self, offset: int, buf: bytearray) -> None:
        """Apply the overlay to ``buf``, which holds the file's bytes at ``offset``."""
        end = offset + len(buf)
        for zoff, zlen in self.zeros:
            lo, hi = max(offset, zoff), min(end, zoff + zlen)
            if lo < hi:
                buf[lo - offset : hi - offset] = bytes(hi - lo)
        if not self.sectors:
            return
        first = offset - offset % LOG_SECTOR
        if len(self.sectors) < (end - first) // LOG_SECTOR:
            keys: Iterable[int] = sorted(k for k in self.sectors if first <= k < end)
        else:
            keys = (k for k in range(first, end, LOG_SECTOR) if k in self.sectors)
        for key in keys:
            data = self.sectors[key]
            lo, hi = max(offset, key), min(end, key + LOG_SECTOR)
            buf[lo - offset : hi - offset] = data[lo - key : hi - key]


class _Ring:
    """The log buffer read once, addressed circularly."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def get(self, pos: int, n: int) -> bytes:
        pos %= self.length
        if pos + n <= self.length:
            return self.data[pos : pos + n]
        first = self.data[pos:]
        return first + self.data[: n - len(first)]


def _parse_entry(ring: _Ring, pos: int, log_guid: bytes) -> LogEntry | None:
    """The entry at ``pos`` if it is complete and valid, else None (never raises)."""
    raw_hdr = ring.get(pos, LogEntryHeader.size)
    if raw_hdr[:4] != LOG_ENTRY_SIGNATURE:
        return None
    hdr = LogEntryHeader.unpack(raw_hdr)
    length = hdr.entry_length
    if length == 0 or length % LOG_SECTOR or length > ring.length:
        return None
    if hdr.sequence_number == 0 or hdr.log_guid != log_guid:
        return None
    if hdr.tail % LOG_SECTOR or hdr.tail >= ring.length:
        return None
    dsec = descriptor_sectors(hdr.descriptor_count)
    if dsec * LOG_SECTOR > length:
        return None
    entry = ring.get(pos, length)
    if checksum_with_field_zeroed(entry) != hdr.checksum:
        return None
    data_pos = dsec * LOG_SECTOR
    writes: list[tuple[int, bytes | None, int]] = []
    for i in range(hdr.descriptor_count):
        desc = LogDescriptor.unpack(entry, LogEntryHeader.size + i * LogDescriptor.size)
        if desc.sequence_number != hdr.sequence_number or desc.file_offset % LOG_SECTOR:
            return None
        if desc.signature == LOG_ZERO_SIGNATURE:
            zero_length = int.from_bytes(desc.leading_bytes, "little")
            if zero_length % LOG_SECTOR:
                return None
            writes.append((desc.file_offset, None, zero_length))
        elif desc.signature == LOG_DESC_SIGNATURE:
            if data_pos + LOG_SECTOR > length:
                return None
            sector = LogDataSector.unpack(entry, data_pos)
            seq = (sector.sequence_high << 32) | sector.sequence_low
            if sector.signature != LOG_DATA_SIGNATURE or seq != hdr.sequence_number:
                return None
            writes.append(
                (desc.file_offset, desc.leading_bytes + sector.data + desc.trailing_bytes, 4096)
            )
            data_pos += LOG_SECTOR
        else:
            return None
    if data_pos != length:  # every data sector must have its descriptor, and no more
        return None
    return LogEntry(pos, hdr, writes)


def find_active_sequence(log_data: bytes, log_guid: bytes) -> list[LogEntry]:
    """The entries to replay, oldest first; empty when the log holds nothing to replay.

    MS-VHDX: the active sequence is the run of valid entries with contiguous sequence numbers
    that ends in the valid entry with the highest sequence number, starting at that entry's
    Tail.  When the head's Tail does not lie on the run (some writers do not maintain it), the
    whole contiguous run is replayed, which is what qemu does.
    """
    ring = _Ring(log_data)
    entries: dict[int, LogEntry] = {}
    for pos in range(0, ring.length, LOG_SECTOR):
        entry = _parse_entry(ring, pos, log_guid)
        if entry is not None:
            entries[pos] = entry
    best: list[LogEntry] = []
    visited: set[int] = set()
    for start in sorted(entries, key=lambda p: entries[p].sequence):
        if start in visited:  # already the suffix of a longer run
            continue
        run = [entries[start]]
        pos = (start + run[0].length) % ring.length
        while len(run) * LOG_SECTOR <= ring.length:
            nxt = entries.get(pos)
            if nxt is None or nxt.sequence != run[-1].sequence + 1:
                break
            run.append(nxt)
            visited.add(pos)
            pos = (pos + nxt.length) % ring.length
        if not best or run[-1].sequence > best[-1].sequence:
            best = run
    if not best:
        return []
    tail = best[-1].header.tail
    for i, entry in enumerate(best):
        if entry.position == tail:
            return best[i:]
    return best


def build_overlay(sequence: list[LogEntry]) -> Overlay:
    overlay = Overlay(entries=len(sequence))
    for entry in sequence:
        for offset, data, length in entry.writes:
            if data is None:
                overlay.add_zeros(offset, length)
            else:
                overlay.add_sector(offset, data)
        overlay.last_file_offset = max(overlay.last_file_offset, entry.header.last_file_offset)
        overlay.flushed_file_offset = max(
            overlay.flushed_file_offset, entry.header.flushed_file_offset
        )
        overlay.sequence = entry.sequence
    return overlay


def replay_on_disk(
    overlay: Overlay,
    write: Callable[[int, bytes], None],
) -> None:
    """Write the overlay's sectors to their final places (zero ranges in bounded chunks)."""
    chunk = bytes(1 << 20)
    for zoff, zlen in overlay.zeros:
        pos, end = zoff, zoff + zlen
        while pos < end:
            n = min(len(chunk), end - pos)
            write(pos, chunk[:n])
            pos += n
    for offset in sorted(overlay.sectors):
        write(offset, overlay.sectors[offset])


def build_entry(
    sectors: list[tuple[int, bytes]],
    *,
    sequence: int,
    tail: int,
    log_guid: bytes,
    flushed_file_offset: int,
    last_file_offset: int,
) -> bytes:
    """A complete log entry carrying whole 4 KiB sectors ``(file offset, contents)``."""
    count = len(sectors)
    dsec = descriptor_sectors(count)
    length = (dsec + count) * LOG_SECTOR
    buf = bytearray(length)
    hdr = LogEntryHeader(
        entry_length=length,
        tail=tail,
        sequence_number=sequence,
        descriptor_count=count,
        log_guid=log_guid,
        flushed_file_offset=flushed_file_offset,
        last_file_offset=last_file_offset,
    )
    buf[: LogEntryHeader.size] = hdr.pack()
    for i, (offset, data) in enumerate(sectors):
        if len(data) != LOG_SECTOR or offset % LOG_SECTOR:
            raise CorruptImageError("internal: log writes must be whole aligned 4 KiB sectors")
        desc = LogDescriptor(
            signature=LOG_DESC_SIGNATURE,
            trailing_bytes=data[-4:],
            leading_bytes=data[:8],
            file_offset=offset,
            sequence_number=sequence,
        )
        doff = LogEntryHeader.size + i * LogDescriptor.size
        buf[doff : doff + LogDescriptor.size] = desc.pack()
        sector = LogDataSector(
            sequence_high=sequence >> 32,
            data=data[8:-4],
            sequence_low=sequence & 0xFFFFFFFF,
        )
        soff = (dsec + i) * LOG_SECTOR
        buf[soff : soff + LOG_SECTOR] = sector.pack()
    return bytes(seal(buf))


def max_sectors_per_entry(log_length: int) -> int:
    """How many data sectors one entry may carry so that it fits the log with room to spare."""
    usable = log_length // LOG_SECTOR - 1
    n = usable - descriptor_sectors(usable)
    return max(1, n)
