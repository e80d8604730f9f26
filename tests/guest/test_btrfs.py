"""btrfs reading against filesystems made by btrfs-progs and the kernel; btrfs-progs is the oracle.

Two kinds of fixture:

* ``mkfs.btrfs --rootdir`` images (no mount): every checksum type, small nodes for deep trees,
  and the hostile variants made by editing them (checksums recomputed where the test wants the
  damage to pass the checksum and hit a later check);
* one image built through a loop mount (subvolumes, a default subvolume, a nested subvolume and
  snapshots of it, zlib/zstd/lzo extents, COW-split and preallocated extents), since
  btrfs-progs 6.2's mkfs can make neither subvolumes nor compressed extents.  ``btrfs check``,
  ``btrfs subvolume list/get-default`` and ``dump-tree`` are the oracles; every file is compared
  with the host tree it was copied from.
"""

from __future__ import annotations

import os
import random
import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import crc32c
import pytest

from tests.conftest import require_tool, run
from tests.guest.conftest import fake_root, make_disk
from vmferry.errors import InspectionError
from vmferry.guest.errors import (
    CorruptGuestError,
    NotADirectoryInGuestError,
    UnsupportedGuestFeatureError,
)
from vmferry.guest.fs.btrfs import BtrfsFilesystem, BtrfsSubvolumeFS
from vmferry.guest.fs.btrfs_compress import lzo1x_decompress
from vmferry.guest.fs.probe import open_filesystem, probe
from vmferry.guest.fs.types import GuestFileNotFound
from vmferry.guest.overlay import Slice

MIB = 1 << 20
SUPER = 0x10000


class FileDisk:
    """A raw file as a ReadableDisk."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed by the GC with the test's disk
        self.virtual_size = path.stat().st_size

    def read(self, offset: int, length: int) -> bytes:
        self._f.seek(offset)
        return self._f.read(length)


def _words_text(seed: int, size: int) -> bytes:
    """Compressible text (so the kernel really compresses it), different per seed."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 9))) for _ in range(400)
    ]
    out = bytearray()
    while len(out) < size:
        out += (" ".join(rng.choice(words) for _ in range(64)) + "\n").encode()
    return bytes(out[:size])


SIZES = (0, 1, 100, 2047, 2048, 2049, 4095, 4096, 4097, 65539, 300_000, MIB + 7)


def _source(root: Path, *, bigdir: int = 1500) -> Path:
    """A guest-like tree: fake_root plus files of many sizes, a big dir, symlinks, a sparse file."""
    fake_root(root)
    rng = random.Random(6)
    data = root / "data"
    data.mkdir()
    for n in SIZES:
        (data / f"r{n}").write_bytes(rng.randbytes(n))
        (data / f"t{n}").write_bytes(_words_text(n, n))
    big = root / "bigdir"
    big.mkdir()
    for i in range(bigdir):
        (big / f"an-entry-with-a-fairly-long-name-{i:05d}").write_text(f"entry {i}\n")
    (root / "etc/alt").symlink_to("/etc/os-release")
    (root / "rel").symlink_to("data/r100")
    (root / "dangling").symlink_to("/no/such/file")
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("loop1")
    (root / "longlink").symlink_to("/" + "x" * 200 + "/target")
    (root / "hier").mkdir()
    (root / "hier/up").symlink_to("../etc/os-release")
    with open(root / "sparse", "wb") as f:
        f.seek(3 * MIB + 5)
        f.write(b"middle of a hole")
        f.truncate(8 * MIB + 3)
    os.chmod(root / "data/r100", 0o600)
    return root


def _compare(fs: BtrfsSubvolumeFS, src: Path, prefix: str = "") -> int:
    """Every name, kind, size, mode, content and symlink target under ``src``; files compared."""
    count = 0
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        gdir = prefix + "/" + ("" if rel == "." else rel)
        listed = {e.name: e for e in fs.listdir(gdir)}
        assert set(listed) == set(dirnames) | set(filenames), gdir
        for name in dirnames + filenames:
            host = Path(dirpath) / name
            gpath = gdir.rstrip("/") + "/" + name
            st = fs.stat(gpath, follow=False)
            hst = host.lstat()
            assert st.perm == hst.st_mode & 0o7777, gpath
            if host.is_symlink():
                assert listed[name].kind == "symlink" and st.kind == "symlink"
                assert fs.readlink(gpath) == os.readlink(host), gpath
            elif host.is_dir():
                assert listed[name].kind == "dir" and st.kind == "dir"
            else:
                assert listed[name].kind == "file" and st.kind == "file"
                assert st.size == hst.st_size, gpath
                assert fs.read_file(gpath) == host.read_bytes(), gpath
                count += 1
    return count


