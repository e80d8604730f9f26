"""One streaming pass: a chain, with a copy-on-write overlay's edits laid over it, into a new
image.

`vmferry fix -o` and migrate (one pass per disk) both write "the source as the guest will see
it after the fixes".  Copying the chain and then writing the edits over the copy would write
every edited block twice, and cannot work at all for an append-only output (streamOptimized
VMDK, an OVA): a grain, once written, stays.  So the plan is made once, in disk order, and each
piece is read either from the layer that holds it or, where the overlay changed any byte of it,
through the overlay; ranges the overlay wrote where the source had no data become pieces of
their own.  Zero and unallocated runs are never read nor written and 4 KiB zero runs inside data
are skipped, exactly as ``vmferry convert`` does, so the output stays sparse.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from os import PathLike
from typing import Protocol

from vmferry.chain import Chain
from vmferry.disk import DiskFormat
from vmferry.disk.readahead import CACHED_CHUNK, Readable, read_ahead
from vmferry.ops.convert import check_create_options, new_image, write_nonzero
from vmferry.ops.progress import NoProgress, Progress

#: (offset, length, source): ``source.read(offset, length)`` returns those bytes of the disk
Piece = tuple[int, int, Readable]


class Edits(Protocol):
    """What the plan needs of an overlay (:class:`vmferry.guest.overlay.Overlay`)."""

    @property
    def dirty(self) -> bool: ...

    def changes(self) -> list[tuple[int, int]]: ...

    def read(self, offset: int, length: int) -> bytes: ...


def read_plan(chain: Chain | None, edits: Edits | None, chunk: int = CACHED_CHUNK) -> list[Piece]:
    """Pieces in disk order, none crossing a ``chunk`` boundary: every data run of ``chain``
    read from its layer, except the pieces holding an edited byte, read through ``edits``."""
    pieces: list[Piece] = []
    if chain is not None:
        for ext in chain.map():
            if ext.data:
                _split(pieces, ext.offset, ext.end, chain.layers[ext.depth], chunk)
    changes = edits.changes() if edits is not None and edits.dirty else []
    if not changes:
        return pieces
    assert edits is not None
    starts = [p[0] for p in pieces]
    extra: list[Piece] = []
    for cs, cl in changes:
        ce, pos = cs + cl, cs
        j = max(bisect.bisect_right(starts, cs) - 1, 0)
        while j < len(pieces) and pieces[j][0] < ce:
            ps, pn, _ = pieces[j]
            if ps + pn > cs:  # this data piece holds changed bytes: read it through the overlay
                pieces[j] = (ps, pn, edits)
                if ps > pos:
                    _split(extra, pos, ps, edits, chunk)
                pos = max(pos, ps + pn)
            j += 1
        if pos < ce:
            _split(extra, pos, ce, edits, chunk)
    return sorted(pieces + extra, key=lambda p: p[0])


def _split(out: list[Piece], start: int, end: int, source: Readable, chunk: int) -> None:
    pos = start
    while pos < end:
        n = min(chunk - (pos % chunk), end - pos)
        out.append((pos, n, source))
        pos += n


@dataclass
class Streamed:
    bytes_read: int
    bytes_written: int
    #: the output's virtual size as its driver reports it (a format may round the size up)
    virtual_size: int


class _Tapped:
    """A piece's source that shows each piece's bytes to ``tap`` on the reading thread (a
    digest must see the pieces in disk order, and hashing there overlaps the writes)."""

    __slots__ = ("source", "tap")

    def __init__(self, source: Readable, tap: Callable[[int, bytes], None]) -> None:
        self.source = source
        self.tap = tap

    def read(self, offset: int, length: int) -> bytes:
        buf = self.source.read(offset, length)
        self.tap(offset, buf)
        return buf


def stream_to_image(
    plan: list[Piece],
    virtual_size: int,
    out_path: str | PathLike[str],
    driver: type[DiskFormat],
    options: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    description: str = "converting",
    tap: Callable[[int, bytes], None] | None = None,
    after_chunk: Callable[[], None] | None = None,
) -> Streamed:
    """Write ``plan`` into a new ``driver`` image at ``out_path`` (whole and synced, or not at
    all: :func:`~vmferry.ops.convert.new_image`).

    The output goes through the page cache with writeback started as it goes, not O_DIRECT:
    migrate's verify re-reads the whole output right after, from memory this way.
    ``tap(offset, data)`` sees every piece read, in disk order; ``after_chunk`` runs after each
    piece is written (a test hook).
    """
    opts = dict(options or {})
    check_create_options(driver, opts)
    progress = progress or NoProgress()
    total = sum(n for _, n, _ in plan)
    sources = [(_Tapped(src, tap) if tap else src, pos, n) for pos, n, src in plan]
    with new_image(out_path, driver, virtual_size, opts, overwrite=overwrite) as layer:
        progress.start(total, description)
        chunks = read_ahead(sources)
        try:
            written = write_nonzero(
                [(pos, n) for pos, n, _ in plan],
                chunks,
                layer,
                progress,
                writeback=True,
                after_chunk=after_chunk,
            )
        finally:
            chunks.close()  # the reader thread has stopped: ``tap`` has seen every piece
        progress.finish()
        out_size = layer.virtual_size
    return Streamed(total, written, out_size)
