"""One btrfs device: superblock, logical→physical chunk map, checked tree nodes, key searches.

Why a layer of its own: everything in btrfs (the chunk tree itself, the root tree, each
subvolume's tree, file data) is addressed by *logical* bytes mapped through chunks, and every
tree is the same B-tree.  This module turns an untrusted device into "items of tree T between
key A and key B", with the checks the kernel's tree-checker makes on the way:

* the superblock checksum (crc32c, xxhash64, sha256, blake2b) and sane geometry;
* incompatible feature bits: unknown or unimplemented ones refused by name;
* chunks: SINGLE and DUP on this one device; RAID profiles and multi-device filesystems are
  refused naming them; a chunk pointing past the device is corrupt;
* nodes: checksum (the second DUP copy is tried when the first is bad), fsid, bytenr, level
  and the generation the parent expects; item offsets inside the node; keys strictly ascending
  and inside the range the parent gave; at most 8 levels, levels strictly decreasing (so a
  cyclic tree is caught as a level mismatch), and a budget of nodes per search.
"""

from __future__ import annotations

import bisect
import itertools
import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vmferry.errors import InspectionError
from vmferry.guest.errors import (
    CorruptGuestError,
    GuestLimitError,
    UnsupportedGuestFeatureError,
)
from vmferry.guest.fs.btrfs_csum import CSUM_SIZE, digest
from vmferry.guest.fs.btrfs_layout import (
    BG_DUP,
    BG_PROFILES,
    CHUNK_ITEM,
    CHUNK_TREE,
    CSUM_TYPES,
    FIRST_CHUNK_TREE_OBJECTID,
    HEADER_SIZE,
    INCOMPAT,
    INCOMPAT_READ_OK,
    ITEM_SIZE,
    KEY_PTR_SIZE,
    MAGIC,
    MAX_LEVEL,
    ROOT_BYTENR_AT,
    ROOT_ITEM,
    ROOT_ITEM_MIN,
    ROOT_LEVEL_AT,
    ROOT_TREE,
    STRIPE_SIZE,
    SUPER_OFFSET,
    SUPER_SIZE,
    SYS_CHUNK_ARRAY_AT,
    U64_MAX,
    ChunkItem,
    DevItem,
    Key,
    NodeHeader,
    Superblock,
    flag_names,
    unpack_key,
)
from vmferry.guest.overlay import ReadableDisk

NODE_CACHE = 512  # nodes kept parsed (8 MiB at the default 16 KiB node size)
MAX_CHUNKS = 1 << 16
MAX_NODES_PER_SEARCH = 1 << 16
MIN_KEY: Key = (0, 0, 0)
MAX_KEY: Key = (U64_MAX, 255, U64_MAX)


@dataclass(frozen=True)
class Chunk:
    logical: int
    length: int
    type: int
    physical: tuple[int, ...]  # one offset per copy on this device (two for DUP)


@dataclass(frozen=True)
class Tree:
    """Where a tree's root node is: enough to search it."""

    id: int
    bytenr: int
    level: int
    generation: int | None = None  # checked against the root node's header when known


@dataclass
class Node:
    bytenr: int
    level: int
    keys: list[Key]
    ptrs: list[tuple[int, int]]  # internal nodes: (child bytenr, child generation)
    items: list[tuple[int, int]]  # leaves: (data offset, data size) into ``raw``
    raw: bytes


