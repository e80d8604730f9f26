"""VirtualBox Disk Image (VDI): a header, a block map, and blocks appended in any order.

Layout (all little-endian): a 72-byte pre-header (a text line for eyes only, signature
``0xbeda107f`` at offset 64, version major<<16|minor), then the header (v1.1: 384 bytes, or 400
with the LCHS geometry VirtualBox adds; v0: 348 bytes, no offsets stored), the block map (one
uint32 per block: the *index* of the block in the data area, ``0xFFFFFFFF`` = never allocated,
``0xFFFFFFFE`` = zero block), and the data area, block ``i`` at
``offset_data + i * (block_size + block_extra) + block_extra``.

A differencing image names its parent only by UUID (the parent's image UUID, and the UUID of
the parent's last modification), never by path, so the parent is looked for by reading the
headers of the ``.vdi`` files beside the child.  See docs/formats/vdi.md for the decisions.
"""

from __future__ import annotations

import os
import struct
import uuid
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from vmferry._layout import Layout, raw, u32, u64
from vmferry.disk.base import Alloc, CheckReport, DiskFormat, Extent, ParentInfo, ParentRef
from vmferry.disk.blockfile import BlockFile
from vmferry.errors import (
    CorruptImageError,
    NotThisFormatError,
    ResourceLimitError,
    TruncatedImageError,
    UnsupportedFeatureError,
    UsageError,
    VmferryError,
)

SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001
#: what VirtualBox writes in the pre-header text; some third-party readers compare it
TEXT = b"<<< Oracle VM VirtualBox Disk Image >>>\n"

NORMAL, FIXED, UNDO, DIFF = 1, 2, 3, 4
_TYPE_NAMES = {NORMAL: "normal", FIXED: "fixed", UNDO: "undo", DIFF: "diff"}

FREE = 0xFFFFFFFF  # never allocated: reads from the parent (zeros in a base image)
ZERO = 0xFFFFFFFE  # discarded: reads as zeros, hides the parent
MAX_BLOCKS = 0x3FFFFFFF  # a block index must stay below ZERO; qemu uses the same bound
MIN_BLOCK, MAX_BLOCK = 512, 256 << 20
DEFAULT_BLOCK = 1 << 20
SECTOR = 512
PREHEADER_SIZE = 72
V1_SIZE, V1PLUS_SIZE, V0_SIZE = 384, 400, 348
MAX_HEADER_SIZE = 64 * 1024
#: VirtualBox aligns the block map and data area to 1 MiB; so do we (sparse, costs nothing)
DATA_ALIGN = 1 << 20
#: new blocks written before their map entries are published (two fsyncs per batch)
PUBLISH_EVERY = 64
#: map entries that are rewritten together with the header in one write (64 KiB of map)
ATOMIC_ENTRIES = 16384
MAX_GAP = 4096
#: how many sibling files the parent search reads before giving up
MAX_PARENT_CANDIDATES = 512
NULL_UUID = bytes(16)


class PreHeader(Layout, byteorder="<", size=PREHEADER_SIZE):
    text: bytes = raw(64)
    signature: int = u32()
    version: int = u32()


class HeaderV1(Layout, byteorder="<", size=V1PLUS_SIZE):
    """The v1.1 header with VirtualBox's LCHS extension (only read when header_size says so)."""

    header_size: int = u32()
    image_type: int = u32()
    image_flags: int = u32()
    comment: bytes = raw(256)
    offset_bmap: int = u32()
    offset_data: int = u32()
    cylinders: int = u32()
    heads: int = u32()
    sectors: int = u32()
    sector_size: int = u32()
    unused: int = u32()
    disk_size: int = u64()
    block_size: int = u32()
    block_extra: int = u32()
    blocks: int = u32()
    blocks_allocated: int = u32()
    uuid_create: bytes = raw(16)
    uuid_modify: bytes = raw(16)
    uuid_linkage: bytes = raw(16)
    uuid_parent_modify: bytes = raw(16)
    lchs_cylinders: int = u32()
    lchs_heads: int = u32()
    lchs_sectors: int = u32()
    lchs_sector_size: int = u32()


class HeaderV0(Layout, byteorder="<", size=V0_SIZE):
    image_type: int = u32()
    image_flags: int = u32()
    comment: bytes = raw(256)
    cylinders: int = u32()
    heads: int = u32()
    sectors: int = u32()
    sector_size: int = u32()
    disk_size: int = u64()
    block_size: int = u32()
    blocks: int = u32()
    blocks_allocated: int = u32()
    uuid_create: bytes = raw(16)
    uuid_modify: bytes = raw(16)
    uuid_linkage: bytes = raw(16)


RUN_CHUNK = 4096
_SAME: dict[int, array] = {}


def _same(value: int, n: int) -> array:
    """``n`` copies of ``value`` (cached per value at RUN_CHUNK length)."""
    full = _SAME.get(value)
    if full is None:
        full = _SAME[value] = array("I", [value]) * RUN_CHUNK
    return full if n == RUN_CHUNK else full[:n]


