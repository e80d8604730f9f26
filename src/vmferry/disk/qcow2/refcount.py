"""Refcount table and blocks, and the cluster allocator built on them.

Refcounts are kept exact (no lazy refcounts, no dirty bit).  Changes are made in memory and
written by the driver's commit in crash-safe order: increments (and new refcount blocks)
before anything that references the new clusters, decrements only after the last reference is
gone and synced.  A crash between the two leaks clusters (``qemu-img check`` reports leaks,
never corruption); a cluster is never handed out twice.

Allocation is append-only: new clusters go after the last cluster in use, so a large write
lands in one contiguous run that reads back with one pread.  Clusters freed in a session are
punched out of the file rather than reused.
"""

from __future__ import annotations

from array import array

from vmferry.disk.blockfile import BlockFile
from vmferry.disk.qcow2.header import Meta
from vmferry.disk.qcow2.layout import (
    MAX_REFTABLE_BYTES,
    OFFSET_MASK,
    be64_array,
    be64_bytes,
    decode_refcounts,
    encode_refcounts,
    refcount_typecode,
)
from vmferry.errors import CorruptImageError, ResourceLimitError, UnsupportedFeatureError


class Refcounts:
    def __init__(self, f: BlockFile, meta: Meta) -> None:
        self.f = f
        self.m = meta
        self.cs = meta.cluster_size
        code = refcount_typecode(meta.refcount_order)
        if code is None:
            raise UnsupportedFeatureError(
                f"vmferry writes qcow2 images with 8/16/32/64-bit refcounts only (this one has "
                f"{1 << meta.refcount_order}-bit refcounts)",
                path=str(f.path),
            )
        self.code = code
        self.per_block = self.cs * 8 >> meta.refcount_order
        self.max_refcount = (1 << (1 << meta.refcount_order)) - 1
        self.table = be64_array(
            f.read_exact(
                meta.refcount_table_offset, meta.refcount_table_clusters * self.cs, "refcount table"
            )
        )
        self.blocks: dict[int, array] = {}
        self.dirty_blocks: set[int] = set()
        self.table_dirty: set[int] = set()
        self.table_moved = False
        #: (host offset, clusters) whose refcount drops by one once their references are gone
        self.pending_free: list[tuple[int, int]] = []
        self.next_free = -(-f.size // self.cs)

    # --- reading ------------------------------------------------------------------------------

    def _block(self, ti: int, create: bool) -> array | None:
        blk = self.blocks.get(ti)
        if blk is not None:
            return blk
        off = self.table[ti] & OFFSET_MASK if ti < len(self.table) else 0
        if not off:
            if not create:
                return None
            return self._new_block(ti)
        if off % self.cs:
            raise CorruptImageError(
                f"refcount block {ti} offset {off:#x} is not cluster aligned", path=str(self.f.path)
            )
        raw_block = self.f.read_exact(off, self.cs, f"refcount block {ti}")
        blk = decode_refcounts(raw_block, self.m.refcount_order)
        assert isinstance(blk, array)
        self.blocks[ti] = blk
        return blk

    def get(self, idx: int) -> int:
        ti, bi = divmod(idx, self.per_block)
        blk = self._block(ti, create=False)
        return 0 if blk is None else blk[bi]

    # --- changing -----------------------------------------------------------------------------

    def set(self, idx: int, value: int) -> None:
        if value > self.max_refcount:
            raise ResourceLimitError(
                f"refcount of cluster {idx} would overflow {self.max_refcount}",
                path=str(self.f.path),
            )
        ti, bi = divmod(idx, self.per_block)
        if ti >= len(self.table):
            self._grow_table(ti + 1)
        blk = self._block(ti, create=True)
        assert blk is not None
        blk[bi] = value
        self.dirty_blocks.add(ti)

    def add(self, idx: int, delta: int) -> int:
        value = self.get(idx) + delta
        if value < 0:
            raise CorruptImageError(
                f"refcount of cluster {idx} would drop below zero", path=str(self.f.path)
            )
        self.set(idx, value)
        return value

    def alloc(self, n: int) -> int:
        """Reserve ``n`` contiguous free clusters (refcount 1) and return the first's offset."""
        start = self.next_free
        while True:
            used = self._last_used(start, n)
            if used < 0:
                break
            start = used + 1  # a stray refcount past the data (an old crash): step over it
        self.next_free = start + n
        self._set_run(start, n, 1)
        return start * self.cs

    def _last_used(self, start: int, n: int) -> int:
        """Index of the last cluster in [start, start+n) with a refcount, or -1 (block-wise)."""
        per = self.per_block
        idx = start + n
        while idx > start:
            ti = (idx - 1) // per
            lo = max(start, ti * per)
            blk = self._block(ti, create=False)
            if blk is not None:
                part = blk[lo - ti * per : idx - ti * per]
                if part.count(0) != len(part):
                    for i in range(len(part) - 1, -1, -1):
                        if part[i]:
                            return lo + i
            idx = lo
        return -1

    def _set_run(self, start: int, n: int, value: int) -> None:
        """Set the refcount of clusters [start, start+n) to ``value`` a block at a time."""
        per = self.per_block
        idx, end = start, start + n
        while idx < end:
            ti = idx // per
            stop = min(end, (ti + 1) * per)
            if ti >= len(self.table):
                self._grow_table(ti + 1)
            blk = self._block(ti, create=True)
            assert blk is not None
            blk[idx - ti * per : stop - ti * per] = array(self.code, [value]) * (stop - idx)
            self.dirty_blocks.add(ti)
            idx = stop

    def _new_block(self, ti: int) -> array:
        idx = self.next_free
        self.next_free += 1
        blk = array(self.code, bytes(self.cs))
        self.blocks[ti] = blk
        self.table[ti] = idx * self.cs
        self.table_dirty.add(ti)
        self.dirty_blocks.add(ti)
        self.set(idx, 1)  # the block describes itself when it can, else another block does
        return blk

    def _grow_table(self, min_entries: int) -> None:
        """Move the refcount table to a larger copy at the end of the file."""
        entries = max(min_entries, len(self.table)) * 2
        clusters = -(-entries * 8 // self.cs)
        if clusters * self.cs > MAX_REFTABLE_BYTES:
            raise ResourceLimitError("refcount table would exceed 8 MiB", path=str(self.f.path))
        old = (self.m.refcount_table_offset, self.m.refcount_table_clusters)
        start = self.next_free
        self.next_free += clusters
        self.table.extend([0] * (clusters * self.cs // 8 - len(self.table)))
        self.m.refcount_table_offset = start * self.cs
        self.m.refcount_table_clusters = clusters
        self.table_moved = True
        self.pending_free.append(old)
        for i in range(start, start + clusters):
            self.set(i, 1)

    def free(self, offset: int, length: int) -> None:
        """Drop one reference from every cluster in [offset, offset+length) after commit."""
        first = offset // self.cs
        last = (offset + length - 1) // self.cs
        self.pending_free.append((first * self.cs, last - first + 1))

    # --- writing ------------------------------------------------------------------------------

    def write_blocks(self) -> None:
        for ti in sorted(self.dirty_blocks):
            self.f.write(self.table[ti] & OFFSET_MASK, encode_refcounts(self.blocks[ti]))
        self.dirty_blocks.clear()

    def write_table(self) -> None:
        """Write the table in place (changed entries) or whole at its new location."""
        if self.table_moved:
            self.f.write(self.m.refcount_table_offset, be64_bytes(self.table))
        elif self.table_dirty:
            lo, hi = min(self.table_dirty), max(self.table_dirty) + 1
            self.f.write(self.m.refcount_table_offset + lo * 8, be64_bytes(self.table, lo, hi))
        self.table_dirty.clear()

    def apply_frees(self) -> list[tuple[int, int]]:
        """Apply pending decrements in memory; return the (offset, length) runs now unused."""
        emptied: list[tuple[int, int]] = []
        frees, self.pending_free = self.pending_free, []
        for offset, clusters in frees:
            first = offset // self.cs
            for idx in range(first, first + clusters):
                if self.add(idx, -1) == 0:
                    if emptied and emptied[-1][0] + emptied[-1][1] == idx * self.cs:
                        emptied[-1] = (emptied[-1][0], emptied[-1][1] + self.cs)
                    else:
                        emptied.append((idx * self.cs, self.cs))
        return emptied


def write_fresh_refcounts(f: BlockFile, meta: Meta, refs: array) -> None:
    """Write a complete new refcount table and blocks after the end of the file.

    ``refs`` holds the reference count of every cluster of the file; the new structures count
    themselves.  Nothing in use is touched, so until the caller points the header at the new
    table the image is exactly as before (a crash only leaves unreferenced clusters behind).
    """
    cs = meta.cluster_size
    code = refcount_typecode(meta.refcount_order)
    if code is None:
        raise UnsupportedFeatureError(
            "vmferry rebuilds 8/16/32/64-bit refcounts only", path=str(f.path)
        )
    per_block = cs * 8 >> meta.refcount_order
    limit = (1 << (1 << meta.refcount_order)) - 1
    n = len(refs)
    blocks = table = 0
    while True:  # the new table and blocks describe themselves too
        total = n + table + blocks
        nb = -(-total // per_block)
        nt = -(-nb * 8 // cs)
        if (nb, nt) == (blocks, table):
            break
        blocks, table = nb, nt
    if table * cs > MAX_REFTABLE_BYTES:
        raise ResourceLimitError("rebuilt refcount table would exceed 8 MiB", path=str(f.path))
    counts = array(code, bytes(array(code).itemsize * blocks * per_block))
    for i, v in enumerate(refs):
        if v > limit:
            raise ResourceLimitError(f"cluster {i} has more references than refcounts can hold")
        counts[i] = v
    for i in range(n, n + table + blocks):
        counts[i] = 1
    first_block = n + table
    for b in range(blocks):
        part = counts[b * per_block : (b + 1) * per_block]
        f.write((first_block + b) * cs, encode_refcounts(part))
    entries = array("Q", [(first_block + b) * cs for b in range(blocks)])
    entries.extend([0] * (table * cs // 8 - blocks))
    f.write(n * cs, be64_bytes(entries))
    meta.refcount_table_offset = n * cs
    meta.refcount_table_clusters = table
