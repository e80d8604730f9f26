"""Giving space back (Optimize-VHD): blocks that hold only zeros stop holding anything.

A guest that deletes files leaves its blocks allocated in the image; after ``fstrim`` or a
zero-fill they read as zeros but still occupy the file.  ``compact`` finds every block-sized
run the layer holds as DATA that reads as all zeros and hands it to ``write_zeroes``, where
each driver turns whole blocks into its ZERO/unallocated form or punches a filesystem hole
under them.  The file's apparent size may stay (the blocks are in the middle of it), but its
allocated bytes drop, which is what fills volumes.

Why it is safe: the decision is made on what the *chain* reads (the layer over its parents),
so a zeroed run is replaced by zeros, and writing zeros over zeros never changes what any
reader sees, at any instant; a crash mid-way leaves an image that reads the same.  In a
differencing layer, ``write_zeroes`` keeps the range answered by this layer (ZERO, or zero
data): it never falls back to UNALLOCATED, which would be correct only where every parent also
reads zeros, so the rule "drop to UNALLOCATED only over a zero parent" holds trivially.

An image with children is refused: changing a layer bumps its identity in several formats
(VHDX DataWriteGuid, VMDK CID), which would make its children refuse it as their parent.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmferry.chain.open import open_chain
from vmferry.chain.surgery import find_children
from vmferry.disk import Alloc, Extent
from vmferry.errors import UnsafeOperationError
from vmferry.ops.progress import NoProgress, Progress

#: bytes read at once while looking for zero blocks
WINDOW = 8 << 20
#: smallest run worth zeroing: a filesystem block (a smaller hole gives nothing back)
MIN_UNIT = 4096
#: largest unit examined: drivers punch holes under zeroed parts of a block too, so a large
#: block (VHDX: up to 256 MiB) half full of zeros still gives those zeros back
MAX_UNIT = 1 << 20


def _allocated(files: Sequence[str]) -> int:
    return sum(os.stat(f).st_blocks * 512 for f in files if os.path.exists(f))


def _holes(top: Any, ext: Extent) -> list[tuple[int, int]]:
    """Guest ranges of a DATA extent whose bytes are already a hole in the file.

    Drivers answer zeroing inside an allocated block by punching a hole and keep the block
    DATA, so a second compaction would redo the work (and, in formats whose identity follows
    writes, change the identity for nothing).  Only a hint: a range wrongly taken for a hole
    is merely left as it is, which never changes what is read.
    """
    if ext.host_offset is None or ext.compressed:
        return []
    try:
        runs = list(top.file.data_runs(ext.host_offset, ext.length))
    except (OSError, ValueError):
        return []
    return [
        (ext.offset + off - ext.host_offset, ext.offset + off - ext.host_offset + n)
        for off, n, is_data in runs
        if not is_data
    ]


def _already_hole(holes: list[tuple[int, int]], start: int, length: int) -> bool:
    """The range is a hole but for the file-system blocks its edges share with neighbours.

    Sector-aligned formats (VHD) put a block's bytes off the file system's 4 KiB grid, so a
    punched range keeps a partial page of data at each end that no punch can free.
    """
    covered = sum(max(0, min(b, start + length) - max(a, start)) for a, b in holes)
    slack = 2 * MIN_UNIT if length >= 4 * MIN_UNIT else 0
    return length - covered <= slack


def _zero_runs(chain: Any, unit: int) -> list[tuple[int, int]]:
    """Unit-aligned runs that the top layer holds as DATA and the chain reads as zeros."""
    top = chain.top
    size = top.virtual_size
    zero = bytes(unit)
    runs: list[tuple[int, int]] = []
    done = 0  # everything before this offset has been examined
    for ext in top.extents():
        if ext.alloc is not Alloc.DATA:
            continue
        holes = _holes(top, ext)
        pos = max(ext.offset - ext.offset % unit, done)
        end = min(-(-ext.end // unit) * unit, size)
        while pos < end:
            n = min(WINDOW, end - pos)
            buf = memoryview(chain.read(pos, n))
            for i in range(0, n, unit):
                piece = buf[i : i + unit]
                start = pos + i
                if _already_hole(holes, start, len(piece)):
                    continue  # a hole in the file already: nothing to give back
                if piece == zero[: len(piece)]:
                    if runs and runs[-1][0] + runs[-1][1] == start:
                        runs[-1] = (runs[-1][0], runs[-1][1] + len(piece))
                    else:
                        runs.append((start, len(piece)))
            pos += n
        done = max(done, end)
    return runs


def compact(
    image: str | os.PathLike[str],
    *,
    allowed_dirs: Sequence[str | os.PathLike[str]] = (),
    scan: Sequence[str | os.PathLike[str]] = (),
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Turn every all-zero DATA block of ``image`` into zeros the format stores for free.

    Returns the allocated bytes of the layer's files before and after, and the bytes of the
    guest-visible ranges that were zeroed.
    """
    path = Path(os.path.abspath(image))
    children = find_children(path, scan)
    if children:
        raise UnsafeOperationError(
            f"{path.name} has differencing children ({', '.join(children)}): compacting "
            "changes its identity in several formats, which would break their link to it",
            path=str(path),
            hint="compact the leaf, or merge the snapshots first (vmferry merge CHILD --all)",
        )
    bar = progress or NoProgress()
    with open_chain(path, writable=True, allowed_dirs=allowed_dirs) as chain:
        top = chain.top
        files = [os.path.realpath(f) for f in top.files()]
        before = _allocated(files)
        unit = max(min(top.granularity, MAX_UNIT), top.write_alignment, MIN_UNIT)
        runs = _zero_runs(chain, unit)
        total = sum(n for _, n in runs)
        bar.start(total, "compacting")
        done = 0
        for offset, length in runs:
            chain.write_zeroes(offset, length)
            done += length
            bar.advance(done)
        chain.flush()
        bar.finish()
    after = _allocated(files)
    return {
        "image": str(path),
        "allocated_before": before,
        "allocated_after": after,
        "freed_bytes": max(before - after, 0),
        "zeroed_bytes": total,
        "runs": len(runs),
    }
