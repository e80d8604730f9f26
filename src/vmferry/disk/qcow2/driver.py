"""The qcow2 driver: versions 2 and 3, read and write (qemu docs/interop/qcow2.txt).

Reading walks L1 -> L2 -> cluster; L2 tables are read whole into native arrays and kept in
an LRU cache, contiguous host clusters are read with one pread, and ``block_status`` returns
the longest run of one kind it can find, across L2 tables.

Writing allocates at the end of the file with exact refcounts, in the order data -> refcount
-> L2 -> L1, each step synced before the next publishes it (see ``refcount.py``).  What vmferry
refuses to write (and why) is listed in docs/formats/qcow2.md.
"""

from __future__ import annotations

import contextlib
import os
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Self

from vmferry.disk.base import (
    Alloc,
    CheckReport,
    DiskFormat,
    Extent,
    ParentInfo,
    ParentRef,
    zero_fill,
)
from vmferry.disk.blockfile import BlockFile
from vmferry.disk.parallel import Piece, inflate_pieces, parallel_workers, thread_window
from vmferry.disk.qcow2 import header as hdr
from vmferry.disk.qcow2.codec import (
    Compressor,
    decompress,
    load_zstd,
)
from vmferry.disk.qcow2.header import Meta
from vmferry.disk.qcow2.layout import (
    AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_NAMES,
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    FLAG_COMPRESSED,
    FLAG_COPIED,
    FLAG_ZERO,
    INCOMPAT_COMPRESSION,
    INCOMPAT_CORRUPT,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    MAGIC,
    MAX_BACKING_NAME,
    MAX_L1_BYTES,
    OFFSET_MASK,
    SUBCLUSTERS,
    V3_HEADER_WRITE_SIZE,
    be64_array,
    be64_bytes,
)
from vmferry.disk.qcow2.refcount import Refcounts
from vmferry.disk.qcow2.snapshots import Snapshot, read_snapshots
from vmferry.errors import (
    CorruptImageError,
    ResourceLimitError,
    UnsupportedFeatureError,
    UsageError,
    VmferryError,
)

# what one guest range is, for this layer
UNALLOC, ZERO, DATA, COMPRESSED = 0, 1, 2, 3
_ALLOC = {UNALLOC: Alloc.UNALLOCATED, ZERO: Alloc.ZERO, DATA: Alloc.DATA, COMPRESSED: Alloc.DATA}

#: qemu's names for backing formats that vmferry names differently
_TO_QEMU = {"vhd": "vpc"}
_FROM_QEMU = {v: k for k, v in _TO_QEMU.items()}
_L2_CACHE_BYTES = 32 * 1024 * 1024
#: data written between commits of the metadata that publishes it (see ``_commit_due``);
#: dirty tables also force one when they would fill the L2 cache (they are pinned in it)
COMMIT_EVERY = 256 << 20
#: bytes of packed compressed clusters a thread reads ahead while it inflates (fits a core's
#: L2 cache; larger clusters get a window of two clusters)
INFLATE_WINDOW = 512 * 1024
_ON_OFF = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False}


@dataclass
class _Open:
    """The compressed-output cluster being filled by consecutive partial writes."""

    ci: int
    buf: bytearray


