"""Hosted sparse extents ("KDMV"): grain directory -> grain tables -> grains.

Layout facts (VMware Virtual Disk Format 1.1; qemu block/vmdk.c): a 512-byte little-endian
header; the grain directory (GD) holds the sector of each grain table (GT); a GT holds 512
32-bit grain sectors.  Entry 0 = not allocated here, entry 1 = zeroed grain when the header's
zeroed-grain flag is set.  A redundant GD with its own GTs mirrors the primary one.
streamOptimized extents compress each grain (deflate), prefix it with a 12-byte marker
(lba, size) and may keep the GD at the end (``gdOffset == GD_AT_END``): the footer, a copy of
the header 1024 bytes before the end of the file, then holds the real offset.

Writes keep the on-disk rule "data first, then the pointer": new grains (and new grain tables)
are appended and fsynced before the GT (both copies) or GD entry that publishes them.
"""

from __future__ import annotations

import itertools
import sys
from array import array
from collections.abc import Callable
from typing import Any

from vmferry._layout import Layout, raw, u8, u16, u32, u64
from vmferry.disk.base import Alloc, CheckReport, zero_fill
from vmferry.disk.blockfile import BlockFile
from vmferry.disk.deflate import zlib
from vmferry.disk.parallel import Piece, inflate_pieces, thread_window
from vmferry.disk.vmdk.extent import SECTOR, ExtentBase, Status
from vmferry.errors import (
    CorruptImageError,
    NotThisFormatError,
    ResourceLimitError,
    TruncatedImageError,
    UnsupportedFeatureError,
    UsageError,
)

MAGIC = b"KDMV"
GD_AT_END = 0xFFFFFFFFFFFFFFFF
FLAG_NL_DETECT = 1 << 0
FLAG_RGD = 1 << 1
FLAG_ZERO_GRAIN = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
COMPRESS_DEFLATE = 1
GTES_PER_GT = 512
GT_BYTES = GTES_PER_GT * 4
GTE_ZEROED = 1
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
#: qemu refuses more grain directory entries than this ("L1 size too big"); so do we
MAX_GD_ENTRIES = 32 * 1024 * 1024
#: grains larger than 32 MiB exist nowhere; the bound also caps a grain's inflated size
MAX_GRAIN_SECTORS = 65536


class _ReadPlan:
    """Where a read's bytes come from: (host, offset in the result, length) runs of plain
    grains, compressed grain pieces, and (offset in the result, length) holes."""

    __slots__ = ("grains", "holes", "runs")

    def __init__(self) -> None:
        self.runs: list[tuple[int, int, int]] = []
        self.grains: list[Piece] = []  # keyed by the grain's sector
        self.holes: list[tuple[int, int]] = []


#: bytes of the file a thread reads ahead while it inflates grains (fits a core's L2 cache)
WINDOW = 512 * 1024
#: grains that lie closer together than this many grains apart on average were compressed
STORED_SPACING = 0.9
#: grain tables kept in memory before the cache is dropped (8 MiB of entries)
GT_CACHE_LIMIT = 4096
_BIG_ENDIAN_HOST = sys.byteorder == "big"


class SparseHeader(Layout, byteorder="<", size=512):
    magic: bytes = raw(4, MAGIC)
    version: int = u32(1)
    flags: int = u32()
    capacity: int = u64()  # sectors
    grain_size: int = u64(128)  # sectors
    desc_offset: int = u64()  # sectors
    desc_size: int = u64()  # sectors
    num_gtes: int = u32(GTES_PER_GT)
    rgd_offset: int = u64()  # sectors
    gd_offset: int = u64()  # sectors
    overhead: int = u64()  # sectors before the first grain
    unclean: int = u8()
    nl_check: bytes = raw(4, b"\n \r\n")
    compress: int = u16()
    pad: bytes = raw(433)


class Marker(Layout, byteorder="<", size=512):
    """A metadata marker sector of a streamOptimized extent (size == 0)."""

    value: int = u64()  # sectors of metadata that follow
    size: int = u32()
    type: int = u32()
    pad: bytes = raw(496)


def le32_array(data: bytes) -> array[int]:
    table = array("I")
    table.frombytes(data)
    if _BIG_ENDIAN_HOST:
        table.byteswap()
    return table


def le32_bytes(table: array[int]) -> bytes:
    if _BIG_ENDIAN_HOST:
        copy = array("I", table)
        copy.byteswap()
        return copy.tobytes()
    return table.tobytes()


def gd_entries(capacity_sectors: int, grain_sectors: int) -> int:
    span = GTES_PER_GT * grain_sectors
    return (capacity_sectors + span - 1) // span


