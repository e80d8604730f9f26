"""New XFS symlinks whose target fits the inode (what masking a systemd unit needs) and files.

Why this much and no more: the ``tools`` fix rule masks units with
``/etc/systemd/system/UNIT -> /dev/null``.  Such a symlink keeps its target inside the inode
(local format), so creating it allocates no block: it takes a free inode from an existing
inode chunk and adds one directory entry.  Every structure that changes is updated and (v5)
checksummed: the inode B+tree record (free mask and count), the free-inode B+tree record
(updated, or removed when the chunk fills), the AGI free count, the superblock free count, the
new inode, the directory (short form in the parent inode, or the single data block of a block
form directory with its bestfree table and hash-sorted leaf) and the parent inode.

Everything is planned and checked before the first write; anything outside that envelope
(no free inode in any existing chunk, a directory in leaf or node form, a short-form directory
that would have to become a block, a B+tree change that is more than editing one leaf,
ASCII-CI names, quota accounting) is refused with the reason and nothing written.

A regular file with content is created empty, then written by :func:`xfs_write.write_file`
(new blocks from :mod:`.xfs_alloc`); the allocation is planned before the inode is taken, so a
refusal still comes before the first write.
"""

from __future__ import annotations

import stat as _stat
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vmferry.guest.errors import CorruptGuestError, GuestLimitError, GuestWriteRefusedError
from vmferry.guest.fs import clock, xfs_alloc, xfs_rmap
from vmferry.guest.fs.xfs_layout import (
    DIFLAG2_BIGTIME,
    DINODE_V3_CRC,
    FMT_EXTENTS,
    FMT_LOCAL,
    cksum_ok,
    set_cksum,
)
from vmferry.guest.fs.xfs_write import (
    INCOMPAT_META_UUID,
    MAX_WRITE,
    check_writable,
    inode_touched,
    merged_extents,
    timestamp,
    write_file,
)

if TYPE_CHECKING:
    from vmferry.guest.fs.xfs import XfsFilesystem, XfsInode
    from vmferry.guest.overlay import WritableDisk

_REFUSED = "nothing was written"
INCOMPAT_BIGTIME = 0x8
INCOMPAT_SPARSE = 0x2
RO_COMPAT_FINOBT = 0x1
VERSION_NLINK = 0x20
VERSION_BORG = 0x4000  # ASCII case-insensitive names: another hash
QUOTA_ACCOUNTING = 0x1 | 0x8 | 0x40  # user, project, group accounting
NULLAGINO = 0xFFFFFFFF
MAX_BTREE_BLOCKS = 1 << 16
FTYPE_FILE, FTYPE_SYMLINK = 1, 7

# AGI fields (byte offsets)
AGI_MAGIC, AGI_SEQNO, AGI_ROOT, AGI_LEVEL, AGI_FREECOUNT = 0, 8, 20, 24, 28
AGI_UUID, AGI_CRC, AGI_FREE_ROOT, AGI_FREE_LEVEL = 296, 312, 328, 332
SB_IFREE, SB_CRC = 136, 224
CORE_SIZE_V3, CORE_SIZE_V2 = 176, 100


@dataclass
class _Plan:
    """Byte ranges to write, in order; nothing is written until the plan is complete."""

    writes: list[tuple[int, bytes]] = field(default_factory=list)

    def add(self, offset: int, data: bytes | bytearray) -> None:
        self.writes.append((offset, bytes(data)))


def create(
    fs: XfsFilesystem, path: str, kind: str, payload: bytes, mode: int = 0o644, uid: int = 0,
    gid: int = 0,
) -> int:  # fmt: skip
    """Create ``path``: a ``symlink`` to ``payload`` or a ``file`` holding it; returns its inode.

    A file's content is written by :func:`xfs_write.write_file` once the empty file exists;
    its allocation was already planned (and would have been refused) before the first write.
    """
    plan, ino = _plan_new(fs, path, kind, payload, mode, uid, gid)
    dev: WritableDisk = fs.dev  # type: ignore[assignment]  # check_writable saw .write
    for offset, data in plan.writes:
        dev.write(offset, data)
    fs._dir_cache.clear()
    if kind == "file" and payload:
        write_file(fs, path, payload)
    return ino


