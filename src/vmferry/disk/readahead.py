"""Reading image ranges on a helper thread, a few requests ahead of their consumer.

Copying (convert, merge) alternates reads of one image with writes to another; both are
system calls that release the GIL, so reading the next chunks while this one is written
overlaps them as qemu-img's pipeline does.  A bare thread and a queue: ``concurrent.futures``
would import ``logging`` at every start, and start-up is part of every command's time.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Protocol


class Readable(Protocol):
    def read(self, offset: int, length: int) -> bytes: ...


class ReadableInto(Protocol):
    def read_into(self, offset: int, view: memoryview) -> None: ...


#: requests read ahead of the one being consumed
DEPTH = 2

#: bytes per request when the output is written directly (O_DIRECT): the device wants large
#: requests (2 GiB here: 2.6 s in 8 MiB writes, 6.5 s in 1 MiB ones) and no CPU copy follows
DIRECT_CHUNK = 8 << 20
#: a window that is read and then used at once (compared, hashed) while it is still in the
#: CPU's cache: compare, migrate's verify and its copy
CACHED_CHUNK = 1 << 20
#: bytes per request when a copy's output goes through the page cache.  Once buffered writes
#: were handed to the kernel in CACHED_WRITE_MAX pieces (blockfile.py), larger chunks stopped
#: costing system time (1 MiB had been chosen when 2 and 8 MiB chunks made 2 MiB and 8 MiB
#: writes: 5-8 s of system time per 2 GiB) and only saved work: fewer rounds through Python,
#: and a 2 MiB VHD block allocated whole instead of in two halves (a partial bitmap, then a
#: second write and a bitmap update).  Measured here (2 GiB, --no-sync, 5 alternating rounds,
#: median wall): raw → vhd 1 MiB 1.67 s, 2 MiB 1.41-1.48, 4 MiB 1.25, 8 MiB 1.31; raw → raw
#: 1 MiB 1.40, 2 MiB 1.16; vdi → raw 1 MiB 5.72, 4 MiB 5.55; raw → qcow2 1 MiB 2.20, 4 MiB 1.90.
CACHED_COPY_CHUNK = 4 << 20


class _File(Protocol):
    @property
    def writes_direct(self) -> bool: ...


class _Writes(Protocol):
    file: _File


def chunk_for(dst: _Writes) -> int:
    """Request size for a copy into ``dst`` (see DIRECT_CHUNK and CACHED_COPY_CHUNK)."""
    return DIRECT_CHUNK if dst.file.writes_direct else CACHED_COPY_CHUNK


def read_ahead(plan: Sequence[tuple[Readable, int, int]], depth: int = DEPTH) -> Iterator[bytes]:
    """The bytes of each (source, offset, length) in ``plan``, in order, read ``depth`` ahead.

    A read that fails raises here, in the consumer, in its turn.  Closing the generator (or
    leaving a ``for`` loop over it by an exception, once it is collected) stops the reader and
    waits for it, so the sources may be closed right after.
    """
    results: queue.SimpleQueue[tuple[bytes | None, BaseException | None]] = queue.SimpleQueue()
    room = threading.Semaphore(depth)
    stop = threading.Event()

    def reader() -> None:
        for source, offset, length in plan:
            room.acquire()
            if stop.is_set():
                return
            try:
                results.put((source.read(offset, length), None))
            except BaseException as exc:  # handed to the consumer, raised there
                results.put((None, exc))
                return

    thread = threading.Thread(target=reader, name="vmferry-read", daemon=True)
    thread.start()
    try:
        for _ in plan:
            buf, exc = results.get()
            if exc is not None:
                raise exc
            assert buf is not None
            room.release()
            yield buf
    finally:
        stop.set()
        room.release()
        thread.join()


def read_ahead_into(
    plan: Sequence[tuple[ReadableInto, int, int]], depth: int = DEPTH
) -> Iterator[memoryview]:
    """Like :func:`read_ahead`, but into ``depth + 1`` page-aligned buffers that are reused.

    Each yielded view is valid until the next one is asked for (then its buffer is refilled):
    the consumer writes it and lets it go, it does not keep it.  Why: a fresh 8 MiB bytes
    object per chunk is fresh memory the kernel must fault in and zero (on this kind of VM,
    memory the host may have taken back), and its address suits no O_DIRECT write; the same
    few warm, aligned buffers cost neither.
    """
    import mmap

    size = max((n for _, _, n in plan), default=0)
    if size == 0:
        yield from (memoryview(b"") for _ in plan)
        return
    free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
    for _ in range(depth + 1):
        free.put(mmap.mmap(-1, size))
    results: queue.SimpleQueue[tuple[mmap.mmap | None, BaseException | None]] = queue.SimpleQueue()
    stop = threading.Event()

    def reader() -> None:
        for source, offset, length in plan:
            buf = free.get()
            if stop.is_set():
                return
            try:
                with memoryview(buf) as view:
                    source.read_into(offset, view[:length])
                results.put((buf, None))
            except BaseException as exc:  # handed to the consumer, raised there
                results.put((None, exc))
                return

    thread = threading.Thread(target=reader, name="vmferry-read", daemon=True)
    thread.start()
    held: mmap.mmap | None = None
    try:
        for _, _, length in plan:
            buf, exc = results.get()
            if exc is not None:
                raise exc
            assert buf is not None
            held = buf
            yield memoryview(buf)[:length]
            free.put(held)  # asked for the next one: the consumer is done with this one
            held = None
    finally:
        stop.set()
        if held is not None:
            free.put(held)
        free.put(mmap.mmap(-1, 1))  # wakes a reader waiting for a buffer
        thread.join()
