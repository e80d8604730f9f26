"""Compare what two disks show a guest, as qemu-img compare does.

Runs where both sides read as zeros are decided from the maps alone; only runs where either
side holds data are read.  Sizes may differ: the extra tail of the larger disk must read as
zeros unless ``strict`` is asked for.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from vmferry.chain import Chain, MapExtent, open_chain
from vmferry.disk.readahead import CACHED_CHUNK
from vmferry.ops.progress import NoProgress, Progress
from vmferry.ops.sparse import is_zero

CHUNK = CACHED_CHUNK  # both sides' buffers stay in the CPU's cache for the comparison


@dataclass
class CompareResult:
    identical: bool
    mismatch_offset: int | None
    reason: str

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


def _data_flags(chain: Chain, start: int, end: int) -> Iterator[MapExtent]:
    if start < end:
        yield from chain.map(start, end - start)


def _first_difference(a: bytes, b: bytes) -> int:
    lo, hi = 0, len(a)
    while hi - lo > 512:  # bisect down to a sector with memcmp-speed comparisons
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i
    return lo


def compare_chains(
    a: Chain, b: Chain, *, strict: bool = False, progress: Progress | None = None
) -> CompareResult:
    progress = progress or NoProgress()
    common = min(a.virtual_size, b.virtual_size)
    if strict and a.virtual_size != b.virtual_size:
        return CompareResult(
            False, common, f"image sizes differ: {a.virtual_size} != {b.virtual_size}"
        )
    progress.start(max(a.virtual_size, b.virtual_size), "comparing")
    ia, ib = a.map(0, common), b.map(0, common)
    ea, eb = next(ia, None), next(ib, None)
    pos = 0
    while pos < common and ea is not None and eb is not None:
        end = min(ea.end, eb.end)
        if ea.data or eb.data:
            off = pos
            while off < end:
                n = min(CHUNK, end - off)
                da = a.layers[ea.depth].read(off, n) if ea.data else None
                db = b.layers[eb.depth].read(off, n) if eb.data else None
                if da is None:
                    assert db is not None
                    if not is_zero(db):
                        return _mismatch(off, bytes(n), db)
                elif db is None:
                    if not is_zero(da):
                        return _mismatch(off, da, bytes(n))
                elif da != db:
                    return _mismatch(off, da, db)
                off += n
                progress.advance(off)
        pos = end
        if ea.end == end:
            ea = next(ia, None)
        if eb.end == end:
            eb = next(ib, None)
    longer = a if a.virtual_size > b.virtual_size else b
    for ext in _data_flags(longer, common, longer.virtual_size):
        if not ext.data:
            continue
        off = ext.offset
        while off < ext.end:
            n = min(CHUNK, ext.end - off)
            data = longer.layers[ext.depth].read(off, n)
            if not is_zero(data):
                return CompareResult(
                    False,
                    off + _first_difference(data, bytes(n)),
                    "the larger image has data past the end of the smaller",
                )
            off += n
    progress.finish()
    note = (
        "images are identical"
        if a.virtual_size == b.virtual_size
        else ("images are identical (sizes differ; the extra part reads as zeros)")
    )
    return CompareResult(True, None, note)


def _mismatch(offset: int, a: bytes, b: bytes) -> CompareResult:
    return CompareResult(False, offset + _first_difference(a, b), "content mismatch")


def compare(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    a_format: str | None = None,
    b_format: str | None = None,
    strict: bool = False,
    allowed_dirs: Sequence[str | os.PathLike[str]] | None = None,
    force_share: bool = False,
    progress: Progress | None = None,
) -> CompareResult:
    with (
        open_chain(a, a_format, allowed_dirs=allowed_dirs, force_share=force_share) as ca,
        open_chain(b, b_format, allowed_dirs=allowed_dirs, force_share=force_share) as cb,
    ):
        return compare_chains(ca, cb, strict=strict, progress=progress)
