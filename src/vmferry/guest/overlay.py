"""A copy-on-write view of a disk: guest repairs are written here, never into the source.

Why an overlay and not a copy: a repair touches a few kilobytes of a disk that may hold hundreds
of gigabytes.  Keeping the edits aside lets ``vmferry fix --dry-run`` plan on real bytes, lets
``fix -o OUT`` stream the source through convert once while patching the changed ranges in, and
leaves the source untouched unless the user asks for ``--in-place`` (then ``commit`` writes the
changed ranges back).

Changed data is kept in fixed-size chunks.  Up to ``memory_limit`` bytes stay in a dict; past
that the chunks spill to an unnamed temporary file, so a large edit (an extra initramfs archive)
costs disk space, not memory.
"""

from __future__ import annotations

import bisect
import os
import tempfile
from collections.abc import Iterator
from typing import Protocol

from vmferry.errors import UsageError

CHUNK = 4096
DEFAULT_MEMORY_LIMIT = 64 << 20


class ReadableDisk(Protocol):
    """What the overlay needs from the disk below: a size and random reads."""

    @property
    def virtual_size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...


class WritableDisk(ReadableDisk, Protocol):
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...


class Overlay:
    """Reads merge the base with the edits; writes go to the edits only."""

    def __init__(self, base: ReadableDisk, *, memory_limit: int = DEFAULT_MEMORY_LIMIT) -> None:
        self.base = base
        self.virtual_size = base.virtual_size
        self.memory_limit = memory_limit
        self._mem: dict[int, bytes] = {}
        self._spilled: dict[int, int] = {}  # chunk index -> offset in the spill file
        self._spill: tempfile._TemporaryFileWrapper[bytes] | None = None
        self._keys: list[int] = []  # sorted chunk indices present in either store

    # --- the disk interface ---------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """The base's bytes with every edited chunk laid over them."""
        self._check(offset, length)
        if length == 0:
            return b""
        first, last = offset // CHUNK, (offset + length - 1) // CHUNK
        lo = bisect.bisect_left(self._keys, first)
        hi = bisect.bisect_right(self._keys, last)
        if lo == hi:
            return self.base.read(offset, length)
        buf = bytearray(self.base.read(offset, length))
        for idx in self._keys[lo:hi]:
            chunk = self._get(idx)
            cstart = idx * CHUNK
            a = max(offset, cstart)
            b = min(offset + length, cstart + len(chunk))
            buf[a - offset : b - offset] = chunk[a - cstart : b - cstart]
        return bytes(buf)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Record ``data`` at ``offset``; partial chunks are completed from the current view."""
        data = memoryview(data).cast("B")
        self._check(offset, len(data))
        pos = 0
        while pos < len(data):
            at = offset + pos
            idx = at // CHUNK
            cstart = idx * CHUNK
            csize = min(CHUNK, self.virtual_size - cstart)
            take = min(len(data) - pos, cstart + csize - at)
            if take == csize:
                chunk = bytes(data[pos : pos + take])
            else:
                cur = bytearray(self.read(cstart, csize))
                cur[at - cstart : at - cstart + take] = data[pos : pos + take]
                chunk = bytes(cur)
            self._put(idx, chunk)
            pos += take

    def flush(self) -> None:
        """Nothing to make durable: the overlay lives only as long as the process."""

    # --- what changed ---------------------------------------------------------------------------

    def changes(self) -> list[tuple[int, int]]:
        """Edited byte ranges ``(offset, length)``, sorted, adjacent chunks merged."""
        out: list[tuple[int, int]] = []
        for idx in self._keys:
            start = idx * CHUNK
            length = min(CHUNK, self.virtual_size - start)
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], out[-1][1] + length)
            else:
                out.append((start, length))
        return out

    def iter_changes(self, max_run: int = 4 << 20) -> Iterator[tuple[int, bytes]]:
        """``(offset, bytes)`` for every edited range, in pieces of at most ``max_run`` bytes."""
        for start, length in self.changes():
            for off in range(start, start + length, max_run):
                n = min(max_run, start + length - off)
                yield off, self.read(off, n)

    @property
    def dirty(self) -> bool:
        return bool(self._keys)

    def commit(self, target: WritableDisk) -> int:
        """Write every edited range into ``target`` (the ``--in-place`` path); bytes written."""
        if target.virtual_size != self.virtual_size:
            raise UsageError(
                f"overlay is {self.virtual_size} bytes but the target disk is "
                f"{target.virtual_size} bytes"
            )
        total = 0
        for off, data in self.iter_changes():
            target.write(off, data)
            total += len(data)
        return total

    def discard(self) -> None:
        """Forget every edit."""
        self._mem.clear()
        self._spilled.clear()
        self._keys.clear()
        self.close()

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None
            self._spilled.clear()
            self._keys = sorted(self._mem)

    def __enter__(self) -> Overlay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- storage --------------------------------------------------------------------------------

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise UsageError(
                f"range {offset}+{length} is outside the {self.virtual_size}-byte disk"
            )

    def _get(self, idx: int) -> bytes:
        chunk = self._mem.get(idx)
        if chunk is not None:
            return chunk
        assert self._spill is not None
        size = min(CHUNK, self.virtual_size - idx * CHUNK)
        return os.pread(self._spill.fileno(), size, self._spilled[idx])

    def _put(self, idx: int, chunk: bytes) -> None:
        known = idx in self._mem or idx in self._spilled
        if idx in self._spilled:
            assert self._spill is not None
            os.pwrite(self._spill.fileno(), chunk, self._spilled[idx])
        elif len(self._mem) * CHUNK < self.memory_limit or idx in self._mem:
            self._mem[idx] = chunk
        else:
            if self._spill is None:
                # lives as long as the overlay; closed in close()
                self._spill = tempfile.TemporaryFile(prefix="vmferry-overlay-")  # noqa: SIM115
            slot = len(self._spilled) * CHUNK
            os.pwrite(self._spill.fileno(), chunk, slot)
            self._spilled[idx] = slot
        if not known:
            bisect.insort(self._keys, idx)


class Slice:
    """A window of a disk (a partition) with its own offsets; reads and writes bounds-checked."""

    def __init__(self, disk: ReadableDisk, start: int, size: int) -> None:
        if start < 0 or size < 0 or start + size > disk.virtual_size:
            raise UsageError(f"slice {start}+{size} does not fit the {disk.virtual_size}-byte disk")
        self.disk = disk
        self.start = start
        self.virtual_size = size

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return self.disk.read(self.start + offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check(offset, len(data))
        write = getattr(self.disk, "write", None)
        if write is None:
            raise UsageError("this disk is read-only")
        write(self.start + offset, data)

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise UsageError(
                f"range {offset}+{length} is outside the {self.virtual_size}-byte partition"
            )
