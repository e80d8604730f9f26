"""XFS: enough to inspect and fix a Red Hat 7+ guest whose root is XFS.

Reading covers v4 and v5 (CRC) filesystems: inodes located from their numbers, data forks in
local, extent and B+tree format, directories in short form, block, leaf and node form (only the
data blocks are read: the hash indexes are not needed to list a directory), local and remote
symlinks.  Everything is big-endian.  Reading does not check the log (an unclean log means what
we read may be stale, as with any offline reader); writing does.

Writing lives in its own modules: :mod:`.xfs_write` rewrites or extends a file (new blocks from
:mod:`.xfs_alloc` when it outgrows the ones it owns), :mod:`.xfs_create` adds inline symlinks
and regular files, :mod:`.xfs_log` decides whether the log is clean.  Not done: realtime files,
allocation on reverse-mapping (rmapbt) filesystems.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmferry.guest.errors import (
    CorruptGuestError,
    GuestLimitError,
    NotADirectoryInGuestError,
    UnsupportedGuestFeatureError,
)
from vmferry.guest.fs import xfs_create, xfs_write
from vmferry.guest.fs.tree import MAX_FILE_READ, MAX_PATH, TreeFilesystem
from vmferry.guest.fs.types import DirEntry, Stat, kind_of_mode
from vmferry.guest.fs.xfs_layout import (
    FMT_BTREE,
    FMT_EXTENTS,
    FMT_LOCAL,
    FTYPE,
    INCOMPAT,
    INCOMPAT_READ_OK,
    DinodeCore,
    XfsSuperblock,
    bits,
    bmbt_rec,
)
from vmferry.guest.overlay import ReadableDisk

MAX_DIR_BYTES = 64 << 20
MAX_BTREE_DEPTH = 8
DIR_LEAF_OFFSET = 32 << 30  # directory data blocks live below this byte offset


@dataclass
class XfsInode:
    ino: int
    core: DinodeCore
    fork: bytes  # the data fork's bytes
    raw: bytes = b""  # the whole on-disk inode (kept so a rewrite preserves every field)
    offset: int = 0  # its byte offset in the filesystem

    @property
    def kind(self) -> str:
        return kind_of_mode(self.core.mode)


class XfsFilesystem(TreeFilesystem):
    """One XFS filesystem on ``dev`` (writes need a writable ``dev``, e.g. an Overlay)."""

    type = "xfs"

    @property
    def root_ino(self) -> int:
        return self.sb.rootino

    def __init__(self, dev: ReadableDisk) -> None:
        self.dev = dev
        if dev.virtual_size < 512:
            raise CorruptGuestError("too small to hold an XFS superblock")
        sb = self.sb = XfsSuperblock.unpack(dev.read(0, XfsSuperblock.size))
        if sb.magic != b"XFSB":
            raise CorruptGuestError("no XFS superblock (bad magic)")
        self.v5 = sb.versionnum & 0xF == 5
        if not self.v5 and sb.versionnum & 0xF != 4:
            raise UnsupportedGuestFeatureError(f"XFS version {sb.versionnum & 0xF}")
        unknown = [INCOMPAT.get(b, hex(b)) for b in bits(sb.features_incompat)]
        unknown = [n for n in unknown if n not in INCOMPAT_READ_OK] if self.v5 else []
        if unknown:
            raise UnsupportedGuestFeatureError(
                f"XFS uses incompatible feature(s) {', '.join(unknown)}", features=unknown
            )
        if not 9 <= sb.blocklog <= 16 or sb.blocksize != 1 << sb.blocklog:
            raise CorruptGuestError(f"XFS block size {sb.blocksize} is impossible")
        if not 8 <= sb.inodelog <= 11 or sb.inodesize != 1 << sb.inodelog:
            raise CorruptGuestError(f"XFS inode size {sb.inodesize} is impossible")
        if sb.inopblog != sb.blocklog - sb.inodelog or not 1 <= sb.agblklog <= 31:
            raise CorruptGuestError("XFS geometry fields disagree")
        if sb.agblocks == 0 or sb.agblocks > 1 << sb.agblklog or sb.agcount == 0:
            raise CorruptGuestError("XFS allocation group geometry is impossible")
        if sb.dblocks * sb.blocksize > dev.virtual_size:
            raise CorruptGuestError(
                f"XFS claims {sb.dblocks} blocks, more than the {dev.virtual_size}-byte partition"
            )
        if sb.dirblklog > 8:
            raise CorruptGuestError("XFS directory block size is impossible")
        self.block_size = sb.blocksize
        self.dir_block = sb.blocksize << sb.dirblklog
        self.ftype = bool(sb.features_incompat & 1) if self.v5 else bool(sb.features2 & 0x200)
        self._dir_cache: dict[int, dict[str, int]] = {}
        self.log_known_clean = False  # set by the first write check (vmferry.guest.fs.xfs_log)

    @property
    def uuid(self) -> str:
        u = self.sb.uuid.hex()
        return f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"

    @property
    def label(self) -> str:
        return self.sb.fname.split(b"\0", 1)[0].decode("utf-8", "replace")

    # --- blocks and inodes ----------------------------------------------------------------------

    def _fsb_offset(self, fsb: int) -> int:
        """Byte offset of a filesystem block number (AG number in the high bits)."""
        sb = self.sb
        agno, agbno = fsb >> sb.agblklog, fsb & ((1 << sb.agblklog) - 1)
        if agno >= sb.agcount or agbno >= sb.agblocks:
            raise CorruptGuestError(f"XFS block {fsb:#x} lies outside the filesystem")
        return (agno * sb.agblocks + agbno) * self.block_size

    def _read_fsb(self, fsb: int, count: int, what: str) -> bytes:
        off = self._fsb_offset(fsb)
        if count < 0 or off + count * self.block_size > self.dev.virtual_size:
            raise CorruptGuestError(f"XFS {what} {fsb:#x}+{count} runs past the filesystem")
        return self.dev.read(off, count * self.block_size)

    def inode(self, ino: int) -> XfsInode:
        sb = self.sb
        shift = sb.agblklog + sb.inopblog
        agno, agino = ino >> shift, ino & ((1 << shift) - 1)
        agbno, index = agino >> sb.inopblog, agino & ((1 << sb.inopblog) - 1)
        if agno >= sb.agcount or agbno >= sb.agblocks or ino == 0:
            raise CorruptGuestError(f"XFS inode {ino} is out of range")
        off = (agno * sb.agblocks + agbno) * self.block_size + index * sb.inodesize
        if off + sb.inodesize > self.dev.virtual_size:
            raise CorruptGuestError(f"XFS inode {ino} lies past the filesystem")
        buf = self.dev.read(off, sb.inodesize)
        core = DinodeCore.unpack(buf)
        if core.magic != b"IN" or core.version not in (1, 2, 3):
            raise CorruptGuestError(f"XFS inode {ino} has a bad magic or version")
        start = 176 if core.version == 3 else 100
        end = start + core.forkoff * 8 if core.forkoff else sb.inodesize
        if not start <= end <= sb.inodesize:
            raise CorruptGuestError(f"XFS inode {ino}: fork offset is impossible")
        return XfsInode(ino, core, buf[start:end], buf, off)

    # --- block maps -----------------------------------------------------------------------------

    def _extents(self, node: XfsInode) -> list[tuple[int, int, int, bool]]:
        """``(file block, fs block, count, unwritten)`` of the data fork."""
        fmt = node.core.format
        if fmt == FMT_EXTENTS:
            n = node.core.nextents
            if n * 16 > len(node.fork):
                raise CorruptGuestError(f"XFS inode {node.ino}: {n} extents overflow the fork")
            return [bmbt_rec(node.fork, 16 * i) for i in range(n)]
        if fmt == FMT_BTREE:
            if len(node.fork) < 4:
                raise CorruptGuestError(f"XFS inode {node.ino}: B+tree root too small")
            level, numrecs = struct.unpack_from(">HH", node.fork)
            maxrecs = (len(node.fork) - 4) // 16
            if level == 0 or level > MAX_BTREE_DEPTH or numrecs > maxrecs:
                raise CorruptGuestError(f"XFS inode {node.ino}: bad B+tree root")
            ptrs = struct.unpack_from(f">{numrecs}Q", node.fork, 4 + maxrecs * 8)
            out: list[tuple[int, int, int, bool]] = []
            for p in ptrs:
                self._bmbt_walk(p, level - 1, out, node.ino)
            return out
        raise CorruptGuestError(f"XFS inode {node.ino}: data fork format {fmt} holds no blocks")

    def _bmbt_walk(
        self, fsb: int, level: int, out: list[tuple[int, int, int, bool]], ino: int
    ) -> None:
        buf = self._read_fsb(fsb, 1, "B+tree block")
        magic = buf[:4]
        hdr = 72 if magic == b"BMA3" else 24 if magic == b"BMAP" else 0
        if not hdr:
            raise CorruptGuestError(f"XFS inode {ino}: B+tree block {fsb:#x} has a bad magic")
        blevel, numrecs = struct.unpack_from(">HH", buf, 4)
        if blevel != level:
            raise CorruptGuestError(f"XFS inode {ino}: B+tree levels disagree")
        if level == 0:
            if hdr + numrecs * 16 > len(buf):
                raise CorruptGuestError(f"XFS inode {ino}: B+tree leaf overflows its block")
            out.extend(bmbt_rec(buf, hdr + 16 * i) for i in range(numrecs))
            if len(out) > self.sb.dblocks:
                raise GuestLimitError(f"XFS inode {ino}: more extents than blocks")
            return
        maxrecs = (len(buf) - hdr) // 16
        if numrecs > maxrecs:
            raise CorruptGuestError(f"XFS inode {ino}: B+tree node overflows its block")
        for p in struct.unpack_from(f">{numrecs}Q", buf, hdr + maxrecs * 8):
            self._bmbt_walk(p, level - 1, out, ino)

    def _read_range(self, node: XfsInode, size: int, below: int | None = None) -> bytes:
        """The first ``size`` bytes of the data fork's blocks (holes and unwritten as zeros)."""
        buf = bytearray(size)
        bs = self.block_size
        for fileoff, fsb, count, unwritten in self._extents(node):
            start = fileoff * bs
            if unwritten or start >= size or (below is not None and start >= below):
                continue
            n = min(count * bs, size - start)
            buf[start : start + n] = self._read_fsb(fsb, -(-n // bs), "data")[:n]
        return bytes(buf)

    def read_inode_data(self, node: XfsInode, limit: int = MAX_FILE_READ) -> bytes:
        size = node.core.size
        if size > limit:
            raise GuestLimitError(f"XFS inode {node.ino} holds {size} bytes, over {limit}")
        if node.core.format == FMT_LOCAL:
            return node.fork[:size]
        return self._read_range(node, size)

    # --- directories ----------------------------------------------------------------------------

    def _dir_entries(self, node: XfsInode) -> list[DirEntry]:
        if node.kind != "dir":
            raise NotADirectoryInGuestError(f"XFS inode {node.ino} is not a directory")
        if node.core.format == FMT_LOCAL:
            return self._shortform(node)
        out: list[DirEntry] = []
        dbs = self.dir_block
        total = 0
        for fileoff, fsb, count, unwritten in self._extents(node):
            start = fileoff * self.block_size
            if unwritten or start >= DIR_LEAF_OFFSET:
                continue
            total += count * self.block_size
            if total > MAX_DIR_BYTES:
                raise GuestLimitError(f"XFS directory {node.ino} is over {MAX_DIR_BYTES} bytes")
            data = self._read_fsb(fsb, count, "directory block")
            for at in range(0, len(data) - dbs + 1, dbs):
                self._data_block(data[at : at + dbs], node.ino, out)
        return out

    def _shortform(self, node: XfsInode) -> list[DirEntry]:
        f = node.fork
        if len(f) < 6:
            raise CorruptGuestError(f"XFS directory {node.ino}: short form too small")
        count, i8 = f[0], f[1]
        isize = 8 if i8 else 4
        pos = 2 + isize
        out: list[DirEntry] = []
        for _ in range(count):
            if pos + 3 > len(f):
                raise CorruptGuestError(f"XFS directory {node.ino}: short form overruns")
            namelen = f[pos]
            name_at = pos + 3
            after = name_at + namelen
            ftype = f[after] if self.ftype and after < len(f) else 0
            ino_at = after + (1 if self.ftype else 0)
            if namelen == 0 or ino_at + isize > len(f):
                raise CorruptGuestError(f"XFS directory {node.ino}: short form entry overruns")
            ino = int.from_bytes(f[ino_at : ino_at + isize], "big")
            name = f[name_at:after].decode("utf-8", "surrogateescape")
            out.append(DirEntry(name, ino, FTYPE.get(ftype, "unknown")))
            pos = ino_at + isize
        return out

    def _data_block(self, blk: bytes, ino: int, out: list[DirEntry]) -> None:
        magic = blk[:4]
        if magic in (b"XD2B", b"XD2D"):
            hdr = 16
        elif magic in (b"XDB3", b"XDD3"):
            hdr = 64
        else:
            return  # a leaf/free block mapped below the leaf offset would be corrupt; skip
        end = len(blk)
        if magic in (b"XD2B", b"XDB3"):
            count = struct.unpack_from(">I", blk, end - 8)[0]
            end = end - 8 - 8 * count
            if end < hdr:
                raise CorruptGuestError(f"XFS directory {ino}: block tail count is impossible")
        pos = hdr
        while pos + 8 <= end:
            if blk[pos : pos + 2] == b"\xff\xff":
                length = struct.unpack_from(">H", blk, pos + 2)[0]
                if length < 8 or length % 8:
                    raise CorruptGuestError(f"XFS directory {ino}: bad free entry length")
                pos += length
                continue
            child = struct.unpack_from(">Q", blk, pos)[0]
            namelen = blk[pos + 8]
            if namelen == 0 or pos + 9 + namelen > end:
                raise CorruptGuestError(f"XFS directory {ino}: entry overruns its block")
            name = blk[pos + 9 : pos + 9 + namelen].decode("utf-8", "surrogateescape")
            ftype = blk[pos + 9 + namelen] if self.ftype else 0
            size = 8 + 1 + namelen + (1 if self.ftype else 0) + 2
            pos += (size + 7) & ~7
            if name not in (".", ".."):
                out.append(DirEntry(name, child, FTYPE.get(ftype, "unknown")))

    def _readlink_node(self, node: XfsInode) -> str:
        size = node.core.size
        if size > MAX_PATH:
            raise CorruptGuestError(f"XFS symlink {node.ino} is {size} bytes long")
        if node.core.format == FMT_LOCAL:
            data = node.fork[:size]
        elif self.v5:
            data = self._remote_symlink(node, size)
        else:
            data = self._read_range(node, size)
        return data.decode("utf-8", "surrogateescape")

    def _remote_symlink(self, node: XfsInode, size: int) -> bytes:
        out = b""
        for _, fsb, count, _ in self._extents(node):
            for i in range(count):
                blk = self._read_fsb(fsb + i, 1, "symlink block")
                if blk[:4] != b"XSLM":
                    raise CorruptGuestError(f"XFS symlink {node.ino}: bad remote block magic")
                nbytes = struct.unpack_from(">I", blk, 8)[0]
                out += blk[56 : 56 + min(nbytes, len(blk) - 56)]
        return out[:size]

    # --- the GuestFS interface ------------------------------------------------------------------

    def stat(self, path: str, *, follow: bool = True) -> Stat:
        node = self.resolve(path, follow=follow)
        return Stat(node.ino, node.kind, node.core.size, node.core.mode & 0o7777)

    def read_head(self, path: str, length: int) -> bytes:
        node = self._regular(path)
        if node.core.format == FMT_LOCAL:
            return node.fork[: min(length, node.core.size)]
        return self._read_range(node, min(length, node.core.size))

    # --- writing (vmferry.guest.fs.xfs_write: in place, inside the file's own blocks) ----------

    def check_writable(self) -> None:
        """Refuse (named) unless the features and a clean log allow writing."""
        xfs_write.check_writable(self)

    def check_write_file(self, path: str, data: bytes) -> None:
        """Raise the refusal ``write_file(path, data)`` would raise, without writing."""
        xfs_write.plan_rewrite(self, path, data)

    def write_file(self, path: str, data: bytes) -> None:
        """Replace an existing regular file's content (new blocks allocated when it grows)."""
        xfs_write.write_file(self, path, data)

    def append_file(self, path: str, data: bytes) -> None:
        """Append to an existing regular file (new blocks allocated past the ones it owns)."""
        xfs_write.write_file(self, path, data, append=True)

    def check_append_file(self, path: str, data: bytes) -> None:
        """Raise the refusal ``append_file(path, data)`` would raise, without writing."""
        xfs_write.plan_rewrite(self, path, data, append=True)

    def check_creatable(self, path: str) -> None:
        """Raise the refusal a new symlink (or empty file) at ``path`` would get; no write."""
        xfs_create.check_create(self, path)

    def check_create_file(self, path: str, data: bytes) -> None:
        """Raise the refusal ``create_file(path, data)`` would get (its blocks included)."""
        xfs_create.check_create(self, path, "file", data)

    def create_file(
        self, path: str, data: bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0
    ) -> int:
        """A new regular file holding ``data`` (its blocks allocated like a growing file's)."""
        return xfs_create.create(self, path, "file", data, mode, uid, gid)

    def symlink(self, path: str, target: str, *, uid: int = 0, gid: int = 0) -> int:
        """A new symlink whose target fits inside the inode (``/dev/null`` for masking)."""
        raw = target.encode("utf-8", "surrogateescape")
        return xfs_create.create(self, path, "symlink", raw, 0o777, uid, gid)
