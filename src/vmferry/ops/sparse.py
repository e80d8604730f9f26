"""Finding the parts of a buffer that are worth writing.

qemu-img convert skips runs of zeros of at least 4 KiB (its ``-S 4k`` default) so a
fully allocated source still yields a sparse target; vmferry does the same at the same
granularity, using memcmp-speed comparisons rather than a Python loop over bytes.
"""

from __future__ import annotations

from collections.abc import Iterator

SPARSE_GRANULARITY = 4096
_ZERO_PIECE = bytes(SPARSE_GRANULARITY)
_ZERO_CACHE: dict[int, bytes] = {}


def zeros(length: int) -> bytes:
    """A shared all-zero bytes object of ``length`` (cached for the common chunk sizes)."""
    z = _ZERO_CACHE.get(length)
    if z is None:
        z = bytes(length)
        if length <= 32 << 20:
            _ZERO_CACHE[length] = z
    return z


def is_zero(buf: bytes | bytearray | memoryview) -> bool:
    return buf == zeros(len(buf))


def nonzero_runs(
    buf: bytes, base: int = 0, granularity: int = SPARSE_GRANULARITY
) -> Iterator[tuple[int, int]]:
    """Yield (offset, length) of runs that are not all zero, at ``granularity`` resolution.

    ``base`` is the buffer's position in the disk; pieces are aligned to the disk, not the
    buffer, so a target's blocks see the same zero runs whatever the chunking.
    """
    n = len(buf)
    if n == 0 or is_zero(buf):
        return
    if granularity == SPARSE_GRANULARITY and buf.find(_ZERO_PIECE) < 0:
        yield base, n  # not even an unaligned 4 KiB run of zeros: all of it is data
        return
    mv = memoryview(buf)
    zero = _ZERO_PIECE if granularity == SPARSE_GRANULARITY else bytes(granularity)
    run_start = -1
    pos = 0
    first = granularity - (base % granularity)
    while pos < n:
        step = first if pos == 0 and first != granularity else granularity
        end = min(pos + step, n)
        piece = mv[pos:end]
        empty = piece == (zero if end - pos == granularity else bytes(end - pos))
        if empty:
            if run_start >= 0:
                yield base + run_start, pos - run_start
                run_start = -1
        elif run_start < 0:
            run_start = pos
        pos = end
    if run_start >= 0:
        yield base + run_start, n - run_start
