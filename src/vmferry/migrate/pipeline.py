"""One disk, one streaming pass: source chain (+ guest fixes in the overlay) → target image.

The pass itself is :func:`vmferry.ops.stream.stream_to_image` (the one ``vmferry fix -o`` uses):
what the chain map says holds data is read from the layer that answers for it, the pieces the
overlay changed are read through the overlay, zero runs are never written, so the output stays
sparse.  Migrate adds the digest of the virtual content (:mod:`vmferry.migrate.digest`),
computed on the same buffers on the reader thread, so it costs one hash of the data, no extra
read, and overlaps the writes.

The output is written under a temporary name and renamed when complete and synced
(:class:`~vmferry.ops.atomic.AtomicOutput`), so a killed migration leaves no file that looks
finished.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from vmferry.chain import Chain
from vmferry.disk import driver_by_name
from vmferry.guest.overlay import Overlay
from vmferry.migrate.digest import BlockDigest
from vmferry.ops.progress import Progress
from vmferry.ops.stream import read_plan, stream_to_image

#: test hook: seconds to sleep after each chunk (a kill test needs a migration caught mid-disk);
#: inert unless set
SLOW_ENV = "VMFERRY_TEST_SLOW_CHUNK"


@dataclass
class StreamResult:
    bytes_read: int
    bytes_written: int
    seconds: float
    digest: str
    out_virtual_size: int


def stream_disk(
    chain: Chain | None,
    overlay: Overlay | None,
    virtual_size: int,
    out_path: Path,
    driver_name: str,
    options: dict[str, str],
    progress: Progress | None = None,
    description: str = "converting",
) -> StreamResult:
    """Write the disk (with the overlay's fixes) into a new image at ``out_path``."""
    slow = float(os.environ.get(SLOW_ENV, "0") or 0)
    started = time.monotonic()
    digest = BlockDigest(virtual_size)
    done = stream_to_image(
        read_plan(chain, overlay),
        virtual_size,
        out_path,
        driver_by_name(driver_name),
        options,
        progress=progress,
        description=description,
        tap=digest.update,
        after_chunk=(lambda: time.sleep(slow)) if slow else None,
    )
    return StreamResult(
        done.bytes_read,
        done.bytes_written,
        time.monotonic() - started,
        digest.hexdigest(),
        done.virtual_size,
    )