class Qcow2(DiskFormat):
    name = "qcow2"
    extensions = (".qcow2", ".qcow")
    supports_parent = True
    parent_formats = ("qcow2", "raw", "vhd", "vhdx", "vmdk", "vdi")
    create_options = {
        "compat": "0.10 (version 2) or 1.1 (version 3, default)",
        "cluster_size": "cluster size, a power of two from 512 to 2M (default 64K)",
        "refcount_bits": "refcount width: 8, 16 (default), 32 or 64",
        "compression_type": "zlib (default) or zstd (needs compat=1.1 and python zstandard)",
        "compress": "on: store written clusters compressed (convert output), off (default)",
        "extended_l2": "off only: vmferry reads extended L2 images but does not create them",
    }

    def __init__(
        self, f: BlockFile, meta: Meta, writable: bool, data: BlockFile | None = None
    ) -> None:
        self.file = f
        self.meta = meta
        self.writable = writable
        self.data = data if data is not None else f
        self.cs = meta.cluster_size
        self.cb = meta.cluster_bits
        self.ext_l2 = meta.extended_l2
        self.l2_entries = meta.l2_entries
        self.l2_bits = self.l2_entries.bit_length() - 1
        self.sc_bits = self.cb - 5  # subcluster size with extended L2 entries
        self.virtual_size = meta.size
        self.granularity = self.cs >> 5 if self.ext_l2 else self.cs
        self.external = data is not None
        self.csize_shift = 62 - (self.cb - 8)
        self.csize_mask = (1 << (self.cb - 8)) - 1
        self.coffset_mask = (1 << self.csize_shift) - 1
        self.l1 = be64_array(
            f.read_exact(meta.l1_table_offset, meta.l1_size * 8, "L1 table")
            if meta.l1_size
            else b""
        )
        self.warnings: list[str] = []
        self.snapshots: list[Snapshot] = []
        self._l2_cache: OrderedDict[int, Any] = OrderedDict()
        self._l2_cap = max(16, _L2_CACHE_BYTES // self.cs)
        self._last_cluster: tuple[int, bytes] | None = None  # last decompressed (entry, bytes)
        # writer state
        self._rc: Refcounts | None = None
        self._l2_dirty: dict[int, tuple[int, int]] = {}
        self._l1_dirty: set[int] = set()
        self._durable = True
        self._compressor: Compressor | None = None
        self._cpos: int | None = None  # next free byte for compressed output
        self._open_cluster: _Open | None = None
        self._modified = False
        self._failed = False
        self._uncommitted = 0  # data bytes written since the last commit
        self._update_alignment()

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        return 100 if head[:4] == MAGIC else 0

    @classmethod
    def open(
        cls,
        f: BlockFile,
        *,
        writable: bool = False,
        allow_external_data: bool = False,
        snapshot: str | None = None,
    ) -> Self:
        meta = hdr.parse(f)
        path = str(f.path)
        warnings: list[str] = []
        if meta.incompatible & INCOMPAT_CORRUPT:
            if writable:
                raise CorruptImageError(
                    "qcow2 image is marked corrupt; refusing to write to it",
                    path=path,
                    hint="run qemu-img check -r all on a copy, or read it read-only",
                )
            warnings.append(f"{path}: image is marked corrupt; data may be damaged")
        if writable:
            _refuse_writable(meta, path, snapshot)
        data = _open_data_file(f, meta, allow_external_data)
        try:
            drv = cls(f, meta, writable, data)
            drv.warnings += warnings
            drv.snapshots = read_snapshots(f, meta)
            if snapshot is not None:
                drv._switch_to_snapshot(snapshot)
            if writable and meta.incompatible & INCOMPAT_DIRTY:
                drv._rebuild_refcounts()
        except BaseException:
            if data is not None:
                data.close()
            raise
        return drv

    def _rebuild_refcounts(self) -> None:
        """A dirty image (lazy refcounts, writer crashed) gets exact refcounts, as qemu does.

        The references are counted from the tables, a new refcount table and blocks are
        written after the end of the file and synced, then one header write switches to them
        and clears the dirty bit.  The old refcount clusters are simply no longer counted.
        """
        from vmferry.disk.qcow2.check import count_references
        from vmferry.disk.qcow2.refcount import write_fresh_refcounts

        refs = count_references(self)
        write_fresh_refcounts(self.file, self.meta, refs)
        self.file.fsync()
        self.meta.incompatible &= ~INCOMPAT_DIRTY
        self.file.write(0, hdr.build(self.meta))
        self.file.fsync()
        self.warnings.append(f"{self.file.path}: image was dirty; refcounts rebuilt")

    def _switch_to_snapshot(self, wanted: str) -> None:
        """Read-only view of an internal snapshot: its L1 table and its disk size."""
        for snap in self.snapshots:
            if wanted in (snap.id, snap.name):
                break
        else:
            raise UsageError(f"no internal snapshot {wanted!r}", path=str(self.file.path))
        if snap.l1_size * 8 > MAX_L1_BYTES:
            raise ResourceLimitError("snapshot L1 table is too large", path=str(self.file.path))
        size = snap.disk_size if snap.disk_size is not None else self.meta.size
        span = self.cs * self.l2_entries
        if snap.l1_size < -(-size // span):
            raise CorruptImageError("snapshot L1 table is too small", path=str(self.file.path))
        hdr.check_table(
            self.file, snap.l1_offset, snap.l1_size * 8, self.cs, "snapshot L1", str(self.file.path)
        )
        raw = self.file.read_exact(snap.l1_offset, snap.l1_size * 8, "snapshot L1 table")
        self.l1 = be64_array(raw)
        self.virtual_size = size

    # --- what the layer is --------------------------------------------------------------------

    def parent_ref(self) -> ParentRef | None:
        name = self.meta.backing_file
        if not name:
            return None
        path = str(self.file.path)
        if name.startswith("json:") or "://" in name:
            raise UnsupportedFeatureError(
                f"backing file {name!r} is a protocol URL, not a file", path=path
            )
        stored = self.meta.backing_format
        if not stored:
            raise UnsupportedFeatureError(
                f"backing file format of {name!r} is not recorded in the image; vmferry never "
                "guesses a backing file's format",
                path=path,
                features=["backing file without format"],
                hint=f"record it: qemu-img rebase -u -F FORMAT -b {name} {self.file.path.name}",
            )
        fmt = _FROM_QEMU.get(stored, stored)
        if fmt not in self.parent_formats:
            raise UnsupportedFeatureError(
                f"backing file format {stored!r} is not supported", path=path
            )
        return ParentRef(
            format=fmt,
            hints=(name,),
            raw={"backing_file": name, "backing_format": stored},
        )

    def files(self) -> list[str]:
        """The image, and its external data file when one was opened."""
        out = [str(self.file.path)]
        if self.data is not self.file:
            out.append(str(self.data.path))
        return out

    def info(self) -> dict[str, Any]:
        m = self.meta
        out: dict[str, Any] = {
            "compat": "0.10" if m.version == 2 else "1.1",
            "version": m.version,
            "cluster_size": self.cs,
            "refcount_bits": 1 << m.refcount_order,
            "lazy_refcounts": bool(m.compatible & COMPAT_LAZY_REFCOUNTS),
            "compression_type": COMPRESSION_NAMES.get(m.compression_type, "?"),
            "extended_l2": self.ext_l2,
            "corrupt": bool(m.incompatible & INCOMPAT_CORRUPT),
            "dirty": bool(m.incompatible & INCOMPAT_DIRTY),
            "incompatible_features": _feature_list(m, 0, m.incompatible),
            "compatible_features": _feature_list(m, 1, m.compatible),
            "autoclear_features": _feature_list(m, 2, m.autoclear),
            "backing_file": m.backing_file,
            "backing_format": m.backing_format,
            "data_file": m.data_file,
            "bitmaps_extension": m.bitmaps_ext is not None,
            "snapshots": [s.as_dict() for s in self.snapshots],
        }
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out

    # --- reading ------------------------------------------------------------------------------

    def _l2(self, off: int) -> Any:
        table = self._l2_cache.get(off)
        if table is not None:
            self._l2_cache.move_to_end(off)
            return table
        if off % self.cs:
            raise CorruptImageError(
                f"L2 table offset {off:#x} is not cluster aligned", path=str(self.file.path)
            )
        table = be64_array(self.file.read_exact(off, self.cs, "L2 table"))
        self._l2_cache[off] = table
        if len(self._l2_cache) > self._l2_cap:
            for old in list(self._l2_cache)[: len(self._l2_cache) - self._l2_cap]:
                if old not in self._l2_dirty:
                    del self._l2_cache[old]
        return table

    def _entry(self, ci: int) -> tuple[int, int]:
        """(L2 entry, subcluster bitmap) of guest cluster ``ci``; (0, 0) when no L2 table."""
        l1i = ci >> self.l2_bits
        l2off = self.l1[l1i] & OFFSET_MASK if l1i < len(self.l1) else 0
        if not l2off:
            return 0, 0
        table = self._l2(l2off)
        idx = ci & (self.l2_entries - 1)
        if self.ext_l2:
            return table[2 * idx], table[2 * idx + 1]
        return table[idx], 0

    def _classify(self, pos: int) -> tuple[int, int, int]:
        """(kind, host offset of ``pos`` for DATA, end of this kind's run) at guest ``pos``."""
        cb = self.cb
        ci = pos >> cb
        l1i = ci >> self.l2_bits
        l2off = self.l1[l1i] & OFFSET_MASK if l1i < len(self.l1) else 0
        if not l2off:
            return UNALLOC, 0, (l1i + 1) << (self.l2_bits + cb)
        table = self._l2(l2off)
        idx = ci & (self.l2_entries - 1)
        cluster_end = (ci + 1) << cb
        if not self.ext_l2:
            e = table[idx]
            if not e:
                return UNALLOC, 0, cluster_end
            if e & FLAG_COMPRESSED:
                return self._compressed_kind(e, ci), 0, cluster_end
            if e & FLAG_ZERO:
                return ZERO, 0, cluster_end
            host = self._host(e, ci)
            if host < 0:
                return UNALLOC, 0, cluster_end
            return DATA, host + (pos & (self.cs - 1)), cluster_end
        return self._classify_ext(pos, ci, table[2 * idx], table[2 * idx + 1])

    def _compressed_kind(self, e: int, ci: int) -> int:
        if self.external:
            raise CorruptImageError(
                f"compressed cluster at guest offset {ci << self.cb:#x} in an image with an "
                "external data file",
                path=str(self.file.path),
            )
        return COMPRESSED

    def _host(self, e: int, ci: int) -> int:
        """Host offset of a standard cluster, validated; -1 when unallocated."""
        off = e & OFFSET_MASK
        if not off and not (self.external and e & FLAG_COPIED):
            return -1
        if off % self.cs:
            raise CorruptImageError(
                f"L2 entry for guest offset {ci << self.cb:#x} points at unaligned host offset "
                f"{off:#x}",
                path=str(self.file.path),
            )
        if off >= self.data.size:
            raise CorruptImageError(
                f"L2 entry for guest offset {ci << self.cb:#x} points past the end of the file "
                f"({off:#x} >= {self.data.size:#x})",
                path=str(self.data.path),
            )
        return off

    def _classify_ext(self, pos: int, ci: int, e: int, bitmap: int) -> tuple[int, int, int]:
        cluster_start = ci << self.cb
        if e & FLAG_COMPRESSED:
            return self._compressed_kind(e, ci), 0, cluster_start + self.cs
        alloc = bitmap & 0xFFFFFFFF
        zero = bitmap >> 32
        if alloc & zero:
            raise CorruptImageError(
                f"subcluster both allocated and zero at guest offset {cluster_start:#x}",
                path=str(self.file.path),
            )
        si = (pos - cluster_start) >> self.sc_bits

        def state(i: int) -> int:
            if alloc >> i & 1:
                return DATA
            return ZERO if zero >> i & 1 else UNALLOC

        kind = state(si)
        j = si + 1
        while j < SUBCLUSTERS and state(j) == kind:
            j += 1
        end = cluster_start + (j << self.sc_bits)
        if kind != DATA:
            return kind, 0, end
        host = self._host(e, ci)
        if host < 0:
            raise CorruptImageError(
                f"allocated subcluster without a host cluster at guest offset {cluster_start:#x}",
                path=str(self.file.path),
            )
        return DATA, host + (pos - cluster_start), end

    def _status(self, pos: int, end: int) -> tuple[int, int, int]:
        """(kind, length, host) of the longest run of one kind from ``pos`` (before ``end``)."""
        kind, host, run_end = self._classify(pos)
        run_end = min(run_end, end)
        if not self.ext_l2 and run_end < end and not run_end & (self.cs - 1):
            run_end = self._extend_run(kind, host - pos + run_end, run_end, end)
        while run_end < end:
            k2, h2, e2 = self._classify(run_end)
            if k2 != kind or (kind == DATA and h2 != host + (run_end - pos)):
                break
            run_end = min(e2, end)
        return kind, run_end - pos, host

    def _extend_run(self, kind: int, next_host: int, pos: int, end: int) -> int:
        """Fast path of ``_status`` for standard L2 tables: scan the arrays without calls.

        Stops at the first entry that does not obviously continue the run; the generic loop
        then decides about it (and raises if it is broken), so stopping early is always safe.
        """
        cb, l2_bits = self.cb, self.l2_bits
        mask = self.l2_entries - 1
        l1 = self.l1
        limit = self.data.size
        want_bits = OFFSET_MASK | FLAG_COMPRESSED | FLAG_ZERO
        ci = pos >> cb
        last_ci = (end - 1) >> cb
        while ci <= last_ci:
            l1i = ci >> l2_bits
            l2off = l1[l1i] & OFFSET_MASK if l1i < len(l1) else 0
            if not l2off:
                if kind != UNALLOC:
                    break
                ci = (l1i + 1) << l2_bits
                continue
            table = self._l2(l2off)
            base = ci - (ci & mask)
            idx = ci & mask
            stop = min(mask + 1, last_ci - base + 1)
            if kind == UNALLOC:
                while idx < stop and not table[idx]:
                    idx += 1
            elif kind == ZERO:
                while idx < stop and table[idx] & (FLAG_ZERO | FLAG_COMPRESSED) == FLAG_ZERO:
                    idx += 1
            elif kind == COMPRESSED:
                while idx < stop and table[idx] & FLAG_COMPRESSED:
                    idx += 1
            else:
                while idx < stop and next_host < limit and table[idx] & want_bits == next_host:
                    next_host += self.cs
                    idx += 1
            ci = base + idx
            if idx < stop:
                break
        return min(ci << cb, end)

    def block_status(self, offset: int, length: int) -> Extent:
        self._check_range(offset, length)
        self._flush_open_cluster()
        kind, n, host = self._status(offset, offset + length)
        if kind == DATA:  # (bytes in an external data file have no offset in this file)
            return Extent(offset, n, Alloc.DATA, None if self.external else host)
        return Extent(offset, n, _ALLOC[kind], None, kind == COMPRESSED)

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        self._flush_open_cluster()
        kind, n, host = self._status(offset, offset + length)
        if n == length and kind == DATA:  # one run of plain clusters: one pread, no copy
            return self.data.pread(host, n)
        if n == length and kind != COMPRESSED:
            return bytes(n)
        out = bytearray(length)  # zeros already: holes need no filling
        self._fill(offset, memoryview(out), zero_holes=False)
        return bytes(out)

    def read_into(self, offset: int, view: memoryview) -> None:
        self._check_range(offset, len(view))
        self._flush_open_cluster()
        self._fill(offset, view, zero_holes=True)

    def _fill(self, offset: int, view: memoryview, *, zero_holes: bool) -> None:
        pos, end = offset, offset + len(view)
        pieces: list[Piece] = []  # compressed (keyed by L2 entry), inflated at the end
        while pos < end:
            kind, n, host = self._status(pos, end)
            part = view[pos - offset : pos - offset + n]
            if kind == DATA:
                self.data.pread_into(host, part)
            elif kind == COMPRESSED:
                self._plan_compressed(pos, n, pos - offset, pieces)
            elif zero_holes:
                zero_fill(part)
            pos += n
        if pieces:
            self._inflate_into(view, pieces)

    def _plan_compressed(self, pos: int, n: int, dst: int, pieces: list[Piece]) -> None:
        end = pos + n
        while pos < end:
            ci = pos >> self.cb
            in_c = pos - (ci << self.cb)
            k = min(self.cs - in_c, end - pos)
            pieces.append((ci, self._entry(ci)[0], dst, in_c, k))
            pos += k
            dst += k

    def _inflate_into(self, view: memoryview, pieces: list[Piece]) -> None:
        """Inflate compressed clusters into ``view``, in one contiguous batch per core.

        Each batch reads the packed compressed bytes through a small per-thread window that
        stays in the core's cache and inflates from there, as streamOptimized VMDK grains are
        read: no buffer the size of the request is built, sliced or joined on the way.
        """
        if self.meta.compression_type == COMPRESSION_ZSTD:
            load_zstd()  # the missing-module error once, before any thread
        try:
            self._last_cluster = inflate_pieces(
                view,
                pieces,
                self._last_cluster,
                lambda batch: self._inflate_batch(view, batch),
                lambda todo: len(todo) >= 4 and parallel_workers() > 1,
            )
        except VmferryError as exc:
            exc.path = exc.path or str(self.file.path)
            raise

    def _inflate_batch(self, view: memoryview, pieces: list[Piece]) -> list[bytes | None]:
        """Inflate ``pieces`` into ``view``; one result per piece: the last one's cluster (to
        be cached), None for the rest."""
        cs = self.cs
        size = self.file.size
        window = thread_window(max(INFLATE_WINDOW, 2 * cs + 512))
        lo = hi = 0  # the file bytes [lo, hi) are in the window
        out: list[bytes | None] = []
        plain = b""
        for ci, e, dst, in_c, n in pieces:
            coff, csize = self._compressed_range(e)
            where = f"compressed cluster at guest offset {ci << self.cb:#x}"
            if coff >= size:
                raise CorruptImageError(f"{where} points past the end of the file")
            csize = min(csize, 2 * cs, size - coff)
            if not (lo <= coff and coff + csize <= hi):
                lo, hi = coff, coff + min(len(window), size - coff)
                self.file.pread_into(lo, window[: hi - lo])
            plain = decompress(
                self.meta.compression_type, window[coff - lo : coff - lo + csize], cs, where
            )
            view[dst : dst + n] = memoryview(plain)[in_c : in_c + n]
            out.append(None)
        out[-1] = plain
        return out

    def _compressed_range(self, e: int) -> tuple[int, int]:
        """(host offset, byte length) of a compressed cluster's data."""
        coff = e & self.coffset_mask
        sectors = ((e >> self.csize_shift) & self.csize_mask) + 1
        return coff, sectors * 512 - (coff & 511)

    # --- writing: helpers ---------------------------------------------------------------------

    def _update_alignment(self) -> None:
        self.write_alignment = self.cs if self.meta.backing_file else 1

    def _begin_modify(self) -> Refcounts:
        """First change in this session: clear autoclear bits we do not maintain (per spec)."""
        self._require_writable()
        if self._rc is None:
            self._rc = Refcounts(self.file, self.meta)
        if not self._modified:
            self._modified = True
            if self.meta.autoclear:
                self.meta.autoclear = 0
                self._write_header()
        return self._rc

    def _sync(self) -> None:
        if self._durable:
            self.file.fsync()

    def _write_header(self) -> None:
        self.file.write(0, hdr.build(self.meta))
        self._sync()

    def _cluster_len(self, ci: int) -> int:
        """Guest bytes of cluster ``ci`` inside the disk (the last one may be short)."""
        return min(self.cs, self.virtual_size - (ci << self.cb))

    def _l2_for_write(self, ci: int) -> tuple[Any, int, int]:
        """(table, its host offset, index) for guest cluster ``ci``, allocating the table."""
        assert self._rc is not None
        l1i = ci >> self.l2_bits
        e1 = self.l1[l1i]
        off = e1 & OFFSET_MASK
        idx = ci & (self.l2_entries - 1)
        if off:
            if not e1 & FLAG_COPIED:
                raise UnsupportedFeatureError(
                    "L2 table is shared (no COPIED flag); vmferry does not write such images",
                    path=str(self.file.path),
                )
            return self._l2(off), off, idx
        off = self._rc.alloc(1)
        table = be64_array(bytes(self.cs))
        self._l2_cache[off] = table
        self._l2_dirty[off] = (0, len(table))
        self.l1[l1i] = off | FLAG_COPIED
        self._l1_dirty.add(l1i)
        return table, off, idx

    def _set_entry(self, table: Any, toff: int, idx: int, value: int) -> None:
        table[idx] = value
        lo, hi = self._l2_dirty.get(toff, (idx, idx + 1))
        self._l2_dirty[toff] = (min(lo, idx), max(hi, idx + 1))

    def _old_content(self, e: int, ci: int, covers_all: bool) -> bytearray:
        """What cluster ``ci`` reads as in this layer, as the base of a partial write."""
        cs = self.cs
        if covers_all:
            return bytearray(cs)
        if e & FLAG_COMPRESSED:
            buf = bytearray(cs)
            self._inflate_into(memoryview(buf), [(ci, e, 0, 0, cs)])
            return buf
        if e & FLAG_ZERO:
            return bytearray(cs)
        host = self._host(e, ci)
        if host >= 0:
            return bytearray(self.file.pread(host, cs))
        if self.meta.backing_file:
            raise UsageError(
                f"partial write to unallocated cluster {ci} of an image with a backing file; "
                "write whole clusters (Chain.write does this)",
                path=str(self.file.path),
            )
        return bytearray(cs)

    def _release(self, e: int) -> None:
        """Drop this entry's reference to its host clusters (applied after commit)."""
        assert self._rc is not None
        if e & FLAG_COMPRESSED:
            coff, csize = self._compressed_range(e)
            self._rc.free(coff, csize)
            if self._last_cluster is not None and self._last_cluster[0] == e:
                self._last_cluster = None
            return
        off = e & OFFSET_MASK
        if off:
            self._rc.free(off, self.cs)

    def _commit(self) -> None:
        """Publish the session's changes in crash-safe order (see refcount.py)."""
        rc = self._rc
        if rc is None or self._failed:
            return
        if not (
            rc.dirty_blocks
            or rc.table_dirty
            or rc.table_moved
            or self._l2_dirty
            or self._l1_dirty
            or rc.pending_free
        ):
            return
        self._uncommitted = 0
        rc.write_blocks()
        self._sync()
        if rc.table_moved:
            rc.write_table()
            self._sync()
            rc.table_moved = False
            self._write_header()
        elif rc.table_dirty:
            rc.write_table()
            self._sync()
        if self._l2_dirty:
            for toff, (lo, hi) in sorted(self._l2_dirty.items()):
                table = self._l2_cache[toff]
                self.file.write(toff + lo * 8, be64_bytes(table, lo, hi))
            self._l2_dirty.clear()
            self._sync()
        if self._l1_dirty:
            lo, hi = min(self._l1_dirty), max(self._l1_dirty) + 1
            self.file.write(self.meta.l1_table_offset + lo * 8, be64_bytes(self.l1, lo, hi))
            self._l1_dirty.clear()
            self._sync()
        if rc.pending_free:
            emptied = rc.apply_frees()
            rc.write_blocks()  # a crash before the next sync only leaks
            if self._cpos is not None and any(o <= self._cpos < o + n for o, n in emptied):
                self._cpos = None
            for off, n in emptied:
                self.file.punch_hole(off, n)

    # --- writing ------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._require_writable()
        n = len(data)
        self._check_range(offset, n)
        if n == 0:
            return
        self._require_own_edges(offset, offset + n)
        with self._guard():
            self._begin_modify()
            view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
            if self._compressor is not None:
                self._write_compressed(offset, view)
            else:
                self._write_plain(offset, view)
            self._uncommitted += n
            if self._commit_due():
                self._commit()

    def _commit_due(self) -> bool:
        """Publish in batches: each commit of an image written in place costs three fsyncs.

        Like qemu's metadata caches, new mappings are published (in crash-safe order) at
        ``flush``/``close``, and before then once enough data or dirty tables pile up (which
        also bounds the memory pinned by dirty tables).  A crash loses at most unpublished
        writes, as it would lose unflushed writes in qemu; the image stays consistent.
        """
        rc = self._rc
        return (
            self._uncommitted >= COMMIT_EVERY
            or len(self._l2_dirty) >= self._l2_cap
            or (rc is not None and len(rc.dirty_blocks) >= self._l2_cap)
        )

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """A change that fails half-way poisons the session: nothing more is published.

        In-memory tables may then hold references whose data or refcounts never reached the
        file; publishing them later could expose garbage.  What is on disk stays consistent
        (at worst leaked clusters), so the image is safe to reopen.
        """
        if self._failed:
            raise UsageError(
                "an earlier change to this image failed; close and reopen it",
                path=str(self.file.path),
            )
        try:
            yield
        except BaseException:
            self._failed = True
            raise

    def _require_own_edges(self, offset: int, end: int) -> None:
        """Refuse up front (before any change) a partial cluster only the backing file knows."""
        if not self.meta.backing_file:
            return
        for ci in {offset >> self.cb, (end - 1) >> self.cb}:
            start = ci << self.cb
            if offset <= start and end >= start + self._cluster_len(ci):
                continue
            if self._open_cluster is not None and self._open_cluster.ci == ci:
                continue
            if self._classify(start)[0] == UNALLOC:
                raise UsageError(
                    f"a write that covers only part of cluster {ci} of a qcow2 image with a "
                    "backing file needs the backing file's bytes for the rest of the cluster",
                    path=str(self.file.path),
                    hint="write whole clusters to a qcow2 overlay (the chain does this)",
                )

    def _write_fresh(self, offset: int, view: memoryview) -> bool:
        """Fast path of ``_write_plain``: whole clusters that this layer has never allocated.

        The usual case of convert's output.  Table slices are checked and set at C speed and
        the data goes out in one write; anything else (partial clusters, allocated, zero or
        compressed entries, extended L2) returns False before any change but new L2 tables,
        which the general path would allocate the same way.
        """
        cs, cb = self.cs, self.cb
        end = offset + len(view)
        if self.ext_l2 or offset & (cs - 1) or end & (cs - 1) or self.data is not self.file:
            return False
        assert self._rc is not None
        groups: list[tuple[Any, int, int, int]] = []
        ci, stop_ci = offset >> cb, end >> cb
        while ci < stop_ci:
            table, toff, idx = self._l2_for_write(ci)
            stop = min(self.l2_entries, idx + stop_ci - ci)
            if table[idx:stop].count(0) != stop - idx:
                return False
            groups.append((table, toff, idx, stop))
            ci += stop - idx
        host = self._rc.alloc(stop_ci - (offset >> cb))
        self.file.write(host, view)
        for table, toff, idx, stop in groups:
            n = stop - idx
            first = host | FLAG_COPIED
            table[idx:stop] = array("Q", range(first, first + n * cs, cs))
            lo, hi = self._l2_dirty.get(toff, (idx, stop))
            self._l2_dirty[toff] = (min(lo, idx), max(hi, stop))
            host += n * cs
        return True

    def _write_plain(self, offset: int, view: memoryview) -> None:
        assert self._rc is not None
        if self._write_fresh(offset, view):
            return
        cs, cb = self.cs, self.cb
        pieces: list[tuple[int, bytes | bytearray | memoryview, int]] = []
        new: list[tuple[Any, int, int, bytes | bytearray | memoryview, int]] = []
        pos, end = offset, offset + len(view)
        while pos < end:
            ci = pos >> cb
            start = ci << cb
            a, b = pos - start, min(cs, end - start)
            chunk = view[pos - offset : pos - offset + b - a]
            table, toff, idx = self._l2_for_write(ci)
            e = table[idx]
            full = a == 0 and b >= self._cluster_len(ci)
            host = -1 if e & FLAG_COMPRESSED else self._host(e, ci)
            if host >= 0 and e & FLAG_COPIED and not e & FLAG_ZERO:
                pieces.append((host + a, chunk, pos - offset))
            elif host >= 0 and e & FLAG_COPIED:  # preallocated zero cluster: reuse it
                buf = bytearray(cs)
                buf[a:b] = chunk
                pieces.append((host, buf, -1))
                self._set_entry(table, toff, idx, host | FLAG_COPIED)
            else:
                if full and b == cs:
                    content: bytes | bytearray | memoryview = chunk
                    src = pos - offset
                else:
                    buf = self._old_content(e, ci, full)
                    buf[a:b] = chunk
                    content, src = buf, -1
                new.append((table, toff, idx, content, src))
                if e:
                    self._release(e)
            pos = start + b
        if new:
            first = self._rc.alloc(len(new))
            for j, (table, toff, idx, content, src) in enumerate(new):
                host = first + j * cs
                pieces.append((host, content, src))
                self._set_entry(table, toff, idx, host | FLAG_COPIED)
        self._write_pieces(pieces, view)

    def _write_pieces(
        self, pieces: list[tuple[int, bytes | bytearray | memoryview, int]], view: memoryview
    ) -> None:
        """pwrite the pieces, merging those contiguous on the host into one write.

        ``src`` is a piece's offset in ``view`` when it is a slice of it (else -1): a run of
        such slices that is contiguous in ``view`` too is written without copying.
        """
        pieces.sort(key=lambda p: p[0])
        run: list[tuple[int, bytes | bytearray | memoryview, int]] = []
        for piece in pieces:
            if run and piece[0] == run[-1][0] + len(run[-1][1]):
                run.append(piece)
                continue
            self._write_run(run, view)
            run = [piece]
        self._write_run(run, view)

    def _write_run(
        self, run: list[tuple[int, bytes | bytearray | memoryview, int]], view: memoryview
    ) -> None:
        if not run:
            return
        first_src = run[0][2]
        size = sum(len(p[1]) for p in run)
        if len(run) == 1:
            self.file.write(run[0][0], run[0][1])
        elif first_src >= 0 and all(p[2] == first_src + (p[0] - run[0][0]) for p in run):
            self.file.write(run[0][0], view[first_src : first_src + size])
        else:
            self.file.write(run[0][0], b"".join(p[1] for p in run))

    # --- compressed output --------------------------------------------------------------------

    def _write_compressed(self, offset: int, view: memoryview) -> None:
        """Store new clusters compressed; a partly written cluster waits for the next write."""
        cs, cb = self.cs, self.cb
        end = offset + len(view)
        ready: list[tuple[int, bytearray]] = []  # whole clusters, compressed together below
        oc = self._open_cluster
        if oc is not None and not (offset >> cb <= oc.ci <= (end - 1) >> cb):
            ready.append((oc.ci, oc.buf))
            self._open_cluster = None
        pos = offset
        while pos < end:
            ci = pos >> cb
            start = ci << cb
            a, b = pos - start, min(cs, end - start)
            chunk = view[pos - offset : pos - offset + b - a]
            pos = start + b
            oc = self._open_cluster
            if oc is not None and oc.ci == ci:
                oc.buf[a:b] = chunk
            else:
                e, _ = self._entry(ci)
                host = -1 if e & FLAG_COMPRESSED else self._host(e, ci)
                if host >= 0 and e & FLAG_COPIED and not e & FLAG_ZERO:
                    self.file.write(host + a, chunk)  # allocated: stays where it is
                    continue
                full = a == 0 and b >= self._cluster_len(ci)
                buf = self._old_content(e, ci, full)
                buf[a:b] = chunk
                self._open_cluster = _Open(ci, buf)
            oc = self._open_cluster
            if oc is not None and (b == cs or pos >= self.virtual_size):
                ready.append((oc.ci, oc.buf))
                self._open_cluster = None
        self._store_compressed(ready)

    def _flush_open_cluster(self, commit: bool = True) -> None:
        oc = self._open_cluster
        if oc is None or self._failed:
            return
        self._open_cluster = None
        self._store_compressed([(oc.ci, oc.buf)])
        if commit:
            self._commit()

    def _store_compressed(self, clusters: list[tuple[int, bytearray]]) -> None:
        """Compress on every core (zlib and zstd release the GIL), then place in order."""
        assert self._compressor is not None
        if not clusters:
            return
        bufs = [buf for _, buf in clusters]
        if len(bufs) > 1:
            packed_all = self._compressor.compress_many(bufs)
        else:
            packed_all = [self._compressor.compress(bufs[0])]
        for (ci, buf), packed in zip(clusters, packed_all, strict=True):
            self._place_compressed(ci, buf, packed)

    def _place_compressed(self, ci: int, buf: bytearray, packed: bytes) -> None:
        assert self._rc is not None
        table, toff, idx = self._l2_for_write(ci)
        old = table[idx]
        if len(packed) >= self.cs - 512:  # not worth it: store the cluster as it is
            host = self._rc.alloc(1)
            self.file.write(host, buf)
            entry = host | FLAG_COPIED
        else:
            coff = self._alloc_bytes(len(packed))
            self.file.write(coff, packed)
            sectors = ((coff + len(packed) - 1) >> 9) - (coff >> 9)
            entry = FLAG_COMPRESSED | (sectors << self.csize_shift) | coff
        self._set_entry(table, toff, idx, entry)
        if old:
            self._release(old)

    def _alloc_bytes(self, n: int) -> int:
        """Byte-granular space for compressed data, packed like qemu packs it."""
        rc = self._rc
        assert rc is not None
        cs = self.cs
        pos = self._cpos
        if pos is not None and pos % cs and pos // cs == rc.next_free - 1:
            first = pos // cs
            if rc.get(first) < rc.max_refcount:
                last = (pos + n - 1) // cs
                rc.add(first, 1)
                if last > first:
                    got = rc.alloc(last - first)
                    if got != (first + 1) * cs:  # could not extend in place: undo, start fresh
                        rc.add(first, -1)
                        rc.free(got, (last - first) * cs)
                        return self._alloc_bytes_fresh(n)
                self._cpos = pos + n
                return pos
        return self._alloc_bytes_fresh(n)

    def _alloc_bytes_fresh(self, n: int) -> int:
        assert self._rc is not None
        clusters = -(-n // self.cs)
        start = self._rc.alloc(clusters)
        self._cpos = start + n
        return start

    # --- zeroes, flush, close -----------------------------------------------------------------

    def write_zeroes(self, offset: int, length: int) -> None:
        self._require_writable()
        self._check_range(offset, length)
        if length == 0:
            return
        self._require_own_edges(offset, offset + length)
        with self._guard():
            self._zero_range(offset, length)

    def _zero_range(self, offset: int, length: int) -> None:
        self._begin_modify()
        self._flush_open_cluster(commit=False)
        cs, cb = self.cs, self.cb
        partial: list[tuple[int, int]] = []
        pos, end = offset, offset + length
        backing = bool(self.meta.backing_file)
        while pos < end:
            ci = pos >> cb
            start = ci << cb
            a, b = pos - start, min(cs, end - start)
            pos = start + b
            e, _ = self._entry(ci)
            kind = self._classify(start)[0] if e else UNALLOC
            if kind == ZERO or (kind == UNALLOC and not backing):
                continue  # reads as zeros already
            if not (a == 0 and b >= self._cluster_len(ci)):
                partial.append((start + a, b - a))
                continue
            if self.meta.version == 2 and backing:
                partial.append((start, b))  # no zero flag: store a zero cluster
                continue
            table, toff, idx = self._l2_for_write(ci)
            self._set_entry(table, toff, idx, FLAG_ZERO if self.meta.version == 3 else 0)
            if e:
                self._release(e)
        self._commit()
        for off, n in partial:
            view = memoryview(bytes(n))
            if self._compressor is not None:
                self._write_compressed(off, view)
            else:
                self._write_plain(off, view)
            self._commit()

    def flush(self) -> None:
        if self.writable and not self._failed:
            with self._guard():
                self._flush_open_cluster()
                self._commit()
        self.file.fsync()

    def close(self) -> None:
        try:
            if self.writable and self.file.fd >= 0 and not self._failed:
                self.flush()
        finally:
            if self.data is not self.file:
                self.data.close()
            self.file.close()

    # --- metadata changes ---------------------------------------------------------------------

    def set_parent(self, parent: ParentInfo | None) -> None:
        with self._guard():
            self._set_parent(parent)

    def _set_parent(self, parent: ParentInfo | None) -> None:
        self._begin_modify()
        self._flush_open_cluster()
        self._commit()  # a header written below must not publish a half-written refcount table
        m = self.meta
        if parent is None:
            m.backing_file = None
            m.backing_format = None
        else:
            if m.incompatible & INCOMPAT_DATA_FILE or m.autoclear & AUTOCLEAR_DATA_FILE_RAW:
                raise UnsupportedFeatureError("an image with external data cannot have a backing")
            m.backing_file = _backing_name(parent)
            m.backing_format = _TO_QEMU.get(parent.format, parent.format)
        self._write_header()
        self._update_alignment()

    def resize(self, new_size: int) -> None:
        self._require_writable()
        if new_size < self.meta.size:
            raise UnsupportedFeatureError(
                "vmferry does not shrink qcow2 images", hint="qemu-img resize --shrink does"
            )
        with self._guard():
            self._resize(new_size)

    def _resize(self, new_size: int) -> None:
        rc = self._begin_modify()
        self._flush_open_cluster()
        self._commit()
        new_size = -(-new_size // 512) * 512
        m = self.meta
        need = -(-new_size // (self.cs * self.l2_entries))
        if need > m.l1_size:
            if need * 8 > MAX_L1_BYTES:
                raise ResourceLimitError("the L1 table for this size would exceed 32 MiB")
            old_clusters = -(-m.l1_size * 8 // self.cs)
            new_clusters = -(-need * 8 // self.cs)
            self.l1.extend([0] * (need - len(self.l1)))
            if new_clusters > old_clusters:
                old_off = m.l1_table_offset
                m.l1_table_offset = rc.alloc(new_clusters)
                if old_clusters:
                    rc.free(old_off, old_clusters * self.cs)
                rc.write_blocks()
                rc.write_table()
                self._sync()
                self.file.write(m.l1_table_offset, be64_bytes(self.l1))
                if rc.table_moved:
                    rc.table_moved = False  # written just above; the header below publishes it
            else:
                self.file.write(m.l1_table_offset + m.l1_size * 8, bytes((need - m.l1_size) * 8))
            self._sync()
            m.l1_size = need
        m.size = new_size
        self._write_header()
        self.virtual_size = new_size
        self._commit()

    def check(self) -> CheckReport:
        from vmferry.disk.qcow2.check import check_image

        self._flush_open_cluster()
        if self.writable and not self._failed:
            self._commit()  # the check reads what is on disk
        return check_image(self)

    # --- creating -----------------------------------------------------------------------------

    @classmethod
    def create(
        cls, f: BlockFile, size: int, options: Mapping[str, str], parent: ParentInfo | None = None
    ) -> Self:
        o = _CreateOptions.parse(options)
        size = -(-size // 512) * 512
        cs = 1 << o.cluster_bits
        meta = Meta(
            version=o.version,
            cluster_bits=o.cluster_bits,
            size=size,
            l1_size=-(-size // (cs * cs // 8)),
            l1_table_offset=0,
            refcount_table_offset=cs,
            refcount_table_clusters=1,
            nb_snapshots=0,
            snapshots_offset=0,
            refcount_order=o.refcount_order,
        )
        if meta.l1_size * 8 > MAX_L1_BYTES:
            raise UsageError(f"{size} bytes is too large for {cs}-byte clusters")
        if o.version == 3:
            meta.header_length = V3_HEADER_WRITE_SIZE
            meta.header_tail = bytes([o.compression_type]) + bytes(7)
            if o.compression_type:
                meta.incompatible |= INCOMPAT_COMPRESSION
        if parent is not None:
            meta.backing_file = _backing_name(parent)
            meta.backing_format = _TO_QEMU.get(parent.format, parent.format)
        hdr.build(meta)  # fails early when the backing name does not fit
        f.truncate(0)
        f.write(0, bytes(2 * cs))  # header and an empty refcount table
        rc = Refcounts(f, meta)
        rc.next_free = 2
        rc.set(0, 1)
        rc.set(1, 1)
        l1_clusters = -(-meta.l1_size * 8 // cs)
        if l1_clusters:
            meta.l1_table_offset = rc.alloc(l1_clusters)
        f.truncate(rc.next_free * cs)
        rc.write_blocks()
        rc.write_table()
        f.write(0, hdr.build(meta))
        drv = cls.open(f, writable=True)
        drv._durable = False  # invisible until AtomicOutput renames it after flush()
        if o.compress:
            drv._compressor = Compressor(o.compression_type)
        return drv

    @classmethod
    def measure(
        cls, virtual_size: int, data_ranges: Sequence[tuple[int, int]], options: Mapping[str, str]
    ) -> tuple[int, int]:
        o = _CreateOptions.parse(options)
        cs = 1 << o.cluster_bits
        clusters: set[int] = set()
        for off, length in data_ranges:
            clusters.update(range(off // cs, -(-(off + length) // cs)))
        required = _measure(virtual_size, cs, len(clusters), {c // (cs // 8) for c in clusters}, o)
        return required, _measure(virtual_size, cs, -(-virtual_size // cs), None, o)


def _measure(size: int, cs: int, data: int, l2s: set[int] | None, o: _CreateOptions) -> int:
    l2_span = cs * cs // 8
    l2 = len(l2s) if l2s is not None else -(-size // l2_span)
    l1_entries = -(-size // l2_span)
    l1 = -(-l1_entries * 8 // cs)
    meta = 1 + l1 + l2 + data
    per_block = cs * 8 >> o.refcount_order
    blocks = table = 1
    for _ in range(8):  # refcount metadata describes itself: iterate to the fixed point
        total = meta + blocks + table
        blocks = -(-total // per_block)
        table = -(-blocks * 8 // cs)
    return (meta + blocks + table) * cs


@dataclass
class _CreateOptions:
    version: int = 3
    cluster_bits: int = 16
    refcount_order: int = 4
    compression_type: int = COMPRESSION_ZLIB
    compress: bool = False

    @classmethod
    def parse(cls, options: Mapping[str, str]) -> _CreateOptions:
        o = cls()
        compat = options.get("compat", "1.1").lower()
        if compat not in ("0.10", "v2", "1.1", "v3"):
            raise UsageError(f"compat must be 0.10 or 1.1, not {compat!r}")
        o.version = 2 if compat in ("0.10", "v2") else 3
        cs = _parse_size(options.get("cluster_size", "65536"), "cluster_size")
        if cs < 512 or cs > 2 << 20 or cs & (cs - 1):
            raise UsageError("cluster_size must be a power of two from 512 to 2M")
        o.cluster_bits = cs.bit_length() - 1
        bits = options.get("refcount_bits", "16")
        if bits not in ("8", "16", "32", "64"):
            raise UsageError("refcount_bits must be 8, 16, 32 or 64 for vmferry")
        if o.version == 2 and bits != "16":
            raise UsageError("compat=0.10 images always have 16-bit refcounts")
        o.refcount_order = int(bits).bit_length() - 1
        ctype = options.get("compression_type", "zlib").lower()
        if ctype not in ("zlib", "zstd"):
            raise UsageError("compression_type must be zlib or zstd")
        o.compression_type = COMPRESSION_ZSTD if ctype == "zstd" else COMPRESSION_ZLIB
        if o.compression_type == COMPRESSION_ZSTD:
            if o.version == 2:
                raise UsageError("compression_type=zstd needs compat=1.1")
            load_zstd()
        o.compress = _flag(options.get("compress", "off"), "compress")
        if _flag(options.get("extended_l2", "off"), "extended_l2"):
            raise UnsupportedFeatureError("vmferry does not create images with extended L2 entries")
        return o


def _flag(value: str, name: str) -> bool:
    v = _ON_OFF.get(value.lower())
    if v is None:
        raise UsageError(f"{name} must be on or off, not {value!r}")
    return v


def _parse_size(text: str, what: str) -> int:
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    if not t.isdigit():
        raise UsageError(f"{what} must be a size like 65536 or 64K, not {text!r}")
    return int(t) * mult


def _backing_name(parent: ParentInfo) -> str:
    """The relative path (as qemu stores a relative -b), else the absolute one."""
    for name in (parent.relative_path, parent.absolute_path):
        if name and len(name.encode("utf-8")) <= MAX_BACKING_NAME:
            return name
    raise UsageError(f"backing file name is longer than {MAX_BACKING_NAME} bytes")


def _feature_list(m: Meta, kind: int, mask: int) -> list[str]:
    return [m.feature_name(kind, b) for b in range(64) if mask >> b & 1]


def _refuse_writable(meta: Meta, path: str, snapshot: str | None) -> None:
    """What vmferry will not write, each with the reason (docs/formats/qcow2.md)."""
    reasons = []
    if meta.incompatible & INCOMPAT_DATA_FILE:
        reasons.append(("external data file", "external data files are read-only in vmferry"))
    if meta.extended_l2:
        reasons.append(("extended L2 entries", "extended L2 images are read-only in vmferry"))
    if meta.nb_snapshots:
        reasons.append(("internal snapshots", "images with internal snapshots are read-only"))
    if snapshot is not None:
        reasons.append(("snapshot view", "an internal snapshot is opened read-only"))
    if meta.refcount_order < 3:
        reasons.append(("sub-byte refcounts", "vmferry writes 8..64-bit refcounts only"))
    if reasons:
        raise UnsupportedFeatureError(
            f"cannot open this qcow2 image for writing: {reasons[0][1]}",
            path=path,
            features=[r[0] for r in reasons],
            hint="convert it to a new image instead",
        )


def _open_data_file(f: BlockFile, meta: Meta, allow: bool) -> BlockFile | None:
    """The external data file, only when the caller allowed it, and only beside the image."""
    if not meta.incompatible & INCOMPAT_DATA_FILE:
        return None
    path = str(f.path)
    name = meta.data_file
    if not allow:
        raise UnsupportedFeatureError(
            f"qcow2 image keeps its data in an external data file ({name!r}); refused by default",
            path=path,
            features=["external data file"],
            hint="open it with allow_external_data=True if you trust the image",
        )
    if not name:
        raise UnsupportedFeatureError(
            "qcow2 image uses an external data file but does not record its name", path=path
        )
    p = PurePosixPath(name)
    base = f.path.parent
    target = Path(name) if p.is_absolute() else base / p
    real = os.path.realpath(target)
    root = os.path.realpath(base)
    if ".." in p.parts or not real.startswith(root.rstrip(os.sep) + os.sep):
        raise UnsupportedFeatureError(
            f"external data file {name!r} is outside the image's directory", path=path
        )
    if not os.path.exists(target):
        raise UnsupportedFeatureError(
            f"external data file {name!r} not found beside the image", path=path
        )
    return BlockFile.open(target, writable=False)