def _mkfs(img: Path, src: Path | None, *args: str, size: int = 256 * MIB) -> Path:
    require_tool("mkfs.btrfs")
    with open(img, "wb") as f:
        f.truncate(size)
    argv = ["mkfs.btrfs", "-q", "-f", *args]
    if src is not None:
        argv += ["--rootdir", str(src)]
    run(*argv, img)
    return img


def _check(img: Path) -> None:
    require_tool("btrfs")
    proc = run("btrfs", "check", "--readonly", img, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _dump(img: Path, *args: str) -> str:
    require_tool("btrfs")
    return run("btrfs", "inspect-internal", "dump-tree", *args, img).stdout


# --- mkfs --rootdir images ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def rootdir_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _source(tmp_path_factory.mktemp("btrfs-src") / "root")


@pytest.mark.parametrize("csum", ["crc32c", "xxhash", "sha256", "blake2"])
def test_rootdir_every_checksum(tmp_path: Path, rootdir_src: Path, csum: str) -> None:
    img = _mkfs(tmp_path / "fs.img", rootdir_src, "--csum", csum, "-L", "lab-" + csum)
    _check(img)
    fs = BtrfsFilesystem(FileDisk(img))
    assert fs.volume.csum_type == {"xxhash": "xxhash64", "blake2": "blake2b"}.get(csum, csum)
    assert fs.type == "btrfs" and fs.label == "lab-" + csum
    super_info = run("btrfs", "inspect-internal", "dump-super", img).stdout
    assert re.search(rf"^fsid\s+{fs.uuid}$", super_info, re.M)
    assert fs.subvolume_id == 5 and fs.subvolumes() == []
    assert _compare(fs, rootdir_src) >= 2 * len(SIZES)


def test_deep_tree_small_nodes_single_metadata(tmp_path: Path) -> None:
    src = _source(tmp_path / "src", bigdir=4000)
    img = _mkfs(tmp_path / "fs.img", src, "-n", "4096", "-m", "single", "-d", "single")
    _check(img)
    levels = [int(m) for m in re.findall(r"^node \d+ level (\d+)", _dump(img, "-t", "fs"), re.M)]
    assert max(levels) >= 2, "fixture should have a fs tree of three levels"
    fs = BtrfsFilesystem(FileDisk(img))
    _compare(fs, src)
    assert fs.read_file("/hier/up") == (src / "etc/os-release").read_bytes()
    assert fs.read_head("/data/r1048583", 10) == (src / "data/r1048583").read_bytes()[:10]
    assert fs.read_head("/sparse", 1 << 30) == (src / "sparse").read_bytes()
    assert fs.exists("/bigdir/an-entry-with-a-fairly-long-name-03999")
    assert not fs.exists("/bigdir/an-entry-with-a-fairly-long-name-04000")
    assert not fs.exists("/dangling")
    with pytest.raises(InspectionError, match="symlinks"):
        fs.read_file("/loop1")
    with pytest.raises(NotADirectoryInGuestError):
        fs.listdir("/etc/fstab")
    with pytest.raises(GuestFileNotFound):
        fs.read_file("/bigdir")


def test_probe_and_open_filesystem_on_a_partition(tmp_path: Path, rootdir_src: Path) -> None:
    fsimg = _mkfs(tmp_path / "fs.img", rootdir_src, "-L", "vmroot", size=128 * MIB)
    img, table = make_disk(tmp_path, 130 * MIB, "label: gpt\nstart=2048,size=262144\n")
    start = table["partitions"][0]["start"] * 512
    with open(img, "r+b") as out:
        out.seek(start)
        out.write(fsimg.read_bytes())
    part = Slice(FileDisk(img), start, 128 * MIB)
    sig = probe(part)
    blk = run("blkid", "-p", "-o", "export", fsimg).stdout
    assert sig is not None and sig.type == "btrfs" and sig.label == "vmroot"
    assert f"UUID={sig.uuid}" in blk
    fs = open_filesystem(part, sig)
    assert isinstance(fs, BtrfsFilesystem) and fs.uuid == sig.uuid
    assert fs.read_file("/etc/fstab") == (rootdir_src / "etc/fstab").read_bytes()
    assert not hasattr(fs, "check_writable")  # fix.write_plan refuses: reported, never edited


def test_multi_device_raid1_is_refused(tmp_path: Path) -> None:
    require_tool("mkfs.btrfs")
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for p in (a, b):
        with open(p, "wb") as f:
            f.truncate(200 * MIB)
    run("mkfs.btrfs", "-q", "-f", "-d", "raid1", "-m", "raid1", a, b)
    with pytest.raises(UnsupportedGuestFeatureError, match="2 devices") as e:
        BtrfsFilesystem(FileDisk(a))
    assert e.value.features == ["multi-device"]


# --- hostile images -----------------------------------------------------------------------------


def _physical(img: Path, logical: int) -> list[int]:
    """Where each copy of a logical address lives, according to btrfs-map-logical."""
    require_tool("btrfs-map-logical")
    out = run("btrfs-map-logical", "-l", str(logical), img).stdout
    return [int(m) for m in re.findall(r"physical (\d+)", out)]


def _super(img: Path) -> bytearray:
    with open(img, "rb") as f:
        f.seek(SUPER)
        return bytearray(f.read(4096))


def _write_super(img: Path, sb: bytearray, *, fix_csum: bool = True) -> None:
    if fix_csum:
        sb[0:4] = struct.pack("<I", crc32c.crc32c(bytes(sb[32:])))
    with open(img, "r+b") as f:
        f.seek(SUPER)
        f.write(sb)


def _patch_node(img: Path, phys: int, at: int, data: bytes, nodesize: int = 4096) -> None:
    """Overwrite bytes inside the node at ``phys`` and recompute its crc32c."""
    with open(img, "r+b") as f:
        f.seek(phys)
        node = bytearray(f.read(nodesize))
        node[at : at + len(data)] = data
        node[0:4] = struct.pack("<I", crc32c.crc32c(bytes(node[32:])))
        f.seek(phys)
        f.write(node)


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, Path]:
    src = _source(tmp_path / "src", bigdir=1200)
    img = _mkfs(tmp_path / "fs.img", src, "-n", "4096", "-m", "single", "-d", "single")
    return img, src