def check_create(
    fs: XfsFilesystem, path: str, kind: str = "symlink", payload: bytes = b"/"
) -> None:
    """Raise the refusal ``create`` would raise, without writing."""
    _plan_new(fs, path, kind, payload, 0o644, 0, 0)


def _plan_new(
    fs: XfsFilesystem, path: str, kind: str, payload: bytes, mode: int, uid: int, gid: int
) -> tuple[_Plan, int]:
    check_writable(fs)
    sb = fs.sb
    if not fs.v5 and not sb.versionnum & VERSION_NLINK:
        raise _refuse(path, "the filesystem still uses version 1 inodes")
    if not fs.v5 and sb.versionnum & VERSION_BORG:
        raise _refuse(path, "the filesystem hashes names case-insensitively (ASCII-CI)")
    if sb.qflags & QUOTA_ACCOUNTING:
        raise _refuse(path, "quota accounting is on and vmferry does not update quota counts")
    literal = sb.inodesize - (CORE_SIZE_V3 if fs.v5 else CORE_SIZE_V2)
    if kind == "symlink" and not 0 < len(payload) <= literal:
        raise _refuse(path, f"a {len(payload)}-byte target does not fit inside the inode")
    content, payload = (payload, b"") if kind == "file" else (b"", payload)
    parent_path, _, name = path.rstrip("/").rpartition("/")
    raw_name = name.encode("utf-8", "surrogateescape")
    if not 0 < len(raw_name) <= 255 or name in (".", "..") or b"\0" in raw_name:
        raise _refuse(path, "not a valid file name")
    parent = fs.resolve(parent_path or "/")
    if parent.kind != "dir":
        raise _refuse(path, "the parent is not a directory")
    if fs._lookup_in(parent.ino, name) is not None:
        raise _refuse(path, "it already exists")
    plan = _Plan()
    ino = _allocate_inode(fs, parent, plan, path)
    ftype = FTYPE_SYMLINK if kind == "symlink" else FTYPE_FILE
    _add_entry(fs, parent, raw_name, ino, ftype, plan, path)
    if kind == "symlink":
        imode, fmt = _stat.S_IFLNK | 0o777, FMT_LOCAL
    else:
        imode, fmt = _stat.S_IFREG | (mode & 0o7777), FMT_EXTENTS
    # the new inode goes first: the entry and counts written after it point at a whole inode
    plan.writes.insert(0, _new_inode(fs, ino, imode, fmt, payload, uid, gid))
    if content:
        _check_content(fs, ino, content, literal, path)
    return plan, ino


