"""streamOptimized extents: compressed grains with markers, tables and footer at the end.

This is the layout VMware's OVF export writes (header version 3, ``gdOffset = GD_AT_END``):

    header | descriptor | grain marker+deflate ... | GT marker, GT ... | GD marker, GD |
    footer marker | footer (header copy with the real gdOffset) | end-of-stream marker

It can only be produced front to back: each grain is compressed once, at its final place.
``StreamExtent`` accepts writes at increasing offsets (what convert does), keeps the grain
being filled in memory, and on ``flush``/``close`` appends the tables, the footer and the
end-of-stream marker.  The next write cuts that trailer off again and carries on, so the file
is a complete, valid stream after every flush.

For other engineers (OVA export): :func:`create_stream_optimized` writes a new stream into a
``BlockFile`` and returns the writable layer; call ``write(offset, data)`` with increasing
offsets, then ``close()`` (or ``finish()`` to complete the file but keep it open).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from typing import TYPE_CHECKING

from vmferry.disk.base import Alloc
from vmferry.disk.blockfile import BlockFile
from vmferry.disk.deflate import zlib
from vmferry.disk.parallel import map_all
from vmferry.disk.vmdk.extent import SECTOR, Status
from vmferry.disk.vmdk.sparse import (
    COMPRESS_DEFLATE,
    FLAG_COMPRESSED,
    FLAG_MARKERS,
    FLAG_NL_DETECT,
    GD_AT_END,
    GT_BYTES,
    GTES_PER_GT,
    MARKER_EOS,
    MARKER_FOOTER,
    MARKER_GD,
    MARKER_GT,
    Marker,
    SparseExtent,
    SparseHeader,
    _grain_marker,
    _round_up,
    gd_entries,
    le32_bytes,
)
from vmferry.errors import UnsupportedFeatureError

if TYPE_CHECKING:
    from vmferry.disk.vmdk.driver import Vmdk

#: deflate level: zlib's default, what VMware and qemu use
LEVEL = 6
#: grains compressed per thread-pool batch (zlib releases the GIL, so threads scale)
_BATCH = 64


def deflate_grain(data: bytes | bytearray | memoryview) -> bytes:
    """Deflate one grain; already-compressed (random-looking) data is stored, not squeezed.

    Three 2 KiB samples are compressed fast first: when they do not shrink, the grain is
    written as stored deflate blocks (level 0), ten times faster than level 6 and no bigger.
    """
    n = len(data)
    if n >= 8192:
        mid = n // 2
        sample = bytes(data[:2048]) + bytes(data[mid : mid + 2048]) + bytes(data[-2048:])
        if len(zlib.compress(sample, 1)) >= len(sample) * 0.97:
            return zlib.compress(data, 0)
    return zlib.compress(data, LEVEL)


class StreamExtent(SparseExtent):
    """A compressed KDMV extent; writable only front to back."""

    kind = "SPARSE"

    def _after_open(self) -> None:
        self._pending: tuple[int, bytearray] | None = None
        self._stream_pos = 0  # writes below this offset are refused
        self._data_end = 0  # end of the final grains; the trailer starts here
        self._trailer = False  # the file currently ends with a valid trailer
        self._dirty = False
        self._pending_entry: int | None = None
        if self.writable:
            self._prepare_append()

    # --- appending to an existing stream --------------------------------------------------------

    def _prepare_append(self) -> None:
        if self.head.gd_offset != GD_AT_END or not self.markers:
            self._append_refused = (
                "this streamOptimized VMDK keeps its tables at the front; vmferry appends only "
                "to streams with a footer"
            )
            return
        self._append_refused = ""
        self._pin_gts = True
        assert self.file is not None
        last_gi, last_sector = -1, 0
        for gdi in range(self.n_gd):
            gt = self._gt(gdi)
            if gt is None:
                continue
            for idx, e in enumerate(gt):
                if e and e > last_sector:
                    last_sector = e
                if e:
                    last_gi = max(last_gi, gdi * GTES_PER_GT + idx)
        end = self.header.overhead * SECTOR
        if last_sector:
            _lba, size = _grain_marker(
                self.file.read_exact(last_sector * SECTOR, 12, "last grain marker")
            )
            end = max(end, _round_up(last_sector * SECTOR + 12 + size, SECTOR))
        self._data_end = end
        self._stream_pos = (last_gi + 1) * self.grain
        self._trailer = True

    # --- reading the grain being filled ----------------------------------------------------------

    def status(self, offset: int, length: int, has_parent: bool) -> Status:
        pending = self._pending
        if pending is not None:
            start = pending[0] * self.grain
            if start <= offset < start + self.grain:
                return (Alloc.DATA, min(start + self.grain - offset, length), None, False)
            if offset < start < offset + length:
                length = start - offset
        return super().status(offset, length, has_parent)

    def read(self, offset: int, length: int) -> bytes:
        data = super().read(offset, length)
        if self._pending_overlap(offset, length) is None:
            return data
        out = bytearray(data)
        self._overlay_pending(offset, memoryview(out))
        return bytes(out)

    def read_into(self, offset: int, view: memoryview) -> None:
        super().read_into(offset, view)
        self._overlay_pending(offset, view)

    def _pending_overlap(self, offset: int, length: int) -> tuple[int, int] | None:
        """The part of [offset, offset+length) held by the grain being filled, if any."""
        pending = self._pending
        if pending is None:
            return None
        start = pending[0] * self.grain
        lo, hi = max(offset, start), min(offset + length, start + self.grain)
        return (lo, hi) if lo < hi else None

    def _overlay_pending(self, offset: int, view: memoryview) -> None:
        overlap = self._pending_overlap(offset, len(view))
        if overlap is None:
            return
        lo, hi = overlap
        assert self._pending is not None
        start = self._pending[0] * self.grain
        view[lo - offset : hi - offset] = memoryview(self._pending[1])[lo - start : hi - start]

    def entry(self, gi: int) -> int:
        pending = self._pending
        if pending is not None and pending[0] == gi and self._pending_entry is None:
            return 0
        return super().entry(gi)

    # --- writing ---------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._append(offset, memoryview(data))

    def write_with_parent(
        self, offset: int, data: bytes | bytearray | memoryview, has_parent: bool
    ) -> None:
        self._append(offset, memoryview(data))

    def write_zeroes(self, offset: int, length: int, has_parent: bool) -> None:
        """Zeros are what a stream already reads where nothing was written: only move on."""
        self._check_order(offset)
        pending = self._pending
        if pending is not None:
            start = pending[0] * self.grain
            lo, hi = max(offset, start), min(offset + length, start + self.grain)
            if lo < hi:
                self._reopen_tail()
                pending[1][lo - start : hi - start] = bytes(hi - lo)
            if offset + length >= start + self.grain:
                self._reopen_tail()
                self._commit([pending])
                self._pending = None
        self._stream_pos = max(self._stream_pos, offset + length)

    def check_write(self, offset: int) -> None:
        self._check_order(offset)

    def _check_order(self, offset: int) -> None:
        if getattr(self, "_append_refused", ""):
            raise UnsupportedFeatureError(self._append_refused, path=self.path)
        if offset < self._stream_pos:
            raise UnsupportedFeatureError(
                f"a streamOptimized VMDK is written front to back: cannot write at {offset} "
                f"after data up to {self._stream_pos} was written",
                path=self.path,
                hint="convert to a monolithicSparse VMDK to edit it, or write in order",
            )

    def _reopen_tail(self) -> None:
        """Cut the trailer (and a flushed copy of the pending grain) off before appending."""
        if self._trailer:
            assert self.file is not None
            self.file.truncate(self._data_end)
            self._trailer = False
            if self._pending_entry is not None and self._pending is not None:
                gi = self._pending[0]
                gt = self._gts.get(gi // GTES_PER_GT)
                if gt is not None:
                    gt[gi % GTES_PER_GT] = 0
            self._pending_entry = None
        self._dirty = True

    def _append(self, offset: int, mv: memoryview) -> None:
        self._check_order(offset)
        if not len(mv):
            return
        self._reopen_tail()
        g = self.grain
        pos, end = offset, offset + len(mv)
        full: list[tuple[int, bytes | bytearray | memoryview]] = []
        while pos < end:
            gi, in_g = divmod(pos, g)
            n = min(g - in_g, end - pos)
            piece = mv[pos - offset : pos - offset + n]
            pending = self._pending
            if pending is not None and pending[0] != gi:
                full.append(pending)
                self._pending = pending = None
            grain_end = min(g, self.size - gi * g)
            if pending is None and in_g == 0 and n >= grain_end:
                full.append((gi, piece))
            else:
                if pending is None:
                    pending = self._pending = (gi, bytearray(g))
                pending[1][in_g : in_g + n] = piece
                if in_g + n >= grain_end:
                    full.append(pending)
                    self._pending = None
            if len(full) >= _BATCH:
                self._commit(full)
                full = []
            pos += n
        if full:
            self._commit(full)
        self._stream_pos = end

    def _commit(self, grains: list[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Compress (in parallel) and append grains with their markers; zero grains vanish."""
        assert self.file is not None
        todo = [(gi, data) for gi, data in grains if data != self._zero[: len(data)]]
        if not todo:
            return
        blobs = self._compress_all([data for _, data in todo])
        out = bytearray()
        pos = self._data_end
        entries: list[tuple[int, int]] = []
        for (gi, _), blob in zip(todo, blobs, strict=True):
            entries.append((gi, (pos + len(out)) // SECTOR))
            rec = (gi * self.grain_sectors).to_bytes(8, "little") + len(blob).to_bytes(4, "little")
            out += rec
            out += blob
            out += bytes(_round_up(len(out), SECTOR) - len(out))
        self.file.write(pos, out)
        self._data_end = pos + len(out)
        for gi, sector in entries:
            self._set_entry(gi, sector)

    def _compress_all(self, datas: list[bytes | bytearray | memoryview]) -> list[bytes]:
        return map_all(deflate_grain, datas)

    def _set_entry(self, gi: int, sector: int) -> None:
        gdi = gi // GTES_PER_GT
        gt = self._gts.get(gdi)
        if gt is None:
            gt = self._gts[gdi] = array("I", bytes(GT_BYTES))
        gt[gi % GTES_PER_GT] = sector

    # --- the trailer -----------------------------------------------------------------------------

    def flush(self) -> None:
        if self.writable and self._dirty and not self._trailer:
            self._write_trailer()
        super().flush()

    def finish(self) -> None:
        """Complete the stream (tables, footer, end-of-stream marker) and sync it."""
        self.flush()

    def _write_trailer(self) -> None:
        assert self.file is not None
        pending = self._pending
        if pending is not None:
            before = self._data_end
            self._commit([pending])
            if self._data_end != before:
                self._pending_entry = self.entry_raw(pending[0])
            # the flushed copy is cut off again if the grain is written further
            self._data_end, flushed_end = before, self._data_end
        else:
            flushed_end = self._data_end
        out = bytearray()
        pos = flushed_end
        gd = array("I", bytes(4 * self.n_gd))
        gt_sectors = GT_BYTES // SECTOR
        for gdi in range(self.n_gd):
            gt = self._gts.get(gdi)
            if gt is None or not any(gt):
                continue
            out += Marker(value=gt_sectors, size=0, type=MARKER_GT).pack()
            gd[gdi] = (pos + len(out)) // SECTOR
            out += le32_bytes(gt)
        gd_bytes = le32_bytes(gd)
        gd_bytes += bytes(_round_up(len(gd_bytes), SECTOR) - len(gd_bytes))
        out += Marker(value=len(gd_bytes) // SECTOR, size=0, type=MARKER_GD).pack()
        gd_sector = (pos + len(out)) // SECTOR
        out += gd_bytes
        out += Marker(value=1, size=0, type=MARKER_FOOTER).pack()
        out += self.head.replace(gd_offset=gd_sector).pack()
        out += Marker(value=0, size=0, type=MARKER_EOS).pack()
        self.file.write(pos, out)
        self.file.truncate(pos + len(out))
        self._trailer = True
        self.gd = gd

    def entry_raw(self, gi: int) -> int:
        gt = self._gts.get(gi // GTES_PER_GT)
        return 0 if gt is None else gt[gi % GTES_PER_GT]

    def close(self) -> None:
        if self.writable and self.file is not None and self.file.fd >= 0:
            self.flush()
        super().close()


def new_stream_header(capacity_sectors: int, desc_sectors: int) -> SparseHeader:
    """The version-3 header VMware's OVF export writes (tables at the end)."""
    grain = 128
    overhead = _round_up(1 + desc_sectors, grain)
    return SparseHeader(
        version=3,
        flags=FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS,
        capacity=capacity_sectors,
        grain_size=grain,
        desc_offset=1 if desc_sectors else 0,
        desc_size=desc_sectors,
        rgd_offset=0,
        gd_offset=GD_AT_END,
        overhead=overhead,
        compress=COMPRESS_DEFLATE,
    )


def start_stream(f: BlockFile, capacity_sectors: int, descriptor: bytes) -> StreamExtent:
    """Write header + descriptor of a new stream into empty ``f``; return it ready to append."""
    desc_sectors = max(2, _round_up(len(descriptor), SECTOR) // SECTOR)
    header = new_stream_header(capacity_sectors, desc_sectors)
    f.write(0, header.pack())
    f.write(SECTOR, descriptor.ljust(desc_sectors * SECTOR, b"\0"))
    f.truncate(header.overhead * SECTOR)
    ext = StreamExtent(f, header, True, capacity_sectors * SECTOR)
    ext.head = header
    ext.gd = array("I", bytes(4 * gd_entries(capacity_sectors, header.grain_size)))
    ext._pin_gts = True
    ext._after_open()
    ext._append_refused = ""
    ext._data_end = header.overhead * SECTOR
    ext._trailer = False
    ext._dirty = True
    ext.shares_main_file = True
    return ext


def create_stream_optimized(
    f: BlockFile,
    size: int,
    *,
    adapter_type: str = "lsilogic",
    hwversion: str = "4",
) -> Vmdk:
    """A new, empty streamOptimized VMDK in the (empty, writable) ``f``, opened for writing.

    Write with increasing offsets (``layer.write(offset, data)``; going backwards raises
    ``UnsupportedFeatureError``), then ``layer.close()`` — or ``layer.finish()`` to complete
    the file and keep ``f`` open, e.g. to hash it for an OVA manifest.
    """
    from vmferry.disk.vmdk.driver import Vmdk

    options = {"subformat": "streamOptimized", "adapter_type": adapter_type, "hwversion": hwversion}
    return Vmdk.create(f, size, options)


def write_stream_optimized(
    f: BlockFile, size: int, runs: Iterable[tuple[int, bytes]], **options: str
) -> None:
    """Convenience: a whole stream from (offset, data) runs in increasing order, closed."""
    layer = create_stream_optimized(f, size, **options)
    try:
        for offset, data in runs:
            layer.write(offset, data)
        layer.finish()
    finally:
        layer.close()
