"""ESXi SEsparse (space-efficient sparse) extents, read-only.

Facts (qemu block/vmdk.c; the format is not officially documented): a 512-byte constant header
(magic 0xcafebabe, version 0x200000001, grain 8 sectors, grain tables of 64 sectors), a
volatile header (magic 0xcafecafe; a set ``replay_journal`` means a journal must be replayed
first), 64-bit grain directory entries (top nibble 1 = table allocated, low 32 bits = table
index) and 64-bit grain table entries whose top nibble says: 0 not here, 1 unmapped and
2 zero (both read as zeros), 3 allocated (cluster number split across the remaining bits).
"""

from __future__ import annotations

import sys
from array import array

from vmferry._layout import Layout, raw, u64
from vmferry.disk.base import Alloc
from vmferry.disk.blockfile import BlockFile
from vmferry.disk.vmdk.extent import SECTOR, ExtentBase, Status
from vmferry.errors import (
    CorruptImageError,
    DirtyLogError,
    NotThisFormatError,
    ResourceLimitError,
    TruncatedImageError,
    UnsupportedFeatureError,
)

CONST_MAGIC = 0xCAFEBABE
VOLATILE_MAGIC = 0xCAFECAFE
VERSION = 0x200000001
MAX_GD_ENTRIES = 32 * 1024 * 1024


class SEConstHeader(Layout, byteorder="<", size=512):
    magic: int = u64()
    version: int = u64()
    capacity: int = u64()
    grain_size: int = u64()
    gt_size: int = u64()
    flags: int = u64()
    reserved1: int = u64()
    reserved2: int = u64()
    reserved3: int = u64()
    reserved4: int = u64()
    volatile_offset: int = u64()
    volatile_size: int = u64()
    journal_header_offset: int = u64()
    journal_header_size: int = u64()
    journal_offset: int = u64()
    journal_size: int = u64()
    gd_offset: int = u64()
    gd_size: int = u64()
    gts_offset: int = u64()
    gts_size: int = u64()
    free_bitmap_offset: int = u64()
    free_bitmap_size: int = u64()
    backmap_offset: int = u64()
    backmap_size: int = u64()
    grains_offset: int = u64()
    grains_size: int = u64()
    pad: bytes = raw(304)


class SEVolatileHeader(Layout, byteorder="<", size=512):
    magic: int = u64()
    free_gt_number: int = u64()
    next_txn: int = u64()
    replay_journal: int = u64()
    pad: bytes = raw(480)


def _le64_array(data: bytes) -> array[int]:
    table = array("Q")
    table.frombytes(data)
    if sys.byteorder == "big":
        table.byteswap()
    return table


