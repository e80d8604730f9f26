"""FAT12/16/32 read and (narrow) write: the EFI system partition, with no kernel and no mtools.

Reading covers what inspection and the fix rules need: the fixed FAT12/16 root directory or the
FAT32 root cluster chain, subdirectories, VFAT long names (looked up case-insensitively, as
Linux does), and files read through their cluster chains.  Every chain is bounded: a loop, a
free or reserved cluster in the middle, a cluster number past the volume, or a chain shorter
than the file's size is a :class:`CorruptGuestError`.

Writing covers what repairs need: replace a regular file's content (its chain is kept as far as
it reaches, extended from free clusters or cut back) and create a file in an existing directory
(long-name entries plus a unique 8.3 short name; a full directory cluster chain grows by a
zeroed cluster).  Every FAT copy is written identically, the FAT32 FSInfo free count is set to
the exact count of free clusters, and every refusal (volume marked dirty, FAT copies that
differ, mirroring switched off, no room) comes before the first byte is written.
``fsck.fat -n`` is the judge in the tests.

FAT has no inodes; a file is identified by the byte offset of its short directory entry in the
volume (as Linux's ``i_pos``), the root directory by 1.  It has no permission bits, owners or
symbolic links either: ``stat`` reports 0o755 for directories and 0o644 for files (0o444 with the
read-only attribute), ``mode``/``uid``/``gid`` given to ``create_file`` are ignored, and
``symlink`` is refused.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmferry.guest.errors import (
    CorruptGuestError,
    GuestLimitError,
    GuestWriteRefusedError,
    NotADirectoryInGuestError,
)
from vmferry.guest.fs.fat_dir import (
    ATTR_ARCHIVE,
    ATTR_DIR,
    ATTR_LFN,
    ATTR_READONLY,
    ATTR_VOLUME,
    END,
    ENTRY,
    FREE,
    MAX_DIR_ENTRIES,
    Dirent,
    Slots,
    check_long_name,
    fold,
    lfn_checksum,
    lfn_entries,
    parse_directory,
    parse_short,
    short_entry,
    short_name_for,
    updated_entry,
)
from vmferry.guest.fs.fat_layout import (
    BOOT_DIRTY,
    FAT16_CLEAN,
    FAT16_NO_ERROR,
    FAT32_CLEAN,
    FAT32_NO_ERROR,
    FsInfo,
    parse_boot_sector,
)
from vmferry.guest.fs.tree import DIR_CACHE_DIRS, MAX_FILE_READ, TreeFilesystem
from vmferry.guest.fs.types import DirEntry, GuestFileNotFound, Stat
from vmferry.guest.overlay import ReadableDisk

ROOT_INO = 1


@dataclass(frozen=True)
class FatNode:
    """What path lookup needs of a file or directory: its identity, kind, chain start and size."""

    ino: int
    kind: str
    cluster: int  # first cluster; 0 for an empty file, and for the FAT12/16 root
    size: int
    attr: int


class FatFilesystem(TreeFilesystem):
    """One FAT12/16/32 volume on ``dev`` (a partition :class:`Slice` or a whole disk)."""

    type = "vfat"

    def __init__(self, dev: ReadableDisk) -> None:
        self.dev = dev
        if dev.virtual_size < 512:
            raise CorruptGuestError("too small to hold a FAT boot sector")
        head = dev.read(0, min(dev.virtual_size, 4096))
        self.geo = geo = parse_boot_sector(head, dev.virtual_size)
        self.boot = dev.read(0, geo.bytes_per_sector)
        self.fat32 = geo.fat_bits == 32
        self._fat: bytearray | None = None
        self._free: int | None = None
        self._fat_dirty: set[int] = set()  # sector indices inside one FAT copy
        self._dir_cache: dict[int, dict[str, int]] = {}
        self._listing: dict[int, tuple[list[Dirent], Slots, list[int]]] = {}
        self._label: str | None = None
        self._writable_checked = False
        self._last_alloc = 0

    # --- identity -------------------------------------------------------------------------------

    @property
    def root_ino(self) -> int:
        return ROOT_INO

    @property
    def fat_bits(self) -> int:
        return self.geo.fat_bits

    @property
    def uuid(self) -> str:
        return self.geo.uuid

    @property
    def label(self) -> str:
        """The root directory's volume-label entry, else the boot sector's (as blkid reports)."""
        if self._label is None:
            _, label, _ = self._read_dir(self.inode(ROOT_INO))
            self._label = label if label is not None else self.geo.boot_label
            if self._label == "NO NAME":
                self._label = ""
        return self._label

    # --- the FAT --------------------------------------------------------------------------------

    def _table(self) -> bytearray:
        """The active FAT copy, read whole once (its size was bounded by the BPB check)."""
        if self._fat is None:
            geo = self.geo
            copy = geo.ext_flags & 0xF if self.fat32 and geo.ext_flags & 0x80 else 0
            if copy >= geo.num_fats:
                raise CorruptGuestError(f"active FAT {copy} does not exist")
            self._fat = bytearray(self.dev.read(geo.fat_offset(copy), geo.fat_bytes))
        return self._fat

    def _get(self, n: int) -> int:
        fat = self._table()
        bits = self.geo.fat_bits
        if bits == 12:
            v = fat[n + n // 2] | (fat[n + n // 2 + 1] << 8)
            return v >> 4 if n & 1 else v & 0xFFF
        if bits == 16:
            return struct.unpack_from("<H", fat, 2 * n)[0]
        return struct.unpack_from("<I", fat, 4 * n)[0] & 0x0FFFFFFF

    def _set(self, n: int, value: int) -> None:
        if self._free is not None:
            self._free += (value == 0) - (self._get(n) == 0)
        fat = self._table()
        bits = self.geo.fat_bits
        if bits == 12:
            at = n + n // 2
            v = fat[at] | (fat[at + 1] << 8)
            v = (v & 0x000F) | (value << 4) if n & 1 else (v & 0xF000) | value
            struct.pack_into("<H", fat, at, v)
            span = (at, at + 2)
        elif bits == 16:
            struct.pack_into("<H", fat, 2 * n, value)
            span = (2 * n, 2 * n + 2)
        else:  # the top four bits are reserved and kept
            old = struct.unpack_from("<I", fat, 4 * n)[0]
            struct.pack_into("<I", fat, 4 * n, (old & 0xF0000000) | value)
            span = (4 * n, 4 * n + 4)
        bps = self.geo.bytes_per_sector
        self._fat_dirty.update(range(span[0] // bps, (span[1] - 1) // bps + 1))

    def chain(self, first: int, *, limit: int | None = None, what: str = "file") -> list[int]:
        """The clusters of the chain starting at ``first`` (at most ``limit`` of them)."""
        geo = self.geo
        last_valid = geo.cluster_count + 1
        out: list[int] = []
        seen: set[int] = set()
        cur = first
        bad = geo.end_of_chain - 1
        while True:
            if not 2 <= cur <= last_valid:
                raise CorruptGuestError(f"{what}: cluster {cur} lies outside 2..{last_valid}")
            if cur in seen:
                raise CorruptGuestError(f"{what}: cluster chain loops back to cluster {cur}")
            seen.add(cur)
            out.append(cur)
            if limit is not None and len(out) >= limit:
                return out
            nxt = self._get(cur)
            if nxt >= geo.end_of_chain:
                return out
            if nxt == bad:
                raise CorruptGuestError(f"{what}: cluster chain runs into a bad cluster")
            if nxt in (0, 1) or nxt > last_valid:
                raise CorruptGuestError(
                    f"{what}: cluster {cur} links to {nxt:#x}, which is not a cluster"
                )
            cur = nxt

    def free_clusters(self) -> int:
        """Free data clusters, counted in the FAT once (exact; FSInfo's count is only a hint)
        and kept up to date by every change after that."""
        if self._free is None:
            get = self._get
            self._free = sum(1 for n in range(2, self.geo.cluster_count + 2) if get(n) == 0)
        return self._free

    # --- nodes and directories ------------------------------------------------------------------

    def inode(self, ino: int) -> FatNode:
        geo = self.geo
        if ino == ROOT_INO:
            return FatNode(ROOT_INO, "dir", geo.root_cluster, 0, ATTR_DIR)
        if ino % ENTRY or not geo.fat_offset(geo.num_fats) <= ino <= self.dev.virtual_size - 32:
            raise CorruptGuestError(f"no FAT directory entry at byte {ino}")
        raw = self.dev.read(ino, ENTRY)
        if raw[0] in (FREE, END) or raw[11] & 0x3F == ATTR_LFN or raw[11] & ATTR_VOLUME:
            raise CorruptGuestError(f"the FAT directory entry at byte {ino} is not a file")
        e = parse_short(raw, ino, "", self.fat32)
        if e.kind == "dir" and e.cluster == 0:
            if e.short == b"..         ":  # a child of the root names its parent cluster 0
                return FatNode(ROOT_INO, "dir", geo.root_cluster, 0, ATTR_DIR)
            raise CorruptGuestError(f"the FAT directory at byte {ino} has no cluster")
        return FatNode(ino, e.kind, e.cluster, e.size, e.attr)

    def _dir_clusters(self, node: FatNode) -> list[int]:
        """The clusters of a directory; [] for the fixed FAT12/16 root."""
        if node.ino == ROOT_INO and not self.fat32:
            return []
        per = self.geo.cluster_size // ENTRY
        limit = -(-MAX_DIR_ENTRIES // per)
        clusters = self.chain(node.cluster, limit=limit + 1, what=f"directory at {node.ino}")
        if len(clusters) > limit:
            raise GuestLimitError(f"directory at {node.ino} is over {MAX_DIR_ENTRIES} entries")
        return clusters

    def _read_dir(self, node: FatNode) -> tuple[list[Dirent], str | None, Slots]:
        if node.kind != "dir":
            raise NotADirectoryInGuestError(f"FAT entry at {node.ino} is not a directory")
        geo = self.geo
        clusters = self._dir_clusters(node)
        if not clusters:
            base = geo.root_dir_offset
            data = self.dev.read(base, geo.root_dir_bytes)

            def position(i: int) -> int:
                return base + i * ENTRY

        else:
            cs = geo.cluster_size
            data = b"".join(self.dev.read(geo.cluster_offset(c), cs) for c in clusters)
            per = cs // ENTRY

            def position(i: int) -> int:
                return geo.cluster_offset(clusters[i // per]) + (i % per) * ENTRY

        return parse_directory(data, position, self.fat32)

    def _entries(self, node: FatNode) -> list[Dirent]:
        """Cached listing of a directory (dropped by every write to it)."""
        cached = self._listing.get(node.ino)
        if cached is None:
            entries, _, slots = self._read_dir(node)
            if len(self._listing) >= DIR_CACHE_DIRS:
                self._listing.pop(next(iter(self._listing)))
            cached = (entries, slots, self._dir_clusters(node))
            self._listing[node.ino] = cached
        return cached[0]

    def _dir_entries(self, node: FatNode) -> list[DirEntry]:
        return [DirEntry(e.name, e.pos, e.kind) for e in self._entries(node)]

    def _lookup_in(self, dir_ino: int, name: str) -> int | None:
        """Case-insensitive (ASCII) match against long and short names, as Linux vfat."""
        names = self._dir_cache.get(dir_ino)
        if names is None:
            names = {}
            for e in self._entries(self.inode(dir_ino)):
                if e.short[:2] in (b". ", b"..") and e.short[2:].strip(b" ") == b"":
                    continue
                names.setdefault(fold(e.name), e.pos)
                names.setdefault(fold(e.short_name), e.pos)
            if len(self._dir_cache) >= DIR_CACHE_DIRS:
                self._dir_cache.pop(next(iter(self._dir_cache)))
            self._dir_cache[dir_ino] = names
        return names.get(fold(name))

    def _readlink_node(self, node: FatNode) -> str:
        raise GuestFileNotFound("FAT has no symbolic links", path=str(node.ino))

    def read_inode_data(
        self, node: FatNode, limit: int = MAX_FILE_READ, head: int | None = None
    ) -> bytes:
        """The file's bytes; only the first ``head`` bytes when given."""
        size = node.size if head is None else min(node.size, head)
        if size > limit:
            raise GuestLimitError(f"FAT file at {node.ino} holds {size} bytes, over {limit}")
        if node.size == 0:
            return b""
        cs = self.geo.cluster_size
        if node.cluster == 0:
            raise CorruptGuestError(f"FAT file at {node.ino} has {node.size} bytes and no cluster")
        need = -(-size // cs)
        clusters = self.chain(node.cluster, limit=-(-node.size // cs), what=f"file at {node.ino}")
        if len(clusters) * cs < node.size:
            raise CorruptGuestError(
                f"FAT file at {node.ino} is {node.size} bytes but its chain holds "
                f"{len(clusters) * cs}"
            )
        buf = bytearray()
        run_start, run_len = clusters[0], 0
        for c in [*clusters[:need], -1]:
            if c == run_start + run_len:
                run_len += 1
                continue
            buf += self.dev.read(self.geo.cluster_offset(run_start), run_len * cs)
            run_start, run_len = c, 1
        return bytes(buf[:size])

    # --- the GuestFS interface ------------------------------------------------------------------

    def stat(self, path: str, *, follow: bool = True) -> Stat:
        node = self.resolve(path, follow=follow)
        perm = 0o755 if node.kind == "dir" else 0o644
        if node.attr & ATTR_READONLY:
            perm &= 0o555
        return Stat(node.ino, node.kind, node.size, perm)

    def read_head(self, path: str, length: int) -> bytes:
        return self.read_inode_data(self._regular(path), MAX_FILE_READ, head=length)

    # --- writing: checks ------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Refuse (named) unless a write can keep the volume exactly as consistent as it is."""
        if getattr(self.dev, "write", None) is None:
            raise GuestWriteRefusedError("this FAT filesystem was opened read-only")
        if self._writable_checked:
            return
        geo = self.geo
        fsck = "run fsck.fat on it (or boot the guest and shut it down cleanly) first"
        if self.boot[geo.state_offset] & BOOT_DIRTY:
            raise GuestWriteRefusedError(
                "the FAT filesystem is marked dirty (it was not cleanly unmounted)", hint=fsck
            )
        if geo.fat_bits != 12:
            clean, ok = (
                (FAT32_CLEAN, FAT32_NO_ERROR) if self.fat32 else (FAT16_CLEAN, FAT16_NO_ERROR)
            )
            flags = self._get(1)
            if not flags & clean:
                raise GuestWriteRefusedError(
                    "the FAT filesystem's FAT[1] says it was not cleanly unmounted", hint=fsck
                )
            if not flags & ok:
                raise GuestWriteRefusedError(
                    "the FAT filesystem's FAT[1] records disk I/O errors", hint=fsck
                )
        if self.fat32 and geo.ext_flags & 0x80:
            raise GuestWriteRefusedError(
                "FAT mirroring is switched off on this FAT32 volume; vmferry keeps every copy "
                "identical and will not pick one"
            )
        first = self._table()[: geo.fat_used_bytes]
        for copy in range(1, geo.num_fats):
            if self.dev.read(geo.fat_offset(copy), geo.fat_used_bytes) != first:
                raise GuestWriteRefusedError(
                    f"FAT copy {copy + 1} differs from the first", hint=fsck
                )
        self._writable_checked = True

    def _writer(self) -> object:
        self.check_writable()
        return self.dev

    def _refuse_full(self, clusters: int, path: str) -> None:
        free = self.free_clusters()
        if clusters > free:
            raise GuestWriteRefusedError(
                f"{path}: needs {clusters} free clusters of {self.geo.cluster_size} bytes, the "
                f"FAT filesystem has {free}",
                hint="nothing was written",
            )

    # --- writing: replace a file's content ------------------------------------------------------

    def write_file(self, path: str, data: bytes) -> None:
        """Replace the content of the existing regular file at ``path`` with ``data``."""
        self.check_writable()
        node = self.resolve(path)
        if node.kind != "file":
            raise GuestWriteRefusedError(f"{path}: not a regular file")
        if len(data) > 0xFFFFFFFF:
            raise GuestWriteRefusedError(f"{path}: FAT files stop at 4 GiB - 1")
        cs = self.geo.cluster_size
        old: list[int] = []
        if node.cluster:
            old = self.chain(node.cluster, what=path)
        if len(old) * cs < node.size or (node.size and not old):
            raise CorruptGuestError(f"{path}: the cluster chain is shorter than the file")
        need = -(-len(data) // cs)
        self._refuse_full(need - len(old), path)
        keep = old[:need] + self._allocate(need - len(old))
        self._write_data(keep, data)
        for c in old[need:]:
            self._set(c, 0)
        self._link(keep)
        self._flush_fat()
        raw = self.dev.read(node.ino, ENTRY)
        self._write_at(node.ino, updated_entry(raw, keep[0] if keep else 0, len(data), self.fat32))
        self._flush_fsinfo()

    def _allocate(self, count: int) -> list[int]:
        """``count`` free clusters, first fit after the last allocation (wrapping), marked EOC."""
        if count <= 0:
            return []
        geo = self.geo
        out: list[int] = []
        total = geo.cluster_count
        start = self._last_alloc + 1 if self._last_alloc else self._fsinfo_hint()
        for step in range(total):
            n = 2 + (start - 2 + step) % total
            if self._get(n) == 0:
                self._set(n, 0x0FFFFFFF & ((1 << geo.fat_bits) - 1))
                out.append(n)
                if len(out) == count:
                    self._last_alloc = n
                    return out
        raise GuestWriteRefusedError("the FAT filesystem ran out of free clusters")

    def _fsinfo_hint(self) -> int:
        info = self._fsinfo()
        if info is not None and 2 <= info[1].next_free <= self.geo.cluster_count + 1:
            return info[1].next_free
        return 2

    def _link(self, clusters: list[int]) -> None:
        if not clusters:
            return
        eoc = 0x0FFFFFFF & ((1 << self.geo.fat_bits) - 1)
        for a, b in zip(clusters, [*clusters[1:], eoc], strict=True):
            self._set(a, b)

    def _write_data(self, clusters: list[int], data: bytes | bytearray) -> None:
        cs = self.geo.cluster_size
        for i, c in enumerate(clusters):
            chunk = bytes(data[i * cs : (i + 1) * cs])
            self._write_at(self.geo.cluster_offset(c), chunk.ljust(cs, b"\0"))

    def _write_at(self, offset: int, data: bytes | bytearray) -> None:
        self._writer().write(offset, data)  # type: ignore[attr-defined]

    def _flush_fat(self) -> None:
        """Write each changed FAT sector into every FAT copy, so all copies stay identical."""
        geo, fat = self.geo, self._table()
        bps = geo.bytes_per_sector
        for s in sorted(self._fat_dirty):
            for copy in range(geo.num_fats):
                self._write_at(geo.fat_offset(copy) + s * bps, fat[s * bps : (s + 1) * bps])
        self._fat_dirty.clear()

    def _fsinfo(self) -> tuple[int, FsInfo] | None:
        if not self.fat32 or not self.geo.fsinfo_sector:
            return None
        at = self.geo.fsinfo_sector * self.geo.bytes_per_sector
        info = FsInfo.parse(self.dev.read(at, 512))
        return None if info is None else (at, info)

    def _flush_fsinfo(self) -> None:
        """FSInfo gets the exact free count (also when it said "unknown": fsck.fat asks for it)
        and the last allocated cluster as the next-free hint, as Linux keeps it."""
        found = self._fsinfo()
        if found is None:
            return
        at, info = found
        free = self.free_clusters()
        nxt = self._last_alloc or info.next_free
        if (free, nxt) == (info.free_count, info.next_free):
            return
        buf = bytearray(self.dev.read(at, 512))
        FsInfo(free, nxt).pack_into(buf)
        self._write_at(at, buf)

    # --- writing: new files ---------------------------------------------------------------------

    def create_file(
        self, path: str, data: bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0
    ) -> int:
        """Create the regular file ``path`` in an existing directory; returns its entry offset.

        ``mode``, ``uid`` and ``gid`` are accepted for the common interface and ignored: FAT
        stores none of them (the guest's mount options decide what Linux shows).
        """
        parent, name, units = self._new_entry_target(path)
        short, ntres, long_needed = short_name_for(name, self._slots(parent).shorts)
        lfn = lfn_entries(units, lfn_checksum(short)) if long_needed else []
        cs = self.geo.cluster_size
        need = -(-len(data) // cs)
        at, grow = self._place(parent, len(lfn) + 1, path)
        self._refuse_full(need + grow, path)
        if len(data) > 0xFFFFFFFF:
            raise GuestWriteRefusedError(f"{path}: FAT files stop at 4 GiB - 1")
        clusters = self._allocate(need)
        self._write_data(clusters, data)
        self._link(clusters)
        positions = self._grow_dir(parent, grow, at + len(lfn) + 1)
        self._flush_fat()
        entry = short_entry(short, ntres, ATTR_ARCHIVE, clusters[0] if clusters else 0, len(data))
        for i, raw in enumerate([*lfn, entry]):
            self._write_at(positions[at + i], raw)
        self._flush_fsinfo()
        self._forget(parent)
        return positions[at + len(lfn)]

    def symlink(self, path: str, target: str, *, uid: int = 0, gid: int = 0) -> int:
        raise GuestWriteRefusedError(f"{path}: FAT filesystems cannot hold symbolic links")

    def check_creatable(self, path: str, size: int = 0) -> None:
        """Raise the refusal ``create_file`` would raise for ``size`` bytes, without writing."""
        parent, name, units = self._new_entry_target(path)
        _, _, long_needed = short_name_for(name, self._slots(parent).shorts)
        slots = 1 + (-(-len(units) // 26) if long_needed else 0)
        _, grow = self._place(parent, slots, path)
        self._refuse_full(-(-size // self.geo.cluster_size) + grow, path)

    def check_create_file(self, path: str, data: bytes) -> None:
        """``check_creatable`` for this content (the fix writer's content check)."""
        self.check_creatable(path, len(data))

    def _new_entry_target(self, path: str) -> tuple[FatNode, str, bytes]:
        self.check_writable()
        parent_path, _, name = path.rstrip("/").rpartition("/")
        units = check_long_name(name)
        parent = self.resolve(parent_path or "/")
        if parent.kind != "dir":
            raise NotADirectoryInGuestError(f"{parent_path}: not a directory")
        if self._lookup_in(parent.ino, name) is not None:
            raise GuestWriteRefusedError(f"{path}: already exists (FAT names ignore case)")
        return parent, name, units

    def _slots(self, parent: FatNode) -> Slots:
        self._entries(parent)
        return self._listing[parent.ino][1]

    def _place(self, parent: FatNode, n: int, path: str) -> tuple[int, int]:
        """(index of the first of ``n`` consecutive free entries, clusters the directory must
        grow by for them); refused when the directory cannot hold them."""
        slots = self._slots(parent)
        for first, length in slots.free_runs:
            if length >= n and first + length < slots.count:
                return first, 0  # a hole before the end marker's run
        for first, length in slots.free_runs:
            if length >= n:
                return first, 0
        tail = slots.free_runs[-1] if slots.free_runs else (slots.count, 0)
        first = tail[0] if tail[0] + tail[1] == slots.count else slots.count
        missing = first + n - slots.count
        if parent.ino == ROOT_INO and not self.fat32:
            raise GuestWriteRefusedError(
                f"{path}: the FAT{self.geo.fat_bits} root directory is full "
                f"({self.geo.root_entries} entries)"
            )
        per = self.geo.cluster_size // ENTRY
        grow = -(-missing // per)
        if slots.count + grow * per > MAX_DIR_ENTRIES:
            raise GuestWriteRefusedError(f"{path}: the directory would pass {MAX_DIR_ENTRIES}")
        return first, grow

    def _grow_dir(self, parent: FatNode, grow: int, upto: int) -> list[int]:
        """Positions of the directory's entries up to ``upto`` after adding ``grow`` zeroed
        clusters to its chain (the FAT is flushed by the caller)."""
        geo = self.geo
        if parent.ino == ROOT_INO and not self.fat32:
            return [geo.root_dir_offset + i * ENTRY for i in range(upto)]
        clusters = list(self._listing[parent.ino][2])
        if grow:
            new = self._allocate(grow)
            for c in new:
                self._write_at(geo.cluster_offset(c), bytes(geo.cluster_size))
            self._link([clusters[-1], *new])
            clusters += new
        per = geo.cluster_size // ENTRY
        return [geo.cluster_offset(clusters[i // per]) + (i % per) * ENTRY for i in range(upto)]

    def _forget(self, parent: FatNode) -> None:
        self._listing.pop(parent.ino, None)
        self._dir_cache.pop(parent.ino, None)