def test_bad_superblock_checksum(small: tuple[Path, Path]) -> None:
    img, _ = small
    sb = _super(img)
    sb[0x12B] ^= 0x55  # the label
    _write_super(img, sb, fix_csum=False)
    with pytest.raises(CorruptGuestError, match="superblock crc32c checksum"):
        BtrfsFilesystem(FileDisk(img))


def test_unknown_incompat_bit_is_named(small: tuple[Path, Path]) -> None:
    img, _ = small
    sb = _super(img)
    flags = struct.unpack_from("<Q", sb, 0xBC)[0]
    struct.pack_into("<Q", sb, 0xBC, flags | 1 << 20 | 1 << 12)
    _write_super(img, sb)
    with pytest.raises(UnsupportedGuestFeatureError) as e:
        BtrfsFilesystem(FileDisk(img))
    assert e.value.features == ["zoned", "bit20"]


def test_log_tree_needing_replay_is_refused(small: tuple[Path, Path]) -> None:
    img, _ = small
    sb = _super(img)
    struct.pack_into("<Q", sb, 0x60, struct.unpack_from("<Q", sb, 0x50)[0])
    _write_super(img, sb)
    with pytest.raises(InspectionError, match="log tree"):
        BtrfsFilesystem(FileDisk(img))


def _sys_chunk_stripe_at() -> int:
    """Offset in the superblock of the first system chunk's first stripe offset field."""
    return 0x32B + 17 + 48 + 8


def test_chunk_past_the_device(small: tuple[Path, Path]) -> None:
    img, _ = small
    sb = _super(img)
    struct.pack_into("<Q", sb, _sys_chunk_stripe_at(), 1 << 40)
    _write_super(img, sb)
    with pytest.raises(CorruptGuestError, match="past the end of the device"):
        BtrfsFilesystem(FileDisk(img))