class SESparseExtent(ExtentBase):
    kind = "SESPARSE"

    def __init__(self, f: BlockFile, h: SEConstHeader, size: int) -> None:
        self.file = f
        self.path = str(f.path)
        self.h = h
        self.size = size
        self.grain_sectors = h.grain_size
        self.grain = h.grain_size * SECTOR
        self.gt_entries = h.gt_size * SECTOR // 8
        self.gd: array[int] = array("Q")
        self._gts: dict[int, array[int]] = {}

    @classmethod
    def open(
        cls, f: BlockFile, *, size: int | None = None, shares_main: bool = False
    ) -> SESparseExtent:
        path = str(f.path)
        h = SEConstHeader.unpack(f.read_exact(0, 512, "SEsparse header"))
        if h.magic != CONST_MAGIC:
            raise NotThisFormatError("not an SEsparse extent", path=path)
        if h.version != VERSION:
            raise UnsupportedFeatureError(f"SEsparse version {h.version:#x}", path=path)
        if h.grain_size != 8 or h.gt_size != 64:
            raise UnsupportedFeatureError(
                f"SEsparse grain {h.grain_size} / table {h.gt_size} sectors", path=path
            )
        if h.flags or h.reserved1 or h.reserved2 or h.reserved3 or h.reserved4:
            raise UnsupportedFeatureError("SEsparse header has unknown flags", path=path)
        vol = SEVolatileHeader.unpack(
            f.read_exact(h.volatile_offset * SECTOR, 512, "SEsparse volatile header")
        )
        if vol.magic != VOLATILE_MAGIC:
            raise CorruptImageError("SEsparse volatile header magic is wrong", path=path)
        if vol.replay_journal:
            raise DirtyLogError("SEsparse journal needs replaying (open it in ESXi)", path=path)
        n_gd = h.gd_size * SECTOR // 8
        if n_gd > MAX_GD_ENTRIES:
            raise ResourceLimitError(f"SEsparse grain directory has {n_gd} entries", path=path)
        span = 4096 * h.grain_size
        if -(-h.capacity // span) > n_gd:
            raise CorruptImageError("SEsparse grain directory is too small", path=path)
        capacity = h.capacity * SECTOR
        if size is None:
            size = capacity
        elif size > capacity:
            raise CorruptImageError(
                "descriptor gives the SEsparse extent too many sectors", path=path
            )
        ext = cls(f, h, size)
        ext.shares_main_file = shares_main
        ext.gd = _le64_array(f.read_exact(h.gd_offset * SECTOR, n_gd * 8, "SEsparse directory"))
        return ext

    def _entry(self, gi: int) -> tuple[Alloc, int]:
        gdi, idx = divmod(gi, self.gt_entries)
        gt = self._gts.get(gdi)
        if gt is None:
            e = self.gd[gdi]
            if e == 0:
                return (Alloc.UNALLOCATED, 0)
            if e >> 32 != 0x10000000:
                raise CorruptImageError(
                    f"SEsparse directory entry {gdi} is invalid", path=self.path
                )
            off = (self.h.gts_offset * SECTOR) + (e & 0xFFFFFFFF) * self.gt_entries * 8
            assert self.file is not None
            gt = _le64_array(
                self.file.read_exact(off, self.gt_entries * 8, f"SEsparse grain table {gdi}")
            )
            if len(self._gts) > 1024:
                self._gts.clear()
            self._gts[gdi] = gt
        e = gt[idx]
        top = e >> 60
        if top == 0:
            if e:
                raise CorruptImageError(f"SEsparse grain {gi} entry is invalid", path=self.path)
            return (Alloc.UNALLOCATED, 0)
        if top in (1, 2):
            return (Alloc.ZERO, 0)
        if top == 3:
            cluster = ((e & 0x0FFF000000000000) >> 48) | ((e & 0x0000FFFFFFFFFFFF) << 12)
            host = (self.h.grains_offset + cluster * self.grain_sectors) * SECTOR
            assert self.file is not None
            if host >= self.file.size:
                raise TruncatedImageError(f"SEsparse grain {gi} is past the end", path=self.path)
            return (Alloc.DATA, host)
        raise CorruptImageError(f"SEsparse grain {gi} entry type {top} is unknown", path=self.path)

    def status(self, offset: int, length: int, has_parent: bool) -> Status:
        g = self.grain
        gi, in_g = divmod(offset, g)
        kind, host = self._entry(gi)
        run = g - in_g
        while run < length:
            gi += 1
            k, h2 = self._entry(gi)
            if k is not kind or (kind is Alloc.DATA and h2 != host + run + in_g):
                break
            run += g
        run = min(run, length)
        if kind is Alloc.UNALLOCATED and not has_parent:
            kind = Alloc.ZERO
        return (kind, run, host + in_g if kind is Alloc.DATA else None, False)

    def read(self, offset: int, length: int) -> bytes:
        assert self.file is not None
        out = bytearray(length)
        pos, end = offset, offset + length
        while pos < end:
            gi, in_g = divmod(pos, self.grain)
            n = min(self.grain - in_g, end - pos)
            kind, host = self._entry(gi)
            if kind is Alloc.DATA:
                out[pos - offset : pos - offset + n] = self.file.pread(host + in_g, n)
            pos += n
        return bytes(out)