def validate_header(h: SparseHeader, path: str) -> None:
    """Refuse headers whose numbers would size memory or tables absurdly."""
    if h.version not in (1, 2, 3):
        raise UnsupportedFeatureError(f"unsupported VMDK sparse version {h.version}", path=path)
    if h.num_gtes != GTES_PER_GT:
        raise CorruptImageError(
            f"grain tables have {h.num_gtes} entries; VMDK requires {GTES_PER_GT}", path=path
        )
    g = h.grain_size
    if g < 1 or g & (g - 1) or g > MAX_GRAIN_SECTORS:
        raise CorruptImageError(
            f"grain size {g} sectors is not a power of two between 1 and {MAX_GRAIN_SECTORS}",
            path=path,
        )
    if h.capacity == 0:
        raise CorruptImageError("sparse extent has a capacity of 0 sectors", path=path)
    n = gd_entries(h.capacity, g)
    if n > MAX_GD_ENTRIES:
        raise ResourceLimitError(
            f"grain directory would have {n} entries (capacity {h.capacity} sectors): "
            "L1 size too big",
            path=path,
        )
    if h.compress not in (0, COMPRESS_DEFLATE):
        raise UnsupportedFeatureError(f"unknown grain compression {h.compress}", path=path)


class SparseExtent(ExtentBase):
    """A KDMV extent, read and written in place (not streamOptimized output)."""

    kind = "SPARSE"

    def __init__(self, f: BlockFile, header: SparseHeader, writable: bool, size: int) -> None:
        self.file = f
        self.path = str(f.path)
        self.header = header
        self.writable = writable
        self.size = size
        self.grain_sectors = header.grain_size
        self.grain = header.grain_size * SECTOR
        self.compressed = header.compress == COMPRESS_DEFLATE
        self.markers = bool(header.flags & FLAG_MARKERS)
        self.zero_grain = bool(header.flags & FLAG_ZERO_GRAIN)
        self.n_gd = gd_entries(header.capacity, header.grain_size)
        self.gd: array[int] = array("I")
        self.rgd: array[int] | None = None
        self._gts: dict[int, array[int]] = {}
        self._pin_gts = False  # stream writer: every GT lives in memory only
        #: a grow waiting for its header: (capacity, gd and rgd offsets, gd, rgd, next_alloc)
        self._pending: tuple[int, int, int, array[int], array[int] | None, int] | None = None
        self._zero = bytes(self.grain)
        self._grain_cache: tuple[int, bytes] | None = None  # (sector, inflated grain)
        self.next_alloc = 0
        #: fsync between "data" and "pointer" writes; off while the file is a fresh output
        #: under a temporary name (nothing can see it until the final sync and rename)
        self.ordered_sync = True

    # --- opening -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, f: BlockFile, *, writable: bool, size: int | None = None, shares_main: bool = False
    ) -> SparseExtent:
        path = str(f.path)
        head = SparseHeader.unpack(f.read_exact(0, 512, "VMDK sparse header"))
        if head.magic != MAGIC:
            raise NotThisFormatError("not a VMDK sparse extent (no KDMV magic)", path=path)
        header = head
        if head.gd_offset == GD_AT_END:
            header = read_footer(f)
        validate_header(header, path)
        if header.version == 3 and writable and header.compress != COMPRESS_DEFLATE:
            raise UnsupportedFeatureError(
                "VMDK version 3 (changed block tracking) can only be opened read-only",
                path=path,
                hint="open it read-only, or convert it",
            )
        capacity = header.capacity * SECTOR
        if size is None:
            size = capacity
        elif size > capacity:
            raise CorruptImageError(
                f"descriptor gives the extent {size} bytes, its header only {capacity}", path=path
            )
        ext_cls: type[SparseExtent] = cls
        if header.compress == COMPRESS_DEFLATE and cls is SparseExtent:
            from vmferry.disk.vmdk.stream import StreamExtent

            ext_cls = StreamExtent
        ext = ext_cls(f, header, writable, size)
        ext.head = head
        ext.shares_main_file = shares_main
        ext._load_directories()
        ext.next_alloc = _round_up(f.size, ext.grain)
        ext._after_open()
        return ext

    head: SparseHeader

    def _after_open(self) -> None:
        """Hook for the stream writer."""

    def _load_directories(self) -> None:
        h = self.header
        assert self.file is not None
        n = self.n_gd * 4
        if h.gd_offset == 0 or h.gd_offset == GD_AT_END:
            raise CorruptImageError("sparse extent has no grain directory", path=self.path)
        self.gd = le32_array(self.file.read_exact(h.gd_offset * SECTOR, n, "grain directory"))
        if h.flags & FLAG_RGD and h.rgd_offset:
            self.rgd = le32_array(
                self.file.read_exact(h.rgd_offset * SECTOR, n, "redundant grain directory")
            )

    # --- tables --------------------------------------------------------------------------------

    def _gt(self, gdi: int) -> array[int] | None:
        table = self._gts.get(gdi)
        if table is not None:
            return table
        sector = self.gd[gdi]
        if sector == 0:
            return None
        assert self.file is not None
        if sector * SECTOR + GT_BYTES > self.file.size:
            raise TruncatedImageError(
                f"grain table {gdi} (sector {sector}) is past the end of the file",
                path=self.path,
            )
        table = le32_array(self.file.read_exact(sector * SECTOR, GT_BYTES, f"grain table {gdi}"))
        if len(self._gts) >= GT_CACHE_LIMIT and not self._pin_gts:
            self._gts.clear()
        self._gts[gdi] = table
        return table

    def entry(self, gi: int) -> int:
        gt = self._gt(gi // GTES_PER_GT)
        return 0 if gt is None else gt[gi % GTES_PER_GT]

    def _kind(self, e: int, gi: int) -> Alloc:
        """DATA / ZERO / UNALLOCATED (the caller maps UNALLOCATED to ZERO without parent)."""
        if e == 0:
            return Alloc.UNALLOCATED
        if e == GTE_ZEROED and self.zero_grain:
            return Alloc.ZERO
        assert self.file is not None
        if (e < max(1, self.header.overhead) and not self.compressed) or e == GTE_ZEROED:
            raise CorruptImageError(
                f"grain {gi} points into the extent's metadata (sector {e})", path=self.path
            )
        if e * SECTOR >= self.file.size:
            raise TruncatedImageError(
                f"grain {gi} (sector {e}) is past the end of the file", path=self.path
            )
        return Alloc.DATA

    # --- reading -------------------------------------------------------------------------------

    def status(self, offset: int, length: int, has_parent: bool) -> Status:
        g = self.grain
        gi, in_g = divmod(offset, g)
        first = self.entry(gi)
        kind = self._kind(first, gi)
        run = g - in_g
        if kind is Alloc.DATA and self.compressed:
            return (Alloc.DATA, min(run, length), None, True)
        if first == 0 and run < length:  # holes: skip whole tables at C speed
            run += g * count_zero_entries(self._gt, gi + 1, -(-(length - run) // g), GTES_PER_GT)
            length = min(run, length)
        step = self.grain_sectors
        expect = first + step
        while run < length:
            gi += 1
            e = self.entry(gi)
            if kind is Alloc.DATA:
                if e != expect:
                    break
                self._kind(e, gi)
                expect += step
            elif self._kind(e, gi) is not kind:
                break
            run += g
        run = min(run, length)
        if kind is Alloc.UNALLOCATED and not has_parent:
            kind = Alloc.ZERO
        host = first * SECTOR + in_g if kind is Alloc.DATA else None
        return (kind, run, host, False)

    def read(self, offset: int, length: int) -> bytes:
        """The extent's bytes; a range stored in one contiguous run is one pread, no copies."""
        plan = self._read_plan(offset, length)
        if len(plan.runs) == 1 and plan.runs[0][2] == length:
            assert self.file is not None
            return self.file.pread(plan.runs[0][0], length)
        out = bytearray(length)  # zeros already: holes need no filling
        self._fill(memoryview(out), plan, zero_holes=False)
        return bytes(out)

    def read_into(self, offset: int, view: memoryview) -> None:
        self._fill(view, self._read_plan(offset, len(view)), zero_holes=True)

    def _read_plan(self, offset: int, length: int) -> _ReadPlan:
        """Where each piece of [offset, offset+length) comes from; neighbours merged."""
        g = self.grain
        plan = _ReadPlan()
        pos, end = offset, offset + length
        run_host = run_dst = run_len = 0
        while pos < end:
            gi, in_g = divmod(pos, g)
            n = min(g - in_g, end - pos)
            e = self.entry(gi)
            kind = self._kind(e, gi)
            dst = pos - offset
            if kind is Alloc.DATA and not self.compressed:
                host = e * SECTOR + in_g
                if run_len and run_host + run_len == host and run_dst + run_len == dst:
                    run_len += n
                else:
                    if run_len:
                        plan.runs.append((run_host, run_dst, run_len))
                    run_host, run_dst, run_len = host, dst, n
            elif kind is Alloc.DATA:
                plan.grains.append((gi, e, dst, in_g, n))
            elif plan.holes and sum(plan.holes[-1]) == dst:
                plan.holes[-1] = (plan.holes[-1][0], plan.holes[-1][1] + n)
            else:
                plan.holes.append((dst, n))
            pos += n
        if run_len:
            plan.runs.append((run_host, run_dst, run_len))
        return plan

    def _fill(self, view: memoryview, plan: _ReadPlan, *, zero_holes: bool) -> None:
        assert self.file is not None
        for host, dst, n in plan.runs:
            self.file.pread_into(host, view[dst : dst + n])
        if zero_holes:
            for dst, n in plan.holes:
                zero_fill(view[dst : dst + n])
        if plan.grains:
            self._inflate_into(view, plan.grains)

    def _inflate_into(self, view: memoryview, grains: list[Piece]) -> None:
        """Inflate compressed grains into ``view``, in one contiguous batch per core.

        Each batch walks its grains through a small window of the file that stays in the
        core's cache: reading a whole chunk's compressed bytes into one big buffer first made
        every copy after it miss the cache, and cost more than the inflating itself.
        """
        self._grain_cache = inflate_pieces(
            view,
            grains,
            self._grain_cache,
            lambda batch: self._inflate_batch(view, batch),
            self._worth_parallel,
        )

    def _worth_parallel(self, grains: list[Piece]) -> bool:
        """Whether these grains are worth other cores: not when they were stored rather than
        compressed (incompressible data), which the grain tables tell for free: such grains lie
        a grain or more apart.  Inflating a stored grain is a copy and a checksum; measured on
        two cores, threads gave the same wall time for 35 % more CPU (and 20 % slower with
        stdlib zlib), CPU the writing thread needs.  Real inflating went 1.6 times faster."""
        if len(grains) < 4:
            return False
        span = (grains[-1][1] - grains[0][1]) * SECTOR
        return span < STORED_SPACING * self.grain * (len(grains) - 1)

    def _inflate_batch(self, view: memoryview, pieces: list[Piece]) -> list[bytes | None]:
        """Inflate ``pieces`` into ``view``; one result per piece: the last one's grain (to be
        cached), None for the rest."""
        assert self.file is not None
        window = thread_window(max(WINDOW, self._max_record()))
        lo = hi = 0  # the file bytes [lo, hi) are in the window
        size = self.file.size
        out: list[bytes | None] = []
        for gi, sector, dst, in_g, n in pieces:
            pos = sector * SECTOR
            if not (lo <= pos and pos + 12 <= hi):
                lo, hi = pos, self._load(window, pos, size)
            data, end = self._payload(gi, pos, window, lo, hi, size)
            if end > hi and hi < size:  # the record runs past the window: move it here
                lo, hi = pos, self._load(window, pos, size)
                data, end = self._payload(gi, pos, window, lo, hi, size)
            if end > hi:
                raise TruncatedImageError(
                    f"grain {gi} extends past the end of the file", path=self.path, offset=pos
                )
            plain = inflate_grain(data, self.grain, f"grain {gi}", self.path)
            view[dst : dst + n] = memoryview(plain)[in_g : in_g + n]
            out.append(None)
        out[-1] = plain
        return out

    def _load(self, window: memoryview, pos: int, size: int) -> int:
        """Read the file from ``pos`` into the window; the end of what it now holds."""
        assert self.file is not None
        n = min(len(window), size - pos)
        self.file.pread_into(pos, window[:n])
        return pos + n

    def _max_record(self) -> int:
        """Bytes a grain's record can take: marker and deflate data of a stored grain."""
        return 12 + self._max_compressed() if self.markers else 2 * self.grain

    def _max_compressed(self) -> int:
        """The most compressed bytes a grain marker may claim (a stored grain and slack)."""
        return 2 * self.grain + 4096

    def _payload(
        self, gi: int, pos: int, window: memoryview, lo: int, hi: int, size: int
    ) -> tuple[memoryview, int]:
        """Grain ``gi``'s compressed bytes (marker checked and left out) at file offset
        ``pos``, from the window holding [lo, hi) of a file of ``size`` bytes, and the file
        offset where they end (past ``hi`` when the window does not hold them all)."""
        rel = pos - lo
        if not self.markers:
            end = min(pos + 2 * self.grain, size)
            return window[rel : rel + end - pos], end
        if pos + 12 > hi:
            raise TruncatedImageError(
                f"grain {gi} marker extends past the end of the file", path=self.path, offset=pos
            )
        lba, claimed = _grain_marker(window[rel : rel + 12])
        if claimed == 0 or claimed > self._max_compressed():
            raise CorruptImageError(
                f"grain {gi} marker claims {claimed} compressed bytes", path=self.path, offset=pos
            )
        if lba != gi * self.grain_sectors:
            raise CorruptImageError(
                f"grain {gi} marker names sector {lba}, expected {gi * self.grain_sectors}",
                path=self.path,
                offset=pos,
            )
        return window[rel + 12 : rel + 12 + claimed], pos + 12 + claimed

    # --- writing -------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._write(offset, memoryview(data), has_parent=False)

    def write_with_parent(
        self, offset: int, data: bytes | bytearray | memoryview, has_parent: bool
    ) -> None:
        self._write(offset, memoryview(data), has_parent)

    def _write(self, offset: int, mv: memoryview, has_parent: bool) -> None:
        assert self.file is not None
        g = self.grain
        pos, end = offset, offset + len(mv)
        # (grain index, bytes, offset of those bytes in mv or -1 when they are a new buffer)
        new: list[tuple[int, bytes | bytearray | memoryview, int]] = []
        while pos < end:
            gi, in_g = divmod(pos, g)
            n = min(g - in_g, end - pos)
            piece = mv[pos - offset : pos - offset + n]
            e = self.entry(gi)
            kind = self._kind(e, gi)
            if kind is Alloc.DATA:
                self.file.write(e * SECTOR + in_g, piece)
            else:
                src = pos - offset
                if n == g:
                    grain: bytes | bytearray | memoryview = piece
                else:
                    buf = bytearray(g)
                    buf[in_g : in_g + n] = piece
                    grain, src = buf, -1
                skip = kind is Alloc.ZERO or not has_parent
                # (a first-byte test spares a copy and compare of every data grain)
                if not (skip and grain[0] == 0 and bytes(grain) == self._zero):
                    new.append((gi, grain, src))
            pos += n
        if new:
            self._allocate(new, mv)

    def write_zeroes(self, offset: int, length: int, has_parent: bool) -> None:
        assert self.file is not None
        g = self.grain
        pos, end = offset, offset + length
        zeroed: list[int] = []
        while pos < end:
            gi, in_g = divmod(pos, g)
            n = min(g - in_g, end - pos)
            whole = in_g == 0 and (n == g or pos + n >= self.size)
            e = self.entry(gi)
            kind = self._kind(e, gi)
            if kind is Alloc.ZERO or (kind is Alloc.UNALLOCATED and not has_parent):
                pass
            elif whole and self.zero_grain:
                zeroed.append(gi)
            elif kind is Alloc.DATA:
                host = e * SECTOR + in_g
                if not (n == g and self.file.punch_hole(host, n)):
                    self.file.write(host, bytes(n))
            elif not whole and has_parent:
                raise UsageError(
                    f"zeroing part of grain {gi} of a VMDK delta needs the parent's bytes for "
                    "the rest of the grain",
                    path=self.path,
                    hint="write zeros through the chain (Chain.write) for partial grains",
                )
            else:
                self._write(pos, memoryview(bytes(n)), has_parent)
            pos += n
        if zeroed:
            self._barrier()
            self._publish([(gi, GTE_ZEROED) for gi in zeroed])

    def _allocate(
        self, new: list[tuple[int, bytes | bytearray | memoryview, int]], mv: memoryview
    ) -> None:
        """Append grains, fsync, then publish their GT entries (both copies), fsync.

        Grains that are neighbours in ``mv`` too are written straight from it, as one write.
        """
        assert self.file is not None
        missing = sorted({gi // GTES_PER_GT for gi, _, _ in new if self.gd[gi // GTES_PER_GT] == 0})
        if missing:
            self._allocate_gts(missing)
        start = self.next_alloc
        pos = start
        batch: list[bytes | bytearray | memoryview] = []
        batch_start = pos
        batch_len = 0
        run_src = run_len = 0  # grains contiguous in mv too: written from it, not copied

        def emit() -> None:
            """Write the batched grains, then the pending run of mv, at the next position."""
            nonlocal batch, batch_start, batch_len, run_len
            assert self.file is not None
            if batch:
                self.file.write(batch_start, batch[0] if len(batch) == 1 else b"".join(batch))
                batch_start += batch_len
                batch, batch_len = [], 0
            if run_len:
                self.file.write(batch_start, mv[run_src : run_src + run_len])
                batch_start += run_len
                run_len = 0

        for _, grain, src in new:
            if src >= 0 and run_len and src == run_src + run_len:
                run_len += len(grain)
                continue
            if run_len:
                emit()
            if src >= 0:
                run_src, run_len = src, len(grain)
                continue
            batch.append(grain)
            batch_len += len(grain)
            if batch_len >= 32 << 20:
                emit()
        emit()
        self._barrier()
        updates = []
        for gi, grain, _ in new:
            updates.append((gi, pos // SECTOR))
            pos += len(grain)
        self.next_alloc = _round_up(pos, self.grain)
        self._publish(updates)

    def _allocate_gts(self, gdis: list[int]) -> None:
        """New (zeroed) grain tables: written and synced before the GD points at them."""
        assert self.file is not None
        gt_span = _round_up(GT_BYTES, SECTOR)
        copies = 2 if self.rgd is not None else 1
        pos = self.next_alloc
        self.file.write(pos, bytes(gt_span * copies * len(gdis)))
        self._barrier()
        for gdi in gdis:
            self.gd[gdi] = pos // SECTOR
            self._write_dir_entry(self.header.gd_offset, gdi, pos // SECTOR)
            pos += gt_span
            if self.rgd is not None:
                self.rgd[gdi] = pos // SECTOR
                self._write_dir_entry(self.header.rgd_offset, gdi, pos // SECTOR)
                pos += gt_span
            self._gts[gdi] = array("I", bytes(GT_BYTES))
        self._barrier()
        self.next_alloc = _round_up(pos, self.grain)

    def _write_dir_entry(self, dir_sector: int, index: int, value: int) -> None:
        assert self.file is not None
        self.file.write(dir_sector * SECTOR + index * 4, value.to_bytes(4, "little"))

    def _publish(self, updates: list[tuple[int, int]]) -> None:
        """Set GT entries in memory and in both GT copies (contiguous ranges), then fsync."""
        assert self.file is not None
        by_gt: dict[int, list[tuple[int, int]]] = {}
        for gi, value in updates:
            by_gt.setdefault(gi // GTES_PER_GT, []).append((gi % GTES_PER_GT, value))
        for gdi, items in by_gt.items():
            gt = self._gt(gdi)
            assert gt is not None
            for idx, value in items:
                gt[idx] = value
            lo = min(i for i, _ in items)
            hi = max(i for i, _ in items) + 1
            chunk = le32_bytes(gt[lo:hi])
            self.file.write(self.gd[gdi] * SECTOR + lo * 4, chunk)
            if self.rgd is not None and self.rgd[gdi]:
                self.file.write(self.rgd[gdi] * SECTOR + lo * 4, chunk)
        self._barrier()

    def _barrier(self) -> None:
        """Order "data before pointer" on disk (skipped for fresh temporary outputs)."""
        if self.ordered_sync:
            assert self.file is not None
            self.file.fsync()

    # --- growing -------------------------------------------------------------------------------

    def can_grow(self, new_size: int) -> str | None:
        if not self.writable:
            return f"the extent file {self.path} is read-only"
        if self.compressed or self.markers:
            return "a streamOptimized extent is an export format and cannot grow"
        return None

    def grow(self, new_size: int) -> None:
        """Grain tables for the new range and a grain directory that holds them, appended
        where nothing points yet, then synced; the header keeps the old capacity until
        ``publish_size``, so a crash before it leaves the extent as it was (plus unused bytes
        at the end).

        Every new table is allocated now, as qemu and VMware allocate them all when they create
        a hosted sparse extent (qemu cannot write where a directory entry is 0).  The tables go
        at the end of the file as a hole, which reads as zeros.  A directory whose last sector
        has room for the new entries takes them in place; otherwise both directories are
        copied, with the new entries, to the end of the file.
        """
        assert self.file is not None
        f = self.file
        capacity = -(-new_size // SECTOR)
        self.size = new_size
        if capacity <= self.header.capacity:  # (an interrupted grow already made the room)
            self._pending = None
            return
        n_new = gd_entries(capacity, self.grain_sectors)
        if n_new > MAX_GD_ENTRIES:
            raise ResourceLimitError(
                f"a grain directory of {n_new} entries is past vmferry's limit", path=self.path
            )
        gt_span = _round_up(GT_BYTES, SECTOR)
        added = range(self.n_gd, n_new)
        gd = array("I", self.gd)
        rgd = None if self.rgd is None else array("I", self.rgd)
        pos = self.next_alloc
        for _ in added:
            gd.append(pos // SECTOR)
            pos += gt_span
            if rgd is not None:
                rgd.append(pos // SECTOR)
                pos += gt_span
        room = _round_up(self.n_gd * 4, SECTOR) // 4
        gd_offset, rgd_offset = self.header.gd_offset, self.header.rgd_offset
        if n_new <= room:  # the new entries fit the directories' last sectors
            if added:
                tail = self.n_gd * 4
                f.write(gd_offset * SECTOR + tail, le32_bytes(gd[self.n_gd :]))
                if rgd is not None:
                    f.write(rgd_offset * SECTOR + tail, le32_bytes(rgd[self.n_gd :]))
        else:
            dir_span = _round_up(n_new * 4, SECTOR)
            gd_offset = pos // SECTOR
            f.write(pos, le32_bytes(gd).ljust(dir_span, b"\0"))
            pos += dir_span
            if rgd is not None:
                rgd_offset = pos // SECTOR
                f.write(pos, le32_bytes(rgd).ljust(dir_span, b"\0"))
                pos += dir_span
        if pos > f.size:
            f.truncate(pos)  # the new tables, as a hole
        f.fsync()
        self._pending = (capacity, gd_offset, rgd_offset, gd, rgd, _round_up(pos, self.grain))

    def publish_size(self) -> None:
        """One header sector gives the new capacity and directory offsets together, synced."""
        pending = self._pending
        if pending is None:
            return
        assert self.file is not None
        capacity, gd_offset, rgd_offset, gd, rgd, next_alloc = pending
        head = self.head
        head.capacity, head.gd_offset, head.rgd_offset = capacity, gd_offset, rgd_offset
        self.file.write(0, head.pack())
        self.file.fsync()
        self.header = head
        self.n_gd = len(gd)
        self.gd, self.rgd = gd, rgd
        self.next_alloc = max(self.next_alloc, next_alloc)
        self._pending = None

    # --- checking ------------------------------------------------------------------------------

    def check(self, report: CheckReport) -> None:
        assert self.file is not None
        name = self.file.path.name
        size = self.file.size
        meta: list[tuple[int, int, str]] = [(0, 1, "header")]
        h = self.head
        if h.desc_offset and h.desc_size:
            meta.append((h.desc_offset, h.desc_offset + h.desc_size, "descriptor"))
        gd_sectors = _round_up(self.n_gd * 4, SECTOR) // SECTOR
        meta.append((self.header.gd_offset, self.header.gd_offset + gd_sectors, "grain directory"))
        if self.rgd is not None:
            meta.append(
                (self.header.rgd_offset, self.header.rgd_offset + gd_sectors, "redundant GD")
            )
        gt_sectors = GT_BYTES // SECTOR
        for gdi in range(self.n_gd):
            for label, directory in (("GT", self.gd), ("redundant GT", self.rgd)):
                if directory is None or directory[gdi] == 0:
                    continue
                s = directory[gdi]
                if s * SECTOR + GT_BYTES > size:
                    report.corruptions.append(f"{name}: {label} {gdi} is past the end of file")
                    continue
                meta.append((s, s + gt_sectors, f"{label} {gdi}"))
        if self.rgd is not None:
            self._check_redundant(report, name)
        grains: list[tuple[int, int]] = []
        step = self.grain_sectors
        for gdi in range(self.n_gd):
            if self.gd[gdi] == 0 or self.gd[gdi] * SECTOR + GT_BYTES > size:
                continue
            gt = self._gt(gdi)
            assert gt is not None
            for idx, e in enumerate(gt):
                if e == 0 or (e == GTE_ZEROED and self.zero_grain):
                    continue
                gi = gdi * GTES_PER_GT + idx
                if e * SECTOR >= size:
                    report.corruptions.append(f"{name}: grain {gi} points past the end of file")
                    continue
                grains.append((e, gi))
        _check_overlaps(report, name, meta, grains, 1 if self.compressed else step)

    def _check_redundant(self, report: CheckReport, name: str) -> None:
        assert self.file is not None and self.rgd is not None
        for gdi in range(self.n_gd):
            a, b = self.gd[gdi], self.rgd[gdi]
            if (a == 0) != (b == 0):
                report.corruptions.append(f"{name}: GD and redundant GD differ at entry {gdi}")
                continue
            if a == 0 or max(a, b) * SECTOR + GT_BYTES > self.file.size:
                continue
            if self.file.pread(a * SECTOR, GT_BYTES) != self.file.pread(b * SECTOR, GT_BYTES):
                report.corruptions.append(f"{name}: grain table {gdi} and its copy differ")

    def info(self) -> dict[str, Any]:
        out = super().info()
        out["version"] = self.header.version
        out["zeroed_grain"] = self.zero_grain
        return out


def _check_overlaps(
    report: CheckReport,
    name: str,
    meta: list[tuple[int, int, str]],
    grains: list[tuple[int, int]],
    grain_sectors: int,
) -> None:
    spans = [(s, e, what) for s, e, what in meta]
    spans += [(s, s + grain_sectors, f"grain {gi}") for s, gi in grains]
    spans.sort()
    reported = 0
    for (s1, e1, w1), (s2, _e2, w2) in itertools.pairwise(spans):
        if s2 < e1:
            reported += 1
            if reported <= 20:
                report.corruptions.append(f"{name}: {w2} (sector {s2}) overlaps {w1} (sector {s1})")
    if reported > 20:
        report.corruptions.append(f"{name}: {reported - 20} more overlaps")


def _grain_marker(buf: bytes) -> tuple[int, int]:
    return int.from_bytes(buf[:8], "little"), int.from_bytes(buf[8:12], "little")


def inflate_grain(data: bytes, grain: int, what: str, path: str) -> bytes:
    """Deflate stream -> at most one grain of bytes (a bomb stops at ``grain``)."""
    d = zlib.decompressobj()
    try:
        plain = d.decompress(data, grain)
    except zlib.error as exc:
        raise CorruptImageError(f"{what} does not decompress: {exc}", path=path) from None
    if d.unconsumed_tail:
        raise CorruptImageError(f"{what} inflates to more than a grain ({grain} bytes)", path=path)
    if len(plain) < grain:
        plain += bytes(grain - len(plain))
    return plain


def read_footer(f: BlockFile) -> SparseHeader:
    """The footer of a GD-at-end stream: marker, header copy, end-of-stream marker."""
    path = str(f.path)
    if f.size < 1536 + 512:
        raise TruncatedImageError("streamOptimized VMDK is too short for its footer", path=path)
    buf = f.read_exact(f.size - 1536, 1536, "streamOptimized footer")
    footer_marker = Marker.unpack(buf, 0)
    footer = SparseHeader.unpack(buf, 512)
    eos = Marker.unpack(buf, 1024)
    if (
        footer.magic != MAGIC
        or footer_marker.size != 0
        or footer_marker.type != MARKER_FOOTER
        or eos.value != 0
        or eos.size != 0
        or eos.type != MARKER_EOS
    ):
        raise CorruptImageError(
            "invalid streamOptimized footer (the stream was not finished?)", path=path
        )
    if footer.gd_offset == GD_AT_END:
        raise CorruptImageError("streamOptimized footer has no grain directory", path=path)
    return footer


def count_zero_entries(
    table: Callable[[int], array[int] | None], gi: int, limit: int, per_table: int
) -> int:
    """How many grain entries from ``gi`` on (at most ``limit``) are 0: absent tables count
    whole, present ones are scanned with ``bytes.lstrip`` instead of a Python loop."""
    count = 0
    while count < limit:
        tdi, idx = divmod(gi, per_table)
        span = min(per_table - idx, limit - count)
        t = table(tdi)
        if t is None:
            zeros = span
        else:
            chunk = t[idx : idx + span].tobytes()
            zeros = (len(chunk) - len(chunk.lstrip(b"\0"))) // t.itemsize
        count += zeros
        if zeros < span:
            break
        gi += zeros
    return count


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def build_sparse_layout(
    capacity_sectors: int,
    *,
    grain_sectors: int = 128,
    desc_sectors: int = 0,
    zeroed_grain: bool = False,
) -> tuple[SparseHeader, list[tuple[int, bytes]], int]:
    """Header and directories of a new hosted sparse extent, laid out as qemu and VMware do.

    Returns (header, [(offset, bytes)] for both grain directories, file size).  Grain tables
    are preallocated (every GD entry set) but left as holes: they read as zeros.
    """
    n_gd = gd_entries(capacity_sectors, grain_sectors)
    gd_sectors = _round_up(n_gd * 4, SECTOR) // SECTOR
    gt_sectors = GT_BYTES // SECTOR
    rgd = 1 + desc_sectors
    gd = rgd + gd_sectors + gt_sectors * n_gd
    overhead = _round_up(gd + gd_sectors + gt_sectors * n_gd, grain_sectors)
    header = SparseHeader(
        version=2 if zeroed_grain else 1,
        flags=FLAG_NL_DETECT | FLAG_RGD | (FLAG_ZERO_GRAIN if zeroed_grain else 0),
        capacity=capacity_sectors,
        grain_size=grain_sectors,
        desc_offset=1 if desc_sectors else 0,
        desc_size=desc_sectors,
        rgd_offset=rgd,
        gd_offset=gd,
        overhead=overhead,
    )
    pieces = []
    for base in (rgd, gd):
        first_gt = base + gd_sectors
        table = array("I", range(first_gt, first_gt + gt_sectors * n_gd, gt_sectors))
        pieces.append((base * SECTOR, le32_bytes(table)))
    return header, pieces, overhead * SECTOR
