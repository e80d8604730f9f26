"""ext2/ext3/ext4 read and (narrow) write, with no kernel, no loop device and no e2fsprogs.

Reading covers what inspection needs: superblock and features, 32/64-bit group descriptors
(also in meta_bg layout), inodes, extent trees of any depth and indirect blocks, linear
directories (htree directories read as linear: their index blocks look like empty entries),
fast and slow symlinks, and path lookup with symlinks resolved inside the filesystem, bounded.

Writing covers what repairs need: replace the content of an existing regular file, and add a
file or symlink to a directory (an indexed one only where the name's leaf has room).  The file's
old blocks are freed and new ones allocated, so growing, shrinking and fragmentation all go
through one path; bitmaps, group descriptor and superblock free counts, and every metadata_csum
(or uninit_bg) checksum touched are recomputed.  ``e2fsck -fn`` is the judge in the tests.

Refusals (named, never a half-edit): a journal that needs recovery (data may be stale), an
incompatible feature vmferry does not know, and for writes any read-only-compatible feature
whose bookkeeping it does not maintain (quota, bigalloc, snapshots, ...).
"""

from __future__ import annotations

import stat as _stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from vmferry.errors import InspectionError
from vmferry.guest.errors import (
    CorruptGuestError,
    GuestLimitError,
    GuestWriteRefusedError,
    NotADirectoryInGuestError,
    UnsupportedGuestFeatureError,
)
from vmferry.guest.fs import clock
from vmferry.guest.fs.ext_hash import effective_version, name_hash
from vmferry.guest.fs.ext_layout import (
    BG_BLOCK_UNINIT,
    BG_INODE_UNINIT,
    COMPAT,
    COMPAT_DIR_INDEX,
    DX_ROOT_INFO,
    EXT4_APPEND_FL,
    EXT4_CASEFOLD_FL,
    EXT4_EA_INODE_FL,
    EXT4_ENCRYPT_FL,
    EXT4_EXTENTS_FL,
    EXT4_HUGE_FILE_FL,
    EXT4_IMMUTABLE_FL,
    EXT4_INDEX_FL,
    EXT4_INLINE_DATA_FL,
    EXT4_VERITY_FL,
    EXT_MAGIC,
    EXTENT_MAGIC,
    GD_CHECKSUM_OFFSET,
    INCOMPAT,
    INCOMPAT_64BIT,
    INCOMPAT_CSUM_SEED,
    INCOMPAT_EXTENTS,
    INCOMPAT_LARGEDIR,
    INCOMPAT_META_BG,
    INCOMPAT_READ_OK,
    INCOMPAT_RECOVER,
    INODE_CSUM_HI,
    INODE_CSUM_LO,
    INODE_EXTRA_ISIZE,
    RO_COMPAT,
    RO_COMPAT_GDT_CSUM,
    RO_COMPAT_METADATA_CSUM,
    RO_COMPAT_SPARSE_SUPER,
    RO_COMPAT_WRITE_OK,
    SUPERBLOCK_OFFSET,
    DirEntryHead,
    ExtentHeader,
    ExtentIndex,
    ExtentLeaf,
    GroupDesc,
    InodeBase,
    Superblock,
    crc16,
    crc32c_raw,
    feature_names,
)
from vmferry.guest.fs.tree import MAX_FILE_READ, MAX_PATH, TreeFilesystem
from vmferry.guest.fs.types import DirEntry, Stat, kind_of_mode
from vmferry.guest.overlay import ReadableDisk

ROOT_INO = 2
MAX_DIR_BYTES = 64 << 20
MAX_EXTENT_DEPTH = 5
MAX_GROUPS = 1 << 22

S_IFMT = 0o170000
_FT_KIND = {1: "file", 2: "dir", 3: "chr", 4: "blk", 5: "fifo", 6: "sock", 7: "symlink"}


@dataclass
class Inode:
    """A parsed inode plus its raw bytes (kept so a rewrite preserves every unknown field)."""

    ino: int
    base: InodeBase
    raw: bytearray

    @property
    def mode(self) -> int:
        return self.base.mode

    @property
    def size(self) -> int:
        return self.base.size_lo | (self.base.size_high << 32)

    @property
    def kind(self) -> str:
        return kind_of_mode(self.mode)


@dataclass
class _Group:
    desc: GroupDesc
    block_bitmap: int
    inode_table: int
    free_blocks: int


