"""The VHDX driver: Hyper-V's .vhdx and .avhdx (differencing) images.

Reading follows MS-VHDX: current header by sequence number, region table, metadata, BAT with
sector-bitmap entries interleaved every ``chunk_ratio`` payload entries.  A dirty log is
replayed before anything else is trusted.  Writing keeps the format's crash rules: data is
written and flushed before the BAT entry that publishes it, and every BAT / bitmap / metadata
change goes through the log (entry, flush, apply in place, flush), so a crash at any instant
leaves either the old or the new mapping, never a torn one.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import tempfile
import uuid
from array import array
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from vmferry.disk.base import Alloc, CheckReport, DiskFormat, Extent, ParentInfo, ParentRef
from vmferry.disk.blockfile import MAX_METADATA_READ, BlockFile
from vmferry.disk.vhdx import log as vlog
from vmferry.disk.vhdx.layout import (
    BAT_OFFSET_MASK,
    BAT_REGION,
    BAT_STATE_MASK,
    FILE_ID_SIGNATURE,
    FP_HAS_PARENT,
    FP_LEAVE_BLOCKS_ALLOCATED,
    HEADER_AREA_END,
    HEADER_OFFSETS,
    HEADER_SIZE,
    LOG_SECTOR,
    MAX_BLOCK,
    MAX_VIRTUAL_SIZE,
    MD_VIRTUAL_DISK_SIZE,
    METADATA_REGION,
    MIN_BLOCK,
    PAYLOAD_FULLY_PRESENT,
    PAYLOAD_PARTIALLY_PRESENT,
    PAYLOAD_ZERO,
    REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE,
    SB_NOT_PRESENT,
    SB_PRESENT,
    SECTOR_BITMAP_BLOCK,
    ZERO_GUID,
    FileIdentifier,
    Header,
    MiB,
    bat_entry_count,
    chunk_ratio,
    guid_text,
    new_guid,
)
from vmferry.disk.vhdx.metadata import (
    Metadata,
    Region,
    header_is_valid,
    pack_header,
    pack_metadata_region,
    pack_region_table,
    parse_metadata,
    parse_region_table,
    pick_header,
    region_table_is_valid,
)
from vmferry.errors import (
    CorruptImageError,
    NotThisFormatError,
    TruncatedImageError,
    UnsupportedFeatureError,
    UsageError,
)

_DATA = "data"
_ZERO = "zero"
_UNALLOC = "unalloc"
_PARTIAL = "partial"

# One byte per payload block says how it reads; translate tables map a BAT entry's low byte.
_C_DATA, _C_ZERO, _C_UNALLOC, _C_PARTIAL, _C_BAD = b"\0", b"\1", b"\2", b"\3", b"\x09"
_ALL_CODES = (_C_DATA, _C_ZERO, _C_UNALLOC, _C_PARTIAL)
_CODE_KIND = {0: _DATA, 1: _ZERO, 2: _UNALLOC, 3: _PARTIAL, 9: _ZERO}


def _code_table(states: dict[int, bytes]) -> bytes:
    return bytes(states[v & BAT_STATE_MASK][0] for v in range(256))


# UNDEFINED (1), ZERO (2), UNMAPPED (3) and the 0.95 draft's UNMAPPED (5) read as zeros.
_PLAIN_CODES = _code_table(
    {0: _C_ZERO, 1: _C_ZERO, 2: _C_ZERO, 3: _C_ZERO, 4: _C_BAD, 5: _C_ZERO, 6: _C_DATA, 7: _C_BAD}
)
_DIFF_CODES = _code_table(
    {
        0: _C_UNALLOC,
        1: _C_ZERO,
        2: _C_ZERO,
        3: _C_ZERO,
        4: _C_BAD,
        5: _C_ZERO,
        6: _C_DATA,
        7: _C_PARTIAL,
    }
)

DEFAULT_BLOCK = 32 * MiB
DEFAULT_LOG = 1 * MiB
CREATOR = "vmferry"
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_WIN_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _parse_size(text: str, what: str) -> int:
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"{what} must be a size such as 1M or 33554432, not {text!r}")
    return int(m.group(1)) << (10 * " kmgt".index((m.group(2) or " ").lower()))


class Vhdx(DiskFormat):
    """A VHDX layer; differencing layers answer UNALLOCATED where the parent holds the data."""

    name = "vhdx"
    #: New blocks are published (data fsync, one log entry) once this many bytes of writes
    #: went to blocks whose mapping changed, and on flush/close.  0 = publish every write.
    PUBLISH_THRESHOLD = 256 * MiB
    extensions = (".vhdx", ".avhdx")
    supports_parent = True
    parent_formats = ("vhdx",)
    child_size_must_match = True
    create_options = {
        "subformat": "dynamic (default) or fixed",
        "block_size": "payload block size, power of two 1M..256M (default 32M, or the parent's)",
        "log_size": "metadata log size, a multiple of 1M (default 1M)",
        "logical_sector_size": "512 (default, or the parent's) or 4096",
        "physical_sector_size": "512 or 4096 (default 4096)",
    }

    @classmethod
    def measure(
        cls, virtual_size: int, data_ranges: Sequence[tuple[int, int]], options: Mapping[str, str]
    ) -> tuple[int, int]:
        """Exact: the metadata of an empty image made with these options (made, in a temporary
        directory, by ``create`` itself) plus one payload block per block the data touches."""
        empty, bs, fixed = _empty_layout(virtual_size, tuple(sorted(options.items())))
        if fixed:
            return empty, empty
        blocks = -(-virtual_size // bs)
        touched = {b for off, n in data_ranges for b in range(off // bs, -(-(off + n) // bs))}
        base = -(-empty // MiB) * MiB  # payload blocks start 1 MiB-aligned after metadata
        return base + len(touched) * bs, base + blocks * bs

    # --- opening ------------------------------------------------------------------------------

    def __init__(self, f: BlockFile, writable: bool) -> None:
        self.file = f
        self.writable = writable
        self.overlay = vlog.Overlay()
        self.log_replayed_on_open = 0
        self._bitmaps: dict[int, bytearray] = {}
        self._wrote = False
        self._data_changed = False
        self._pending: set[int] = set()  # BAT entries changed in memory, not yet published
        self._pending_bitmaps: set[int] = set()
        self._pending_bytes = 0
        self.publish_threshold = self.PUBLISH_THRESHOLD
        self._log_pos = 0
        self._log_seq = 1

    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        return 100 if head[:8] == FILE_ID_SIGNATURE else 0

    @classmethod
    def open(cls, f: BlockFile, *, writable: bool = False) -> Self:
        self = cls(f, writable)
        self._load()
        return self

    def _err_path(self) -> str:
        return str(self.file.path)

    def _load(self) -> None:
        f = self.file
        if f.size < 8 or f.pread(0, 8) != FILE_ID_SIGNATURE:
            raise NotThisFormatError("not a VHDX file (no 'vhdxfile' signature)", path=str(f.path))
        if f.size < HEADER_AREA_END:
            raise TruncatedImageError(
                f"file is {f.size} bytes, shorter than the 1 MiB VHDX header area",
                path=str(f.path),
            )
        self.creator = _decode_creator(f.read_exact(0, FileIdentifier.size, "file identifier"))
        copies = [f.read_exact(off, HEADER_SIZE, "VHDX header") for off in HEADER_OFFSETS]
        self.header_valid = [header_is_valid(c) for c in copies]
        try:
            self._cur_header, self.header = pick_header(list(copies))
        except CorruptImageError as exc:
            exc.path = str(f.path)
            raise
        self._check_header()
        self._load_log()
        self._load_regions()
        self._load_bat()
        if self.writable and self.header.log_guid != ZERO_GUID:
            self._clear_log()  # replayed (or empty): the log can be forgotten now

    def _check_header(self) -> None:
        h = self.header
        if h.version != 1:
            raise UnsupportedFeatureError(f"VHDX version {h.version} (only 1 is known)")
        if h.log_version != 0:
            raise UnsupportedFeatureError(f"VHDX log version {h.log_version} (only 0 is known)")
        if h.log_offset % MiB or h.log_length % MiB or h.log_offset < HEADER_AREA_END:
            raise CorruptImageError(
                f"VHDX log at {h.log_offset:#x} (+{h.log_length:#x}) is not 1 MiB aligned "
                "past the headers",
                path=self._err_path(),
            )

    def _load_log(self) -> None:
        h = self.header
        if h.log_guid == ZERO_GUID or h.log_length == 0:
            return
        data = self.file.read_exact(h.log_offset, h.log_length, "VHDX log")
        sequence = vlog.find_active_sequence(data, h.log_guid)
        if not sequence:
            return
        overlay = vlog.build_overlay(sequence)
        if overlay.flushed_file_offset > self.file.size:
            raise CorruptImageError(
                f"VHDX log was written when the file was {overlay.flushed_file_offset} bytes, "
                f"but it is now {self.file.size}: the file was truncated",
                path=self._err_path(),
            )
        self._log_seq = sequence[-1].sequence + 1
        if not self.writable:
            self.overlay = overlay
            return
        vlog.replay_on_disk(overlay, self.file.write)
        if self.file.size < overlay.last_file_offset:
            self.file.truncate(_round_up(overlay.last_file_offset, MiB))
        self.file.fsync()
        self.log_replayed_on_open = len(sequence)

    def _read_meta(self, offset: int, length: int, what: str) -> bytes:
        """Metadata read through the replay overlay, bounds-checked like ``read_exact``."""
        if not self.overlay:
            return self.file.read_exact(offset, length, what)
        if length > MAX_METADATA_READ:
            return self.file.read_exact(offset, length, what)  # raises ResourceLimitError
        if offset < 0 or offset + length > self._effective_size():
            raise TruncatedImageError(
                f"{what} ({length} bytes) extends past the end of the file", path=self._err_path()
            )
        buf = bytearray(self.file.pread(offset, length))
        self.overlay.patch(offset, buf)
        return bytes(buf)

    def _pread(self, offset: int, length: int) -> bytes:
        if not self.overlay:
            return self.file.pread(offset, length)
        buf = bytearray(self.file.pread(offset, length))
        self.overlay.patch(offset, buf)
        return bytes(buf)

    def _effective_size(self) -> int:
        return max(self.file.size, self.overlay.last_file_offset if self.overlay else 0)

    def _load_regions(self) -> None:
        tables = [
            self._read_meta(off, REGION_TABLE_SIZE, "VHDX region table")
            for off in REGION_TABLE_OFFSETS
        ]
        self.region_valid = [region_table_is_valid(t) for t in tables]
        chosen = next((t for t, ok in zip(tables, self.region_valid, strict=True) if ok), None)
        if chosen is None:
            raise CorruptImageError(
                "both VHDX region tables are invalid (bad signature or CRC-32C)",
                path=self._err_path(),
            )
        try:
            regions = parse_region_table(chosen, self._effective_size())
            self.bat_region: Region = regions[BAT_REGION]
            self.meta_region: Region = regions[METADATA_REGION]
            h = self.header
            for r, name in ((self.bat_region, "BAT"), (self.meta_region, "metadata")):
                if r.offset < h.log_offset + h.log_length and h.log_offset < r.end:
                    raise CorruptImageError(f"{name} region overlaps the log")
            self.md: Metadata = parse_metadata(self._read_meta, self.meta_region)
        except (CorruptImageError, UnsupportedFeatureError) as exc:
            exc.path = exc.path or self._err_path()
            raise
        md = self.md
        self.virtual_size = md.virtual_size
        self.block_size = md.block_size
        self.granularity = md.block_size
        self.sector_size = md.logical_sector_size
        self.has_parent = md.has_parent
        # a differencing layer stores whole sectors; Chain.write completes partial ones
        self.write_alignment = md.logical_sector_size if md.has_parent else 1
        self.chunk_ratio = chunk_ratio(md.logical_sector_size, md.block_size)
        self.data_blocks = -(-md.virtual_size // md.block_size)

    def _load_bat(self) -> None:
        count = bat_entry_count(
            self.virtual_size, self.block_size, self.chunk_ratio, self.has_parent
        )
        if count * 8 > self.bat_region.length:
            raise CorruptImageError(
                f"BAT region holds {self.bat_region.length // 8} entries, the disk needs {count}",
                path=self._err_path(),
            )
        raw = self._read_meta(self.bat_region.offset, count * 8, "VHDX BAT")
        bat = array("Q")
        bat.frombytes(raw)
        if sys.byteorder == "big":  # pragma: no cover - vmferry runs on little-endian hosts
            bat.byteswap()
        self.bat = bat
        self._validate_bat()
        self._alloc_end = _round_up(self._effective_size(), MiB)

    def _validate_bat(self) -> None:
        """Reject states and offsets that would make reads return garbage.

        Works on one kind code per payload block (built with ``bytes.translate``), so a BAT with
        millions of entries is checked at C speed; only present blocks are visited in Python.
        """
        size = self._effective_size()
        cr, cr1 = self.chunk_ratio, self.chunk_ratio + 1
        low = self.bat.tobytes()[0::8]  # low byte of each entry holds the state
        table = _DIFF_CODES if self.has_parent else _PLAIN_CODES
        payload = bytearray()
        for chunk in range(0, len(low), cr1):
            payload += low[chunk : chunk + cr]
        codes = bytearray(payload[: self.data_blocks].translate(table))
        bad = codes.find(_C_BAD)
        if bad >= 0:
            state = self.bat[self._entry_index(bad)] & BAT_STATE_MASK
            raise CorruptImageError(
                f"BAT entry {self._entry_index(bad)} has state {state}, invalid for this disk type",
                path=self._err_path(),
            )
        self._codes = codes
        for sb_index in range(cr, len(self.bat), cr1):
            state = self.bat[sb_index] & BAT_STATE_MASK
            if state not in (SB_NOT_PRESENT, SB_PRESENT):
                raise CorruptImageError(
                    f"sector bitmap BAT entry {sb_index} has reserved state {state}",
                    path=self._err_path(),
                )
            if state == SB_PRESENT and self.has_parent:
                self._check_target(
                    sb_index, self.bat[sb_index] & BAT_OFFSET_MASK, SECTOR_BITMAP_BLOCK, size
                )
        for block in self._present_blocks():
            index = self._entry_index(block)
            self._check_target(index, self.bat[index] & BAT_OFFSET_MASK, self.block_size, size)
            if codes[block] == _C_PARTIAL[0]:
                sb = self.bat[(block // cr) * cr1 + cr]
                if sb & BAT_STATE_MASK != SB_PRESENT:
                    raise CorruptImageError(
                        f"BAT entry {index} is partially present but its chunk has no sector "
                        "bitmap",
                        path=self._err_path(),
                    )

    def _present_blocks(self) -> Iterator[int]:
        """Blocks that point into the file (DATA or PARTIAL), found with ``bytes.find``."""
        codes = self._codes
        for code in (_C_DATA, _C_PARTIAL):
            pos = codes.find(code)
            while pos >= 0:
                yield pos
                pos = codes.find(code, pos + 1)

    def _check_target(self, index: int, offset: int, length: int, size: int) -> None:
        if offset < HEADER_AREA_END:
            raise CorruptImageError(
                f"BAT entry {index} points into the header area ({offset:#x})",
                path=self._err_path(),
            )
        if offset + length > size:
            raise TruncatedImageError(
                f"BAT entry {index} points past the end of the file ({offset:#x}+{length:#x} > "
                f"{size:#x})",
                path=self._err_path(),
            )

    # --- what the layer is --------------------------------------------------------------------

    @property
    def data_write_guid(self) -> str:
        return guid_text(self.header.data_write_guid)

    def identity(self) -> Mapping[str, str]:
        return {"data_write_guid": self.data_write_guid}

    def parent_ref(self) -> ParentRef | None:
        if not self.has_parent:
            return None
        loc = dict(self.md.parent_locator or {})
        hints: list[str] = []
        rel = loc.get("relative_path")
        if rel:
            hints.append(rel.replace("\\", "/"))
        absolute = loc.get("absolute_win32_path")
        if absolute:
            if absolute.startswith("\\") and not absolute.startswith("\\\\"):
                hints.append(absolute.replace("\\", "/"))  # vmferry's rooted, drive-less form
            else:
                hints.append(absolute)
        vol = loc.get("volume_path")
        if vol:
            hints.append(vol)
        identity: dict[str, str] = {}
        linkage = _canonical_guid(loc.get("parent_linkage"))
        if linkage:
            identity["data_write_guid"] = linkage
        raw: dict[str, Any] = {"locator_type": self.md.locator_type, "entries": loc}
        alt = _canonical_guid(loc.get("parent_linkage2"))
        alternatives = {"data_write_guid": (alt,)} if alt else {}
        return ParentRef(
            format="vhdx", hints=tuple(hints), identity=identity, raw=raw, alternatives=alternatives
        )

    def info(self) -> dict[str, Any]:
        h = self.header
        return {
            "subformat": self.subformat,
            "block_size": self.block_size,
            "logical_sector_size": self.sector_size,
            "physical_sector_size": self.md.physical_sector_size,
            "has_parent": self.has_parent,
            "leave_blocks_allocated": self.md.leave_blocks_allocated,
            "disk_id": self.md.disk_id,
            "data_write_guid": guid_text(h.data_write_guid),
            "file_write_guid": guid_text(h.file_write_guid),
            "log_guid": guid_text(h.log_guid),
            "header_sequence": h.sequence_number,
            "log": self._log_state(),
            "log_offset": h.log_offset,
            "log_length": h.log_length,
            "chunk_ratio": self.chunk_ratio,
            "creator": self.creator,
            "parent_locator": dict(self.md.parent_locator or {}),
        }

    @property
    def subformat(self) -> str:
        if self.has_parent:
            return "differencing"
        return "fixed" if self.md.leave_blocks_allocated else "dynamic"

    def _log_state(self) -> str:
        if self.overlay:
            return f"replayed in memory ({self.overlay.entries} entries)"
        if self.log_replayed_on_open:
            return f"replayed on open ({self.log_replayed_on_open} entries)"
        return "empty" if self.header.log_guid == ZERO_GUID else "active"

    # --- mapping ------------------------------------------------------------------------------

    def _entry_index(self, block: int) -> int:
        return block + block // self.chunk_ratio

    def _payload(self, block: int) -> tuple[int, int]:
        entry = self.bat[self._entry_index(block)]
        return entry & BAT_STATE_MASK, entry & BAT_OFFSET_MASK

    def _kind(self, state: int) -> str:
        """How a payload state reads in this layer (see docs/formats/vhdx.md)."""
        table = _DIFF_CODES if self.has_parent else _PLAIN_CODES
        return _CODE_KIND[table[state & BAT_STATE_MASK]]

    def block_status(self, offset: int, length: int) -> Extent:
        self._check_range(offset, length)
        if length == 0:
            return Extent(offset, 0, Alloc.ZERO)
        bs = self.block_size
        end = offset + length
        block = offset // bs
        state, host = self._payload(block)
        kind = self._kind(state)
        if kind == _PARTIAL:
            return self._partial_status(block, host, offset, length)
        last = (end - 1) // bs
        if kind == _DATA:
            nxt = block + 1
            while nxt <= last:
                s2, h2 = self._payload(nxt)
                if s2 != PAYLOAD_FULLY_PRESENT or h2 != host + (nxt - block) * bs:
                    break
                nxt += 1
        else:
            nxt = self._run_end(block, last)
        run_end = min(end, nxt * bs)
        if kind == _DATA:
            return Extent(offset, run_end - offset, Alloc.DATA, host + offset - block * bs)
        alloc = Alloc.UNALLOCATED if kind == _UNALLOC else Alloc.ZERO
        return Extent(offset, run_end - offset, alloc)

    def _run_end(self, block: int, last: int) -> int:
        """First block after ``block`` (at most ``last + 1``) whose kind code differs."""
        codes = self._codes
        code = codes[block]
        stop = last + 1
        for other in _ALL_CODES:
            if other[0] != code:
                pos = codes.find(other, block + 1, stop)
                if pos >= 0:
                    stop = pos
        return stop

    def _bitmap_location(self, block: int) -> tuple[int, int]:
        """(file offset, byte length) of the sector bitmap bits for ``block``."""
        cr1 = self.chunk_ratio + 1
        chunk = block // self.chunk_ratio
        sb = self.bat[chunk * cr1 + self.chunk_ratio]
        nbytes = self.block_size // self.sector_size // 8
        return (sb & BAT_OFFSET_MASK) + (block % self.chunk_ratio) * nbytes, nbytes

    def _bitmap(self, block: int) -> bytearray:
        bits = self._bitmaps.get(block)
        if bits is None:
            off, n = self._bitmap_location(block)
            bits = bytearray(self._pread(off, n))
            self._bitmaps[block] = bits
        return bits

    def _partial_status(self, block: int, host: int, offset: int, length: int) -> Extent:
        bs, ss = self.block_size, self.sector_size
        base = block * bs
        first = (offset - base) // ss
        bits = int.from_bytes(self._bitmap(block), "little") >> first
        nsect = bs // ss - first
        present = bits & 1
        probe = ~bits if present else bits
        run = (probe & -probe).bit_length() - 1 if probe & ((1 << nsect) - 1) else nsect
        run = min(run, nsect)
        run_end = min(offset + length, base + (first + run) * ss)
        if present:
            return Extent(offset, run_end - offset, Alloc.DATA, host + offset - base)
        return Extent(offset, run_end - offset, Alloc.UNALLOCATED)

    # --- reading ------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        parts: list[bytes] = []
        for ext in self.extents(offset, length):
            if ext.alloc is Alloc.DATA and ext.host_offset is not None:
                parts.append(self._pread(ext.host_offset, ext.length))
            else:
                parts.append(bytes(ext.length))
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def read_into(self, offset: int, view: memoryview) -> None:
        if self.overlay:  # a log replayed in memory patches what the file holds
            super().read_into(offset, view)
        else:
            self._read_into_mapped(offset, view, self.file.pread_into)

    # --- writing ------------------------------------------------------------------------------

    def _begin_write(self, *, data: bool = True) -> None:
        """First change of this open: new FileWriteGuid (+DataWriteGuid) and a fresh LogGuid."""
        self._require_writable()
        changes: dict[str, bytes] = {}
        if not self._wrote:
            changes["file_write_guid"] = new_guid()
        if data and not self._data_changed:
            changes["data_write_guid"] = new_guid()
            self._data_changed = True
        if self.header.log_guid == ZERO_GUID:
            changes["log_guid"] = new_guid()
            self._log_pos = 0
            self._log_seq = 1
        if changes:
            self._update_header(**changes)
        self._wrote = True

    def _update_header(self, **changes: Any) -> None:
        """Two-copy header update: write the non-current copy with sequence + 1, flush."""
        seq = self.header.sequence_number + 1
        if seq >= 1 << 64:
            raise CorruptImageError("header sequence number is exhausted", path=self._err_path())
        new = self.header.replace(sequence_number=seq, **changes)
        target = 1 - self._cur_header
        self.file.write(HEADER_OFFSETS[target], pack_header(new))
        self.file.fsync()
        self._cur_header, self.header = target, new
        self.header_valid[target] = True

    def _clear_log(self) -> None:
        changes: dict[str, bytes] = {"log_guid": ZERO_GUID}
        if not self._wrote:
            changes["file_write_guid"] = new_guid()
            self._wrote = True
        self._update_header(**changes)

    def _allocate(self, length: int) -> int:
        """Space for a block at the (1 MiB aligned) end of the file; reads as zeros."""
        start = self._alloc_end
        self._alloc_end = start + _round_up(length, MiB)
        self.file.truncate(self._alloc_end)
        return start

    def _commit(self, sectors: dict[int, bytes]) -> None:
        """Publish metadata sector changes through the log (caller flushed the data)."""
        if not sectors:
            return
        h = self.header
        items = sorted(sectors.items())
        per_entry = vlog.max_sectors_per_entry(h.log_length)
        for i in range(0, len(items), per_entry):
            chunk = items[i : i + per_entry]
            entry = vlog.build_entry(
                chunk,
                sequence=self._log_seq,
                tail=0,  # patched below once the position is known
                log_guid=h.log_guid,
                flushed_file_offset=self.file.size,
                last_file_offset=self._alloc_end,
            )
            if self._log_pos + len(entry) > h.log_length:
                self._log_pos = 0  # entries never wrap: start over at the beginning
            entry = vlog.build_entry(
                chunk,
                sequence=self._log_seq,
                tail=self._log_pos,
                log_guid=h.log_guid,
                flushed_file_offset=self.file.size,
                last_file_offset=self._alloc_end,
            )
            self.file.write(h.log_offset + self._log_pos, entry)
            self.file.fsync()
            for off, data in chunk:
                self.file.write(off, data)
            self.file.fsync()
            self._log_pos += len(entry)
            self._log_seq += 1

    def _bat_sectors(self, indexes: set[int]) -> dict[int, bytes]:
        """Current contents of the BAT sectors holding ``indexes``."""
        out: dict[int, bytes] = {}
        per = LOG_SECTOR // 8
        for sector in {i // per for i in indexes}:
            chunk = self.bat[sector * per : (sector + 1) * per]
            raw = chunk.tobytes()
            if sys.byteorder == "big":  # pragma: no cover
                a = array("Q", raw)
                a.byteswap()
                raw = a.tobytes()
            out[self.bat_region.offset + sector * LOG_SECTOR] = raw.ljust(LOG_SECTOR, b"\0")
        return out

    def _set_entry(self, index: int, state: int, offset: int, changed: set[int]) -> None:
        self.bat[index] = (offset & BAT_OFFSET_MASK) | state
        changed.add(index)
        cr1 = self.chunk_ratio + 1
        if index % cr1 != self.chunk_ratio:  # a payload entry: keep the kind codes in step
            block = index - index // cr1
            if block < len(self._codes):
                table = _DIFF_CODES if self.has_parent else _PLAIN_CODES
                self._codes[block] = table[state]

    def _bitmap_sectors(self, blocks: set[int]) -> dict[int, bytes]:
        """Whole 4 KiB sectors of the sector bitmap blocks covering ``blocks``' bits."""
        out: dict[int, bytes] = {}
        for block in blocks:
            off, n = self._bitmap_location(block)
            bits = self._bitmaps[block]
            first = off - off % LOG_SECTOR
            last = _round_up(off + n, LOG_SECTOR)
            for sec in range(first, last, LOG_SECTOR):
                cur = bytearray(out.get(sec) or self._pread(sec, LOG_SECTOR))
                lo, hi = max(sec, off), min(sec + LOG_SECTOR, off + n)
                cur[lo - sec : hi - sec] = bits[lo - off : hi - off]
                out[sec] = bytes(cur)
        return out

    def _ensure_bitmap_block(self, block: int, changed: set[int]) -> None:
        cr1 = self.chunk_ratio + 1
        sb_index = (block // self.chunk_ratio) * cr1 + self.chunk_ratio
        if self.bat[sb_index] & BAT_STATE_MASK != SB_PRESENT:
            self._set_entry(sb_index, SB_PRESENT, self._allocate(SECTOR_BITMAP_BLOCK), changed)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._require_writable()
        self._check_range(offset, len(data))
        if not data:
            return
        self._begin_write()
        view = memoryview(data).cast("B")
        bs, ss = self.block_size, self.sector_size
        changed: set[int] = set()
        bitmap_blocks: set[int] = set()
        end = offset + len(view)
        pos = offset
        while pos < end:
            block, inner = divmod(pos, bs)
            n = min(bs - inner, end - pos)
            piece = view[pos - offset : pos - offset + n]
            state, host = self._payload(block)
            kind = self._kind(state)
            if kind == _DATA:
                self.file.write(host + inner, piece)
            elif kind == _PARTIAL:
                self._check_sector_aligned(block, inner, n, present_ok=True)
                self.file.write(host + inner, piece)
                self._mark_present(block, inner, n)
                bitmap_blocks.add(block)
            elif kind == _UNALLOC and n < bs:
                self._check_sector_aligned(block, inner, n, present_ok=False)
                host = self._allocate(bs)
                self.file.write(host + inner, piece)
                self._ensure_bitmap_block(block, changed)
                self._bitmaps[block] = bytearray(bs // ss // 8)
                self._mark_present(block, inner, n)
                bitmap_blocks.add(block)
                self._set_entry(self._entry_index(block), PAYLOAD_PARTIALLY_PRESENT, host, changed)
            else:  # whole block, or a block that reads as zeros: a fresh zeroed block
                host = self._allocate(bs)
                self.file.write(host + inner, piece)
                self._set_entry(self._entry_index(block), PAYLOAD_FULLY_PRESENT, host, changed)
            if kind != _DATA:
                self._pending_bytes += n
            pos += n
        self._defer(changed, bitmap_blocks)

    def _defer(self, changed: set[int], bitmap_blocks: set[int]) -> None:
        """Queue mapping changes; publish them once enough data is waiting behind them."""
        self._pending |= changed
        self._pending_bitmaps |= bitmap_blocks
        if self._pending_bytes >= self.publish_threshold:
            self._publish_pending()

    def _publish_pending(self) -> None:
        """Data fsync, then every queued BAT/bitmap sector through the log."""
        changed, bitmaps = self._pending, self._pending_bitmaps
        self._pending, self._pending_bitmaps, self._pending_bytes = set(), set(), 0
        if not changed and not bitmaps:
            return
        self.file.fsync()  # data before the pointers that expose it
        sectors = self._bitmap_sectors(bitmaps)
        sectors.update(self._bat_sectors(changed))
        self._commit(sectors)

    def _check_sector_aligned(self, block: int, inner: int, n: int, *, present_ok: bool) -> None:
        ss = self.sector_size
        if inner % ss == 0 and n % ss == 0:
            return
        if present_ok:
            bits = self._bitmap(block)
            edges = {inner // ss, (inner + n - 1) // ss}
            if all(bits[s // 8] >> (s % 8) & 1 for s in edges):
                return
        raise UsageError(
            f"write of {n} bytes at block offset {inner} is not aligned to the {ss}-byte "
            "logical sector, and the sector's old bytes live in the parent",
            path=self._err_path(),
            hint="write whole sectors (the chain layer must read-modify-write from the parent)",
        )

    def _mark_present(self, block: int, inner: int, n: int) -> None:
        ss = self.sector_size
        bits = self._bitmap(block)
        first, last = inner // ss, (inner + n - 1) // ss
        for s in range(first, last + 1):
            if s % 8 == 0 and s + 7 <= last:
                bits[s // 8] = 0xFF
            else:
                bits[s // 8] |= 1 << (s % 8)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Whole blocks become ZERO (hiding any parent) or holes; edges are written as zeros."""
        self._require_writable()
        self._check_range(offset, length)
        if length == 0:
            return
        self._begin_write()
        bs = self.block_size
        changed: set[int] = set()
        end = offset + length
        pos = offset
        while pos < end:
            block, inner = divmod(pos, bs)
            n = min(bs - inner, end - pos)
            state, host = self._payload(block)
            kind = self._kind(state)
            whole = n == bs or (inner == 0 and pos + n == self.virtual_size)
            if kind == _ZERO:
                pass
            elif kind == _DATA:
                if not self.file.punch_hole(host + inner, n):
                    self.file.write(host + inner, bytes(n))
            elif whole and kind == _UNALLOC:
                self._set_entry(self._entry_index(block), PAYLOAD_ZERO, 0, changed)
                self._pending_bytes += n
            elif whole and kind == _PARTIAL:
                if not self.file.punch_hole(host, bs):
                    self.file.write(host, bytes(bs))
                self._set_entry(self._entry_index(block), PAYLOAD_FULLY_PRESENT, host, changed)
                self._pending_bytes += n
            else:
                self.write(pos, bytes(n))
            pos += n
        self._defer(changed, set())

    # --- metadata changes ---------------------------------------------------------------------

    def set_parent(self, parent: ParentInfo | None) -> None:
        self._require_writable()
        if not self.has_parent:
            raise UnsupportedFeatureError("this VHDX is not a differencing disk")
        if parent is None:
            raise UnsupportedFeatureError(
                "a differencing VHDX cannot drop its parent in place",
                hint="convert the chain to a new image instead",
            )
        locator = _locator_for(parent, self.file.path)
        self._publish_pending()
        self._rewrite_metadata(parent_locator=locator)

    def resize(self, new_size: int) -> None:
        self._require_writable()
        if new_size < self.virtual_size:
            raise UnsupportedFeatureError("vmferry does not shrink VHDX images")
        if new_size % self.sector_size or new_size > MAX_VIRTUAL_SIZE:
            raise UsageError(f"VHDX size must be a multiple of {self.sector_size} up to 64 TiB")
        count = bat_entry_count(new_size, self.block_size, self.chunk_ratio, self.has_parent)
        if count * 8 > self.bat_region.length:
            raise UnsupportedFeatureError(
                "the BAT region is too small for that size (relocating it is not implemented)"
            )
        self._publish_pending()
        old_blocks = self.data_blocks
        new_bat = array("Q", self.bat)
        new_bat.extend([0] * (count - len(self.bat)))
        changed: set[int] = set()
        self.bat = new_bat
        self.data_blocks = -(-new_size // self.block_size)
        self._validate_bat()  # rebuilds the kind codes for the new blocks
        self._begin_write()
        if self.md.leave_blocks_allocated and not self.has_parent:
            for block in range(old_blocks, self.data_blocks):
                host = self._allocate(self.block_size)
                self._set_entry(self._entry_index(block), PAYLOAD_FULLY_PRESENT, host, changed)
        sectors = self._bat_sectors(changed)
        off = self._md_item_offset(MD_VIRTUAL_DISK_SIZE)
        sec = off - off % LOG_SECTOR
        buf = bytearray(self._pread(sec, LOG_SECTOR))
        buf[off - sec : off - sec + 8] = new_size.to_bytes(8, "little")
        sectors[sec] = bytes(buf)
        self.file.fsync()
        self._commit(sectors)
        self.virtual_size = self.md.virtual_size = new_size

    def _md_item_offset(self, gid: uuid.UUID) -> int:
        for item_id, off, _length, _flags in self.md.items:
            if item_id == str(gid):
                return self.meta_region.offset + off
        raise CorruptImageError(f"metadata item {gid} is missing", path=self._err_path())

    def _rewrite_metadata(self, *, parent_locator: Mapping[str, str] | None) -> None:
        md = self.md
        flags = (FP_LEAVE_BLOCKS_ALLOCATED if md.leave_blocks_allocated else 0) | (
            FP_HAS_PARENT if md.has_parent else 0
        )
        blob = pack_metadata_region(
            block_size=md.block_size,
            flags=flags,
            virtual_size=md.virtual_size,
            disk_id=uuid.UUID(md.disk_id).bytes_le,
            logical_sector_size=md.logical_sector_size,
            physical_sector_size=md.physical_sector_size,
            parent_locator=parent_locator,
        )
        if len(blob) > self.meta_region.length:
            raise UsageError("the new parent locator does not fit the metadata region")
        blob = blob.ljust(_round_up(len(blob), LOG_SECTOR), b"\0")
        self._begin_write(data=False)
        sectors = {
            self.meta_region.offset + i: blob[i : i + LOG_SECTOR]
            for i in range(0, len(blob), LOG_SECTOR)
        }
        self._commit(sectors)
        self.md = parse_metadata(self._read_meta, self.meta_region)

    # --- checking -----------------------------------------------------------------------------

    def check(self) -> CheckReport:
        rep = CheckReport()
        for i, ok in enumerate(self.header_valid):
            if not ok:
                rep.corruptions.append(f"header copy {i + 1} has a bad signature or CRC-32C")
        for i, ok in enumerate(self.region_valid):
            if not ok:
                rep.corruptions.append(f"region table copy {i + 1} has a bad signature or CRC-32C")
        if self.overlay:
            rep.notes.append(
                f"the log holds {self.overlay.entries} entries that were replayed in memory; "
                "open the image writable to replay them on disk"
            )
        h = self.header
        size = self.file.size
        used: list[tuple[int, int, str]] = [
            (0, HEADER_AREA_END, "headers"),
            (h.log_offset, h.log_offset + h.log_length, "log"),
            (self.meta_region.offset, self.meta_region.end, "metadata region"),
            (self.bat_region.offset, self.bat_region.end, "BAT region"),
        ]
        for _start, stop, what in used[1:]:
            if stop > max(size, self._effective_size()):
                rep.corruptions.append(f"{what} extends past the end of the file")
        blocks: list[tuple[int, int, str]] = []
        cr1 = self.chunk_ratio + 1
        for sb_index in range(self.chunk_ratio, len(self.bat), cr1):
            entry = self.bat[sb_index]
            if entry & BAT_STATE_MASK == SB_PRESENT:
                off = entry & BAT_OFFSET_MASK
                blocks.append((off, off + SECTOR_BITMAP_BLOCK, f"sector bitmap entry {sb_index}"))
        for block in self._present_blocks():
            index = self._entry_index(block)
            off = self.bat[index] & BAT_OFFSET_MASK
            blocks.append((off, off + self.block_size, f"BAT entry {index}"))
        for _start, stop, what in blocks:
            if stop > size:
                rep.corruptions.append(f"{what} points past the end of the file")
        used.extend(blocks)
        used.sort()
        reach, owner = 0, ""
        for start, stop, what in used:
            if start < reach:
                rep.corruptions.append(f"{what} at {start:#x} overlaps {owner}")
            if stop > reach:
                reach, owner = stop, what
        self._find_leaks(rep, used, size)
        return rep

    def _find_leaks(self, rep: CheckReport, used: list[tuple[int, int, str]], size: int) -> None:
        """Space in the file that holds bytes but belongs to no structure (crash leftovers)."""
        pos = 0
        gaps: list[tuple[int, int]] = []
        for start, stop, _what in used:
            if start > pos:
                gaps.append((pos, min(start, size)))
            pos = max(pos, stop)
        if pos < size:
            gaps.append((pos, size))
        for g0, g1 in gaps:
            if g1 <= g0:
                continue
            for off, n, is_data in self.file.data_runs(g0, g1 - g0):
                if is_data:
                    rep.leaks.append(f"{n} bytes at {off:#x} belong to no block")
                    rep.leaked_bytes += n

    # --- life cycle ---------------------------------------------------------------------------

    def flush(self) -> None:
        if self.writable:
            self._publish_pending()
            self.file.fsync()
            if self.header.log_guid != ZERO_GUID:
                self._clear_log()

    def close(self) -> None:
        if self.file.fd >= 0 and self.writable:
            self.flush()
        self.file.close()

    # --- creating -----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        f: BlockFile,
        size: int,
        options: Mapping[str, str],
        parent: ParentInfo | None = None,
    ) -> Self:
        plan = _CreatePlan.from_options(size, options, parent, f.path)
        plan.write(f)
        return cls.open(f, writable=True)

    def iter_bat(self) -> Iterator[tuple[int, int, int]]:
        """(block, state, file offset) of every payload block, for tests and ``info``."""
        for block in range(self.data_blocks):
            state, off = self._payload(block)
            yield block, state, off


class _CreatePlan:
    """Everything ``create`` decides before writing a byte."""

    def __init__(self) -> None:
        self.size = 0
        self.fixed = False
        self.block_size = DEFAULT_BLOCK
        self.log_size = DEFAULT_LOG
        self.lss = 512
        self.pss = 4096
        self.locator: dict[str, str] | None = None

    @classmethod
    def from_options(
        cls,
        size: int,
        options: Mapping[str, str],
        parent: ParentInfo | None,
        child_path: os.PathLike[str] | str,
    ) -> _CreatePlan:
        p = cls()
        p.size = size
        sub = options.get("subformat", "dynamic").lower()
        if sub not in ("dynamic", "fixed"):
            raise UsageError(f"subformat must be dynamic or fixed, not {sub!r}")
        p.fixed = sub == "fixed"
        if parent is not None:
            if p.fixed:
                raise UsageError("a differencing VHDX cannot be fixed")
            if isinstance(parent.layer, Vhdx):
                p.block_size = parent.layer.block_size
                p.lss = parent.layer.sector_size
                p.pss = parent.layer.md.physical_sector_size
            p.locator = _locator_for(parent, child_path)
        if "block_size" in options:
            p.block_size = _parse_size(options["block_size"], "block_size")
        if "log_size" in options:
            p.log_size = _parse_size(options["log_size"], "log_size")
        if "logical_sector_size" in options:
            p.lss = _parse_size(options["logical_sector_size"], "logical_sector_size")
        if "physical_sector_size" in options:
            p.pss = _parse_size(options["physical_sector_size"], "physical_sector_size")
        p.validate()
        return p

    def validate(self) -> None:
        bs = self.block_size
        if bs < MIN_BLOCK or bs > MAX_BLOCK or bs & (bs - 1):
            raise UsageError(f"block_size must be a power of two from 1M to 256M, not {bs}")
        if self.log_size < MiB or self.log_size % MiB or self.log_size > 256 * MiB:
            raise UsageError("log_size must be a multiple of 1M, at most 256M")
        if self.lss not in (512, 4096) or self.pss not in (512, 4096):
            raise UsageError("sector sizes must be 512 or 4096")
        if self.size % self.lss or self.size > MAX_VIRTUAL_SIZE or self.size <= 0:
            raise UsageError(
                f"a VHDX size must be a positive multiple of {self.lss} bytes up to 64 TiB "
                f"(got {self.size})",
                hint=f"round the size up to a multiple of {self.lss}",
            )

    def write(self, f: BlockFile) -> None:
        ratio = chunk_ratio(self.lss, self.block_size)
        # Size the BAT for the differencing layout so a disk can later gain a parent.
        entries = bat_entry_count(self.size, self.block_size, ratio, True)
        log_off = HEADER_AREA_END
        meta_off = log_off + self.log_size
        bat_off = meta_off + MiB
        bat_len = max(MiB, _round_up(entries * 8, MiB))
        data_off = bat_off + bat_len
        ident = FileIdentifier(creator=CREATOR.encode("utf-16-le"))
        f.write(0, ident.pack())
        hdr = Header(
            sequence_number=0,
            file_write_guid=new_guid(),
            data_write_guid=new_guid(),
            log_guid=ZERO_GUID,
            log_length=self.log_size,
            log_offset=log_off,
        )
        f.write(HEADER_OFFSETS[0], pack_header(hdr))
        f.write(HEADER_OFFSETS[1], pack_header(hdr.replace(sequence_number=1)))
        regions = [
            Region(BAT_REGION, bat_off, bat_len, True),
            Region(METADATA_REGION, meta_off, MiB, True),
        ]
        table = pack_region_table(regions)
        for off in REGION_TABLE_OFFSETS:
            f.write(off, table)
        flags = FP_LEAVE_BLOCKS_ALLOCATED if self.fixed else 0
        if self.locator is not None:
            flags |= FP_HAS_PARENT
        meta = pack_metadata_region(
            block_size=self.block_size,
            flags=flags,
            virtual_size=self.size,
            disk_id=new_guid(),
            logical_sector_size=self.lss,
            physical_sector_size=self.pss,
            parent_locator=self.locator,
        )
        f.write(meta_off, meta)
        end = data_off
        if self.fixed:
            blocks = -(-self.size // self.block_size)
            bat = array("Q", bytes(8 * bat_entry_count(self.size, self.block_size, ratio, False)))
            for b in range(blocks):
                bat[b + b // ratio] = (data_off + b * self.block_size) | PAYLOAD_FULLY_PRESENT
            raw = bat.tobytes()
            f.write(bat_off, raw)
            end = data_off + blocks * self.block_size
        f.truncate(max(end, bat_off + bat_len))
        f.fsync()


def _locator_for(parent: ParentInfo, child_path: os.PathLike[str] | str) -> dict[str, str]:
    """Parent locator entries for a vmferry-made child (see docs/formats/vhdx.md)."""
    ident = parent.layer.identity().get("data_write_guid")
    if not ident:
        raise UsageError("a VHDX parent must be a VHDX image (it has no DataWriteGuid)")
    rel = parent.relative_path.replace("/", "\\")
    if not rel.startswith(".."):
        rel = ".\\" + rel
    absolute = os.path.abspath(parent.absolute_path).replace("/", "\\")
    return {
        "parent_linkage": "{" + str(uuid.UUID(ident)) + "}",
        "relative_path": rel,
        "absolute_win32_path": absolute,
    }


def _canonical_guid(text: str | None) -> str | None:
    if not text:
        return None
    try:
        value = uuid.UUID(text.strip().strip("{}"))
    except ValueError:
        return None
    return None if value.int == 0 else str(value)


def _decode_creator(buf: bytes) -> str:
    raw = buf[8:520]
    try:
        return raw.decode("utf-16-le").split("\0", 1)[0]
    except UnicodeDecodeError:
        return ""


@functools.lru_cache(maxsize=64)
def _empty_layout(virtual_size: int, options: tuple[tuple[str, str], ...]) -> tuple[int, int, bool]:
    """(file size, block size, fixed) of an empty image made by ``create`` with these options;
    cached, since ``du`` measures every image of a folder and most share their settings."""
    with tempfile.TemporaryDirectory(prefix="vmferry-measure-") as tmp:
        f = BlockFile.open(Path(tmp) / "m.vhdx", writable=True, create=True)
        f.cache_unsafe = True
        layer = Vhdx.create(f, virtual_size, dict(options), None)
        try:
            return f.size, layer.block_size, layer.subformat == "fixed"
        finally:
            layer.close()
