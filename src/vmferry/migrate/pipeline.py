"""One disk, one streaming pass: source chain (+ guest fixes in the overlay) → target image.

The pass reads what the chain map says holds data, each run from the layer that answers for it,
exactly like ``vmferry convert`` (zero and unallocated runs are never read nor written, 4 KiB zero
runs inside data are skipped, so the output stays sparse).  The overlay's changed ranges are the
only reads that go through the overlay; ranges it changed where the source had no data become
extra pieces.  The digest of the virtual content (:mod:`vmferry.migrate.digest`) is computed on
the same buffers, on the reader thread, so it costs one hash of the data, no extra read, and
overlaps the writes.

The output is written under a temporary name and renamed when complete and synced
(:class:`~vmferry.ops.atomic.AtomicOutput`), so a killed migration leaves no file that looks
finished.
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmferry.chain import Chain
from vmferry.disk import driver_by_name
from vmferry.disk.readahead import CACHED_CHUNK, read_ahead
from vmferry.guest.overlay import Overlay
from vmferry.migrate.digest import BlockDigest
from vmferry.ops.atomic import AtomicOutput
from vmferry.ops.convert import write_nonzero
from vmferry.ops.progress import NoProgress, Progress

#: the output goes through the page cache (verify re-reads it from there): small chunks stay in
#: the CPU's cache between the read and the write copy (see readahead.CACHED_CHUNK)
CHUNK = CACHED_CHUNK
READ_AHEAD = 2
#: test hook: seconds to sleep after each chunk (a kill test needs a migration caught mid-disk);
#: inert unless set
SLOW_ENV = "VMFERRY_TEST_SLOW_CHUNK"

Reader = Callable[[int, int], bytes]


@dataclass
class StreamResult:
    bytes_read: int
    bytes_written: int
    seconds: float
    digest: str
    out_virtual_size: int


def read_plan(chain: Chain | None, overlay: Overlay | None) -> list[tuple[int, int, Reader]]:
    """(offset, length, reader) pieces in disk order, none crossing a CHUNK boundary."""
    pieces: list[tuple[int, int, Reader]] = []
    if chain is not None:
        for ext in chain.map():
            if ext.data:
                _split(pieces, ext.offset, ext.end, chain.layers[ext.depth].read)
    changes = overlay.changes() if overlay is not None and overlay.dirty else []
    if not changes:
        return pieces
    assert overlay is not None
    starts = [p[0] for p in pieces]
    extra: list[tuple[int, int, Reader]] = []
    for cs, cl in changes:
        ce, pos = cs + cl, cs
        j = max(bisect.bisect_right(starts, cs) - 1, 0)
        while j < len(pieces) and pieces[j][0] < ce:
            ps, pn, _ = pieces[j]
            if ps + pn > cs:  # this data piece holds changed bytes: read it through the overlay
                pieces[j] = (ps, pn, overlay.read)
                if ps > pos:
                    _split(extra, pos, ps, overlay.read)
                pos = max(pos, ps + pn)
            j += 1
        if pos < ce:
            _split(extra, pos, ce, overlay.read)
    return sorted(pieces + extra, key=lambda p: p[0])


def _split(out: list[tuple[int, int, Reader]], start: int, end: int, reader: Reader) -> None:
    pos = start
    while pos < end:
        n = min(CHUNK - (pos % CHUNK), end - pos)
        out.append((pos, n, reader))
        pos += n


class _HashingReader:
    """One piece of the plan, read and fed to the digest on the reader thread.

    ``read_ahead`` runs every read on one helper thread, in plan order, so the digest (which
    must be fed in disk order) is updated there, whole: the main thread only writes.  hashlib
    releases the GIL, so hashing one chunk overlaps writing the previous one.
    """

    __slots__ = ("digest", "reader")

    def __init__(self, digest: BlockDigest, reader: Reader) -> None:
        self.digest = digest
        self.reader = reader

    def read(self, offset: int, length: int) -> bytes:
        buf = self.reader(offset, length)
        self.digest.update(offset, buf)
        return buf


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
    progress = progress or NoProgress()
    driver = driver_by_name(driver_name)
    plan = read_plan(chain, overlay)
    total = sum(n for _, n, _ in plan)
    slow = float(os.environ.get(SLOW_ENV, "0") or 0)
    started = time.monotonic()
    digest = BlockDigest(virtual_size)
    with AtomicOutput(out_path) as out:
        assert out.file is not None
        out.file.cache_unsafe = True  # synced once, whole, before the rename
        # not ``write_direct``: verify re-reads the whole output right after, from memory this
        # way (from the disk, it would cost a second pass over the device)
        layer = driver.create(out.file, virtual_size, options, None)
        out.discard_with(layer.files())
        try:
            progress.start(total, description)
            chunks = read_ahead(
                [(_HashingReader(digest, reader), pos, n) for pos, n, reader in plan], READ_AHEAD
            )
            try:
                written = write_nonzero(
                    [(pos, n) for pos, n, _ in plan],
                    chunks,
                    layer,
                    progress,
                    writeback=True,
                    after_chunk=(lambda: time.sleep(slow)) if slow else None,
                )
            finally:
                chunks.close()  # the reader thread has stopped: the digest is complete
            progress.finish()
            layer.flush()
            out_size = layer.virtual_size
            out.commit()
        finally:
            layer.close()
    return StreamResult(total, written, time.monotonic() - started, digest.hexdigest(), out_size)