def _check_content(fs: XfsFilesystem, ino: int, content: bytes, literal: int, path: str) -> None:
    """Refuse now what writing ``content`` into the new inode ``ino`` would refuse later.

    Creating the inode touches no free-space structure, so the allocation planned here (and
    thrown away) is exactly the one the write after the creation will make.
    """
    if len(content) > MAX_WRITE:
        raise _refuse(path, f"{len(content)} bytes is over {MAX_WRITE}")
    sb = fs.sb
    need = -(-len(content) // sb.blocksize)
    home_ag = ino >> (sb.agblklog + sb.inopblog)

    def rmap(trial: xfs_alloc.Buffers, pieces: list[tuple[int, int]]) -> None:
        if xfs_alloc.has_rmapbt(fs):
            xfs_rmap.record_growth(fs, trial, ino, [], merged_extents([], 0, pieces))

    pieces = xfs_alloc.allocate(fs, xfs_alloc.Buffers(fs), need, None, home_ag, path, rmap)
    records = len(merged_extents([], 0, pieces))
    if records * 16 > literal:
        raise _refuse(path, f"its content would need {records} extents, more than the inode holds")


# --- the new inode ------------------------------------------------------------------------------


def _new_inode(
    fs: XfsFilesystem, ino: int, mode: int, fmt: int, local: bytes, uid: int, gid: int
) -> tuple[int, bytes]:
    """(offset, bytes) of inode ``ino`` initialised; ``local`` is its inline data."""
    old = fs.inode(ino)  # the free slot, initialised when its chunk was allocated
    if old.core.mode != 0:
        raise CorruptGuestError(f"XFS inode {ino} is marked free but has mode {old.core.mode:o}")
    if fs.v5 and not cksum_ok(old.raw, DINODE_V3_CRC):
        raise CorruptGuestError(f"free XFS inode {ino} fails its checksum")
    sb = fs.sb
    v3 = fs.v5
    bigtime = v3 and bool(sb.features_incompat & INCOMPAT_BIGTIME)
    stamp = timestamp(clock.now_ns(), bigtime)
    raw = bytearray(sb.inodesize)
    struct.pack_into(">2sHBBHIII", raw, 0, b"IN", mode, 3 if v3 else 2, fmt, 0, uid, gid, 1)
    raw[32:40] = raw[40:48] = raw[48:56] = stamp
    struct.pack_into(">QQIIHBB", raw, 56, len(local), 0, 0, 0, 0, 0, FMT_EXTENTS)
    struct.pack_into(">I", raw, 92, old.core.gen)
    struct.pack_into(">I", raw, 96, NULLAGINO)
    start = CORE_SIZE_V3 if v3 else CORE_SIZE_V2
    raw[start : start + len(local)] = local
    if v3:
        struct.pack_into(">QQQ", raw, 104, 1, 0, DIFLAG2_BIGTIME if bigtime else 0)
        raw[144:152] = stamp
        struct.pack_into(">Q16s", raw, 152, ino, _uuid(fs))
        set_cksum(raw, DINODE_V3_CRC)
    return old.offset, bytes(raw)


# --- inode allocation: inobt, finobt, AGI, superblock -------------------------------------------


def _allocate_inode(fs: XfsFilesystem, parent: XfsInode, plan: _Plan, path: str) -> int:
    sb = fs.sb
    shift = sb.agblklog + sb.inopblog
    first_ag = parent.ino >> shift
    for step in range(sb.agcount):
        agno = (first_ag + step) % sb.agcount
        agi_off = agno * sb.agblocks * sb.blocksize + 2 * sb.sectsize
        agi = bytearray(fs.dev.read(agi_off, sb.sectsize))
        _check_agi(fs, agi, agno)
        if struct.unpack_from(">I", agi, AGI_FREECOUNT)[0] == 0:
            continue
        root, level = struct.unpack_from(">II", agi, AGI_ROOT)
        found = _find_free(fs, agno, root, level, b"IAB3" if fs.v5 else b"IABT")
        if found is None:
            raise CorruptGuestError(f"XFS AG {agno}: the AGI counts free inodes the inobt lacks")
        leaf_off, leaf, index = found
        startino, holemask, count, freecount, free = _record(fs, leaf, index)
        bit = next((i for i in range(64) if free >> i & 1 and not holemask >> (i // 4) & 1), None)
        if bit is None or freecount == 0:
            raise CorruptGuestError(f"XFS AG {agno}: inobt record {startino} has no free inode")
        new_free = free & ~(1 << bit)
        _set_record(fs, leaf, index, holemask, count, freecount - 1, new_free)
        plan.add(leaf_off, _sealed(fs, leaf))
        if sb.features_ro_compat & RO_COMPAT_FINOBT:
            _finobt_update(fs, agi, agno, startino, holemask, count, freecount - 1, new_free, plan)
        struct.pack_into(
            ">I", agi, AGI_FREECOUNT, struct.unpack_from(">I", agi, AGI_FREECOUNT)[0] - 1
        )
        if fs.v5:
            set_cksum(agi, AGI_CRC)
        plan.add(agi_off, agi)
        _superblock_ifree(fs, plan)
        return (agno << shift) | (startino + bit)
    raise _refuse(
        path,
        "no allocation group has a free inode in an existing chunk (allocating a new inode "
        "chunk is not implemented)",
    )


def _check_agi(fs: XfsFilesystem, agi: bytes | bytearray, agno: int) -> None:
    if agi[:4] != b"XAGI" or struct.unpack_from(">I", agi, AGI_SEQNO)[0] != agno:
        raise CorruptGuestError(f"XFS AG {agno}: bad AGI")
    if fs.v5 and (not cksum_ok(agi, AGI_CRC) or bytes(agi[AGI_UUID : AGI_UUID + 16]) != _uuid(fs)):
        raise CorruptGuestError(f"XFS AG {agno}: AGI checksum or UUID mismatch")


def _uuid(fs: XfsFilesystem) -> bytes:
    sb = fs.sb
    return sb.meta_uuid if sb.features_incompat & INCOMPAT_META_UUID else sb.uuid


def _hdr(fs: XfsFilesystem) -> int:
    return 56 if fs.v5 else 16


def _read_btree_block(
    fs: XfsFilesystem, agno: int, agbno: int, magic: bytes, level: int
) -> tuple[int, bytearray]:
    sb = fs.sb
    if not 0 < agbno < sb.agblocks:
        raise CorruptGuestError(f"XFS AG {agno}: inode B+tree block {agbno} is out of range")
    off = (agno * sb.agblocks + agbno) * sb.blocksize
    blk = bytearray(fs.dev.read(off, sb.blocksize))
    blevel, numrecs = struct.unpack_from(">HH", blk, 4)
    cap = (sb.blocksize - _hdr(fs)) // (16 if level == 0 else 8)
    if blk[:4] != magic or blevel != level or numrecs > cap:
        raise CorruptGuestError(f"XFS AG {agno}: inode B+tree block {agbno} is damaged")
    if fs.v5:
        blkno, _lsn, uuid, owner = struct.unpack_from(">QQ16sI", blk, 16)
        if not cksum_ok(blk, 52) or blkno != off // 512 or uuid != _uuid(fs) or owner != agno:
            raise CorruptGuestError(f"XFS AG {agno}: inode B+tree block {agbno} fails its checks")
    return off, blk


def _find_free(
    fs: XfsFilesystem, agno: int, root: int, level: int, magic: bytes
) -> tuple[int, bytearray, int] | None:
    """(block offset, leaf block, record index) of the first record with a free inode."""
    if level == 0 or level > 8:
        raise CorruptGuestError(f"XFS AG {agno}: inode B+tree level {level}")
    budget = [MAX_BTREE_BLOCKS]

    def walk(agbno: int, lvl: int) -> tuple[int, bytearray, int] | None:
        budget[0] -= 1
        if budget[0] < 0:
            raise GuestLimitError(f"XFS AG {agno}: inode B+tree has too many blocks")
        off, blk = _read_btree_block(fs, agno, agbno, magic, lvl)
        numrecs = struct.unpack_from(">H", blk, 6)[0]
        if lvl == 0:
            for i in range(numrecs):
                if _record(fs, blk, i)[3]:
                    return off, blk, i
            return None
        for ptr in _ptrs(fs, blk, numrecs):
            hit = walk(ptr, lvl - 1)
            if hit is not None:
                return hit
        return None

    return walk(root, level - 1)


def _ptrs(fs: XfsFilesystem, blk: bytes | bytearray, numrecs: int) -> tuple[int, ...]:
    maxrecs = (fs.sb.blocksize - _hdr(fs)) // 8
    return struct.unpack_from(f">{numrecs}I", blk, _hdr(fs) + 4 * maxrecs)


def _record(fs: XfsFilesystem, blk: bytes | bytearray, i: int) -> tuple[int, int, int, int, int]:
    """(startino, holemask, count, freecount, free mask) of leaf record ``i``."""
    at = _hdr(fs) + 16 * i
    if fs.sb.features_incompat & INCOMPAT_SPARSE:
        startino, holemask, count, freecount, free = struct.unpack_from(">IHBBQ", blk, at)
    else:
        startino, freecount, free = struct.unpack_from(">IIQ", blk, at)
        holemask, count = 0, 64
    if freecount > 64 or freecount != bin(free & ~_hole_bits(holemask)).count("1"):
        raise CorruptGuestError(f"XFS inode B+tree record {startino}: free count disagrees")
    return startino, holemask, count, freecount, free


def _hole_bits(holemask: int) -> int:
    return sum(0xF << (4 * j) for j in range(16) if holemask >> j & 1)


def _set_record(
    fs: XfsFilesystem, blk: bytearray, i: int, holemask: int, count: int, freecount: int, free: int
) -> None:
    at = _hdr(fs) + 16 * i
    if fs.sb.features_incompat & INCOMPAT_SPARSE:
        struct.pack_into(">HBBQ", blk, at + 4, holemask, count, freecount, free)
    else:
        struct.pack_into(">IQ", blk, at + 4, freecount, free)


def _sealed(fs: XfsFilesystem, blk: bytearray) -> bytearray:
    if fs.v5:
        set_cksum(blk, 52)
    return blk


def _finobt_update(
    fs: XfsFilesystem,
    agi: bytes | bytearray,
    agno: int,
    startino: int,
    holemask: int,
    count: int,
    freecount: int,
    free: int,
    plan: _Plan,
) -> None:
    """Mirror the inobt change in the free-inode B+tree (the record goes when the chunk fills)."""
    root, level = struct.unpack_from(">II", agi, AGI_FREE_ROOT)
    magic = b"FIB3" if fs.v5 else b"FIBT"
    if level == 0 or level > 8:
        raise CorruptGuestError(f"XFS AG {agno}: free-inode B+tree level {level}")
    agbno, lvl = root, level - 1
    for _ in range(level):
        off, blk = _read_btree_block(fs, agno, agbno, magic, lvl)
        numrecs = struct.unpack_from(">H", blk, 6)[0]
        if lvl == 0:
            break
        keys = struct.unpack_from(f">{numrecs}I", blk, _hdr(fs))
        pick = max((i for i, k in enumerate(keys) if k <= startino), default=None)
        if pick is None:
            raise CorruptGuestError(f"XFS AG {agno}: free-inode B+tree lacks chunk {startino}")
        agbno, lvl = _ptrs(fs, blk, numrecs)[pick], lvl - 1
    index = next((i for i in range(numrecs) if _record(fs, blk, i)[0] == startino), None)
    if index is None:
        raise CorruptGuestError(f"XFS AG {agno}: free-inode B+tree lacks chunk {startino}")
    if freecount:
        _set_record(fs, blk, index, holemask, count, freecount, free)
    else:
        maxrecs = (fs.sb.blocksize - _hdr(fs)) // 16
        if level > 1 and (index == 0 or numrecs - 1 < maxrecs // 2):
            raise GuestWriteRefusedError(
                "removing a full chunk from this free-inode B+tree would reshape it (key or "
                "merge updates vmferry does not make)",
                hint=_REFUSED,
            )
        at = _hdr(fs) + 16 * index
        end = _hdr(fs) + 16 * numrecs
        blk[at : end - 16] = blk[at + 16 : end]
        blk[end - 16 : end] = bytes(16)
        struct.pack_into(">H", blk, 6, numrecs - 1)
    plan.add(off, _sealed(fs, blk))


def _superblock_ifree(fs: XfsFilesystem, plan: _Plan) -> None:
    sect = bytearray(fs.dev.read(0, fs.sb.sectsize))
    ifree = struct.unpack_from(">Q", sect, SB_IFREE)[0]
    if ifree == 0:
        raise CorruptGuestError("XFS superblock counts no free inode but an AG has one")
    struct.pack_into(">Q", sect, SB_IFREE, ifree - 1)
    if fs.v5:
        set_cksum(sect, SB_CRC)
    plan.add(0, sect)


# --- the directory entry ------------------------------------------------------------------------


def _add_entry(
    fs: XfsFilesystem, parent: XfsInode, name: bytes, ino: int, ftype: int, plan: _Plan, path: str
) -> None:
    if parent.core.format == FMT_LOCAL:
        fork = _shortform_add(fs, parent, name, ino, ftype, path)
        raw = bytearray(parent.raw)
        start = CORE_SIZE_V3 if parent.core.version == 3 else CORE_SIZE_V2
        raw[start : start + len(fork)] = fork
        raw[start + len(fork) : start + len(parent.fork)] = bytes(len(parent.fork) - len(fork))
        plan.add(parent.offset, inode_touched(parent, raw, len(fork)))
        return
    if parent.core.format != FMT_EXTENTS or parent.core.size != fs.dir_block:
        raise _refuse(path, "the directory is in leaf or node form (only short and block form)")
    extents = fs._extents(parent)
    nfsb = fs.dir_block // fs.block_size
    if len(extents) != 1 or extents[0][0] != 0 or extents[0][2] != nfsb or extents[0][3]:
        raise _refuse(path, "the directory is in leaf or node form (only short and block form)")
    off = fs._fsb_offset(extents[0][1])
    blk = bytearray(fs._read_fsb(extents[0][1], nfsb, "directory block"))
    _block_add(fs, parent, blk, off, name, ino, ftype, path)
    plan.add(off, blk)
    plan.add(parent.offset, inode_touched(parent, bytearray(parent.raw), parent.core.size))


def _entsize(fs: XfsFilesystem, namelen: int) -> int:
    return (8 + 1 + namelen + (1 if fs.ftype else 0) + 2 + 7) & ~7


def _data_hdr(fs: XfsFilesystem) -> int:
    return 64 if fs.v5 else 16


def _shortform_add(
    fs: XfsFilesystem, parent: XfsInode, name: bytes, ino: int, ftype: int, path: str
) -> bytes:
    f = bytearray(parent.fork[: parent.core.size])
    if len(f) < 6 or parent.core.size > len(parent.fork):
        raise CorruptGuestError(f"XFS directory {parent.ino}: short form size is impossible")
    count, i8 = f[0], f[1]
    isize = 8 if i8 else 4
    if ino >> 32 and not i8:
        raise _refuse(path, "the new inode number needs the directory's 8-byte form")
    pos = 2 + isize
    offset = _data_hdr(fs) + _entsize(fs, 1) + _entsize(fs, 2)  # after "." and ".."
    for _ in range(count):
        if pos + 3 > len(f):
            raise CorruptGuestError(f"XFS directory {parent.ino}: short form overruns")
        namelen = f[pos]
        tag = struct.unpack_from(">H", f, pos + 1)[0]
        if tag < offset:
            raise CorruptGuestError(f"XFS directory {parent.ino}: short form offsets go back")
        offset = tag + _entsize(fs, namelen)
        pos += 3 + namelen + (1 if fs.ftype else 0) + isize
    if pos != len(f):
        raise CorruptGuestError(f"XFS directory {parent.ino}: short form size disagrees")
    # the kernel's test: would the directory, with the new entry, still fit one block?
    need = offset + _entsize(fs, len(name)) + (count + 3) * 8 + 8
    if need > fs.dir_block:
        raise _refuse(path, "the directory would have to grow into a block")
    entry = bytes([len(name)]) + struct.pack(">H", offset) + name
    entry += bytes([ftype]) if fs.ftype else b""
    entry += ino.to_bytes(isize, "big")
    new = bytearray(f + entry)
    new[0] = count + 1
    if len(new) > len(parent.fork):
        raise _refuse(path, "the directory would outgrow its inode and need a block")
    return bytes(new)


def _block_add(
    fs: XfsFilesystem,
    parent: XfsInode,
    blk: bytearray,
    blk_off: int,
    name: bytes,
    ino: int,
    ftype: int,
    path: str,
) -> None:
    """Insert the entry into a block-form directory block (rebuilt free space and leaf)."""
    dbs = fs.dir_block
    hdr = _data_hdr(fs)
    magic = b"XDB3" if fs.v5 else b"XD2B"
    if blk[:4] != magic:
        raise CorruptGuestError(f"XFS directory {parent.ino}: block has a bad magic")
    if fs.v5:
        blkno, _lsn, uuid, owner = struct.unpack_from(">QQ16sQ", blk, 8)
        if not cksum_ok(blk, 4) or blkno != blk_off // 512 or uuid != _uuid(fs):
            raise CorruptGuestError(f"XFS directory {parent.ino}: block fails its checks")
        if owner != parent.ino:
            raise CorruptGuestError(f"XFS directory {parent.ino}: block belongs elsewhere")
    count, stale = struct.unpack_from(">II", blk, dbs - 8)
    leaf_start = dbs - 8 - 8 * count
    if stale > count or leaf_start < hdr:
        raise CorruptGuestError(f"XFS directory {parent.ino}: block tail is impossible")
    leaf = [struct.unpack_from(">II", blk, leaf_start + 8 * i) for i in range(count)]
    live_leaf = [e for e in leaf if e[1] != 0]
    if len(live_leaf) != count - stale:
        raise CorruptGuestError(f"XFS directory {parent.ino}: stale count disagrees")
    # the live data entries, by offset; everything between them is free space
    entries: list[tuple[int, bytes]] = []
    pos = hdr
    while pos < leaf_start:
        if blk[pos : pos + 2] == b"\xff\xff":
            length = struct.unpack_from(">H", blk, pos + 2)[0]
            if length < 8 or length % 8 or pos + length > leaf_start:
                raise CorruptGuestError(f"XFS directory {parent.ino}: bad free entry")
            pos += length
            continue
        namelen = blk[pos + 8]
        size = _entsize(fs, namelen)
        if namelen == 0 or pos + size > leaf_start:
            raise CorruptGuestError(f"XFS directory {parent.ino}: entry overruns its block")
        entries.append((pos, bytes(blk[pos : pos + size])))
        pos += size
    if {e[1] * 8 for e in live_leaf} != {p for p, _ in entries}:
        raise CorruptGuestError(f"XFS directory {parent.ino}: leaf and entries disagree")
    # stale leaf entries are dropped (as xfs_dir2_block_compact does); one new leaf entry
    new_leaf_start = dbs - 8 - 8 * (len(live_leaf) + 1)
    size = _entsize(fs, len(name))
    gaps = _gaps(entries, hdr, new_leaf_start)
    if gaps is None:
        raise _refuse(path, "the directory block is full (it would have to become leaf form)")
    at = next((g for g, length in gaps if length >= size), None)
    if at is None:
        raise _refuse(path, "the directory block is full (it would have to become leaf form)")
    entry = bytearray(size)
    struct.pack_into(">QB", entry, 0, ino, len(name))
    entry[9 : 9 + len(name)] = name
    if fs.ftype:
        entry[9 + len(name)] = ftype
    struct.pack_into(">H", entry, size - 2, at)
    entries = sorted([*entries, (at, bytes(entry))])
    gaps = _gaps(entries, hdr, new_leaf_start)
    assert gaps is not None
    body = bytearray(dbs)
    body[:hdr] = blk[:hdr]
    for p, data in entries:
        body[p : p + len(data)] = data
    for p, length in gaps:
        struct.pack_into(">HH", body, p, 0xFFFF, length)
        struct.pack_into(">H", body, p + length - 2, p)
    best = sorted(gaps, key=lambda g: (-g[1], g[0]))[:3]
    best += [(0, 0)] * (3 - len(best))
    bf_at = 48 if fs.v5 else 4
    for i, (p, length) in enumerate(best):
        struct.pack_into(">HH", body, bf_at + 4 * i, p, length)
    new_leaf = sorted([*live_leaf, (hashname(name), at // 8)])
    for i, (h, addr) in enumerate(new_leaf):
        struct.pack_into(">II", body, new_leaf_start + 8 * i, h, addr)
    struct.pack_into(">II", body, dbs - 8, len(new_leaf), 0)
    if fs.v5:
        set_cksum(body, 4)
    blk[:] = body


def _gaps(entries: list[tuple[int, bytes]], start: int, end: int) -> list[tuple[int, int]] | None:
    """Free (offset, length) runs between sorted entries in [start, end); None if they overlap."""
    out = []
    pos = start
    for p, data in sorted(entries):
        if p < pos:
            return None
        if p > pos:
            out.append((pos, p - pos))
        pos = p + len(data)
    if pos > end:
        return None
    if end > pos:
        out.append((pos, end - pos))
    return out


def hashname(name: bytes) -> int:
    """The directory name hash (``xfs_da_hashname``): 7-bit rotations over 4-byte groups."""

    def rol(x: int, n: int) -> int:
        return ((x << n) | (x >> (32 - n))) & 0xFFFFFFFF

    h = 0
    i = 0
    while len(name) - i >= 4:
        a, b, c, d = name[i : i + 4]
        h = (a << 21) ^ (b << 14) ^ (c << 7) ^ d ^ rol(h, 28)
        i += 4
    rest = name[i:]
    if len(rest) == 3:
        h = (rest[0] << 14) ^ (rest[1] << 7) ^ rest[2] ^ rol(h, 21)
    elif len(rest) == 2:
        h = (rest[0] << 7) ^ rest[1] ^ rol(h, 14)
    elif len(rest) == 1:
        h = rest[0] ^ rol(h, 7)
    return h & 0xFFFFFFFF


def _refuse(path: str, why: str) -> GuestWriteRefusedError:
    return GuestWriteRefusedError(f"{path}: vmferry cannot create it on XFS: {why}", hint=_REFUSED)
