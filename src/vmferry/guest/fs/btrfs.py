"""btrfs, read-only: the subvolume layouts Fedora, openSUSE and Ubuntu install on.

``BtrfsFilesystem(dev)`` is the *default subvolume* (what a plain ``mount`` shows: the top level
unless ``btrfs subvolume set-default`` chose another, as openSUSE does), with the same read
interface as ext and XFS.  ``subvolumes()`` lists every subvolume with its path from the top
level, and ``open_subvolume(path_or_id)`` gives another view on the same device, the way an
fstab ``subvol=`` or ``subvolid=`` mount would.

Inside a view, entries that are nested subvolumes are entered like the kernel does (their root
directory appears in place); a snapshot's copy of a nested subvolume, which the kernel shows as
an empty directory, is an empty directory here too.  Inode numbers of the view's own tree are
the btrfs ones; inodes of a nested subvolume get ``tree << 64 | objectid`` so they stay unique.

There is no ``check_writable``: fix rules refuse to plan writes on a filesystem without it, so
a btrfs guest is reported, never half-edited.  Metadata checksums are verified (see
``btrfs_volume``); file data checksums (the csum tree) are not.
"""

from __future__ import annotations

import stat as _stat
import struct
from dataclasses import dataclass

from vmferry.guest.errors import (
    CorruptGuestError,
    GuestLimitError,
    NotADirectoryInGuestError,
    UnsupportedGuestFeatureError,
)
from vmferry.guest.fs.btrfs_compress import MAX_EXTENT_RAM, decompress
from vmferry.guest.fs.btrfs_csum import name_hash
from vmferry.guest.fs.btrfs_layout import (
    COMPRESSION,
    DIR_INDEX,
    DIR_ITEM,
    EMPTY_SUBVOL_DIR,
    EXTENT_DATA,
    EXTENT_INLINE,
    EXTENT_PREALLOC,
    EXTENT_REG,
    FIRST_FREE_OBJECTID,
    FS_TREE,
    FT_NAMES,
    INODE_EXTREF,
    INODE_ITEM,
    INODE_REF,
    LAST_FREE_OBJECTID,
    ROOT_BACKREF,
    ROOT_DIRID_AT,
    ROOT_FLAGS_AT,
    ROOT_ITEM,
    ROOT_ITEM_MIN,
    ROOT_SUBVOL_RDONLY,
    ROOT_TREE_DIR,
    U64_MAX,
    FileExtentHead,
    FileExtentRegular,
    InodeItem,
    parse_dir_items,
    parse_inode_extrefs,
    parse_inode_refs,
    parse_root_ref,
)
from vmferry.guest.fs.btrfs_volume import BtrfsVolume, Tree
from vmferry.guest.fs.tree import MAX_FILE_READ, MAX_PATH, TreeFilesystem
from vmferry.guest.fs.types import DirEntry, GuestFileNotFound, Stat, kind_of_mode
from vmferry.guest.overlay import ReadableDisk

MAX_DIR_ENTRIES = 1 << 20
MAX_SUBVOLUMES = 1 << 16
MAX_PATH_DEPTH = 1024


@dataclass(frozen=True)
class Subvolume:
    """A subvolume: ``path`` from the top level without a leading slash (as fstab's subvol=)."""

    id: int
    path: str
    parent_id: int
    readonly: bool = False  # snapshots made with -r (openSUSE's, for one)


@dataclass
class BtrfsInode:
    ino: int  # as this view numbers it
    tree: int
    objectid: int
    item: InodeItem

    @property
    def kind(self) -> str:
        return kind_of_mode(self.item.mode)


_EMPTY_DIR = InodeItem(mode=_stat.S_IFDIR | 0o755, nlink=1)


