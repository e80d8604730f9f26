"""Finding the parts of a buffer that are worth writing.

qemu-img convert skips runs of zeros of at least 4 KiB (its ``-S 4k`` default) so a
fully allocated source still yields a sparse target; vmferry does the same at the same
granularity.  Every comparison is a C ``memcmp`` (``bytes.startswith`` against a shared zero
buffer): comparing a ``memoryview`` slice with ``==`` goes item by item and is ~60x slower.
A memoryview (a slice of a reused read buffer) is compared the other way round: the shared
zero bytes ``startswith`` the slice, still a memcmp, and without copying the buffer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

SPARSE_GRANULARITY = 4096
_ZERO_CACHE: dict[int, bytes] = {}
#: one shared zero buffer; a prefix of its view is the "all zeros" of any length up to it
_ZERO_MAX = 32 << 20
_ZERO_BYTES = bytes(_ZERO_MAX)
_ZERO_VIEW = memoryview(_ZERO_BYTES)
_NONZERO = re.compile(rb"[^\x00]")


def zeros(length: int) -> bytes:
    """A shared all-zero bytes object of ``length`` (cached for the common chunk sizes)."""
    z = _ZERO_CACHE.get(length)
    if z is None:
        z = bytes(length)
        if length <= _ZERO_MAX and len(_ZERO_CACHE) < 64:
            _ZERO_CACHE[length] = z
    return z


def _zero_at(buf: bytes | bytearray | memoryview, start: int, end: int) -> bool:
    """``buf[start:end]`` is all zeros (memcmp speed, no copy)."""
    if isinstance(buf, memoryview):
        while end - start > _ZERO_MAX:
            if not _ZERO_BYTES.startswith(buf[start : start + _ZERO_MAX]):
                return False
            start += _ZERO_MAX
        return _ZERO_BYTES.startswith(buf[start:end])
    while end - start > _ZERO_MAX:
        if not buf.startswith(_ZERO_VIEW, start):
            return False
        start += _ZERO_MAX
    return buf.startswith(_ZERO_VIEW[: end - start], start)


def _bytes_view(buf: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
    """bytes/bytearray as they are; anything else as a flat byte memoryview (no copy)."""
    if isinstance(buf, bytes | bytearray):
        return buf
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def is_zero(buf: bytes | bytearray | memoryview) -> bool:
    buf = _bytes_view(buf)
    return _zero_at(buf, 0, len(buf))


def nonzero_runs(
    buf: bytes | bytearray | memoryview, base: int = 0, granularity: int = SPARSE_GRANULARITY
) -> Iterator[tuple[int, int]]:
    """Yield (offset, length) of runs that are not all zero, at ``granularity`` resolution.

    ``base`` is the buffer's position in the disk; pieces are aligned to the disk, not the
    buffer, so a target's blocks see the same zero runs whatever the chunking.

    Only pieces whose first byte is zero can be zero, and those are found in one strided
    slice (one byte per piece): on data, the check costs a few candidates per chunk instead
    of a scan of every byte; a run of candidates is confirmed with one comparison.
    """
    buf = _bytes_view(buf)
    n = len(buf)
    if n == 0 or _zero_at(buf, 0, n):
        return
    g = granularity
    head = min(-base % g, n)  # a first piece shorter than g, up to the next aligned offset
    zero_runs: list[tuple[int, int]] = []
    if head and _zero_at(buf, 0, head):
        zero_runs.append((0, head))
    firsts = bytes(buf[head::g])  # the first byte of every aligned piece
    count = len(firsts)
    k = firsts.find(0)
    while k >= 0:
        m = _NONZERO.search(firsts, k + 1)
        j = m.start() if m else count  # pieces k..j-1 all start with a zero byte
        start, end = head + k * g, min(head + j * g, n)
        if _zero_at(buf, start, end):
            _add(zero_runs, start, end)
        else:
            for p in range(start, end, g):
                if _zero_at(buf, p, min(p + g, n)):
                    _add(zero_runs, p, min(p + g, n))
        k = firsts.find(0, j) if j < count else -1
    pos = 0
    for start, end in zero_runs:
        if start > pos:
            yield base + pos, start - pos
        pos = end
    if pos < n:
        yield base + pos, n - pos


def _add(runs: list[tuple[int, int]], start: int, end: int) -> None:
    if runs and runs[-1][1] == start:
        runs[-1] = (runs[-1][0], end)
    else:
        runs.append((start, end))