def test_raid_profile_is_named(small: tuple[Path, Path]) -> None:
    img, _ = small
    sb = _super(img)
    at = 0x32B + 17 + 24  # chunk type
    struct.pack_into("<Q", sb, at, struct.unpack_from("<Q", sb, at)[0] | 1 << 3)  # raid0
    _write_super(img, sb)
    with pytest.raises(UnsupportedGuestFeatureError, match="raid0") as e:
        BtrfsFilesystem(FileDisk(img))
    assert e.value.features == ["raid0"]


def _fs_root(img: Path) -> tuple[int, int]:
    """(logical, level) of the FS_TREE root node, from dump-tree."""
    m = re.search(r"^node (\d+) level (\d+)", _dump(img, "-t", "fs"), re.M)
    assert m, "fixture should have an internal fs tree node"
    return int(m.group(1)), int(m.group(2))


def test_bad_node_checksum(small: tuple[Path, Path]) -> None:
    img, _ = small
    logical, _ = _fs_root(img)
    (phys,) = _physical(img, logical)
    with open(img, "r+b") as f:
        f.seek(phys + 200)
        byte = f.read(1)
        f.seek(phys + 200)
        f.write(bytes([byte[0] ^ 1]))
    fs = BtrfsFilesystem(FileDisk(img))
    with pytest.raises(CorruptGuestError, match=f"node {logical}: copy 1 fails its crc32c"):
        fs.listdir("/")


def test_cyclic_tree(small: tuple[Path, Path]) -> None:
    img, _ = small
    logical, level = _fs_root(img)
    (phys,) = _physical(img, logical)
    _patch_node(img, phys, 101 + 17, struct.pack("<Q", logical))  # first child -> itself
    fs = BtrfsFilesystem(FileDisk(img))
    with pytest.raises(CorruptGuestError, match=f"level {level}, its parent says {level - 1}"):
        fs.listdir("/")


def test_item_outside_its_leaf(small: tuple[Path, Path]) -> None:
    img, _ = small
    m = re.search(r"^leaf (\d+) items \d+", _dump(img, "-t", "fs"), re.M)
    assert m
    (phys,) = _physical(img, int(m.group(1)))
    _patch_node(img, phys, 101 + 17, struct.pack("<I", 0xFFF0))  # item 0's data offset
    fs = BtrfsFilesystem(FileDisk(img))
    with pytest.raises(CorruptGuestError, match="outside the leaf"):
        _compare(fs, small[1])


def test_dup_metadata_survives_one_bad_copy(tmp_path: Path, rootdir_src: Path) -> None:
    img = _mkfs(tmp_path / "fs.img", rootdir_src, "-m", "dup")
    logical = int(
        re.search(
            r"^root\s+(\d+)", run("btrfs", "inspect-internal", "dump-super", img).stdout, re.M
        ).group(1)
    )  # type: ignore[union-attr]
    copies = _physical(img, logical)
    assert len(copies) == 2
    with open(img, "r+b") as f:
        f.seek(copies[0] + 300)
        f.write(b"\xde\xad")
    assert (
        BtrfsFilesystem(FileDisk(img)).read_file("/etc/fstab")
        == (rootdir_src / "etc/fstab").read_bytes()
    )
    with open(img, "r+b") as f:
        f.seek(copies[1] + 300)
        f.write(b"\xde\xad")
    with pytest.raises(CorruptGuestError, match="copy 2 fails"):
        BtrfsFilesystem(FileDisk(img))


def test_lzo_rejects_hostile_streams() -> None:
    with pytest.raises(CorruptGuestError, match="before the output"):
        lzo1x_decompress(bytes([18, ord("a"), 0x40 | 0x1C, 0xFF]), 4096)  # match 2 KiB back
    with pytest.raises(CorruptGuestError, match="ends inside"):
        lzo1x_decompress(bytes([30, 1, 2]), 4096)  # 13 literals promised, 2 given
    with pytest.raises(CorruptGuestError, match="past the output"):
        lzo1x_decompress(bytes([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]), 64)


# --- the mounted fixture: subvolumes, compression, snapshots -------------------------------------


@dataclass
class Layout:
    img: Path
    src: Path  # what subvolume "root" holds, besides the compressed and mutated files
    extra: dict[str, bytes]  # guest path in "root" -> expected content
    subvols: dict[int, tuple[int, str]]  # id -> (parent, path), from btrfs subvolume list
    readonly: set[int]
    default: int
    dump: str