class ExtFilesystem(TreeFilesystem):
    """One ext2/3/4 filesystem on ``dev`` (a partition :class:`Slice` or a whole disk)."""

    type = "ext"

    @property
    def root_ino(self) -> int:
        return ROOT_INO

    def __init__(self, dev: ReadableDisk) -> None:
        self.dev = dev
        if dev.virtual_size < SUPERBLOCK_OFFSET + Superblock.size:
            raise CorruptGuestError("too small to hold an ext superblock")
        self._sb_raw = dev.read(SUPERBLOCK_OFFSET, Superblock.size)
        self.sb = sb = Superblock.unpack(self._sb_raw)
        if sb.magic != EXT_MAGIC:
            raise CorruptGuestError("no ext2/3/4 superblock (bad magic)")
        self._check_features()
        if not 0 <= sb.log_block_size <= 6:
            raise CorruptGuestError(f"block size 2^(10+{sb.log_block_size}) is impossible")
        self.block_size = 1024 << sb.log_block_size
        self.is64 = bool(sb.feature_incompat & INCOMPAT_64BIT)
        self.blocks_count = sb.blocks_count_lo | ((sb.blocks_count_hi << 32) if self.is64 else 0)
        self.metadata_csum = bool(sb.feature_ro_compat & RO_COMPAT_METADATA_CSUM)
        self.gdt_csum = bool(sb.feature_ro_compat & RO_COMPAT_GDT_CSUM) and not self.metadata_csum
        if self.metadata_csum:
            self._check_sb_csum()
        self._check_geometry()
        self.csum_seed = 0
        if self.metadata_csum:
            if sb.feature_incompat & INCOMPAT_CSUM_SEED:
                self.csum_seed = sb.checksum_seed
            else:
                self.csum_seed = crc32c_raw(0xFFFFFFFF, sb.uuid)
        self._groups: dict[int, _Group] = {}
        self._dir_cache: dict[int, dict[str, int]] = {}
        self._dirty_groups: set[int] = set()
        self._free_delta = 0  # blocks freed minus allocated since the superblock was written
        self._free_inodes_delta = 0
        self._block_dirty: set[int] = set()
        self._inode_dirty: set[int] = set()

    # --- identity -------------------------------------------------------------------------------

    @property
    def uuid(self) -> str:
        u = self.sb.uuid.hex()
        return f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"

    @property
    def label(self) -> str:
        return self.sb.volume_name.split(b"\0", 1)[0].decode("utf-8", "replace")

    @property
    def version(self) -> str:
        """ext2, ext3 or ext4, decided by features as blkid does."""
        sb = self.sb
        ext4_incompat = sb.feature_incompat & ~(0x2 | 0x4 | 0x10)  # beyond filetype/recover/meta
        ext4_ro = sb.feature_ro_compat & ~(0x1 | 0x2 | 0x4)
        if ext4_incompat or ext4_ro:
            return "ext4"
        return "ext3" if sb.feature_compat & 0x4 else "ext2"

    @property
    def features(self) -> list[str]:
        sb = self.sb
        return (
            feature_names(sb.feature_compat, COMPAT)
            + feature_names(sb.feature_incompat, INCOMPAT)
            + feature_names(sb.feature_ro_compat, RO_COMPAT)
        )

    # --- validation -----------------------------------------------------------------------------

    def _check_features(self) -> None:
        sb = self.sb
        if sb.feature_incompat & INCOMPAT_RECOVER:
            raise InspectionError(
                "the ext filesystem's journal needs recovery (it was not cleanly unmounted)",
                hint="boot the guest once and shut it down cleanly, or run e2fsck on a copy",
            )
        unknown = [
            n for n in feature_names(sb.feature_incompat, INCOMPAT) if n not in INCOMPAT_READ_OK
        ]
        if unknown:
            raise UnsupportedGuestFeatureError(
                f"ext filesystem uses incompatible feature(s) {', '.join(unknown)}",
                features=unknown,
            )

    def _check_sb_csum(self) -> None:
        if self.sb.checksum_type != 1:
            raise CorruptGuestError(f"unknown metadata checksum type {self.sb.checksum_type}")
        if crc32c_raw(0xFFFFFFFF, self._sb_raw[:0x3FC]) != self.sb.checksum:
            raise CorruptGuestError("ext superblock checksum mismatch")

    def _check_geometry(self) -> None:
        sb, bs = self.sb, self.block_size
        if sb.blocks_per_group == 0 or sb.blocks_per_group > 8 * bs:
            raise CorruptGuestError(f"{sb.blocks_per_group} blocks per group is impossible")
        if sb.inodes_per_group == 0 or sb.inodes_per_group > 8 * bs:
            raise CorruptGuestError(f"{sb.inodes_per_group} inodes per group is impossible")
        if self.blocks_count * bs > self.dev.virtual_size:
            raise CorruptGuestError(
                f"filesystem claims {self.blocks_count} blocks of {bs} bytes, more than the "
                f"{self.dev.virtual_size}-byte partition holds"
            )
        if sb.first_data_block >= self.blocks_count:
            raise CorruptGuestError("first data block lies past the filesystem")
        self.group_count = -(-(self.blocks_count - sb.first_data_block) // sb.blocks_per_group)
        if self.group_count > MAX_GROUPS:
            raise GuestLimitError(f"{self.group_count} block groups")
        if sb.inodes_count > self.group_count * sb.inodes_per_group:
            raise CorruptGuestError(
                f"inode count {sb.inodes_count} exceeds {self.group_count} groups of "
                f"{sb.inodes_per_group}"
            )
        self.inode_size = sb.inode_size if sb.rev_level >= 1 else 128
        if self.inode_size < 128 or self.inode_size > bs or self.inode_size & (self.inode_size - 1):
            raise CorruptGuestError(f"inode size {self.inode_size} is impossible")
        if self.is64:
            self.desc_size = sb.desc_size
            if (
                self.desc_size < 32
                or self.desc_size > 1024
                or self.desc_size & (self.desc_size - 1)
            ):
                raise CorruptGuestError(f"group descriptor size {self.desc_size} is impossible")
        else:
            self.desc_size = 32

    # --- blocks and groups ----------------------------------------------------------------------

    def read_blocks(self, block: int, count: int = 1, what: str = "block") -> bytes:
        if block < 0 or count < 0 or block + count > self.blocks_count:
            raise CorruptGuestError(
                f"{what} {block}+{count} lies outside the filesystem ({self.blocks_count} blocks)"
            )
        return self.dev.read(block * self.block_size, count * self.block_size)

    def _write_block(self, block: int, data: bytes | bytearray) -> None:
        if not 0 < block < self.blocks_count or len(data) % self.block_size:
            raise CorruptGuestError(f"refusing to write block {block}: outside the filesystem")
        self._writer().write(block * self.block_size, data)

    def _writer(self) -> object:
        if getattr(self.dev, "write", None) is None:
            raise GuestWriteRefusedError("this filesystem was opened read-only")
        return self.dev

    def _has_super(self, group: int) -> bool:
        if group <= 1 or not self.sb.feature_ro_compat & RO_COMPAT_SPARSE_SUPER:
            return True
        for base in (3, 5, 7):
            n = base
            while n < group:
                n *= base
            if n == group:
                return True
        return False

    def _desc_location(self, group: int) -> int:
        """Byte offset of the descriptor of ``group`` (classic or meta_bg layout)."""
        per_block = self.block_size // self.desc_size
        gdt_block = group // per_block
        sb = self.sb
        if sb.feature_incompat & INCOMPAT_META_BG and gdt_block >= sb.first_meta_bg:
            first_group = gdt_block * per_block
            block = sb.first_data_block + first_group * sb.blocks_per_group
            block += 1 if self._has_super(first_group) else 0
        else:
            block = sb.first_data_block + 1 + gdt_block
        if block >= self.blocks_count:
            raise CorruptGuestError(f"descriptor block of group {group} is past the filesystem")
        return block * self.block_size + (group % per_block) * self.desc_size

    def group(self, g: int) -> _Group:
        if not 0 <= g < self.group_count:
            raise CorruptGuestError(f"block group {g} does not exist")
        cached = self._groups.get(g)
        if cached is not None:
            return cached
        raw_desc = self.dev.read(self._desc_location(g), self.desc_size).ljust(64, b"\0")
        d = GroupDesc.unpack(raw_desc)
        hi = self.is64 and self.desc_size >= 64
        bb = d.block_bitmap_lo | ((d.block_bitmap_hi << 32) if hi else 0)
        it = d.inode_table_lo | ((d.inode_table_hi << 32) if hi else 0)
        free = d.free_blocks_count_lo | ((d.free_blocks_count_hi << 16) if hi else 0)
        grp = _Group(d, bb, it, free)
        self._groups[g] = grp
        return grp

    # --- inodes ---------------------------------------------------------------------------------

    def inode(self, ino: int) -> Inode:
        sb = self.sb
        if not 1 <= ino <= sb.inodes_count:
            raise CorruptGuestError(f"inode {ino} is out of range (1..{sb.inodes_count})")
        g, idx = divmod(ino - 1, sb.inodes_per_group)
        grp = self.group(g)
        off = grp.inode_table * self.block_size + idx * self.inode_size
        if grp.inode_table >= self.blocks_count or off + self.inode_size > self.dev.virtual_size:
            raise CorruptGuestError(f"inode table of group {g} lies past the filesystem")
        raw_ino = bytearray(self.dev.read(off, self.inode_size))
        return Inode(ino, InodeBase.unpack(raw_ino), raw_ino)

    def _inode_csum(self, node: Inode) -> int:
        buf = bytearray(node.raw)
        buf[INODE_CSUM_LO : INODE_CSUM_LO + 2] = b"\0\0"
        has_hi = self._inode_has_csum_hi(node)
        if has_hi:
            buf[INODE_CSUM_HI : INODE_CSUM_HI + 2] = b"\0\0"
        crc = crc32c_raw(self.csum_seed, struct.pack("<I", node.ino))
        crc = crc32c_raw(crc, struct.pack("<I", node.base.generation))
        crc = crc32c_raw(crc, buf)
        return crc if has_hi else crc & 0xFFFF

    def _inode_has_csum_hi(self, node: Inode) -> bool:
        if self.inode_size <= 128:
            return False
        extra = struct.unpack_from("<H", node.raw, INODE_EXTRA_ISIZE)[0]
        return extra >= 4

    def verify_inode(self, node: Inode) -> bool:
        """True when metadata_csum is off or the inode's checksum matches."""
        if not self.metadata_csum:
            return True
        stored = node.base.checksum_lo
        if self._inode_has_csum_hi(node):
            stored |= struct.unpack_from("<H", node.raw, INODE_CSUM_HI)[0] << 16
        return stored == self._inode_csum(node)

    # --- block maps -----------------------------------------------------------------------------

    def file_runs(self, node: Inode) -> list[tuple[int, int, int]]:
        """``(logical, physical, count)`` runs of the initialised data blocks of ``node``."""
        nblocks = -(-node.size // self.block_size)
        if node.base.flags & EXT4_INLINE_DATA_FL:
            raise UnsupportedGuestFeatureError(
                f"inode {node.ino} keeps its data inline", features=["inline_data"]
            )
        if node.base.flags & EXT4_EXTENTS_FL:
            runs: list[tuple[int, int, int]] = []
            self._walk_extents(node.base.block, MAX_EXTENT_DEPTH + 1, runs, None, node.ino)
            return [r for r in runs if r[0] < nblocks]
        return self._indirect_runs(node, nblocks, None)

    def _walk_extents(
        self,
        buf: bytes,
        max_depth: int,
        runs: list[tuple[int, int, int]],
        meta: list[int] | None,
        ino: int,
    ) -> None:
        hdr = ExtentHeader.unpack(buf)
        if hdr.magic != EXTENT_MAGIC:
            raise CorruptGuestError(f"inode {ino}: extent header has a bad magic")
        capacity = (len(buf) - ExtentHeader.size) // 12
        if hdr.entries > hdr.max or hdr.max > capacity:
            raise CorruptGuestError(f"inode {ino}: extent node claims {hdr.entries} entries")
        if hdr.depth >= max_depth:
            raise CorruptGuestError(f"inode {ino}: extent tree depth {hdr.depth} is impossible")
        for i in range(hdr.entries):
            at = ExtentHeader.size + 12 * i
            if hdr.depth == 0:
                e = ExtentLeaf.unpack(buf, at)
                length = e.len if e.len <= 32768 else e.len - 32768
                start = e.start_lo | (e.start_hi << 32)
                if start + length > self.blocks_count or (start == 0 and length):
                    raise CorruptGuestError(
                        f"inode {ino}: extent {start}+{length} points past the filesystem"
                    )
                if e.len <= 32768:  # uninitialised extents read as zeros
                    runs.append((e.block, start, length))
                if len(runs) > self.blocks_count:
                    raise GuestLimitError(f"inode {ino}: more extents than blocks")
            else:
                ix = ExtentIndex.unpack(buf, at)
                child = ix.leaf_lo | (ix.leaf_hi << 32)
                if meta is not None:
                    meta.append(child)
                self._walk_extents(
                    self.read_blocks(child, 1, f"inode {ino} extent block"),
                    hdr.depth,
                    runs,
                    meta,
                    ino,
                )

    def _indirect_runs(
        self, node: Inode, nblocks: int, meta: list[int] | None
    ) -> list[tuple[int, int, int]]:
        ptrs = struct.unpack_from("<15I", node.base.block)
        per = self.block_size // 4
        out: list[tuple[int, int, int]] = []

        def add(logical: int, phys: int) -> None:
            if phys == 0:
                return
            if phys >= self.blocks_count:
                raise CorruptGuestError(f"inode {node.ino}: block {phys} is past the filesystem")
            if out and out[-1][0] + out[-1][2] == logical and out[-1][1] + out[-1][2] == phys:
                out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
            else:
                out.append((logical, phys, 1))

        def walk(block: int, level: int, logical: int) -> None:
            if block == 0 or logical >= nblocks:
                return
            if meta is not None:
                meta.append(block)
            entries = struct.unpack(f"<{per}I", self.read_blocks(block, 1, "indirect block"))
            span = per ** (level - 1)
            for i, p in enumerate(entries):
                lb = logical + i * span
                if lb >= nblocks:
                    break
                if level == 1:
                    add(lb, p)
                else:
                    walk(p, level - 1, lb)

        for i in range(min(12, nblocks)):
            add(i, ptrs[i])
        logical = 12
        for level, p in ((1, ptrs[12]), (2, ptrs[13]), (3, ptrs[14])):
            walk(p, level, logical)
            logical += per**level
        return out

    def read_inode_data(
        self, node: Inode, limit: int = MAX_FILE_READ, head: int | None = None
    ) -> bytes:
        """The file's bytes (holes as zeros); only the first ``head`` bytes when given."""
        size = node.size if head is None else min(node.size, head)
        if size > limit:
            raise GuestLimitError(f"inode {node.ino} holds {size} bytes, over the {limit} limit")
        buf = bytearray(size)
        bs = self.block_size
        for logical, phys, count in self.file_runs(node):
            start = logical * bs
            n = min(count * bs, size - start)
            if n <= 0:
                continue
            buf[start : start + n] = self.read_blocks(phys, -(-n // bs), f"inode {node.ino}")[:n]
        return bytes(buf)

    # --- directories and paths ------------------------------------------------------------------

    def _dir_entries(self, node: Inode) -> Iterator[DirEntry]:
        if node.kind != "dir":
            raise NotADirectoryInGuestError(f"inode {node.ino} is not a directory")
        data = self.read_inode_data(node, MAX_DIR_BYTES)
        bs = self.block_size
        for base in range(0, len(data), bs):
            pos = base
            end = min(base + bs, len(data))
            while pos + DirEntryHead.size <= end:
                h = DirEntryHead.unpack(data, pos)
                if h.rec_len < 8 or pos + h.rec_len > end or h.rec_len % 4:
                    raise CorruptGuestError(
                        f"directory inode {node.ino}: bad entry length {h.rec_len}"
                    )
                if h.inode and h.name_len and 8 + h.name_len <= h.rec_len:
                    name = data[pos + 8 : pos + 8 + h.name_len].decode("utf-8", "surrogateescape")
                    kind = _FT_KIND.get(h.file_type, "unknown")
                    yield DirEntry(name, h.inode, kind)
                pos += h.rec_len

    def _readlink_node(self, node: Inode) -> str:
        size = node.size
        if size > MAX_PATH:
            raise CorruptGuestError(f"symlink inode {node.ino} is {size} bytes long")
        ea_sectors = self.block_size // 512 if node.base.file_acl_lo else 0
        fast = size < 60 and node.base.blocks_lo - ea_sectors == 0
        if node.base.flags & EXT4_INLINE_DATA_FL or fast:
            data = node.base.block[:size]
        else:
            data = self.read_inode_data(node, MAX_PATH)
        return data.decode("utf-8", "surrogateescape")

    # --- the GuestFS interface ------------------------------------------------------------------

    def stat(self, path: str, *, follow: bool = True) -> Stat:
        node = self.resolve(path, follow=follow)
        return Stat(node.ino, node.kind, node.size, node.mode & 0o7777)

    def read_head(self, path: str, length: int) -> bytes:
        """The first ``length`` bytes of a regular file (an ELF header, a magic number)."""
        return self.read_inode_data(self._regular(path), MAX_FILE_READ, head=length)

    # --- writing --------------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Refuse (named) unless every structure a write touches is one vmferry maintains."""
        self._writer()
        sb = self.sb
        bad = [
            n for n in feature_names(sb.feature_ro_compat, RO_COMPAT) if n not in RO_COMPAT_WRITE_OK
        ]
        if bad:
            raise GuestWriteRefusedError(
                f"vmferry does not write ext filesystems with {', '.join(bad)}"
            )
        if sb.log_cluster_size != sb.log_block_size:
            raise GuestWriteRefusedError("vmferry does not write bigalloc filesystems")
        if not sb.state & 1 or sb.state & 2:
            raise GuestWriteRefusedError(
                "the ext filesystem is not marked clean (or has errors recorded)",
                hint="run e2fsck on it first",
            )

    def write_file(self, path: str, data: bytes) -> None:
        """Replace the content of the existing regular file at ``path`` with ``data``."""
        self.check_writable()
        node = self.resolve(path)
        if node.kind != "file":
            raise GuestWriteRefusedError(f"{path}: not a regular file")
        self._check_inode_writable(node, path)
        self._replace_content(node, data)

    def append_file(self, path: str, data: bytes) -> None:
        """Append ``data`` to the existing regular file at ``path``.

        An extent-mapped file without holes keeps its blocks: the last partial block is filled,
        new blocks are allocated for the rest and the extent tree is rebuilt (any depth), so a
        tens-of-MB initramfs is not rewritten.  Other files (block-mapped, sparse,
        preallocated) are rewritten whole through :meth:`write_file`'s path.
        """
        self.check_writable()
        node = self.resolve(path)
        if node.kind != "file":
            raise GuestWriteRefusedError(f"{path}: not a regular file")
        self._check_inode_writable(node, path)
        if not data:
            return
        plan = self._append_plan(node)
        if plan is None:
            old = self.read_inode_data(node, MAX_FILE_READ - len(data))
            self._replace_content(node, old + bytes(data))
            return
        runs, meta = plan
        bs = self.block_size
        size = node.size
        nold = -(-size // bs)
        tail = size % bs
        data = bytes(data)
        new_size = size + len(data)
        if tail:
            last = next(p + nold - 1 - lb for lb, p, c in runs if lb <= nold - 1 < lb + c)
            block = bytearray(self.read_blocks(last, 1, f"inode {node.ino}"))
            take = min(bs - tail, len(data))
            block[tail:] = data[:take].ljust(bs - tail, b"\0")
            self._write_block(last, block)
            data = data[take:]
        for b in meta:
            self._set_blocks(b, 1, used=False)
        goal = (runs[-1][1] - self.sb.first_data_block) // self.sb.blocks_per_group if runs else 0
        nnew = -(-len(data) // bs)
        new_runs = self._allocate(nnew, goal) if nnew else []
        pos = 0
        for phys, count in new_runs:
            self._write_block(phys, data[pos : pos + count * bs].ljust(count * bs, b"\0"))
            pos += count * bs
        merged: list[tuple[int, int]] = []
        for phys, count in [(p, c) for _, p, c in runs] + new_runs:
            if merged and merged[-1][0] + merged[-1][1] == phys:
                merged[-1] = (merged[-1][0], merged[-1][1] + count)
            else:
                merged.append((phys, count))
        block_field, meta_blocks = self._build_extents(node, merged)
        self._finish_inode(node, block_field, new_size, nold + nnew + meta_blocks)
        self._flush_groups()

    def _append_plan(self, node: Inode) -> tuple[list[tuple[int, int, int]], list[int]] | None:
        """The file's runs and extent-tree blocks when it can be extended in place, else None."""
        if not node.base.flags & EXT4_EXTENTS_FL or self._uninit_extents(node):
            return None
        runs: list[tuple[int, int, int]] = []
        meta: list[int] = []
        self._walk_extents(node.base.block, MAX_EXTENT_DEPTH + 1, runs, meta, node.ino)
        runs.sort()
        expect = 0
        for lb, _, count in runs:
            if lb != expect:
                return None
            expect += count
        if expect != -(-node.size // self.block_size):
            return None
        return runs, meta

    def _check_inode_writable(self, node: Inode, path: str) -> None:
        flags = node.base.flags
        for flag, why in (
            (EXT4_INLINE_DATA_FL, "keeps its data inline"),
            (EXT4_ENCRYPT_FL, "is encrypted"),
            (EXT4_VERITY_FL, "is protected by fs-verity"),
            (EXT4_IMMUTABLE_FL | EXT4_APPEND_FL, "is immutable or append-only"),
            (EXT4_EA_INODE_FL, "is an extended-attribute inode"),
        ):
            if flags & flag:
                raise GuestWriteRefusedError(f"{path}: the file {why}")
        if not self.verify_inode(node):
            raise CorruptGuestError(f"{path}: inode {node.ino} fails its checksum")
        if flags & EXT4_EXTENTS_FL and not self.sb.feature_incompat & INCOMPAT_EXTENTS:
            raise CorruptGuestError(f"{path}: extent-mapped file on a filesystem without extents")

    def _replace_content(self, node: Inode, data: bytes | bytearray) -> None:
        """Free every block ``node`` holds, allocate and fill new ones, publish the inode."""
        use_extents = bool(node.base.flags & EXT4_EXTENTS_FL)
        bs = self.block_size
        nblocks = -(-len(data) // bs)
        self._plan_fits(nblocks, use_extents)
        # free everything the file holds now: data blocks and mapping blocks
        meta: list[int] = []
        if use_extents:
            runs: list[tuple[int, int, int]] = []
            self._walk_extents(node.base.block, MAX_EXTENT_DEPTH + 1, runs, meta, node.ino)
            old = [(p, c) for _, p, c in runs] + [(b, 1) for b in meta]
            # uninitialised extents own blocks too
            old += self._uninit_extents(node)
        else:
            old_runs = self._indirect_runs(node, 1 << 62, meta)
            old = [(p, c) for _, p, c in old_runs] + [(b, 1) for b in meta]
        for phys, count in old:
            self._set_blocks(phys, count, used=False)
        goal_group = (node.ino - 1) // self.sb.inodes_per_group
        new_runs = self._allocate(nblocks, goal_group)
        if use_extents:
            block_field, meta_blocks = self._build_extents(node, new_runs)
        else:
            block_field, meta_blocks = self._build_indirect(new_runs, goal_group)
        # data first, then mapping, then inode and counters
        pos = 0
        for phys, count in new_runs:
            chunk = bytes(data[pos : pos + count * bs])
            self._write_block(phys, chunk.ljust(count * bs, b"\0"))
            pos += count * bs
        self._finish_inode(node, block_field, len(data), nblocks + meta_blocks)
        self._flush_groups()
        self._dir_cache.pop(node.ino, None)

    # creating files

    def create_file(
        self, path: str, data: bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0
    ) -> int:
        """Create the regular file ``path`` (its directory must exist); returns its inode."""
        parent, name = self._new_entry_target(path)
        extents = bool(self.sb.feature_incompat & INCOMPAT_EXTENTS)
        node = self._new_inode(parent, _stat.S_IFREG | (mode & 0o7777), uid, gid, extents)
        self._add_dir_entry(parent, name, node.ino, 1)
        self._replace_content(node, data)
        return node.ino

    def symlink(self, path: str, target: str, *, uid: int = 0, gid: int = 0) -> int:
        """Create the symlink ``path`` → ``target`` (fast when the target fits the inode)."""
        raw_target = target.encode("utf-8", "surrogateescape")
        if not raw_target or len(raw_target) >= min(self.block_size, MAX_PATH):
            raise GuestWriteRefusedError(f"{path}: symlink target of {len(raw_target)} bytes")
        parent, name = self._new_entry_target(path)
        fast = len(raw_target) < 60
        extents = not fast and bool(self.sb.feature_incompat & INCOMPAT_EXTENTS)
        node = self._new_inode(parent, _stat.S_IFLNK | 0o777, uid, gid, extents)
        self._add_dir_entry(parent, name, node.ino, 7)
        if fast:
            self._finish_inode(node, raw_target.ljust(60, b"\0"), len(raw_target), 0)
            self._flush_groups()
        else:
            self._replace_content(node, raw_target)
        return node.ino

    def check_creatable(self, path: str) -> None:
        """Raise the refusal ``create_file``/``symlink`` would raise, without writing."""
        self._new_entry_target(path)

    def _new_entry_target(self, path: str) -> tuple[Inode, str]:
        self.check_writable()
        parent_path, _, name = path.rstrip("/").rpartition("/")
        raw_name = name.encode("utf-8", "surrogateescape")
        if name in ("", ".", "..") or len(raw_name) > 255 or "\0" in name:
            raise GuestWriteRefusedError(f"{path}: not a valid file name")
        parent = self.resolve(parent_path or "/")
        if parent.kind != "dir":
            raise NotADirectoryInGuestError(f"{parent_path}: not a directory")
        self._check_inode_writable(parent, parent_path or "/")
        if parent.base.flags & EXT4_CASEFOLD_FL:
            raise GuestWriteRefusedError(
                f"{parent_path or '/'}: vmferry does not add entries to case-folded directories"
            )
        if self._lookup_in(parent.ino, name) is not None:
            raise GuestWriteRefusedError(f"{path}: already exists")
        if parent.base.flags & EXT4_INDEX_FL:
            data = self.read_inode_data(parent, MAX_DIR_BYTES)
            self._htree_leaf(parent, data, raw_name, parent_path or "/")  # refuses a full leaf
        return parent, name

    def _htree_leaf(
        self, parent: Inode, data: bytes | bytearray, raw_name: bytes, where: str
    ) -> int:
        """The logical block of the leaf an indexed (htree) directory (its content ``data``)
        keeps ``raw_name`` in, refused unless that leaf has room for it.

        Why only then: the index blocks are never rewritten (no leaf split, no new index
        entry), so an entry goes in exactly where the kernel's lookup will look for it: the leaf
        whose hash range holds the name's hash, found as ``dx_probe`` finds it.
        """
        if not self.sb.feature_compat & COMPAT_DIR_INDEX:
            raise GuestWriteRefusedError(
                f"{where}: indexed directory without the dir_index feature"
            )
        bs = self.block_size
        nblocks = len(data) // bs
        root = data[:bs]
        zero, version, info_len, levels = struct.unpack_from("<IBBB", root, DX_ROOT_INFO)
        max_levels = 3 if self.sb.feature_incompat & INCOMPAT_LARGEDIR else 2
        if zero != 0 or info_len != 8 or levels >= max_levels:
            raise GuestWriteRefusedError(
                f"{where}: htree root of a form vmferry does not know (levels {levels})"
            )
        want = name_hash(raw_name, effective_version(version, self.sb.flags), self.sb.hash_seed)
        block, at = root, DX_ROOT_INFO + 8
        for level in range(levels + 1):
            limit, count = struct.unpack_from("<HH", block, at)
            if not 0 < count <= limit or at + 8 * limit > bs:
                raise CorruptGuestError(f"{where}: htree index with {count} of {limit} entries")
            pick = 0
            for i in range(1, count):
                if struct.unpack_from("<I", block, at + 8 * i)[0] > want:
                    break
                pick = i
            logical = struct.unpack_from("<I", block, at + 8 * pick + 4)[0] & 0x0FFFFFFF
            if not 0 < logical < nblocks:
                raise CorruptGuestError(f"{where}: htree points at block {logical}")
            if level < levels:
                block, at = data[logical * bs : (logical + 1) * bs], 8
        need = (8 + len(raw_name) + 3) & ~3
        usable = bs - (12 if self.metadata_csum else 0)
        if _hole_for(data, logical * bs, usable, need, where) is None:
            raise GuestWriteRefusedError(
                f"{where}: the htree leaf for this name is full; vmferry does not split htree "
                "blocks"
            )
        return logical

    def _new_inode(self, parent: Inode, mode: int, uid: int, gid: int, extents: bool) -> Inode:
        ino = self._allocate_inode((parent.ino - 1) // self.sb.inodes_per_group)
        now = clock.now() & 0xFFFFFFFF
        block = (
            ExtentHeader(EXTENT_MAGIC, 0, 4, 0, 0).pack().ljust(60, b"\0") if extents else bytes(60)
        )
        base = InodeBase(
            mode=mode,
            uid=uid & 0xFFFF,
            atime=now,
            ctime=now,
            mtime=now,
            gid=gid & 0xFFFF,
            links_count=1,
            flags=EXT4_EXTENTS_FL if extents else 0,
            block=block,
            generation=clock.generation(self.sb.uuid, ino),
            uid_high=(uid >> 16) & 0xFFFF,
            gid_high=(gid >> 16) & 0xFFFF,
        )
        raw_ino = bytearray(self.inode_size)
        raw_ino[:128] = base.pack()
        if self.inode_size >= 160:
            struct.pack_into("<H", raw_ino, INODE_EXTRA_ISIZE, 32)
            struct.pack_into("<I", raw_ino, 0x90, now)  # i_crtime
        return Inode(ino, base, raw_ino)

    def _allocate_inode(self, goal: int) -> int:
        sb = self.sb
        ipg = sb.inodes_per_group
        for step in range(self.group_count):
            g = (goal + step) % self.group_count
            grp = self.group(g)
            d = grp.desc
            hi = self.is64 and self.desc_size >= 64
            free = d.free_inodes_count_lo | ((d.free_inodes_count_hi << 16) if hi else 0)
            if free == 0:
                continue
            if d.flags & BG_INODE_UNINIT:
                self._init_inode_bitmap(g)
                d = grp.desc
            bm = self._inode_bitmap(g)
            for idx in range(ipg):
                if bm[idx >> 3] & (1 << (idx & 7)):
                    continue
                ino = g * ipg + idx + 1
                if ino < sb.first_ino or ino > sb.inodes_count:
                    continue
                bm[idx >> 3] |= 1 << (idx & 7)
                unused = d.itable_unused_lo | ((d.itable_unused_hi << 16) if hi else 0)
                if (self.metadata_csum or self.gdt_csum) and idx >= ipg - unused:
                    unused = ipg - idx - 1
                free -= 1
                grp.desc = d.replace(
                    free_inodes_count_lo=free & 0xFFFF,
                    free_inodes_count_hi=(free >> 16) if hi else d.free_inodes_count_hi,
                    itable_unused_lo=unused & 0xFFFF,
                    itable_unused_hi=(unused >> 16) if hi else d.itable_unused_hi,
                )
                self._inode_dirty.add(g)
                self._dirty_groups.add(g)
                self._free_inodes_delta -= 1
                return ino
        raise GuestWriteRefusedError("the filesystem has no free inode vmferry can use")

    def _init_inode_bitmap(self, g: int) -> None:
        """A group whose inode bitmap was never written: start it empty, padding bits set."""
        bm = bytearray(self.block_size)
        ipg = self.sb.inodes_per_group
        for bit in range(ipg, self.block_size * 8):
            bm[bit >> 3] |= 1 << (bit & 7)
        self.__dict__.setdefault("_ibitmaps", {})[g] = bm
        grp = self.group(g)
        grp.desc = grp.desc.replace(flags=grp.desc.flags & ~BG_INODE_UNINIT)
        self._inode_dirty.add(g)
        self._dirty_groups.add(g)

    def _inode_bitmap(self, g: int) -> bytearray:
        cache = self.__dict__.setdefault("_ibitmaps", {})
        if g not in cache:
            grp = self.group(g)
            d = grp.desc
            hi = self.is64 and self.desc_size >= 64
            block = d.inode_bitmap_lo | ((d.inode_bitmap_hi << 32) if hi else 0)
            cache[g] = bytearray(self.read_blocks(block, 1, f"group {g} inode bitmap"))
        return cache[g]

    def _add_dir_entry(self, parent: Inode, name: str, ino: int, file_type: int) -> None:
        """Put ``name`` in the first hole that fits, or in a new block at the directory's end."""
        bs = self.block_size
        raw_name = name.encode("utf-8", "surrogateescape")
        need = (8 + len(raw_name) + 3) & ~3
        ft = file_type if self.sb.feature_incompat & 0x2 else 0
        tail = 12 if self.metadata_csum else 0
        data = bytearray(self.read_inode_data(parent, MAX_DIR_BYTES))
        entry = DirEntryHead(ino, 0, len(raw_name), ft)
        if parent.base.flags & EXT4_INDEX_FL:
            bases = [self._htree_leaf(parent, data, raw_name, f"directory inode {parent.ino}") * bs]
        else:
            bases = list(range(0, len(data), bs))
        for base in bases:
            hole = _hole_for(data, base, bs - tail, need, f"directory inode {parent.ino}")
            if hole is None:
                continue
            pos, used, rec_len = hole
            if used:
                data[pos : pos + 8] = DirEntryHead.unpack(data, pos).replace(rec_len=used).pack()
            at = pos + used
            data[at : at + 8] = entry.replace(rec_len=rec_len - used).pack()
            data[at + 8 : at + 8 + len(raw_name)] = raw_name
            self._write_dir_block(parent, base // bs, data[base : base + bs])
            self._touch(parent)
            return
        block = bytearray(bs)
        block[:8] = entry.replace(rec_len=bs - tail).pack()
        block[8 : 8 + len(raw_name)] = raw_name
        if tail:
            block[bs - 12 : bs] = DirEntryHead(0, 12, 0, 0xDE).pack() + bytes(4)
            struct.pack_into("<I", block, bs - 4, self._dir_block_csum(parent, block))
        self._replace_content(parent, bytes(data) + bytes(block))
        self._dir_cache.pop(parent.ino, None)

    def _dir_block_csum(self, parent: Inode, block: bytes | bytearray) -> int:
        crc = crc32c_raw(self.csum_seed, struct.pack("<I", parent.ino))
        crc = crc32c_raw(crc, struct.pack("<I", parent.base.generation))
        return crc32c_raw(crc, block[: self.block_size - 12])

    def _write_dir_block(self, parent: Inode, logical: int, block: bytes | bytearray) -> None:
        block = bytearray(block)
        if self.metadata_csum:
            struct.pack_into("<I", block, self.block_size - 4, self._dir_block_csum(parent, block))
        for lb, phys, count in self.file_runs(parent):
            if lb <= logical < lb + count:
                self._write_block(phys + logical - lb, block)
                self._dir_cache.pop(parent.ino, None)
                return
        raise CorruptGuestError(f"directory inode {parent.ino} has a hole at block {logical}")

    def _touch(self, node: Inode) -> None:
        """New mtime/ctime on a directory whose entries changed; checksum and store."""
        now = clock.now() & 0xFFFFFFFF
        node.base = node.base.replace(mtime=now, ctime=now)
        node.raw[:128] = node.base.pack()
        self._store_inode(node)
        self._flush_groups()

    def _plan_fits(self, nblocks: int, use_extents: bool) -> None:
        """Refuse before touching anything when the mapping could not be written."""
        if use_extents:
            return  # checked against the actual fragmentation in _build_extents
        per = self.block_size // 4
        if nblocks > 12 + per + per * per:
            raise GuestWriteRefusedError(
                f"a {nblocks}-block file needs triple-indirect blocks, which vmferry does not write"
            )

    def _uninit_extents(self, node: Inode) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []

        def walk(buf: bytes) -> None:
            hdr = ExtentHeader.unpack(buf)
            for i in range(hdr.entries):
                at = ExtentHeader.size + 12 * i
                if hdr.depth == 0:
                    e = ExtentLeaf.unpack(buf, at)
                    if e.len > 32768:
                        out.append((e.start_lo | (e.start_hi << 32), e.len - 32768))
                else:
                    ix = ExtentIndex.unpack(buf, at)
                    walk(self.read_blocks(ix.leaf_lo | (ix.leaf_hi << 32), 1, "extent block"))

        walk(node.base.block)
        return out

    # block bitmaps

    def _bitmap(self, g: int) -> bytearray:
        grp = self.group(g)
        if grp.desc.flags & BG_BLOCK_UNINIT:
            raise GuestWriteRefusedError(f"group {g}'s block bitmap is uninitialised")
        cache = self.__dict__.setdefault("_bitmaps", {})
        if g not in cache:
            cache[g] = bytearray(self.read_blocks(grp.block_bitmap, 1, f"group {g} bitmap"))
        return cache[g]

    def _set_blocks(self, phys: int, count: int, *, used: bool) -> None:
        sb = self.sb
        for b in range(phys, phys + count):
            if not sb.first_data_block <= b < self.blocks_count:
                raise CorruptGuestError(f"block {b} is outside the filesystem")
            g, bit = divmod(b - sb.first_data_block, sb.blocks_per_group)
            bm = self._bitmap(g)
            mask = 1 << (bit & 7)
            was = bool(bm[bit >> 3] & mask)
            if was == used:
                state = "in use" if used else "free"
                raise CorruptGuestError(f"block {b} is already marked {state} in the bitmap")
            if used:
                bm[bit >> 3] |= mask
            else:
                bm[bit >> 3] &= ~mask & 0xFF
            self.group(g).free_blocks += -1 if used else 1
            self._free_delta += -1 if used else 1
            self._dirty_groups.add(g)
            self._block_dirty.add(g)

    def _allocate(self, nblocks: int, goal: int) -> list[tuple[int, int]]:
        """Pick ``nblocks`` free blocks, first-fit from the goal group on, as few runs as may be."""
        sb = self.sb
        runs: list[tuple[int, int]] = []
        need = nblocks
        for step in range(self.group_count):
            if need == 0:
                break
            g = (goal + step) % self.group_count
            grp = self.group(g)
            if grp.free_blocks == 0 or grp.desc.flags & BG_BLOCK_UNINIT:
                continue
            bm = self._bitmap(g)
            first = sb.first_data_block + g * sb.blocks_per_group
            limit = min(sb.blocks_per_group, self.blocks_count - first)
            bit = 0
            while bit < limit and need:
                if bm[bit >> 3] == 0xFF and bit & 7 == 0:
                    bit += 8
                    continue
                if bm[bit >> 3] & (1 << (bit & 7)):
                    bit += 1
                    continue
                start = bit
                while bit < limit and need and not bm[bit >> 3] & (1 << (bit & 7)):
                    bit += 1
                    need -= 1
                self._set_blocks(first + start, bit - start, used=True)
                if runs and runs[-1][0] + runs[-1][1] == first + start:
                    runs[-1] = (runs[-1][0], runs[-1][1] + bit - start)
                else:
                    runs.append((first + start, bit - start))
        if need:
            raise GuestWriteRefusedError(f"the filesystem has no room for {nblocks} more blocks")
        return runs

    # mappings

    def _build_extents(self, node: Inode, runs: list[tuple[int, int]]) -> tuple[bytes, int]:
        """The inode's extent root for ``runs`` (logically contiguous from block 0) and how many
        tree blocks were allocated.  Up to 4 extents fit the inode; beyond, full leaves and
        index levels are added until the root's 4 slots hold the top level (depth <= 5)."""
        extents: list[tuple[int, int, int]] = []  # logical, phys, len (<= 32768)
        logical = 0
        for phys, count in runs:
            while count:
                n = min(count, 32768)
                extents.append((logical, phys, n))
                logical += n
                phys += n
                count -= n
        gen = ExtentHeader.unpack(node.base.block).generation
        if len(extents) <= 4:
            return self._extent_node(extents, 4, 0, gen, 60), 0
        per_block = (self.block_size - 12 - (4 if self.metadata_csum else 0)) // 12
        goal = (node.ino - 1) // self.sb.inodes_per_group
        level: list[tuple[int, int, int]] = extents  # leaf entries, then (logical, block, 0)
        depth = 0
        allocated = 0
        while len(level) > 4:
            if depth >= MAX_EXTENT_DEPTH - 1:
                raise GuestWriteRefusedError(
                    f"the new content would need {len(extents)} extents; too deep a tree"
                )
            upper: list[tuple[int, int, int]] = []
            for i in range(0, len(level), per_block):
                group = level[i : i + per_block]
                ((block, _),) = self._allocate(1, goal)
                allocated += 1
                buf = bytearray(self._extent_node(group, per_block, depth, 0, self.block_size))
                if self.metadata_csum:
                    tail = 12 + 12 * per_block
                    struct.pack_into("<I", buf, tail, self._extent_block_csum(node, buf[:tail]))
                self._write_block(block, buf)
                upper.append((group[0][0], block, 0))
            level = upper
            depth += 1
        return self._extent_node(level, 4, depth, gen, 60), allocated

    def _extent_node(
        self, entries: list[tuple[int, int, int]], cap: int, depth: int, gen: int, size: int
    ) -> bytes:
        """One tree node: leaf extents ``(logical, phys, len)`` at depth 0, else index entries
        ``(logical, child block, 0)``."""
        buf = bytearray(ExtentHeader(EXTENT_MAGIC, len(entries), cap, depth, gen).pack())
        for lb, phys, n in entries:
            if depth == 0:
                buf += ExtentLeaf(lb, n, phys >> 32, phys & 0xFFFFFFFF).pack()
            else:
                buf += ExtentIndex(lb, phys & 0xFFFFFFFF, phys >> 32, 0).pack()
        return bytes(buf.ljust(size, b"\0"))

    def _extent_block_csum(self, node: Inode, body: bytes | bytearray) -> int:
        crc = crc32c_raw(self.csum_seed, struct.pack("<I", node.ino))
        crc = crc32c_raw(crc, struct.pack("<I", node.base.generation))
        return crc32c_raw(crc, body)

    def _build_indirect(self, runs: list[tuple[int, int]], goal: int) -> tuple[bytes, int]:
        blocks = [p + i for p, c in runs for i in range(c)]
        per = self.block_size // 4
        ptrs = blocks[:12] + [0] * (12 - min(12, len(blocks)))
        rest = blocks[12:]
        meta = 0

        def table(entries: list[int]) -> int:
            nonlocal meta
            ((block, _),) = self._allocate(1, goal)
            meta += 1
            self._write_block(
                block, struct.pack(f"<{per}I", *entries, *([0] * (per - len(entries))))
            )
            return block

        single = rest[:per]
        ptrs.append(table(single) if single else 0)
        double = rest[per:]
        if double:
            children = [table(double[i : i + per]) for i in range(0, len(double), per)]
            ptrs.append(table(children))
        else:
            ptrs.append(0)
        ptrs.append(0)
        return struct.pack("<15I", *ptrs), meta

    # publishing

    def _finish_inode(self, node: Inode, block_field: bytes, size: int, blocks: int) -> None:
        raw_ino = node.raw
        sectors = blocks * (self.block_size // 512)
        now = clock.now() & 0xFFFFFFFF
        b = node.base.replace(
            size_lo=size & 0xFFFFFFFF,
            size_high=size >> 32,
            block=block_field,
            blocks_lo=sectors & 0xFFFFFFFF,
            blocks_high=(sectors >> 32) & 0xFFFF,
            flags=node.base.flags & ~EXT4_HUGE_FILE_FL,
            mtime=now,
            ctime=now,
        )
        raw_ino[:128] = b.pack()
        node.base = b
        self._store_inode(node)

    def _store_inode(self, node: Inode) -> None:
        """Checksum (metadata_csum) and write the inode's raw bytes to its table slot."""
        raw_ino = node.raw
        if self.metadata_csum:
            csum = self._inode_csum(node)
            struct.pack_into("<H", raw_ino, INODE_CSUM_LO, csum & 0xFFFF)
            if self._inode_has_csum_hi(node):
                struct.pack_into("<H", raw_ino, INODE_CSUM_HI, csum >> 16)
            node.base = InodeBase.unpack(raw_ino)
        g, idx = divmod(node.ino - 1, self.sb.inodes_per_group)
        off = self.group(g).inode_table * self.block_size + idx * self.inode_size
        self._writer().write(off, bytes(raw_ino))  # type: ignore[attr-defined]

    def _flush_groups(self) -> None:
        """Write touched bitmaps and descriptors, then the superblock's free counts."""
        for g in sorted(self._dirty_groups):
            self._write_group(g)
        self._dirty_groups.clear()
        self._block_dirty.clear()
        self._inode_dirty.clear()
        # adjust by what changed rather than re-summing every group: O(1) on huge filesystems
        sb = self.sb
        free_blocks = sb.free_blocks_count_lo | (
            (sb.free_blocks_count_hi << 32) if self.is64 else 0
        )
        free_blocks += self._free_delta
        free_inodes = sb.free_inodes_count + self._free_inodes_delta
        self._free_delta = self._free_inodes_delta = 0
        if not 0 <= free_blocks <= self.blocks_count or not 0 <= free_inodes <= sb.inodes_count:
            raise CorruptGuestError("superblock free counts are inconsistent")
        sb = sb.replace(
            free_blocks_count_lo=free_blocks & 0xFFFFFFFF,
            free_blocks_count_hi=(free_blocks >> 32) if self.is64 else sb.free_blocks_count_hi,
            free_inodes_count=free_inodes,
            wtime=clock.now() & 0xFFFFFFFF,
        )
        raw_sb = bytearray(sb.pack())
        if self.metadata_csum:
            struct.pack_into("<I", raw_sb, 0x3FC, crc32c_raw(0xFFFFFFFF, raw_sb[:0x3FC]))
        self.sb = Superblock.unpack(raw_sb)
        self._sb_raw = bytes(raw_sb)
        self._writer().write(SUPERBLOCK_OFFSET, bytes(raw_sb))  # type: ignore[attr-defined]

    def _write_group(self, g: int) -> None:
        """One group's changed bitmaps, then its descriptor with fresh checksums."""
        hi = self.is64 and self.desc_size >= 64
        grp = self.group(g)
        d = grp.desc
        if g in self._block_dirty:
            bm = self.__dict__["_bitmaps"][g]
            self._write_block(grp.block_bitmap, bm)
            d = d.replace(
                free_blocks_count_lo=grp.free_blocks & 0xFFFF,
                free_blocks_count_hi=(grp.free_blocks >> 16) if hi else 0,
            )
            if self.metadata_csum:
                csum = crc32c_raw(self.csum_seed, bm[: self.sb.clusters_per_group // 8])
                d = d.replace(
                    block_bitmap_csum_lo=csum & 0xFFFF,
                    block_bitmap_csum_hi=(csum >> 16) if hi else 0,
                )
        if g in self._inode_dirty:
            ibm = self.__dict__["_ibitmaps"][g]
            self._write_block(d.inode_bitmap_lo | ((d.inode_bitmap_hi << 32) if hi else 0), ibm)
            if self.metadata_csum:
                csum = crc32c_raw(self.csum_seed, ibm[: self.sb.inodes_per_group // 8])
                d = d.replace(
                    inode_bitmap_csum_lo=csum & 0xFFFF,
                    inode_bitmap_csum_hi=(csum >> 16) if hi else 0,
                )
        raw_desc = bytearray(d.pack()[: self.desc_size])
        raw_desc[GD_CHECKSUM_OFFSET : GD_CHECKSUM_OFFSET + 2] = b"\0\0"
        struct.pack_into("<H", raw_desc, GD_CHECKSUM_OFFSET, self._desc_csum(g, raw_desc))
        grp.desc = GroupDesc.unpack(bytes(raw_desc).ljust(64, b"\0"))
        self._writer().write(self._desc_location(g), bytes(raw_desc))  # type: ignore[attr-defined]

    def _desc_csum(self, g: int, raw_desc: bytes | bytearray) -> int:
        if self.metadata_csum:
            crc = crc32c_raw(self.csum_seed, struct.pack("<I", g))
            return crc32c_raw(crc, raw_desc) & 0xFFFF
        if self.gdt_csum:
            crc = crc16(0xFFFF, self.sb.uuid)
            crc = crc16(crc, struct.pack("<I", g))
            crc = crc16(crc, raw_desc[:GD_CHECKSUM_OFFSET])
            if len(raw_desc) > GD_CHECKSUM_OFFSET + 2:
                crc = crc16(crc, raw_desc[GD_CHECKSUM_OFFSET + 2 :])
            return crc
        return 0


def _hole_for(
    data: bytes | bytearray, base: int, usable: int, need: int, what: str
) -> tuple[int, int, int] | None:
    """The first entry of the directory block at ``base`` (its first ``usable`` bytes: the
    rest is the checksum tail) with ``need`` spare bytes after its own name: (its position,
    the bytes it keeps, its record length), or None."""
    pos, end = base, base + usable
    while pos + 8 <= end:
        h = DirEntryHead.unpack(data, pos)
        if h.rec_len < 8 or pos + h.rec_len > end:
            raise CorruptGuestError(f"{what}: bad entry length")
        used = (8 + h.name_len + 3) & ~3 if h.inode else 0
        if h.rec_len - used >= need:
            return pos, used, h.rec_len
        pos += h.rec_len
    return None
