"""ESX "vmfsSparse" (COWD) delta extents.

Facts (qemu block/vmdk.c ``VMDK3Header``; libvmdk's format notes): magic "COWD", then
little-endian version, flags, capacity (sectors), grain size (sectors), GD offset (sectors),
GD entries, next free sector.  Each grain table has 4096 32-bit entries holding a grain's
sector, 0 meaning "not in this delta".  Writes follow the sparse rule: a new grain (or grain
table) is appended and fsynced before the entry that publishes it; the header's next-free
sector is advanced afterwards (it is only an allocation hint).
"""

from __future__ import annotations

from array import array

from vmferry._layout import Layout, raw, u32
from vmferry.disk.base import Alloc, CheckReport
from vmferry.disk.blockfile import BlockFile
from vmferry.disk.vmdk.extent import SECTOR, ExtentBase, Status
from vmferry.disk.vmdk.sparse import count_zero_entries, le32_array
from vmferry.errors import (
    CorruptImageError,
    NotThisFormatError,
    TruncatedImageError,
    UsageError,
    VmferryError,
)

COWD_GTES = 4096
COWD_GT_BYTES = COWD_GTES * 4
MAX_GRAIN_SECTORS = 65536
MAX_GD_ENTRIES = 32 * 1024 * 1024


class CowdHeader(Layout, byteorder="<"):
    magic: bytes = raw(4, b"COWD")
    version: int = u32(1)
    flags: int = u32(3)
    capacity: int = u32()
    grain_size: int = u32()
    gd_offset: int = u32()
    gd_entries: int = u32()
    free_sector: int = u32()


