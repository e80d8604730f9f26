"""A disk as a guest sees it: a top layer and the parents below it.

Users never hold a bare differencing layer: reading one without its parent returns holes
where the guest had data (qemu's vpc driver does exactly that).  ``Chain`` sends what the top
layer leaves unallocated to the layer below, and ``map`` says for every byte which layer
answers, which is what convert, compare, merge and du are built on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmferry.disk.base import Alloc, DiskFormat, Extent


@dataclass(frozen=True, slots=True)
class MapExtent:
    """A run of the flattened disk: which layer answers and how (qemu-img map's record)."""

    offset: int
    length: int
    data: bool  # some layer holds bytes here (False: reads as zeros)
    zero: bool  # known to read as zeros
    depth: int  # index of the answering layer (0 = top); len(layers) when nobody answers
    host_offset: int | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def present(self) -> bool:
        return self.data or self.zero_present

    zero_present: bool = False  # a layer explicitly said ZERO (qemu's "present")


class Chain:
    """Layers top first; ``layers[-1]`` is the base."""

    def __init__(self, layers: list[DiskFormat], warnings: list[str] | None = None) -> None:
        if not layers:
            raise ValueError("a chain has at least one layer")
        self.layers = layers
        self.warnings = warnings if warnings is not None else []

    # --- the disk interface, delegated to the top layer ----------------------------------------

    @property
    def top(self) -> DiskFormat:
        return self.layers[0]

    @property
    def path(self) -> Path:
        return self.top.file.path

    @property
    def format(self) -> str:
        return self.top.name

    @property
    def virtual_size(self) -> int:
        return self.top.virtual_size

    @property
    def parent(self) -> Chain | None:
        return Chain(self.layers[1:], self.warnings) if len(self.layers) > 1 else None

    def block_status(self, offset: int, length: int) -> Extent:
        """The top layer's own status (UNALLOCATED = the parent answers)."""
        return self.top.block_status(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write through the top layer, completing partial sectors from the chain below.

        A differencing layer stores whole sectors and cannot read its parent, so an unaligned
        write is widened here with the bytes the guest currently sees (head and tail sector only).
        """
        align = self.top.write_alignment
        end = offset + len(data)
        if align <= 1 or (offset % align == 0 and end % align == 0):
            self.top.write(offset, data)
            return
        start = offset - offset % align
        stop = min(-(-end // align) * align, self.virtual_size)
        buf = bytearray(stop - start)
        buf[offset - start : end - start] = data
        if offset > start:
            buf[: offset - start] = self.read(start, offset - start)
        if end < stop:
            buf[end - start :] = self.read(end, stop - end)
        self.top.write(start, buf)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero a range; partial sectors at either end go through ``write`` (see above)."""
        align = self.top.write_alignment
        end = offset + length
        if align <= 1:
            self.top.write_zeroes(offset, length)
            return
        head_end = min(-(-offset // align) * align, end)
        tail_start = max(end - end % align, head_end)
        if head_end > offset:
            self.write(offset, bytes(head_end - offset))
        if tail_start > head_end:
            self.top.write_zeroes(head_end, tail_start - head_end)
        if end > tail_start:
            self.write(tail_start, bytes(end - tail_start))

    def flush(self) -> None:
        self.top.flush()

    def info(self) -> dict[str, Any]:
        return self.top.info()

    # --- reads through the chain --------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """The guest's view of the bytes: each run from the layer that answers for it."""
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            self.top._check_range(offset, length)
        parts: list[bytes] = []
        for ext in self.map(offset, length):
            if ext.data:
                parts.append(self.layers[ext.depth].read(ext.offset, ext.length))
            else:
                parts.append(bytes(ext.length))
        return b"".join(parts) if len(parts) != 1 else parts[0]

    def map(self, offset: int = 0, length: int | None = None) -> Iterator[MapExtent]:
        """Tile the range with runs that each have one answering layer, neighbours merged."""
        end = self.virtual_size if length is None else offset + length
        pending: MapExtent | None = None
        for ext in self._resolve(0, offset, end):
            if pending is not None and _mergeable(pending, ext):
                host = pending.host_offset
                pending = MapExtent(
                    pending.offset,
                    pending.length + ext.length,
                    pending.data,
                    pending.zero,
                    pending.depth,
                    host,
                    pending.zero_present,
                )
                continue
            if pending is not None:
                yield pending
            pending = ext
        if pending is not None:
            yield pending

    def _resolve(self, depth: int, offset: int, end: int) -> Iterator[MapExtent]:
        if depth >= len(self.layers):
            yield MapExtent(offset, end - offset, False, True, depth)
            return
        layer = self.layers[depth]
        layer_end = min(end, layer.virtual_size)
        if offset < layer_end:
            for ext in layer.extents(offset, layer_end - offset):
                if ext.alloc is Alloc.DATA:
                    yield MapExtent(ext.offset, ext.length, True, False, depth, ext.host_offset)
                elif ext.alloc is Alloc.ZERO:
                    yield MapExtent(ext.offset, ext.length, False, True, depth, None, True)
                else:
                    yield from self._resolve(depth + 1, ext.offset, ext.end)
        if layer_end < end:  # a child larger than its parent: the tail reads as zeros
            start = max(offset, layer_end)
            yield MapExtent(start, end - start, False, True, len(self.layers))

    # --- life cycle ----------------------------------------------------------------------------

    def close(self) -> None:
        for layer in self.layers:
            layer.close()

    def __enter__(self) -> Chain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        names = " <- ".join(
            f"{layer.name}:{layer.file.path.name}" for layer in reversed(self.layers)
        )
        return f"Chain({names})"


def _mergeable(a: MapExtent, b: MapExtent) -> bool:
    if a.end != b.offset or a.data != b.data or a.zero != b.zero or a.depth != b.depth:
        return False
    if a.zero_present != b.zero_present:
        return False
    if not a.data:
        return True
    if a.host_offset is None or b.host_offset is None:
        return a.host_offset is None and b.host_offset is None
    return b.host_offset == a.host_offset + a.length
