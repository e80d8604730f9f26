"""Structural check in qemu-img check's terms.

Every reference in the image (header, L1/L2 tables, data and compressed clusters, refcount
table and blocks, snapshot tables, bitmap tables) is counted in memory and compared with the
stored refcounts: a stored refcount below the references is a corruption (a cluster could be
handed out twice), above is a leak (space lost, data safe).  References past the end of the
file or not cluster aligned, and COPIED flags that disagree with the refcount, are corruptions.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from vmferry.disk.base import CheckReport
from vmferry.disk.qcow2.layout import (
    FLAG_COMPRESSED,
    FLAG_COPIED,
    OFFSET_MASK,
    BitmapDirEntry,
    BitmapsExt,
    be64_array,
    decode_refcounts,
)
from vmferry.errors import CorruptImageError, FormatError, ResourceLimitError

if TYPE_CHECKING:
    from vmferry.disk.qcow2.driver import Qcow2

_MAX_CLUSTERS = 1 << 28
_MAX_MESSAGES = 50


class _Checker:
    def __init__(self, drv: Qcow2) -> None:
        self.drv = drv
        self.f = drv.file
        self.m = drv.meta
        self.cs = drv.cs
        self.n = -(-self.f.size // self.cs)
        if self.n > _MAX_CLUSTERS:
            raise ResourceLimitError("image is too large to check in memory", path=str(self.f.path))
        self.refs = array("I", bytes(4 * self.n))
        self.stored = array("Q", bytes(8 * self.n))
        self.report = CheckReport()
        self.dropped = 0
        self.comparing = True

    def corrupt(self, msg: str) -> None:
        if len(self.report.corruptions) < _MAX_MESSAGES:
            self.report.corruptions.append(msg)
        else:
            self.dropped += 1

    def add(self, off: int, length: int, what: str) -> bool:
        """Count one reference to every cluster of [off, off+length); False if out of file."""
        if length <= 0:
            return True
        first, last = off // self.cs, (off + length - 1) // self.cs
        ok = True
        if last >= self.n:
            self.corrupt(f"{what} at {off:#x} extends past the end of the file")
            last = self.n - 1
            ok = False
        refs = self.refs
        for i in range(first, last + 1):
            refs[i] += 1
        return ok

    def read_table(self, off: int, length: int, what: str) -> array | None:
        try:
            return be64_array(self.f.read_exact(off, length, what))
        except FormatError as exc:
            self.corrupt(f"{what}: {exc.message}")
            return None

    # --- the walk -----------------------------------------------------------------------------

    def run(self, *, with_refcounts: bool = True) -> CheckReport:
        """Count every reference; ``with_refcounts=False`` leaves out the refcount structures
        themselves (and the comparison), which is what a refcount rebuild needs."""
        m, cs = self.m, self.cs
        if with_refcounts:
            self.load_refcounts()
            self.add(m.refcount_table_offset, m.refcount_table_clusters * cs, "refcount table")
        self.add(0, cs, "header")
        self.add(m.l1_table_offset, m.l1_size * 8, "L1 table")
        l1 = self.read_table(m.l1_table_offset, m.l1_size * 8, "L1 table") if m.l1_size else None
        if l1 is not None:
            self.walk_l1(l1, active=True)
        if self.drv.snapshots:
            size = sum(s.entry_size for s in self.drv.snapshots)
            self.add(m.snapshots_offset, size, "snapshot table")
            for s in self.drv.snapshots:
                what = f"snapshot {s.id} L1 table"
                if s.l1_offset % cs:
                    self.corrupt(f"{what} is not cluster aligned")
                    continue
                if self.add(s.l1_offset, s.l1_size * 8, what):
                    table = self.read_table(s.l1_offset, s.l1_size * 8, what)
                    if table is not None:
                        self.walk_l1(table, active=False)
        self.walk_bitmaps()
        if with_refcounts:
            self.compare()
        if self.dropped:
            self.report.corruptions.append(f"... and {self.dropped} more")
        return self.report

    def load_refcounts(self) -> None:
        m, cs = self.m, self.cs
        table = self.read_table(
            m.refcount_table_offset, m.refcount_table_clusters * cs, "refcount table"
        )
        if table is None:
            return
        per_block = cs * 8 >> m.refcount_order
        beyond = 0
        for ti, e in enumerate(table):
            off = e & OFFSET_MASK
            if not off:
                continue
            if off % cs:
                self.corrupt(f"refcount block {ti} offset {off:#x} is not cluster aligned")
                continue
            if not self.add(off, cs, f"refcount block {ti}"):
                continue
            raw = self.f.read_exact(off, cs, "refcount block")
            counts = decode_refcounts(raw, m.refcount_order)
            base = ti * per_block
            for bi, v in enumerate(counts):
                if not v:
                    continue
                idx = base + bi
                if idx < self.n:
                    self.stored[idx] = v
                else:
                    beyond += 1
        if beyond:  # harmless (qemu-img check does not count them either): note only
            self.report.notes.append(f"{beyond} cluster(s) past the end of the file have refcounts")

    def walk_l1(self, l1: array, *, active: bool) -> None:
        cs = self.cs
        for i, e in enumerate(l1):
            off = e & OFFSET_MASK
            if not off:
                continue
            what = f"L2 table {i}"
            if off % cs:
                self.corrupt(f"{what} offset {off:#x} is not cluster aligned")
                continue
            if not self.add(off, cs, what):
                continue
            if active:
                self.check_copied(off, e, what)
            table = self.read_table(off, cs, what)
            if table is not None:
                self.walk_l2(table, i, active)

    def walk_l2(self, table: array, l1i: int, active: bool) -> None:
        drv, cs = self.drv, self.cs
        step = 2 if drv.ext_l2 else 1
        for j in range(0, len(table), step):
            e = table[j]
            if not e:
                continue
            guest = ((l1i * drv.l2_entries) + j // step) * cs
            if e & FLAG_COMPRESSED:
                if drv.external:
                    self.corrupt(f"compressed cluster at guest {guest:#x} with external data")
                    continue
                coff, csize = drv._compressed_range(e)
                self.add(coff, csize, f"compressed cluster for guest {guest:#x}")
                continue
            off = e & OFFSET_MASK
            if not off:
                continue
            what = f"cluster for guest {guest:#x}"
            if off % cs:
                self.corrupt(f"{what} at unaligned host offset {off:#x}")
                continue
            if drv.external:
                continue  # clusters in the data file are not refcounted
            if self.add(off, cs, what) and active:
                self.check_copied(off, e, what)

    def check_copied(self, off: int, e: int, what: str) -> None:
        if not self.comparing:
            return
        idx = off // self.cs
        if idx >= self.n:
            return
        stored = self.stored[idx]
        if bool(e & FLAG_COPIED) != (stored == 1):
            self.corrupt(f"{what}: COPIED flag {int(bool(e & FLAG_COPIED))} but refcount {stored}")

    def walk_bitmaps(self) -> None:
        raw = self.m.bitmaps_ext
        if raw is None or len(raw) < BitmapsExt.size:
            return
        ext = BitmapsExt.unpack(raw)
        size = ext.bitmap_directory_size
        if size > 64 << 20:
            self.corrupt("bitmap directory is absurdly large")
            return
        if not self.add(ext.bitmap_directory_offset, size, "bitmap directory"):
            return
        try:
            data = self.f.read_exact(ext.bitmap_directory_offset, size, "bitmap directory")
        except FormatError as exc:
            self.corrupt(exc.message)
            return
        pos = 0
        for _ in range(ext.nb_bitmaps):
            if pos + BitmapDirEntry.size > len(data):
                self.corrupt("bitmap directory entry runs past the directory")
                return
            d = BitmapDirEntry.unpack(data, pos)
            tbytes = d.bitmap_table_size * 8
            if self.add(d.bitmap_table_offset, tbytes, "bitmap table"):
                table = self.read_table(d.bitmap_table_offset, tbytes, "bitmap table")
                for e in table or ():
                    off = e & OFFSET_MASK
                    if off:
                        self.add(off, self.cs, "bitmap data")
            entry = BitmapDirEntry.size + d.extra_data_size + d.name_size
            pos += entry + (-entry % 8)

    def compare(self) -> None:
        leaks = 0
        for idx in range(self.n):
            have, want = self.stored[idx], self.refs[idx]
            if have == want:
                continue
            if have < want:
                self.corrupt(f"cluster {idx}: refcount {have} but {want} reference(s)")
            else:
                leaks += 1
                if len(self.report.leaks) < _MAX_MESSAGES:
                    self.report.leaks.append(
                        f"cluster {idx}: refcount {have} but {want} reference(s)"
                    )
        self.report.leaked_bytes += leaks * self.cs


def check_image(drv: Qcow2) -> CheckReport:
    report = _Checker(drv).run()
    if drv.meta.incompatible & 1:
        report.notes.append("image is marked dirty: refcounts may be stale")
    if drv.meta.incompatible & 2:
        report.corruptions.append("image is marked corrupt")
    return report


def count_references(drv: Qcow2) -> array:
    """Reference counts of every cluster of the file, from the tables alone (for a rebuild).

    Refuses when the tables themselves are damaged: refcounts rebuilt from broken tables
    would make the damage permanent.
    """
    checker = _Checker(drv)
    checker.comparing = False
    report = checker.run(with_refcounts=False)
    if report.corruptions:
        raise CorruptImageError(
            "cannot rebuild the refcounts of this dirty image: " + report.corruptions[0],
            path=str(drv.file.path),
            hint="repair it with qemu-img check -r all",
        )
    return checker.refs