def _sh(*args: str | Path) -> None:
    run(*args)


def _build_layout(tmp: Path) -> Layout:
    require_tool("mkfs.btrfs")
    require_tool("btrfs")
    src = _source(tmp / "src")
    img = _mkfs(tmp / "layout.img", None, "-L", "vmlayout", size=400 * MIB)
    mnt = tmp / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True)
    if proc.returncode != 0:
        message = f"cannot loop-mount a btrfs fixture here: {proc.stderr.decode().strip()}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    extra: dict[str, bytes] = {}
    try:
        for sub in ("root", "home", "@", "@/.snapshots"):
            _sh("btrfs", "subvolume", "create", mnt / sub)
        (mnt / "@/.snapshots/1").mkdir()
        _sh("btrfs", "subvolume", "create", mnt / "@/.snapshots/1/snapshot")
        (mnt / "@/.snapshots/1/snapshot/etc").mkdir()
        (mnt / "@/.snapshots/1/snapshot/etc/fstab").write_text(
            "UUID=x / btrfs defaults 0 0\nUUID=x /home btrfs subvol=/@/home 0 0\n"
        )
        (mnt / "home/user").mkdir()
        (mnt / "home/user/notes").write_text("home subvolume\n")
        root = mnt / "root"
        for algo in ("zlib", "zstd", "lzo"):
            d = root / "z" / algo
            d.mkdir(parents=True)
            _sh("btrfs", "property", "set", d, "compression", algo)
            for n in (700, 1500, 5000, 300_000, MIB + 11):
                extra[f"/z/{algo}/t{n}"] = _words_text(n + len(algo), n)
            extra[f"/z/{algo}/random"] = random.Random(algo).randbytes(200_000)
            extra[f"/z/{algo}/mixed"] = _words_text(9, 150_000) + random.Random(9).randbytes(70_000)
        for path, data in extra.items():
            (root / path.lstrip("/")).write_bytes(data)
        _sh("cp", "-a", f"{src}/.", root)
        _sh("sync")
        # COW splits: overwrite the middle of a synced file, so extents point into older ones
        cow = bytearray(src.joinpath("data/r1048583").read_bytes())
        with open(root / "data/r1048583", "r+b") as f:
            for at in (200_000, 700_001):
                f.seek(at)
                f.write(b"\x5a" * 10_000)
                cow[at : at + 10_000] = b"\x5a" * 10_000
                f.flush()
                os.fsync(f.fileno())
        extra["/data/r1048583"] = bytes(cow)
        # preallocated (unwritten) extents around written data
        with open(root / "prealloc", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, 2 * MIB)
            f.seek(MIB)
            f.write(b"written into a preallocated extent")
        extra["/prealloc"] = bytes(MIB) + b"written into a preallocated extent" + bytes(MIB - 34)
        _sh("btrfs", "subvolume", "create", root / "var/lib/machines")
        (root / "var/lib/machines/m.conf").write_text("nested subvolume\n")
        _sh("btrfs", "subvolume", "snapshot", root, mnt / "snap")
        _sh("btrfs", "subvolume", "snapshot", "-r", root, mnt / "@/.snapshots/ro")
        _sh("btrfs", "subvolume", "set-default", mnt / "@/.snapshots/1/snapshot")
        listing = run("btrfs", "subvolume", "list", "-p", mnt).stdout
        ro = run("btrfs", "subvolume", "list", "-r", mnt).stdout
        default = run("btrfs", "subvolume", "get-default", mnt).stdout
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    subvols = {
        int(m[0]): (int(m[1]), m[2])
        for m in re.findall(
            r"^ID (\d+) gen \d+ parent (\d+) top level \d+ path (.+)$", listing, re.M
        )
    }
    dump = _dump(img, "-t", str(_id_of(subvols, "root")))
    _scribble_on_prealloc(img, dump)
    _check(img)
    return Layout(
        img,
        src,
        extra,
        subvols,
        {int(i) for i in re.findall(r"^ID (\d+)", ro, re.M)},
        int(re.match(r"ID (\d+)", default).group(1)),  # type: ignore[union-attr]
        dump,
    )