def uuid_str(b: bytes) -> str:
    """VirtualBox stores RTUUIDs in the mixed-endian (Microsoft GUID) byte order."""
    return str(uuid.UUID(bytes_le=b))


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _round_up(value: int, to: int) -> int:
    return -(-value // to) * to


def _bool_option(options: Mapping[str, str], name: str) -> bool:
    value = options.get(name, "off").strip().lower()
    if value in ("on", "yes", "true", "y", "1"):
        return True
    if value in ("off", "no", "false", "n", "0"):
        return False
    raise UsageError(f"option {name} must be on or off, not {value!r}")


def read_identity(f: BlockFile) -> tuple[str, str] | None:
    """(image uuid, modification uuid) of a file if it is a VDI; None otherwise.  Never raises
    for bad content: used to scan siblings for a parent."""
    if f.size < PREHEADER_SIZE + V0_SIZE:
        return None
    head = f.pread(0, PREHEADER_SIZE + V1PLUS_SIZE)
    pre = PreHeader.unpack(head)
    if pre.signature != SIGNATURE:
        return None
    major = pre.version >> 16
    if major == 1:
        h1 = HeaderV1.unpack(head, PREHEADER_SIZE)
        return uuid_str(h1.uuid_create), uuid_str(h1.uuid_modify)
    if major == 0:
        h0 = HeaderV0.unpack(head, PREHEADER_SIZE)
        return uuid_str(h0.uuid_create), uuid_str(h0.uuid_modify)
    return None


class Vdi(DiskFormat):
    name = "vdi"
    extensions = (".vdi",)
    supports_parent = True
    parent_formats = ("vdi",)
    create_options = {
        "static": "on: preallocated (fixed) image, every block mapped; off (default): dynamic",
    }

    def __init__(
        self, f: BlockFile, writable: bool, pre: PreHeader, header: HeaderV1, bmap: array
    ) -> None:
        self.file = f
        self.writable = writable
        self.pre = pre
        self.header = header
        self.version = pre.version
        self.bmap = bmap
        self.image_type = header.image_type
        self.block_size = header.block_size
        self.block_extra = header.block_extra
        self.block_stride = header.block_size + header.block_extra
        self.virtual_size = header.disk_size
        self.granularity = header.block_size
        self.is_diff = header.image_type in (DIFF, UNDO) and header.uuid_linkage != NULL_UUID
        # A differencing layer keeps whole blocks and cannot read its parent: Chain.write
        # completes partial blocks from the layers below.
        self.write_alignment = self.block_size if self.is_diff else 1
        self.mapped = 0
        self.max_slot = -1
        self._free_slots: list[int] = []
        self._touched = False
        self._unpublished: list[int] = []
        self._gap: bytes | None = None
        self._parent_ref: ParentRef | None = None

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        if len(head) >= PREHEADER_SIZE and struct.unpack_from("<I", head, 64)[0] == SIGNATURE:
            return 100
        return 0

    @classmethod
    def open(cls, f: BlockFile, *, writable: bool = False) -> Self:
        pre = PreHeader.unpack(f.read_exact(0, PREHEADER_SIZE, "VDI pre-header"))
        if pre.signature != SIGNATURE:
            raise NotThisFormatError(
                f"not a VDI image (signature {pre.signature:#010x}, expected {SIGNATURE:#x})",
                path=str(f.path),
            )
        major, minor = pre.version >> 16, pre.version & 0xFFFF
        if major == 1:
            header = cls._read_v1(f)
        elif major == 0:
            header = cls._read_v0(f)
            if writable:
                raise UnsupportedFeatureError(
                    "vmferry reads version 0 VDI images but does not write them",
                    path=str(f.path),
                    hint="convert it: vmferry convert OLD.vdi NEW.vdi",
                )
        else:
            raise UnsupportedFeatureError(
                f"unsupported VDI version {major}.{minor} (vmferry knows 0.x and 1.1)",
                path=str(f.path),
            )
        cls._validate(f, header)
        bmap = cls._read_bmap(f, header)
        layer = cls(f, writable, pre, header, bmap)
        layer._scan_bmap()
        if writable:
            layer._prepare_writes()
        return layer

    @staticmethod
    def _read_v1(f: BlockFile) -> HeaderV1:
        size_buf = f.read_exact(PREHEADER_SIZE, 4, "VDI header size")
        header_size = struct.unpack("<I", size_buf)[0]
        if header_size < V1_SIZE or header_size > MAX_HEADER_SIZE:
            raise CorruptImageError(
                f"VDI header size {header_size} is outside {V1_SIZE}..{MAX_HEADER_SIZE}",
                path=str(f.path),
                offset=PREHEADER_SIZE,
            )
        got = f.read_exact(PREHEADER_SIZE, V1_SIZE, "VDI header")
        extra = b""
        if header_size >= V1PLUS_SIZE:
            extra = f.read_exact(PREHEADER_SIZE + V1_SIZE, 16, "VDI LCHS geometry")
        return HeaderV1.unpack(got + extra.ljust(16, b"\0"))

    @staticmethod
    def _read_v0(f: BlockFile) -> HeaderV1:
        h = HeaderV0.unpack(f.read_exact(PREHEADER_SIZE, V0_SIZE, "VDI version 0 header"))
        offset_bmap = PREHEADER_SIZE + V0_SIZE
        return HeaderV1(
            header_size=V0_SIZE,
            image_type=h.image_type,
            image_flags=h.image_flags,
            comment=h.comment,
            offset_bmap=offset_bmap,
            offset_data=offset_bmap + 4 * h.blocks,
            cylinders=h.cylinders,
            heads=h.heads,
            sectors=h.sectors,
            sector_size=h.sector_size,
            disk_size=h.disk_size,
            block_size=h.block_size,
            block_extra=0,
            blocks=h.blocks,
            blocks_allocated=h.blocks_allocated,
            uuid_create=h.uuid_create,
            uuid_modify=h.uuid_modify,
            uuid_linkage=h.uuid_linkage,
            uuid_parent_modify=NULL_UUID,
        )

    @staticmethod
    def _validate(f: BlockFile, h: HeaderV1) -> None:
        path = str(f.path)
        if h.image_type not in _TYPE_NAMES:
            raise UnsupportedFeatureError(f"unknown VDI image type {h.image_type}", path=path)
        if h.image_type == DIFF and h.uuid_linkage == NULL_UUID:
            raise CorruptImageError("differencing VDI has no parent UUID", path=path)
        bs = h.block_size
        if not _is_pow2(bs) or not MIN_BLOCK <= bs <= MAX_BLOCK:
            raise CorruptImageError(
                f"VDI block size {bs} is not a power of two in {MIN_BLOCK}..{MAX_BLOCK}",
                path=path,
            )
        if h.block_extra % SECTOR or h.block_extra > bs:
            raise UnsupportedFeatureError(
                f"VDI per-block extra data of {h.block_extra} bytes is not supported "
                "(must be a multiple of 512, at most the block size)",
                path=path,
            )
        if h.blocks > MAX_BLOCKS:
            raise ResourceLimitError(
                f"VDI claims {h.blocks} blocks, more than the {MAX_BLOCKS} a block map can index",
                path=path,
            )
        if h.disk_size > h.blocks * bs:
            raise CorruptImageError(
                f"VDI disk size {h.disk_size} exceeds its {h.blocks} blocks of {bs} bytes",
                path=path,
            )
        header_end = PREHEADER_SIZE + min(h.header_size, V1PLUS_SIZE)
        if h.offset_bmap < header_end:
            raise CorruptImageError(
                f"VDI block map at {h.offset_bmap} overlaps the header", path=path
            )
        if h.offset_data < h.offset_bmap + 4 * h.blocks:
            raise CorruptImageError(
                f"VDI data area at {h.offset_data} overlaps the block map "
                f"({h.blocks} entries at {h.offset_bmap})",
                path=path,
            )
        if h.blocks_allocated > h.blocks:
            raise CorruptImageError(
                f"VDI header says {h.blocks_allocated} of {h.blocks} blocks are allocated",
                path=path,
            )

    @staticmethod
    def _read_bmap(f: BlockFile, h: HeaderV1) -> array:
        buf = f.read_exact(h.offset_bmap, 4 * h.blocks, "VDI block map")
        bmap = array("I")
        bmap.frombytes(buf)
        if bmap.itemsize != 4:  # pragma: no cover - every supported platform has 4-byte "I"
            raise RuntimeError("array('I') is not 32-bit here")
        if struct.pack("=I", 1) != struct.pack("<I", 1):  # pragma: no cover - big-endian host
            bmap.byteswap()
        return bmap

    def _scan_bmap(self) -> None:
        """Count mapped blocks and find the highest slot; refuse maps pointing outside."""
        mapped = [e for e in self.bmap if e < ZERO]
        self.mapped = len(mapped)
        self.max_slot = max(mapped, default=-1)
        if self.max_slot >= 0 and self.max_slot >= self.header.blocks:
            bad = next(i for i, e in enumerate(self.bmap) if ZERO > e >= self.header.blocks)
            raise CorruptImageError(
                f"VDI block map entry {bad} points at block {self.bmap[bad]}, beyond the "
                f"{self.header.blocks} blocks of the image",
                path=str(self.file.path),
                offset=self.header.offset_bmap + 4 * bad,
            )
        end = self._slots_end()
        if self.max_slot >= 0 and end > self.file.size and not self.file.is_block_device:
            raise TruncatedImageError(
                f"VDI block {self.max_slot} extends past the end of the file "
                f"({end} > {self.file.size} bytes)",
                path=str(self.file.path),
            )

    def _prepare_writes(self) -> None:
        """Before writing: a map with shared blocks would make one write change two places."""
        header_end = len(self._header_bytes())
        gap = self.header.offset_bmap - header_end
        if 0 <= gap <= MAX_GAP:  # kept as found, so header and map can go in one write
            self._gap = self.file.read_exact(header_end, gap, "VDI header padding")
        used = bytearray(self.max_slot + 1)
        for e in self.bmap:
            if e < ZERO:
                if used[e]:
                    raise CorruptImageError(
                        f"VDI block {e} is mapped twice; refusing to write",
                        path=str(self.file.path),
                        hint="run vmferry check on it, and convert it to a new image",
                    )
                used[e] = 1
        self._free_slots = [i for i in range(self.max_slot + 1) if not used[i]][::-1]

    # --- what the layer is --------------------------------------------------------------------

    @property
    def uuid(self) -> str:
        return uuid_str(self.header.uuid_create)

    def identity(self) -> Mapping[str, str]:
        return {
            "uuid": uuid_str(self.header.uuid_create),
            "modification_uuid": uuid_str(self.header.uuid_modify),
        }

    def parent_ref(self) -> ParentRef | None:
        if not self.is_diff:
            return None
        if self._parent_ref is None:
            h = self.header
            link = uuid_str(h.uuid_linkage)
            advisory = {}
            if h.uuid_parent_modify != NULL_UUID:
                advisory["modification_uuid"] = uuid_str(h.uuid_parent_modify)
            found = find_parent_candidates(self.file.path, link)
            hints = list(found)
            stored = _comment_hint(h.comment)
            if stored and stored not in hints:
                hints.append(stored)  # after the verified matches: a stale path must not win
            if not found:
                hints.append(f"{{{link}}}.vdi")  # so "not found" names the missing UUID
            self._parent_ref = ParentRef(
                format="vdi",
                hints=tuple(hints),
                identity={"uuid": link},
                advisory=advisory,
                raw={"parent_uuid": link, **advisory},
            )
        return self._parent_ref

    def info(self) -> dict[str, Any]:
        h = self.header
        out: dict[str, Any] = {
            "type": _TYPE_NAMES.get(h.image_type, str(h.image_type)),
            "version": f"{self.version >> 16}.{self.version & 0xFFFF}",
            "header_size": h.header_size,
            "text": self.pre.text.split(b"\0", 1)[0].decode("latin-1").rstrip("\n"),
            "comment": h.comment.split(b"\0", 1)[0].decode("utf-8", "replace"),
            "flags": h.image_flags,
            "block_size": h.block_size,
            "block_extra": h.block_extra,
            "blocks": h.blocks,
            "blocks_allocated": h.blocks_allocated,
            "blocks_mapped": self.mapped,
            "offset_bmap": h.offset_bmap,
            "offset_data": h.offset_data,
            "uuid": uuid_str(h.uuid_create),
            "modification_uuid": uuid_str(h.uuid_modify),
        }
        if h.uuid_linkage != NULL_UUID:
            out["parent_uuid"] = uuid_str(h.uuid_linkage)
        if h.uuid_parent_modify != NULL_UUID:
            out["parent_modification_uuid"] = uuid_str(h.uuid_parent_modify)
        return out

    # --- reading ------------------------------------------------------------------------------

    def _slot_offset(self, slot: int) -> int:
        return self.header.offset_data + slot * self.block_stride + self.block_extra

    def _slots_end(self) -> int:
        """End of the last used slot (the data area's start when there is none)."""
        return self.header.offset_data + (self.max_slot + 1) * self.block_stride

    def _absent(self, entry: int) -> Alloc:
        if entry == ZERO or not self.is_diff:
            return Alloc.ZERO
        return Alloc.UNALLOCATED

    def _status(self, offset: int, length: int) -> Extent:
        """The run at ``offset`` from the block map alone (no look at file holes)."""
        bs = self.block_size
        end = offset + length
        first = offset // bs
        last = (end - 1) // bs
        entry = self.bmap[first]
        j = first + 1
        bmap = self.bmap
        if entry < ZERO:
            if self.block_extra == 0:
                j = self._run_end(j, last, lambda a, n: array("I", range(a, a + n)), entry - first)
            host = self._slot_offset(entry) + offset - first * bs
            return Extent(offset, min(end, j * bs) - offset, Alloc.DATA, host)
        kind = self._absent(entry)
        j = self._run_end(j, last, lambda a, n: _same(entry, n), None)
        while j <= last and bmap[j] >= ZERO and self._absent(bmap[j]) is kind:
            j += 1
        return Extent(offset, min(end, j * bs) - offset, kind)

    def _run_end(
        self, j: int, last: int, expect: Callable[[int, int], array], base: int | None
    ) -> int:
        """First index from ``j`` (at most ``last + 1``) where the map leaves the expected run,
        compared a chunk at a time in C (a 2 TiB map has two million entries)."""
        bmap = self.bmap
        while j <= last:
            n = min(RUN_CHUNK, last + 1 - j)
            want = expect(j + base if base is not None else 0, n)
            got = bmap[j : j + n]
            if got == want:
                j += n
                continue
            for k in range(n):  # the first difference inside this chunk
                if got[k] != want[k]:
                    return j + k
        return j

    def block_status(self, offset: int, length: int) -> Extent:
        self._check_range(offset, length)
        ext = self._status(offset, length)
        if ext.alloc is not Alloc.DATA or self.file.is_block_device or ext.host_offset is None:
            return ext
        # A block mapped over a hole of the file (a static image, a punched block) reads as
        # zeros: say so, so that convert and map skip it.
        for _, run_len, is_data in self.file.data_runs(ext.host_offset, ext.length):
            if is_data:
                return Extent(offset, run_len, Alloc.DATA, ext.host_offset)
            return Extent(offset, run_len, Alloc.ZERO)
        return ext

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        if length == 0:
            return b""
        ext = self._status(offset, length)
        if ext.length == length:
            if ext.alloc is Alloc.DATA and ext.host_offset is not None:
                return self.file.pread(ext.host_offset, length)
            return bytes(length)
        out = bytearray(length)
        pos, end = offset, offset + length
        while pos < end:
            ext = self._status(pos, end - pos)
            if ext.alloc is Alloc.DATA and ext.host_offset is not None:
                out[pos - offset : ext.end - offset] = self.file.pread(ext.host_offset, ext.length)
            pos = ext.end
        return bytes(out)

    def read_into(self, offset: int, view: memoryview) -> None:
        self._read_into_mapped(offset, view, self.file.pread_into)

    # --- writing ------------------------------------------------------------------------------

    def _block_len(self, index: int) -> int:
        """Bytes of block ``index`` inside the disk (the last block may be partial)."""
        return min(self.block_size, self.virtual_size - index * self.block_size)

    def _touch(self) -> None:
        """First change in this session: a new modification UUID, as VirtualBox does, so a
        child made from the old content warns when stacked on the changed parent."""
        if self._touched:
            return
        self._touched = True
        self.header = self.header.replace(uuid_modify=uuid.uuid4().bytes_le)
        self._write_header()

    def _header_bytes(self) -> bytes:
        size = V1PLUS_SIZE if self.header.header_size >= V1PLUS_SIZE else V1_SIZE
        return self.pre.pack() + self.header.pack()[:size]

    def _write_header(self) -> None:
        self.file.write(0, self._header_bytes())

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._require_writable()
        self._check_range(offset, len(data))
        if not len(data):
            return
        self._touch()
        source = view = memoryview(data).cast("B")
        bs = self.block_size
        pending: list[tuple[int, int, memoryview]] = []
        pos = offset
        while len(view):
            index, in_block = divmod(pos, bs)
            n = min(len(view), bs - in_block)
            entry = self.bmap[index]
            if entry < ZERO:
                self.file.write(self._slot_offset(entry) + in_block, view[:n])
            else:
                pending.append((index, in_block, view[:n]))
            view = view[n:]
            pos += n
        if pending:
            self._allocate(pending, source, offset)

    def _take_slot(self) -> int:
        if self._free_slots:
            return self._free_slots.pop()
        if self.max_slot + 1 >= self.header.blocks:
            raise CorruptImageError(  # cannot happen on a consistent map: slots < blocks
                "VDI has no free block slot left", path=str(self.file.path)
            )
        self.max_slot += 1
        return self.max_slot

    def _allocate(
        self, pending: list[tuple[int, int, memoryview]], source: memoryview, offset: int
    ) -> None:
        """Give each block a slot and its data; the map entries are published in batches.

        Publishing (``_publish``) is: fsync the data, write the map entries and the header's
        allocated count, fsync.  It happens every PUBLISH_EVERY new blocks, on flush/close and
        before any slot is freed.  A crash before it loses only the not yet flushed new blocks
        (their slots are past the published map: the next allocation rewrites them whole); the
        map never points at bytes that are not on disk.
        """
        changed: list[int] = []
        grow_to = self.file.size
        appended: list[tuple[int, int, int]] = []  # (file offset, offset in source, length)
        for index, in_block, chunk in pending:  # refuse before anything changes
            covers = in_block == 0 and len(chunk) >= self._block_len(index)
            if self.bmap[index] == FREE and self.is_diff and not covers:
                raise UsageError(
                    f"a write covering only part of block {index} of a differencing VDI needs "
                    "the parent's bytes for the rest of the block",
                    path=str(self.file.path),
                    hint="write through the chain (vmferry.open), which completes the block",
                )
        for index, in_block, chunk in pending:
            slot = self._take_slot()
            start = self._slot_offset(slot)
            if start < self.file.size:  # reused or leaked slot: old bytes must not show
                buf = bytearray(self.block_size)
                buf[in_block : in_block + len(chunk)] = chunk
                self.file.write(start, buf)
            else:
                appended.append(
                    (start + in_block, index * self.block_size + in_block - offset, len(chunk))
                )
            grow_to = max(grow_to, start + self.block_size)
            self.bmap[index] = slot
            changed.append(index)
        for at, rel, n in _back_to_back(appended):
            # new blocks take consecutive slots: one write for a run of them (large requests)
            self.file.write(at, source[rel : rel + n])
        if grow_to > self.file.size:
            self.file.truncate(grow_to)
        self.mapped += len(changed)
        self._unpublished.extend(changed)
        if len(self._unpublished) >= PUBLISH_EVERY:
            self._publish()

    def _publish(self, extra: Sequence[int] = ()) -> None:
        """Make the data durable, then write the changed map entries (coalesced) and the
        header, then fsync."""
        changed = sorted({*self._unpublished, *extra})
        if not changed:
            return
        self.file.fsync()
        self.header = self.header.replace(blocks_allocated=self.mapped)
        if self._gap is not None and changed[-1] < ATOMIC_ENTRIES:
            # One pwrite for header and map: a killed process leaves both old or both new.
            entries = self.bmap[: changed[-1] + 1]
            if struct.pack("=I", 1) != struct.pack("<I", 1):  # pragma: no cover
                entries.byteswap()
            self.file.write(0, self._header_bytes() + self._gap + entries.tobytes())
        else:
            run_start = prev = changed[0]
            for i in [*changed[1:], None]:
                if i is not None and i - prev <= 128:
                    prev = i
                    continue
                self._write_entries(run_start, prev + 1)
                if i is not None:
                    run_start = prev = i
            self._write_header()
        self.file.fsync()
        self._unpublished.clear()

    def flush(self) -> None:
        if self.writable:
            self._publish()
        self.file.fsync()

    def close(self) -> None:
        try:
            if self.writable and self.file.fd >= 0:
                self._publish()
        finally:
            self.file.close()

    def _write_entries(self, lo: int, hi: int) -> None:
        part = self.bmap[lo:hi]
        if struct.pack("=I", 1) != struct.pack("<I", 1):  # pragma: no cover - big-endian host
            part.byteswap()
        self.file.write(self.header.offset_bmap + 4 * lo, part.tobytes())

    def write_zeroes(self, offset: int, length: int) -> None:
        self._require_writable()
        self._check_range(offset, length)
        if not length:
            return
        self._touch()
        bs = self.block_size
        pos, end = offset, offset + length
        released: list[tuple[int, int]] = []  # (index, old slot)
        marked: list[int] = []
        while pos < end:
            index, in_block = divmod(pos, bs)
            n = min(end - pos, bs - in_block)
            entry = self.bmap[index]
            whole = in_block == 0 and n >= self._block_len(index)
            if whole and self.image_type != FIXED:
                new = ZERO if self.is_diff else FREE
                if entry != new:
                    if entry < ZERO:
                        released.append((index, entry))
                    self.bmap[index] = new
                    marked.append(index)
            elif entry < ZERO:
                self._zero_in_slot(self._slot_offset(entry) + in_block, n)
            elif entry == FREE and self.is_diff:
                # Zeros over part of a block the parent answers for: the block must become
                # this layer's, so the parent's bytes around the range are needed.
                raise UsageError(
                    f"zeroing part of block {index} of a differencing VDI needs the parent's "
                    "bytes for the rest of the block",
                    path=str(self.file.path),
                    hint="write zeros through the chain in whole blocks",
                )
            pos += n
        if marked:
            self.mapped -= len(released)
            self._publish(marked)
            for _, slot in released:  # only after the map no longer points at them
                self._zero_in_slot(self._slot_offset(slot), self.block_size)
                self._free_slots.append(slot)
            self._trim_tail()

    def _trim_tail(self) -> None:
        """Give freed slots at the end of the data area back to the filesystem."""
        free = set(self._free_slots)
        top = self.max_slot
        while top >= 0 and top in free:
            free.discard(top)
            top -= 1
        if top != self.max_slot:
            self.max_slot = top
            end = max(self._slot_offset(top + 1) - self.block_extra, self.header.offset_data)
            if not self.file.is_block_device and self.file.size > end:
                self.file.truncate(end)
        self._free_slots = sorted(free, reverse=True)

    def _zero_in_slot(self, at: int, length: int) -> None:
        if self.file.is_block_device or not self.file.punch_hole(at, length):
            self.file.write(at, bytes(length))

    # --- creating -----------------------------------------------------------------------------

    @classmethod
    def create(
        cls, f: BlockFile, size: int, options: Mapping[str, str], parent: ParentInfo | None = None
    ) -> Self:
        static = _bool_option(options, "static")
        if static and parent is not None:
            raise UsageError("a differencing VDI cannot be static")
        bs = DEFAULT_BLOCK
        if size % SECTOR:
            raise UsageError(f"a VDI disk size must be a multiple of {SECTOR} bytes, not {size}")
        blocks = -(-size // bs)
        if blocks > MAX_BLOCKS:
            raise UsageError(f"a VDI with 1 MiB blocks holds at most {MAX_BLOCKS} MiB")
        offset_bmap = _round_up(PREHEADER_SIZE + V1PLUS_SIZE, SECTOR)
        offset_data = _round_up(offset_bmap + 4 * blocks, DATA_ALIGN)
        image_type = FIXED if static else NORMAL
        linkage = parent_modify = NULL_UUID
        if parent is not None:
            if parent.format != "vdi":
                raise UsageError(f"a VDI child cannot have a {parent.format} parent")
            ident = parent.layer.identity()
            if size != parent.layer.virtual_size:
                raise UsageError("a differencing VDI must have its parent's size")
            image_type = DIFF
            linkage = uuid.UUID(ident["uuid"]).bytes_le
            parent_modify = uuid.UUID(ident["modification_uuid"]).bytes_le
        pre = PreHeader(text=TEXT.ljust(64, b"\0"), signature=SIGNATURE, version=VERSION_1_1)
        header = HeaderV1(
            header_size=V1PLUS_SIZE,
            image_type=image_type,
            comment=_hint_comment(parent.relative_path) if parent is not None else bytes(256),
            offset_bmap=offset_bmap,
            offset_data=offset_data,
            sector_size=SECTOR,
            disk_size=size,
            block_size=bs,
            blocks=blocks,
            blocks_allocated=blocks if static else 0,
            uuid_create=uuid.uuid4().bytes_le,
            uuid_modify=uuid.uuid4().bytes_le,
            uuid_linkage=linkage,
            uuid_parent_modify=parent_modify,
        )
        bmap = array("I", range(blocks)) if static else array("I", [FREE]) * blocks
        if struct.pack("=I", 1) != struct.pack("<I", 1):  # pragma: no cover
            bmap.byteswap()
        f.write(0, (pre.pack() + header.pack()).ljust(offset_bmap, b"\0"))
        f.write(offset_bmap, bmap.tobytes())
        # Static: every block mapped in order over a sparse data area (VirtualBox's "fixed").
        f.truncate(offset_data + (blocks * bs if static else 0))
        f.fsync()
        return cls.open(f, writable=True)

    @classmethod
    def measure(
        cls, virtual_size: int, data_ranges: Sequence[tuple[int, int]], options: Mapping[str, str]
    ) -> tuple[int, int]:
        bs = DEFAULT_BLOCK
        blocks = -(-virtual_size // bs)
        meta = _round_up(_round_up(PREHEADER_SIZE + V1PLUS_SIZE, SECTOR) + 4 * blocks, DATA_ALIGN)
        touched: set[int] = set()
        for off, length in data_ranges:
            if length > 0:
                touched.update(range(off // bs, (off + length - 1) // bs + 1))
        full = meta + blocks * bs
        if _bool_option(options, "static"):
            return full, full
        return meta + len(touched) * bs, full

    # --- metadata changes ---------------------------------------------------------------------

    def set_parent(self, parent: ParentInfo | None) -> None:
        self._require_writable()
        if not self.is_diff:
            raise UnsupportedFeatureError("this VDI is not a differencing image")
        if parent is None:
            raise UnsupportedFeatureError(
                "a differencing VDI cannot drop its parent in place",
                hint="convert the chain to a new image instead",
            )
        if parent.format != "vdi":
            raise UsageError(f"a VDI child cannot have a {parent.format} parent")
        ident = parent.layer.identity()
        self.header = self.header.replace(
            uuid_linkage=uuid.UUID(ident["uuid"]).bytes_le,
            uuid_parent_modify=uuid.UUID(ident["modification_uuid"]).bytes_le,
        )
        if self.header.comment.strip(b"\0") == b"" or _comment_hint(self.header.comment):
            self.header = self.header.replace(comment=_hint_comment(parent.relative_path))
        self._parent_ref = None
        self._write_header()
        self.file.fsync()

    def resize(self, new_size: int) -> None:
        """Grow into the room between the map and the data area, or shrink over empty blocks.

        Order: the new map entries (or the fixed image's new slots) first, fsync, then the
        header that makes them part of the disk, fsync; a crash in between leaves the old size.
        """
        self._require_writable()
        if new_size < 0 or new_size % SECTOR:
            raise UsageError(f"a VDI disk size must be a multiple of {SECTOR} bytes")
        h, bs = self.header, self.block_size
        old_blocks, new_blocks = h.blocks, -(-new_size // bs)
        if new_blocks > MAX_BLOCKS:
            raise UsageError(f"a VDI holds at most {MAX_BLOCKS} blocks")
        self._touch()
        self._publish()
        if new_size < self.virtual_size:
            self._shrink_to(new_size, new_blocks)
        elif new_blocks > old_blocks:
            if h.offset_bmap + 4 * new_blocks > h.offset_data:
                raise UnsupportedFeatureError(
                    f"the VDI block map has room for {(h.offset_data - h.offset_bmap) // 4} "
                    f"blocks, {new_blocks} are needed",
                    path=str(self.file.path),
                    hint="convert to a new VDI of the new size instead",
                )
            if self.image_type == FIXED:
                first = self.max_slot + 1
                self.bmap.extend(range(first, first + new_blocks - old_blocks))
                self.max_slot = first + new_blocks - old_blocks - 1
                self.mapped += new_blocks - old_blocks
                self.file.truncate(max(self.file.size, self._slots_end()))
            else:
                self.bmap.extend([FREE] * (new_blocks - old_blocks))
            self._write_entries(old_blocks, new_blocks)
            self.file.fsync()
        self.header = self.header.replace(
            disk_size=new_size, blocks=new_blocks, blocks_allocated=self.mapped
        )
        self.virtual_size = new_size
        self._write_header()
        self.file.fsync()

    def _shrink_to(self, new_size: int, new_blocks: int) -> None:
        dropped = [e for e in self.bmap[new_blocks:] if e < ZERO]
        if dropped and self.image_type != FIXED:
            raise UsageError(
                "shrinking the VDI would drop allocated blocks", path=str(self.file.path)
            )
        if dropped and sorted(dropped) != list(
            range(self.max_slot + 1 - len(dropped), self.max_slot + 1)
        ):
            raise UnsupportedFeatureError(
                "this fixed VDI's last blocks are not its last slots; cannot shrink in place",
                path=str(self.file.path),
            )
        # bytes of a kept, partial last block past the new end must read as zeros later
        tail = new_size % self.block_size
        if tail and new_blocks and self.bmap[new_blocks - 1] < ZERO:
            at = self._slot_offset(self.bmap[new_blocks - 1]) + tail
            self._zero_in_slot(at, self._block_len(new_blocks - 1) - tail)
        del self.bmap[new_blocks:]  # entries past the block count are ignored by readers
        if dropped:
            self.mapped -= len(dropped)
            self.max_slot -= len(dropped)
            end = max(
                self._slot_offset(self.max_slot + 1) - self.block_extra, self.header.offset_data
            )
            self.header = self.header.replace(
                disk_size=new_size, blocks=new_blocks, blocks_allocated=self.mapped
            )
            self._write_header()
            self.file.fsync()
            self.file.truncate(end)

    def check(self) -> CheckReport:
        report = CheckReport()
        h = self.header
        seen: dict[int, int] = {}
        for i, e in enumerate(self.bmap):
            if e >= ZERO:
                continue
            if e in seen:
                report.corruptions.append(f"block {i} shares data block {e} with block {seen[e]}")
            else:
                seen[e] = i
        if self.mapped != h.blocks_allocated:
            report.corruptions.append(
                f"header says {h.blocks_allocated} blocks allocated, the map has {self.mapped}"
            )
        gaps = self.max_slot + 1 - len(seen)
        if gaps > 0:  # freed blocks are punched and reused by the next allocation
            report.notes.append(f"{gaps} free data block slot(s) below the last one")
        used_end = self._slot_offset(self.max_slot + 1) - self.block_extra
        used_end = max(used_end, h.offset_data)
        if not self.file.is_block_device and self.file.size > used_end:
            tail = self.file.size - used_end
            report.leaks.append(f"{tail} bytes after the last data block")
            report.leaked_bytes += tail
        if self.is_diff:
            report.notes.append(f"differencing image of parent {uuid_str(h.uuid_linkage)}")
        return report


#: vmferry's note of where the parent was, kept in the (otherwise free-text) comment field
HINT_PREFIX = "vmferry-parent="


def _back_to_back(writes: list[tuple[int, int, int]]) -> Iterator[tuple[int, int, int]]:
    """Merge (file offset, source offset, length) writes that continue one another in both."""
    run: tuple[int, int, int] | None = None
    for at, rel, n in writes:
        if run is not None and run[0] + run[2] == at and run[1] + run[2] == rel:
            run = (run[0], run[1], run[2] + n)
            continue
        if run is not None:
            yield run
        run = (at, rel, n)
    if run is not None:
        yield run


def _hint_comment(relative_path: str) -> bytes:
    """The comment recording the parent's path, or an empty comment if it does not fit."""
    text = (HINT_PREFIX + relative_path).encode("utf-8")
    return text.ljust(256, b"\0") if len(text) < 256 else bytes(256)


def _comment_hint(comment: bytes) -> str | None:
    text = comment.split(b"\0", 1)[0].decode("utf-8", "replace")
    if text.startswith(HINT_PREFIX) and len(text) > len(HINT_PREFIX):
        return text[len(HINT_PREFIX) :]
    return None


def find_parent_candidates(child: Path, parent_uuid: str) -> list[str]:
    """Names (relative to the child's directory) of ``.vdi`` files whose image UUID is the
    parent's: the child's own directory, then the one above when the child lives in a VirtualBox
    ``Snapshots`` folder.  Reads at most MAX_PARENT_CANDIDATES headers, unlocked and read-only
    (a header read does not disturb a running VM)."""
    child = Path(os.path.abspath(child))
    dirs: list[tuple[Path, str]] = [(child.parent, "")]
    if child.parent.name.lower() == "snapshots":
        dirs.append((child.parent.parent, "../"))
    found: list[str] = []
    budget = MAX_PARENT_CANDIDATES
    want = parent_uuid.lower()
    for directory, prefix in dirs:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            if not name.lower().endswith(".vdi") or directory / name == child:
                continue
            if budget <= 0:
                return found
            budget -= 1
            if _uuid_of(directory / name) == want:
                found.append(prefix + name)
    return found


def _uuid_of(path: Path) -> str | None:
    try:
        if not path.is_file():
            return None
        f = BlockFile.open(path, writable=False, lock=False)
    except (VmferryError, OSError):
        return None
    try:
        ident = read_identity(f)
    except (VmferryError, OSError, ValueError):
        return None
    finally:
        f.close()
    return ident[0].lower() if ident else None