class BtrfsSubvolumeFS(TreeFilesystem):
    """One subvolume of a btrfs filesystem, read-only, as a mount of it would show."""

    type = "btrfs"

    def __init__(self, volume: BtrfsVolume, subvol_id: int) -> None:
        self.volume = volume
        self.subvolume_id = subvol_id
        self._trees: dict[int, tuple[Tree, int]] = {}
        self._root_dirid = self._tree(subvol_id)[1]
        self._dir_cache: dict[int, dict[str, int]] = {}

    @property
    def uuid(self) -> str:
        u = self.volume.sb.fsid.hex()
        return f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"

    @property
    def label(self) -> str:
        return self.volume.sb.label.split(b"\0", 1)[0].decode("utf-8", "replace")

    # --- trees and inode numbers ----------------------------------------------------------------

    def _tree(self, tree_id: int) -> tuple[Tree, int]:
        """A subvolume's tree and its root directory's objectid."""
        found = self._trees.get(tree_id)
        if found is None:
            if tree_id != FS_TREE and not FIRST_FREE_OBJECTID <= tree_id <= LAST_FREE_OBJECTID:
                raise CorruptGuestError(f"btrfs: {tree_id} is not a subvolume id")
            tree = self.volume.tree(tree_id)
            if tree is None:
                raise GuestFileNotFound(f"btrfs subvolume {tree_id} does not exist")
            dirid = struct.unpack_from("<Q", self._root_item(tree_id), ROOT_DIRID_AT)[0]
            found = (tree, dirid)
            if len(self._trees) > MAX_SUBVOLUMES:
                self._trees.clear()
            self._trees[tree_id] = found
        return found

    def _root_item(self, tree_id: int) -> bytes:
        vol = self.volume
        hit = vol.first(vol.root_tree, (tree_id, ROOT_ITEM, 0), (tree_id, ROOT_ITEM, U64_MAX))
        if hit is None or len(hit[1]) < ROOT_ITEM_MIN:
            raise CorruptGuestError(f"btrfs root item of subvolume {tree_id} is missing")
        return hit[1]

    def _encode(self, tree: int, objectid: int) -> int:
        return objectid if tree == self.subvolume_id else (tree << 64) | objectid

    def _decode(self, ino: int) -> tuple[int, int]:
        return (ino >> 64, ino & U64_MAX) if ino >> 64 else (self.subvolume_id, ino)

    @property
    def root_ino(self) -> int:
        return self._root_dirid

    def inode(self, ino: int) -> BtrfsInode:
        tree_id, objectid = self._decode(ino)
        if objectid == EMPTY_SUBVOL_DIR:
            return BtrfsInode(ino, tree_id, objectid, _EMPTY_DIR)
        tree = self._tree(tree_id)[0]
        body = self.volume.lookup(tree, (objectid, INODE_ITEM, 0))
        if body is None:
            raise CorruptGuestError(f"btrfs subvolume {tree_id}: inode {objectid} is missing")
        if len(body) < InodeItem.size:
            raise CorruptGuestError(f"btrfs subvolume {tree_id}: inode {objectid} is too short")
        return BtrfsInode(ino, tree_id, objectid, InodeItem.unpack(body))

    # --- directories ----------------------------------------------------------------------------

    def _dir_entries(self, node: BtrfsInode) -> list[DirEntry]:
        if node.kind != "dir":
            raise NotADirectoryInGuestError(f"btrfs inode {node.objectid} is not a directory")
        if node.objectid == EMPTY_SUBVOL_DIR:
            return []
        tree = self._tree(node.tree)[0]
        where = f"subvolume {node.tree} directory {node.objectid}"
        out: list[DirEntry] = []
        lo, hi = (node.objectid, DIR_INDEX, 0), (node.objectid, DIR_INDEX, U64_MAX)
        for _, body in self.volume.items(tree, lo, hi):
            for e in parse_dir_items(body, where):
                out.append(self._entry(node, e.location, e.type, e.name))
                if len(out) > MAX_DIR_ENTRIES:
                    raise GuestLimitError(f"btrfs {where} has over {MAX_DIR_ENTRIES} entries")
        return out

    def _entry(
        self, parent: BtrfsInode, loc: tuple[int, int, int], ftype: int, name: bytes
    ) -> DirEntry:
        text = name.decode("utf-8", "surrogateescape")
        if "/" in text or text in (".", ".."):
            raise CorruptGuestError(f"btrfs directory {parent.objectid}: bad name {text!r}")
        kind = FT_NAMES.get(ftype, "unknown")
        if loc[1] == INODE_ITEM:
            return DirEntry(text, self._encode(parent.tree, loc[0]), kind)
        if loc[1] == ROOT_ITEM:
            return DirEntry(text, self._subvol_root(parent, loc[0], name), "dir")
        raise CorruptGuestError(f"btrfs directory {parent.objectid}: entry {text!r} points nowhere")

    def _subvol_root(self, parent: BtrfsInode, subvol: int, name: bytes) -> int:
        """The inode a nested subvolume's entry leads to (an empty dir in a snapshot's copy)."""
        vol = self.volume
        back = vol.lookup(vol.root_tree, (subvol, ROOT_BACKREF, parent.tree))
        if back is not None:
            dirid, ref_name = parse_root_ref(back, f"subvolume {subvol} back reference")
            if dirid == parent.objectid and ref_name == name:
                return self._encode(subvol, self._tree(subvol)[1])
        return self._encode(subvol, EMPTY_SUBVOL_DIR)

    def _lookup_in(self, dir_ino: int, name: str) -> int | None:
        """Large directories (/usr/lib, modules) are looked up by name hash, not listed."""
        if dir_ino in self._dir_cache:
            return super()._lookup_in(dir_ino, name)
        node = self.inode(dir_ino)
        if node.objectid == EMPTY_SUBVOL_DIR:
            return None
        raw = name.encode("utf-8", "surrogateescape")
        key = (node.objectid, DIR_ITEM, name_hash(raw))
        body = self.volume.lookup(self._tree(node.tree)[0], key)
        if body is None:
            return None
        for e in parse_dir_items(body, f"subvolume {node.tree} directory {node.objectid}"):
            if e.name == raw:
                return self._entry(node, e.location, e.type, e.name).inode
        return None

    # --- file data ------------------------------------------------------------------------------

    def _read_range(self, node: BtrfsInode, size: int) -> bytes:
        """The first ``size`` bytes of a file: extents laid over zeros (holes, prealloc)."""
        buf = bytearray(size)
        if size == 0 or node.objectid == EMPTY_SUBVOL_DIR:
            return bytes(buf)
        vol = self.volume
        tree = self._tree(node.tree)[0]
        where = f"subvolume {node.tree} inode {node.objectid}"
        lo, hi = (node.objectid, EXTENT_DATA, 0), (node.objectid, EXTENT_DATA, size - 1)
        for key, body in vol.items(tree, lo, hi):
            self._extent(buf, key[2], body, where)
        return bytes(buf)

    def _extent(self, buf: bytearray, file_off: int, body: bytes, where: str) -> None:
        if len(body) < FileExtentHead.size:
            raise CorruptGuestError(f"btrfs {where}: file extent item too short")
        head = FileExtentHead.unpack(body)
        if head.encryption or head.other_encoding:
            raise UnsupportedGuestFeatureError(
                f"btrfs {where}: file data is encrypted or encoded", features=["encryption"]
            )
        if head.compression not in COMPRESSION:
            raise UnsupportedGuestFeatureError(
                f"btrfs {where}: compression type {head.compression} is unknown",
                features=[f"compression {head.compression}"],
            )
        ss = self.volume.sb.sectorsize
        if head.type == EXTENT_INLINE:
            data = body[FileExtentHead.size :]
            if head.compression:
                data = decompress(head.compression, data, head.ram_bytes, ss, where)
            elif len(data) != head.ram_bytes:
                raise CorruptGuestError(f"btrfs {where}: inline extent size disagrees")
            self._place(buf, file_off, data)
            return
        if head.type not in (EXTENT_REG, EXTENT_PREALLOC):
            raise CorruptGuestError(f"btrfs {where}: file extent type {head.type} is unknown")
        if len(body) < FileExtentHead.size + FileExtentRegular.size:
            raise CorruptGuestError(f"btrfs {where}: file extent item too short")
        reg = FileExtentRegular.unpack(body, FileExtentHead.size)
        if head.type == EXTENT_PREALLOC or reg.disk_bytenr == 0:
            return  # unwritten or a hole: zeros
        n = min(reg.num_bytes, len(buf) - file_off)
        if n <= 0:
            return
        if head.compression:
            if reg.disk_num_bytes > MAX_EXTENT_RAM or reg.offset + n > head.ram_bytes:
                raise CorruptGuestError(f"btrfs {where}: compressed extent sizes disagree")
            packed = self.volume.read_logical(reg.disk_bytenr, reg.disk_num_bytes)
            data = decompress(head.compression, packed, head.ram_bytes, ss, where)
            self._place(buf, file_off, data[reg.offset : reg.offset + n])
            return
        if reg.offset + n > reg.disk_num_bytes:
            raise CorruptGuestError(f"btrfs {where}: extent reads past its disk extent")
        self._place(buf, file_off, self.volume.read_logical(reg.disk_bytenr + reg.offset, n))

    @staticmethod
    def _place(buf: bytearray, at: int, data: bytes) -> None:
        n = min(len(data), len(buf) - at)
        if n > 0:
            buf[at : at + n] = data[:n]

    def read_inode_data(self, node: BtrfsInode, limit: int = MAX_FILE_READ) -> bytes:
        size = node.item.size
        if size > limit:
            raise GuestLimitError(f"btrfs inode {node.objectid} holds {size} bytes, over {limit}")
        return self._read_range(node, size)

    def _readlink_node(self, node: BtrfsInode) -> str:
        size = node.item.size
        if size > MAX_PATH or size == 0:
            raise CorruptGuestError(f"btrfs symlink {node.objectid} is {size} bytes long")
        return self._read_range(node, size).decode("utf-8", "surrogateescape")

    # --- the GuestFS interface ------------------------------------------------------------------

    def stat(self, path: str, *, follow: bool = True) -> Stat:
        node = self.resolve(path, follow=follow)
        return Stat(node.ino, node.kind, node.item.size, node.item.mode & 0o7777)

    def read_head(self, path: str, length: int) -> bytes:
        node = self._regular(path)
        return self._read_range(node, max(0, min(length, node.item.size)))

    # --- subvolumes -----------------------------------------------------------------------------

    def subvolumes(self) -> list[Subvolume]:
        """Every subvolume linked into the filesystem (the top level, id 5, is not listed)."""
        cached = self.volume.subvolume_list
        if cached is None:
            cached = self.volume.subvolume_list = self._list_subvolumes()
        return list(cached)

    def _list_subvolumes(self) -> list[Subvolume]:
        vol = self.volume
        backrefs: dict[int, tuple[int, int, bytes]] = {}
        readonly: dict[int, bool] = {}
        lo, hi = (FIRST_FREE_OBJECTID, 0, 0), (LAST_FREE_OBJECTID, 255, U64_MAX)
        for key, body in vol.items(vol.root_tree, lo, hi):
            if key[1] == ROOT_ITEM and len(body) >= ROOT_ITEM_MIN:
                flags = struct.unpack_from("<Q", body, ROOT_FLAGS_AT)[0]
                readonly[key[0]] = bool(flags & ROOT_SUBVOL_RDONLY)
            elif key[1] == ROOT_BACKREF and key[0] not in backrefs:
                dirid, name = parse_root_ref(body, f"subvolume {key[0]} back reference")
                backrefs[key[0]] = (key[2], dirid, name)
            if len(backrefs) > MAX_SUBVOLUMES:
                raise GuestLimitError(f"btrfs has over {MAX_SUBVOLUMES} subvolumes")
        paths: dict[int, str] = {FS_TREE: ""}

        def path_of(sid: int, depth: int = 0) -> str | None:
            if sid in paths:
                return paths[sid]
            if depth > MAX_PATH_DEPTH or sid not in backrefs:
                return None
            parent, dirid, name = backrefs[sid]
            base = path_of(parent, depth + 1)
            if base is None:
                return None
            inner = self._dir_path(parent, dirid)
            parts = [p for p in (base, inner, name.decode("utf-8", "surrogateescape")) if p]
            paths[sid] = "/".join(parts)
            return paths[sid]

        out = []
        for sid in sorted(backrefs):
            if sid not in readonly:
                continue  # a deleted subvolume still being cleaned up
            p = path_of(sid)
            if p is not None:
                out.append(Subvolume(sid, p, backrefs[sid][0], readonly[sid]))
        return out

    def _dir_path(self, tree_id: int, dirid: int) -> str:
        """Path of directory ``dirid`` inside subvolume ``tree_id``, from its INODE_REFs."""
        tree, root = self._tree(tree_id)
        vol = self.volume
        names: list[str] = []
        cur = dirid
        seen: set[int] = set()
        while cur != root:
            if cur in seen or len(names) > MAX_PATH_DEPTH:
                raise CorruptGuestError(f"btrfs subvolume {tree_id}: directory loop at {cur}")
            seen.add(cur)
            where = f"subvolume {tree_id} inode {cur}"
            ref = vol.first(tree, (cur, INODE_REF, 0), (cur, INODE_REF, U64_MAX))
            if ref is not None:
                parent, name = ref[0][2], parse_inode_refs(ref[1], where)[0][1]
            else:
                ext = vol.first(tree, (cur, INODE_EXTREF, 0), (cur, INODE_EXTREF, U64_MAX))
                if ext is None:
                    raise CorruptGuestError(f"btrfs {where}: directory has no parent reference")
                parent, _, name = parse_inode_extrefs(ext[1], where)[0]
            names.append(name.decode("utf-8", "surrogateescape"))
            cur = parent
        return "/".join(reversed(names))

    def open_subvolume(self, path_or_id: str | int) -> BtrfsSubvolumeFS:
        """A view of one subvolume: by id, or by path from the top level (``@/home``, ``root``)."""
        if isinstance(path_or_id, int):
            sid = path_or_id
        else:
            want = "/".join(p for p in path_or_id.split("/") if p not in ("", "."))
            if want == "":
                sid = FS_TREE
            else:
                match = [s.id for s in self.subvolumes() if s.path == want]
                if not match:
                    raise GuestFileNotFound(f"no btrfs subvolume at {want!r}", path=want)
                sid = match[0]
        return BtrfsSubvolumeFS(self.volume, sid)


class BtrfsFilesystem(BtrfsSubvolumeFS):
    """A btrfs filesystem on ``dev``, seen through its default subvolume."""

    def __init__(self, dev: ReadableDisk) -> None:
        volume = BtrfsVolume(dev)
        super().__init__(volume, _default_subvolume(volume))

    @property
    def default_subvolume_id(self) -> int:
        return self.subvolume_id


def _default_subvolume(vol: BtrfsVolume) -> int:
    """The ``default`` entry of the root tree's directory (set-default), else the top level."""
    body = vol.lookup(vol.root_tree, (ROOT_TREE_DIR, DIR_ITEM, name_hash(b"default")))
    if body is None:
        return FS_TREE
    for e in parse_dir_items(body, "root tree directory"):
        if e.name == b"default":
            if e.location[1] != ROOT_ITEM:
                raise CorruptGuestError("btrfs default subvolume entry points at no subvolume")
            return e.location[0]
    return FS_TREE