def _scribble_on_prealloc(img: Path, dump: str) -> None:
    """Fill the unwritten parts of preallocated extents with garbage: they must still read 0."""
    ranges = re.findall(
        r"prealloc data disk byte (\d+) nr \d+\n\s+prealloc data offset (\d+) nr (\d+)", dump
    )
    assert ranges, "fixture should have preallocated extents"
    with open(img, "r+b") as f:
        for disk, off, nr in ranges:
            (phys,) = _physical(img, int(disk) + int(off))
            f.seek(phys)
            f.write(b"\xee" * int(nr))


def _id_of(subvols: dict[int, tuple[int, str]], path: str) -> int:
    return next(i for i, (_, p) in subvols.items() if p == path)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    if os.geteuid() != 0:
        message = "the subvolume/compression fixture needs root for a loop mount"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    tmp = tmp_path_factory.mktemp("btrfs-layout")
    return _build_layout(tmp)


def test_fixture_really_has_compressed_prealloc_and_split_extents(layout: Layout) -> None:
    for n, name in ((1, "zlib"), (2, "lzo"), (3, "zstd")):
        assert f"extent compression {n} ({name})" in layout.dump
        assert re.search(rf"inline extent data size \d+ ram_bytes \d+ compression {n}", layout.dump)
    assert "type 2 (prealloc)" in layout.dump
    assert re.search(r"extent data offset [1-9]\d* nr", layout.dump)


def test_subvolumes_match_btrfs_subvolume_list(layout: Layout) -> None:
    fs = BtrfsFilesystem(FileDisk(layout.img))
    got = {s.id: (s.parent_id, s.path) for s in fs.subvolumes()}
    assert got == layout.subvols
    assert {s.id for s in fs.subvolumes() if s.readonly} == layout.readonly != set()


def test_default_subvolume(layout: Layout) -> None:
    fs = BtrfsFilesystem(FileDisk(layout.img))
    assert layout.subvols[layout.default][1] == "@/.snapshots/1/snapshot"
    assert fs.subvolume_id == fs.default_subvolume_id == layout.default
    assert fs.label == "vmlayout"
    assert b"subvol=/@/home" in fs.read_file("/etc/fstab")
    assert [e.name for e in fs.listdir("/")] == ["etc"]


def test_root_subvolume_every_file(layout: Layout) -> None:
    fs = BtrfsFilesystem(FileDisk(layout.img)).open_subvolume("root")
    assert fs.subvolume_id == _id_of(layout.subvols, "root")
    for path, data in layout.extra.items():
        assert fs.read_file(path) == data, path
        assert fs.stat(path).size == len(data)
        assert fs.read_head(path, 5000) == data[:5000]
    mutated = set(layout.extra)
    for dirpath, _, files in os.walk(layout.src):
        for name in files:
            rel = "/" + os.path.relpath(os.path.join(dirpath, name), layout.src)
            if rel not in mutated and not Path(dirpath, name).is_symlink():
                assert fs.read_file(rel) == Path(dirpath, name).read_bytes(), rel
    assert len(fs.listdir("/bigdir")) == 1500
    assert fs.readlink("/rel") == "data/r100"


def test_nested_subvolume_and_snapshots(layout: Layout) -> None:
    top = BtrfsFilesystem(FileDisk(layout.img)).open_subvolume("/")
    assert top.subvolume_id == 5
    assert {e.name for e in top.listdir("/")} == {"root", "home", "@", "snap"}
    assert top.read_file("/root/var/lib/machines/m.conf") == b"nested subvolume\n"
    assert top.read_file("/root/etc/fstab") == (layout.src / "etc/fstab").read_bytes()
    assert top.read_file("/home/user/notes") == b"home subvolume\n"
    inner = top.stat("/root/etc/fstab").inode
    assert inner >> 64 == _id_of(layout.subvols, "root")
    root = top.open_subvolume(_id_of(layout.subvols, "root"))
    assert root.stat("/etc/fstab").inode == inner & ((1 << 64) - 1)
    # a snapshot shows the nested subvolume as an empty directory, as the kernel does
    for snap in ("snap", "@/.snapshots/ro"):
        view = top.open_subvolume(snap)
        assert view.stat("/var/lib/machines").kind == "dir"
        assert view.listdir("/var/lib/machines") == []
        assert view.read_file("/z/zstd/t300000") == layout.extra["/z/zstd/t300000"]
    assert top.listdir("/snap/var/lib/machines") == []
    with pytest.raises(GuestFileNotFound):
        top.open_subvolume("no/such/subvolume")
    with pytest.raises(GuestFileNotFound):
        top.open_subvolume(4242)


