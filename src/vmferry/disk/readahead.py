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


#: requests read ahead of the one being consumed
DEPTH = 2


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