class CowdExtent(ExtentBase):
    """A COWD grain map over one file."""

    kind = "VMFSSPARSE"

    def __init__(self, f: BlockFile, header: CowdHeader, size: int) -> None:
        self.file = f
        self.path = str(f.path)
        self.header = header
        self.size = size
        self.grain_sectors = header.grain_size
        self.grain = header.grain_size * SECTOR
        self.gd: array[int] = array("I")
        self._gts: dict[int, array[int]] = {}
        self.next_alloc = 0

    @classmethod
    def open(
        cls, f: BlockFile, *, writable: bool, size: int | None = None, shares_main: bool = False
    ) -> CowdExtent:
        path = str(f.path)
        h = CowdHeader.unpack(f.read_exact(0, CowdHeader.size, "COWD header"))
        if h.magic != b"COWD":
            raise NotThisFormatError("not a COWD extent", path=path)
        g = h.grain_size
        if g < 1 or g & (g - 1) or g > MAX_GRAIN_SECTORS:
            raise CorruptImageError(f"COWD grain size {g} sectors is invalid", path=path)
        if h.capacity == 0:
            raise CorruptImageError("COWD extent has a capacity of 0", path=path)
        need = -(-h.capacity // (COWD_GTES * g))
        if h.gd_entries > MAX_GD_ENTRIES:
            raise CorruptImageError(f"COWD grain directory has {h.gd_entries} entries", path=path)
        if h.gd_entries < need:
            raise CorruptImageError(
                f"COWD grain directory has {h.gd_entries} entries, the capacity needs {need}",
                path=path,
            )
        capacity = h.capacity * SECTOR
        if size is None:
            size = capacity
        elif size > capacity:
            raise CorruptImageError(
                "descriptor gives the COWD extent more than its capacity", path=path
            )
        ext = cls(f, h, size)
        ext.writable = writable
        ext.next_alloc = max(f.size, h.free_sector * SECTOR)
        ext.next_alloc = -(-ext.next_alloc // SECTOR) * SECTOR
        ext.shares_main_file = shares_main
        ext.gd = le32_array(
            f.read_exact(h.gd_offset * SECTOR, h.gd_entries * 4, "COWD grain directory")
        )
        return ext

    def _table(self, gdi: int) -> array[int] | None:
        self._entry(gdi * COWD_GTES)
        return self._gts.get(gdi)

    def _entry(self, gi: int) -> int:
        gdi, idx = divmod(gi, COWD_GTES)
        gt = self._gts.get(gdi)
        if gt is None:
            sector = self.gd[gdi]
            if sector == 0:
                return 0
            assert self.file is not None
            if sector * SECTOR + COWD_GT_BYTES > self.file.size:
                raise TruncatedImageError(
                    f"COWD grain table {gdi} is past the end of the file", path=self.path
                )
            gt = le32_array(
                self.file.read_exact(sector * SECTOR, COWD_GT_BYTES, f"COWD grain table {gdi}")
            )
            if len(self._gts) > 1024:
                self._gts.clear()
            self._gts[gdi] = gt
        e = gt[idx]
        if e and (e < 1 or e * SECTOR >= self.file.size):  # type: ignore[union-attr]
            raise TruncatedImageError(f"COWD grain {gi} points past the end", path=self.path)
        return e

    def status(self, offset: int, length: int, has_parent: bool) -> Status:
        g = self.grain
        gi, in_g = divmod(offset, g)
        first = self._entry(gi)
        run = g - in_g
        if first == 0 and run < length:
            run += g * count_zero_entries(self._table, gi + 1, -(-(length - run) // g), COWD_GTES)
            length = min(run, length)
        expect = first + self.grain_sectors
        while run < length:
            gi += 1
            e = self._entry(gi)
            if (e == 0) != (first == 0) or (first and e != expect):
                break
            expect += self.grain_sectors
            run += g
        run = min(run, length)
        if first:
            return (Alloc.DATA, run, first * SECTOR + in_g, False)
        return (Alloc.UNALLOCATED if has_parent else Alloc.ZERO, run, None, False)

    def read(self, offset: int, length: int) -> bytes:
        assert self.file is not None
        out = bytearray(length)
        pos, end = offset, offset + length
        while pos < end:
            gi, in_g = divmod(pos, self.grain)
            n = min(self.grain - in_g, end - pos)
            e = self._entry(gi)
            if e:
                out[pos - offset : pos - offset + n] = self.file.pread(e * SECTOR + in_g, n)
            pos += n
        return bytes(out)

    def check(self, report: CheckReport) -> None:
        """Every grain table and grain inside the file; no two grains sharing sectors."""
        seen: dict[int, int] = {}
        name = self.path
        for gdi in range(len(self.gd)):
            try:
                if self._table(gdi) is None:
                    continue
                for idx in range(COWD_GTES):
                    gi = gdi * COWD_GTES + idx
                    e = self._entry(gi)
                    if e in seen:
                        report.corruptions.append(f"{name}: grains {seen[e]} and {gi} overlap")
                    elif e:
                        seen[e] = gi
            except VmferryError as exc:
                report.corruptions.append(str(exc))

    # --- writing ---------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.write_with_parent(offset, data, False)

    def write_with_parent(
        self, offset: int, data: bytes | bytearray | memoryview, has_parent: bool
    ) -> None:
        assert self.file is not None
        mv = memoryview(data)
        g = self.grain
        pos, end = offset, offset + len(mv)
        new: list[tuple[int, bytes | bytearray | memoryview]] = []
        while pos < end:
            gi, in_g = divmod(pos, g)
            n = min(g - in_g, end - pos)
            piece = mv[pos - offset : pos - offset + n]
            e = self._entry(gi)
            if e:
                self.file.write(e * SECTOR + in_g, piece)
            elif n == g:
                new.append((gi, piece))
            else:  # only at the end of the disk, or without a parent: the rest is zeros
                buf = bytearray(g)
                buf[in_g : in_g + n] = piece
                new.append((gi, buf))
            pos += n
        if new:
            self._allocate(new)

    def _allocate(self, new: list[tuple[int, bytes | bytearray | memoryview]]) -> None:
        assert self.file is not None
        for gdi in sorted({gi // COWD_GTES for gi, _ in new}):
            if self.gd[gdi] == 0:
                at = self.next_alloc
                self.file.write(at, bytes(COWD_GT_BYTES))
                self.file.fsync()
                self.file.write(self.header.gd_offset * SECTOR + gdi * 4, _le32(at // SECTOR))
                self.gd[gdi] = at // SECTOR
                self._gts[gdi] = array("I", bytes(COWD_GT_BYTES))
                self.next_alloc = at + COWD_GT_BYTES
        start = self.next_alloc
        self.file.write(start, b"".join(bytes(d) for _, d in new))
        self.file.fsync()
        pos = start
        for gi, d in new:
            gdi, idx = divmod(gi, COWD_GTES)
            gt = self._table(gdi)
            assert gt is not None
            gt[idx] = pos // SECTOR
            self.file.write(self.gd[gdi] * SECTOR + idx * 4, _le32(pos // SECTOR))
            pos += len(d)
        self.next_alloc = pos
        self.file.write(28, _le32(pos // SECTOR))  # freeSector, after the magic + 6 fields
        self.file.fsync()

    def write_zeroes(self, offset: int, length: int, has_parent: bool) -> None:
        """COWD has no zero marker: allocated grains get zeros, holes without parent stay."""
        g = self.grain
        pos, end = offset, offset + length
        while pos < end:
            gi, in_g = divmod(pos, g)
            n = min(g - in_g, end - pos)
            e = self._entry(gi)
            if not e and has_parent and n < g:
                raise UsageError(
                    f"zeroing part of grain {gi} of a COWD delta needs the parent's bytes",
                    path=self.path,
                    hint="write zeros through the chain (Chain.write) for partial grains",
                )
            if e or has_parent:
                self.write_with_parent(pos, bytes(n), has_parent)
            pos += n


def _le32(value: int) -> bytes:
    return value.to_bytes(4, "little")