def test_btrfs_restore_agrees(layout: Layout, tmp_path: Path) -> None:
    """btrfs-progs' own extractor reads the same bytes for the compressed and split files."""
    require_tool("btrfs")
    out = tmp_path / "restored"
    out.mkdir()
    sid = _id_of(layout.subvols, "root")
    run("btrfs", "restore", "-r", str(sid), "--path-regex", r"^/(|z(|/.*))$", layout.img, out)
    fs = BtrfsFilesystem(FileDisk(layout.img)).open_subvolume(sid)
    compared = 0
    for path in layout.extra:
        if path.startswith("/z/"):
            assert fs.read_file(path) == (out / path.lstrip("/")).read_bytes(), path
            compared += 1
    assert compared == 21


def _lzop_blocks(blob: bytes) -> list[tuple[int, bytes]]:
    """(uncompressed size, LZO1X stream) of each compressed block of an lzop file."""
    assert blob[:9] == b"\x89LZO\x00\r\n\x1a\n"
    pos = 9
    version = struct.unpack_from(">H", blob, pos)[0]
    pos += 6 if version >= 0x0940 else 4  # version, lib version, [version needed]
    pos += 2 if version >= 0x0940 else 1  # method, [level]
    flags = struct.unpack_from(">I", blob, pos)[0]
    pos += 4 + (4 if flags & 0x800 else 0) + 8 + (4 if version >= 0x0940 else 0)
    pos += 1 + blob[pos] + 4  # name, header checksum
    if flags & 0x40:
        pos += 4 + struct.unpack_from(">I", blob, pos)[0] + 4
    out = []
    while True:
        dst = struct.unpack_from(">I", blob, pos)[0]
        pos += 4
        if dst == 0:
            return out
        src = struct.unpack_from(">I", blob, pos)[0]
        pos += 4 + 4 * bool(flags & 0x1) + 4 * bool(flags & 0x100)
        if src < dst:
            pos += 4 * bool(flags & 0x2) + 4 * bool(flags & 0x200)
            out.append((dst, blob[pos : pos + src]))
        pos += src


@pytest.mark.parametrize("level", ["-1", "-9"])
def test_lzo1x_against_lzop(tmp_path: Path, level: str) -> None:
    """Every LZO1X instruction form, checked on streams lzop (liblzo2) wrote."""
    require_tool("lzop")
    rng = random.Random(level)
    parts = [_words_text(1, 300_000), bytes(70_000), rng.randbytes(5000)]
    for _ in range(3000):  # short repeats at every distance range, between literal runs
        dist = rng.choice((1, 2, 3, 700, 1100, 2100, 2900, 3100, 9000, 17000, 40000, 49000))
        tail = b"".join(parts)[-dist:][: rng.randint(2, 40)]
        parts.append(rng.randbytes(rng.randint(0, 6)) + tail)
    data = b"".join(parts)
    (tmp_path / "d").write_bytes(data)
    run("lzop", level, "-f", "-o", tmp_path / "d.lzo", tmp_path / "d")
    got = bytearray()
    blocks = _lzop_blocks((tmp_path / "d.lzo").read_bytes())
    for size, stream in blocks:
        got += lzo1x_decompress(stream, size)
    assert len(blocks) >= 2 and bytes(got) == data


def test_mixed_block_groups_and_changed_metadata_uuid(tmp_path: Path, rootdir_src: Path) -> None:
    """mkfs -M (data and metadata share chunks); btrfstune -m (new fsid, metadata_uuid kept)."""
    require_tool("btrfstune")
    img = _mkfs(tmp_path / "fs.img", rootdir_src, "-M", "-L", "mixed")
    before = BtrfsFilesystem(FileDisk(img)).uuid
    run("btrfstune", "-f", "-m", img)
    _check(img)
    fs = BtrfsFilesystem(FileDisk(img))
    assert fs.volume.sb.incompat_flags & (1 << 2 | 1 << 10) == 1 << 2 | 1 << 10
    blk = run("blkid", "-p", "-o", "export", img).stdout
    assert fs.uuid != before and f"UUID={fs.uuid}" in blk
    _compare(fs, rootdir_src)
