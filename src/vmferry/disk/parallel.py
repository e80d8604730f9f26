"""One process-wide worker pool for the CPU work drivers hand out: inflating compressed grains
and clusters, deflating them for compressed output.

Why one pool and threads: zlib and zstd release the GIL while they work, so threads use every
core without pickling; one pool (instead of one per driver or per image) keeps the thread count
at the core count however many images a chain or a merge has open.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # (imported when first needed: it pulls in logging, at every start)
    from concurrent.futures import ThreadPoolExecutor

T = TypeVar("T")
R = TypeVar("R")
#: a piece of a compressed unit (grain, cluster) to inflate into a result: (unit index, the key
#: that identifies its stored bytes, offset in the result, offset in the unit, length)
Piece = tuple[int, int, int, int, int]
#: the last inflated unit, kept by a driver: (key, its bytes)
LastUnit = tuple[int, bytes]

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_WINDOWS = threading.local()


def parallel_workers() -> int:
    return os.cpu_count() or 1


def _pool() -> ThreadPoolExecutor:
    global _POOL
    from concurrent.futures import ThreadPoolExecutor

    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(parallel_workers(), thread_name_prefix="vmferry-codec")
        return _POOL


def map_all(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]`` on every core, results in order (see :func:`map_batches`)."""
    return map_batches(lambda batch: [fn(x) for x in batch], items)


def map_batches(fn: Callable[[list[T]], list[R]], items: Iterable[T]) -> list[R]:
    """``fn(items)`` with the items cut into one contiguous batch per core, results joined in
    order; ``fn`` maps a batch to one result per item.

    Why batches: a future per item costs about as much as inflating a 64 KiB grain that does
    not compress, and a batch lets ``fn`` keep one small buffer hot in its core's cache.  The
    calling thread works through the first batch itself instead of idling while it waits.
    Every batch has finished before the first error is raised, so no work is left running
    behind an exception (it could still be reading a buffer the caller is about to reuse).
    """
    items = list(items)
    workers = min(parallel_workers(), len(items))
    if workers < 2:
        return fn(items) if items else []
    from concurrent.futures import wait

    size = -(-len(items) // workers)
    batches = [items[at : at + size] for at in range(0, len(items), size)]
    pool = _pool()
    futures = [pool.submit(fn, batch) for batch in batches[1:]]
    try:
        out = fn(batches[0])
    finally:
        wait(futures)
    for future in futures:
        out.extend(future.result())
    return out


def thread_window(size: int) -> memoryview:
    """``size`` bytes of this thread's scratch buffer, for compressed bytes on their
    way to the inflater.  Reused (per thread, since batches run on every core) so that it stays
    in the core's cache: a fresh buffer per chunk made every copy after it miss the cache."""
    buf: bytearray | None = getattr(_WINDOWS, "buf", None)
    if buf is None or len(buf) < size:
        buf = _WINDOWS.buf = bytearray(size)
    return memoryview(buf)[:size]


def inflate_pieces(
    view: memoryview,
    pieces: list[Piece],
    last: LastUnit | None,
    batch: Callable[[list[Piece]], list[bytes | None]],
    parallel: Callable[[list[Piece]], bool],
) -> LastUnit | None:
    """Fill ``view`` with ``pieces`` of compressed units; returns the unit to keep as ``last``.

    Pieces of the unit inflated last are copied from it (small reads walking through one unit
    inflate it once); the rest go to ``batch``, which inflates its pieces into ``view`` and
    returns one result per piece, the last one's unit (None for the others): in one call, or
    in one contiguous batch per core when ``parallel(todo)`` says it is worth it.
    """
    todo: list[Piece] = []
    for piece in pieces:
        _unit, key, dst, at, n = piece
        if last is not None and last[0] == key:
            view[dst : dst + n] = memoryview(last[1])[at : at + n]
        else:
            todo.append(piece)
    if not todo:
        return last
    lasts = map_batches(batch, todo) if parallel(todo) else batch(todo)
    unit = lasts[-1]
    assert unit is not None
    return todo[-1][1], unit