class BtrfsVolume:
    """A single-device btrfs filesystem's metadata, read-only."""

    def __init__(self, dev: ReadableDisk) -> None:
        self.dev = dev
        if dev.virtual_size < SUPER_OFFSET + SUPER_SIZE:
            raise CorruptGuestError("too small to hold a btrfs superblock")
        raw = dev.read(SUPER_OFFSET, SUPER_SIZE)
        sb = self.sb = Superblock.unpack(raw)
        if sb.magic != MAGIC:
            raise CorruptGuestError("no btrfs superblock (bad magic)")
        self.csum_type = CSUM_TYPES.get(sb.csum_type, "")
        if not self.csum_type:
            raise UnsupportedGuestFeatureError(
                f"btrfs checksum type {sb.csum_type} is unknown",
                features=[f"csum_type {sb.csum_type}"],
            )
        self.csum_size = CSUM_SIZE[self.csum_type]
        if digest(self.csum_type, raw[32:]) != raw[: self.csum_size]:
            raise CorruptGuestError(f"btrfs superblock {self.csum_type} checksum mismatch")
        self._check_super()
        self.devid = DevItem.unpack(sb.dev_item).devid
        self.meta_fsid = sb.metadata_uuid if sb.incompat_flags & (1 << 10) else sb.fsid
        self._cache: OrderedDict[int, Node] = OrderedDict()
        self._chunks: list[Chunk] = []
        self._starts: list[int] = []
        self._load_sys_chunks(
            raw[SYS_CHUNK_ARRAY_AT : SYS_CHUNK_ARRAY_AT + sb.sys_chunk_array_size]
        )
        self._load_chunk_tree()
        self.root_tree = Tree(ROOT_TREE, sb.root, sb.root_level, sb.generation)
        self.subvolume_list: list[Any] | None = None  # filled once by the subvolume views

    # --- superblock -----------------------------------------------------------------------------

    def _check_super(self) -> None:
        sb = self.sb
        unknown = [n for n in flag_names(sb.incompat_flags, INCOMPAT) if n not in INCOMPAT_READ_OK]
        if unknown:
            raise UnsupportedGuestFeatureError(
                f"btrfs uses incompatible feature(s) {', '.join(unknown)}", features=unknown
            )
        if sb.bytenr != SUPER_OFFSET:
            raise CorruptGuestError(f"btrfs superblock says it lives at {sb.bytenr}")
        ss, ns = sb.sectorsize, sb.nodesize
        if not (4096 <= ss <= 65536 and ss & (ss - 1) == 0):
            raise CorruptGuestError(f"btrfs sector size {ss} is impossible")
        if not (ss <= ns <= 65536 and ns & (ns - 1) == 0):
            raise CorruptGuestError(f"btrfs node size {ns} is impossible")
        if sb.sys_chunk_array_size > 2048 or sb.sys_chunk_array_size < 17 + ChunkItem.size:
            raise CorruptGuestError("btrfs system chunk array size is impossible")
        if sb.root_level >= MAX_LEVEL or sb.chunk_root_level >= MAX_LEVEL:
            raise CorruptGuestError("btrfs root level is impossible")
        if sb.num_devices != 1:
            raise UnsupportedGuestFeatureError(
                f"btrfs spans {sb.num_devices} devices; only single-device filesystems are read",
                features=["multi-device"],
            )
        if sb.log_root:
            raise InspectionError(
                "the btrfs log tree needs replaying (the filesystem was not cleanly unmounted)",
                hint="boot the guest once and shut it down cleanly, or mount a copy read-write",
            )

    # --- chunks ---------------------------------------------------------------------------------

    def _add_chunk(self, key: Key, body: bytes, where: str) -> int:
        """Parse one CHUNK_ITEM body; return its size in bytes."""
        if key[0] != FIRST_CHUNK_TREE_OBJECTID or key[1] != CHUNK_ITEM:
            raise CorruptGuestError(f"btrfs {where}: item {key} is not a chunk")
        if len(body) < ChunkItem.size:
            raise CorruptGuestError(f"btrfs {where}: chunk item too short")
        c = ChunkItem.unpack(body)
        size = ChunkItem.size + c.num_stripes * STRIPE_SIZE
        if c.num_stripes == 0 or size > len(body):
            raise CorruptGuestError(f"btrfs {where}: chunk at {key[2]} has a bad stripe count")
        if c.length == 0 or c.length % self.sb.sectorsize or key[2] + c.length > U64_MAX:
            raise CorruptGuestError(f"btrfs {where}: chunk at {key[2]} has a bad length")
        profiles = [BG_PROFILES[b] for b in BG_PROFILES if c.type & b]
        if [p for p in profiles if p != "dup"] or len(profiles) > 1:
            raise UnsupportedGuestFeatureError(
                f"btrfs chunk at {key[2]} uses the {'+'.join(profiles)} profile; only single "
                "and dup are read",
                features=profiles,
            )
        want = 2 if c.type & BG_DUP else 1
        if c.num_stripes != want:
            raise CorruptGuestError(f"btrfs {where}: chunk at {key[2]} has {c.num_stripes} copies")
        phys = []
        for i in range(c.num_stripes):
            devid, offset = struct.unpack_from("<QQ", body, ChunkItem.size + i * STRIPE_SIZE)
            if devid != self.devid:
                raise UnsupportedGuestFeatureError(
                    f"btrfs chunk at {key[2]} lives on device {devid}, not this one",
                    features=["multi-device"],
                )
            if offset + c.length > self.dev.virtual_size:
                raise CorruptGuestError(
                    f"btrfs chunk at {key[2]} maps past the end of the device "
                    f"({offset}+{c.length} > {self.dev.virtual_size})"
                )
            phys.append(offset)
        chunk = Chunk(key[2], c.length, c.type, tuple(phys))
        i = bisect.bisect_left(self._starts, chunk.logical)
        if i < len(self._starts) and self._starts[i] == chunk.logical:
            if self._chunks[i] != chunk:
                raise CorruptGuestError(f"btrfs chunk at {key[2]} is described twice, differently")
            return size
        before = self._chunks[i - 1] if i else None
        after = self._chunks[i] if i < len(self._chunks) else None
        if (before and before.logical + before.length > chunk.logical) or (
            after and chunk.logical + chunk.length > after.logical
        ):
            raise CorruptGuestError(f"btrfs chunk at {key[2]} overlaps another")
        if len(self._chunks) >= MAX_CHUNKS:
            raise GuestLimitError(f"btrfs has more than {MAX_CHUNKS} chunks")
        self._chunks.insert(i, chunk)
        self._starts.insert(i, chunk.logical)
        return size

    def _load_sys_chunks(self, array: bytes) -> None:
        pos = 0
        while pos < len(array):
            if pos + 17 > len(array):
                raise CorruptGuestError("btrfs system chunk array ends inside a key")
            key = unpack_key(array, pos)
            pos += 17
            pos += self._add_chunk(key, array[pos:], "system chunk array")
        if not self._chunks:
            raise CorruptGuestError("btrfs system chunk array is empty")

    def _load_chunk_tree(self) -> None:
        tree = Tree(
            CHUNK_TREE, self.sb.chunk_root, self.sb.chunk_root_level, self.sb.chunk_root_generation
        )
        lo = (FIRST_CHUNK_TREE_OBJECTID, CHUNK_ITEM, 0)
        hi = (FIRST_CHUNK_TREE_OBJECTID, CHUNK_ITEM, U64_MAX)
        for key, body in self.items(tree, lo, hi):
            self._add_chunk(key, body, "chunk tree")

    def _chunk(self, logical: int) -> Chunk:
        i = bisect.bisect_right(self._starts, logical) - 1
        if i < 0 or logical >= self._chunks[i].logical + self._chunks[i].length:
            raise CorruptGuestError(f"btrfs logical address {logical} is in no chunk")
        return self._chunks[i]

    def read_logical(self, logical: int, length: int, copy: int = 0) -> bytes:
        """``length`` bytes at a logical address, crossing chunk boundaries as needed."""
        out = bytearray()
        while length > 0:
            c = self._chunk(logical)
            n = min(length, c.logical + c.length - logical)
            phys = c.physical[min(copy, len(c.physical) - 1)]
            out += self.dev.read(phys + logical - c.logical, n)
            logical += n
            length -= n
        return bytes(out)

    def copies(self, logical: int) -> int:
        return len(self._chunk(logical).physical)

    # --- nodes ----------------------------------------------------------------------------------

    def node(self, bytenr: int, level: int, generation: int | None, owner: str) -> Node:
        """The checked node at ``bytenr``; ``level``/``generation`` are what its parent said."""
        cached = self._cache.get(bytenr)
        if cached is None:
            cached = self._read_node(bytenr, owner)
            self._cache[bytenr] = cached
            if len(self._cache) > NODE_CACHE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(bytenr)
        if cached.level != level:
            raise CorruptGuestError(
                f"btrfs {owner}: node {bytenr} is level {cached.level}, its parent says {level}"
            )
        if generation is not None:
            gen = NodeHeader.unpack(cached.raw).generation
            if gen != generation:
                raise CorruptGuestError(
                    f"btrfs {owner}: node {bytenr} has generation {gen}, expected {generation}"
                )
        return cached

    def _read_node(self, bytenr: int, owner: str) -> Node:
        ns = self.sb.nodesize
        if bytenr % self.sb.sectorsize:
            raise CorruptGuestError(f"btrfs {owner}: node address {bytenr} is not aligned")
        errors = []
        for copy in range(self.copies(bytenr)):
            raw = self.read_logical(bytenr, ns, copy)
            if len(raw) != ns:
                raise CorruptGuestError(f"btrfs {owner}: node {bytenr} is cut short")
            if digest(self.csum_type, raw[32:]) != raw[: self.csum_size]:
                errors.append(f"copy {copy + 1} fails its {self.csum_type} checksum")
                continue
            return self._parse_node(bytenr, raw, owner)
        raise CorruptGuestError(f"btrfs {owner}: node {bytenr}: {'; '.join(errors)}")

    def _parse_node(self, bytenr: int, raw: bytes, owner: str) -> Node:
        h = NodeHeader.unpack(raw)
        if h.fsid != self.meta_fsid:
            raise CorruptGuestError(f"btrfs {owner}: node {bytenr} belongs to another filesystem")
        if h.bytenr != bytenr:
            raise CorruptGuestError(f"btrfs {owner}: node {bytenr} says it lives at {h.bytenr}")
        if h.level >= MAX_LEVEL:
            raise CorruptGuestError(f"btrfs {owner}: node {bytenr} has level {h.level}")
        if h.generation > self.sb.generation:
            raise CorruptGuestError(f"btrfs {owner}: node {bytenr} is newer than the superblock")
        body = len(raw) - HEADER_SIZE
        keys: list[Key] = []
        ptrs: list[tuple[int, int]] = []
        items: list[tuple[int, int]] = []
        if h.level:
            if h.nritems == 0 or h.nritems * KEY_PTR_SIZE > body:
                raise CorruptGuestError(f"btrfs {owner}: node {bytenr} has {h.nritems} pointers")
            for i in range(h.nritems):
                at = HEADER_SIZE + i * KEY_PTR_SIZE
                keys.append(unpack_key(raw, at))
                ptrs.append(struct.unpack_from("<QQ", raw, at + 17))  # type: ignore[arg-type]
        else:
            if h.nritems * ITEM_SIZE > body:
                raise CorruptGuestError(f"btrfs {owner}: leaf {bytenr} has {h.nritems} items")
            floor = HEADER_SIZE + h.nritems * ITEM_SIZE
            for i in range(h.nritems):
                at = HEADER_SIZE + i * ITEM_SIZE
                keys.append(unpack_key(raw, at))
                off, size = struct.unpack_from("<II", raw, at + 17)
                start = HEADER_SIZE + off
                if start < floor or start + size > len(raw):
                    raise CorruptGuestError(
                        f"btrfs {owner}: leaf {bytenr} item {i} data lies outside the leaf"
                    )
                items.append((start, size))
        for a, b in itertools.pairwise(keys):
            if a >= b:
                raise CorruptGuestError(f"btrfs {owner}: node {bytenr} keys are out of order")
        return Node(bytenr, h.level, keys, ptrs, items, raw)

    # --- searches -------------------------------------------------------------------------------

    def items(self, tree: Tree, lo: Key, hi: Key) -> Iterator[tuple[Key, bytes]]:
        """Every item of ``tree`` with ``lo <= key <= hi``, in key order."""
        budget = [MAX_NODES_PER_SEARCH]
        owner = f"tree {tree.id}"
        if tree.level >= MAX_LEVEL:
            raise CorruptGuestError(f"btrfs {owner}: root level {tree.level} is impossible")
        root = self.node(tree.bytenr, tree.level, tree.generation, owner)
        yield from self._walk(root, lo, hi, MIN_KEY, None, budget, owner)

    def _walk(
        self,
        node: Node,
        lo: Key,
        hi: Key,
        floor: Key,
        ceiling: Key | None,
        budget: list[int],
        owner: str,
    ) -> Iterator[tuple[Key, bytes]]:
        budget[0] -= 1
        if budget[0] < 0:
            raise GuestLimitError(
                f"btrfs {owner}: a search visits over {MAX_NODES_PER_SEARCH} nodes"
            )
        keys = node.keys
        if keys and (keys[0] < floor or (ceiling is not None and keys[-1] >= ceiling)):
            raise CorruptGuestError(
                f"btrfs {owner}: node {node.bytenr} holds keys outside its parent's range"
            )
        if node.level == 0:
            i = bisect.bisect_left(keys, lo)
            while i < len(keys) and keys[i] <= hi:
                start, size = node.items[i]
                yield keys[i], node.raw[start : start + size]
                i += 1
            return
        i = max(bisect.bisect_right(keys, lo) - 1, 0)
        while i < len(keys) and keys[i] <= hi:
            child_ceiling = keys[i + 1] if i + 1 < len(keys) else ceiling
            bytenr, gen = node.ptrs[i]
            child = self.node(bytenr, node.level - 1, gen, owner)
            if child.keys and child.keys[0] != keys[i]:
                raise CorruptGuestError(
                    f"btrfs {owner}: node {bytenr}'s first key differs from its parent's"
                )
            yield from self._walk(child, lo, hi, keys[i], child_ceiling, budget, owner)
            i += 1

    def first(self, tree: Tree, lo: Key, hi: Key) -> tuple[Key, bytes] | None:
        for found in self.items(tree, lo, hi):
            return found
        return None

    def lookup(self, tree: Tree, key: Key) -> bytes | None:
        found = self.first(tree, key, key)
        return found[1] if found else None

    def tree(self, tree_id: int) -> Tree | None:
        """The tree whose ROOT_ITEM in the root tree has objectid ``tree_id``, if any."""
        found = self.first(self.root_tree, (tree_id, ROOT_ITEM, 0), (tree_id, ROOT_ITEM, U64_MAX))
        if found is None:
            return None
        body = found[1]
        if len(body) < ROOT_ITEM_MIN:
            raise CorruptGuestError(f"btrfs root item of tree {tree_id} is too short")
        bytenr = struct.unpack_from("<Q", body, ROOT_BYTENR_AT)[0]
        level = body[ROOT_LEVEL_AT]
        gen = struct.unpack_from("<Q", body, 160)[0]
        return Tree(tree_id, bytenr, level, gen)
