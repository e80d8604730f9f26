"""ext2/3/4 reader and writer against e2fsprogs: mke2fs -d builds, debugfs and e2fsck judge."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

import vmferry
from tests.guest.conftest import (
    blkid,
    debugfs_cat,
    e2fsck_clean,
    extract,
    fake_root,
    make_disk,
    mkfs_ext,
)
from vmferry.errors import GuestError, InspectionError
from vmferry.guest.errors import (
    CorruptGuestError,
    GuestLimitError,
    GuestWriteRefusedError,
    UnsupportedGuestFeatureError,
)
from vmferry.guest.fs.ext import ExtFilesystem
from vmferry.guest.fs.types import GuestFileNotFound
from vmferry.guest.overlay import Overlay, Slice

MIB = 1 << 20
DISK = 48 * MIB
START = MIB
SIZE = 40 * MIB

VARIANTS = {
    "ext4": ("mkfs.ext4", ()),
    "ext4-nocsum": ("mkfs.ext4", ("-O", "^metadata_csum")),
    "ext4-uninit-bg": ("mkfs.ext4", ("-O", "^metadata_csum,uninit_bg")),
    "ext4-32bit-1k": ("mkfs.ext4", ("-O", "^64bit", "-b", "1024")),
    "ext4-csum-2k": ("mkfs.ext4", ("-O", "metadata_csum,64bit", "-b", "2048")),
    "ext4-meta-bg-1k": ("mkfs.ext4", ("-O", "meta_bg,^resize_inode", "-b", "1024", "-g", "1024")),
    "ext3": ("mkfs.ext3", ()),
    "ext2-1k": ("mkfs.ext2", ("-b", "1024")),
}


@dataclass
class Fixture:
    img: Path
    root: Path
    tmp: Path
    size: int = SIZE

    def part(self, name: str = "part.raw") -> Path:
        return extract(self.img, START, self.size, self.tmp / name)

    def put_back(self, part: Path) -> None:
        with open(self.img, "r+b") as f:
            f.seek(START)
            f.write(part.read_bytes())


def _populate(root: Path) -> None:
    fake_root(root)
    rng = random.Random(5)
    (root / "usr/bin/big").write_bytes(rng.randbytes(3 * MIB + 123))
    with open(root / "usr/bin/sparse", "wb") as f:  # holes between islands of data
        for i in range(40):
            f.seek(i * 64 * 1024)
            f.write(rng.randbytes(100))
    big = root / "bigdir"
    big.mkdir()
    for i in range(400):
        (big / f"entry-with-a-fairly-long-name-{i:04d}").write_text(str(i))
    os.symlink("/etc/os-release", root / "etc/alt-release")
    os.symlink("../../etc/fstab", root / "boot/grub/fstab-link")
    os.symlink("x" * 50 + "/" + "y" * 60, root / "slowlink")
    os.symlink("../../../../../../../etc/fstab", root / "usr/bin/escape")
    os.symlink("loop-b", root / "loop-a")
    os.symlink("loop-a", root / "loop-b")
    (root / "empty").write_bytes(b"")


def build(tmp_path: Path, variant: str) -> Fixture:
    prog, args = VARIANTS[variant]
    root = tmp_path / "root"
    _populate(root)
    img, _ = make_disk(tmp_path, DISK, f"label: dos\nstart={START // 512},size={SIZE // 512}\n")
    mkfs_ext(img, START, SIZE, root, *args, prog=prog)
    fx = Fixture(img, root, tmp_path)
    # index the big directory (htree) with e2fsck -D so the reader meets a real dx tree
    part = fx.part()
    subprocess.run(["e2fsck", "-fyD", str(part)], capture_output=True)
    fx.put_back(part)
    return fx


_BUILT: dict[str, Fixture] = {}


@pytest.fixture(params=list(VARIANTS))
def fx(
    request: pytest.FixtureRequest, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Fixture:
    """A private copy of the variant's image (built once per session: mke2fs is the slow part)."""
    variant = request.param
    if variant not in _BUILT:
        _BUILT[variant] = build(tmp_path_factory.mktemp(variant), variant)
    proto = _BUILT[variant]
    img = tmp_path / "disk.raw"
    shutil.copyfile(proto.img, img)
    return Fixture(img, proto.root, tmp_path)


def _fs(disk: object, size: int = SIZE) -> ExtFilesystem:
    return ExtFilesystem(Slice(disk, START, size))  # type: ignore[arg-type]


def test_reads_match_source_tree(fx: Fixture) -> None:
    with vmferry.open(fx.img) as disk:
        fs = _fs(disk)
        seen = 0
        for dirpath, dirnames, filenames in os.walk(fx.root):
            relpath = os.path.relpath(dirpath, fx.root)
            rel = "/" if relpath == "." else "/" + relpath
            ours = {e.name for e in fs.listdir(rel)}
            theirs = set(dirnames) | set(filenames)
            if rel == "/":
                theirs.add("lost+found")
            assert ours == theirs, rel
            for name in filenames + dirnames:
                p = os.path.join(dirpath, name)
                gp = rel.rstrip("/") + "/" + name
                if os.path.islink(p):
                    assert fs.readlink(gp) == os.readlink(p)
                elif os.path.isfile(p):
                    assert fs.read_file(gp) == Path(p).read_bytes(), gp
                    seen += 1
        assert seen > 400


def test_htree_fixture_is_really_indexed(fx: Fixture) -> None:
    out = subprocess.run(
        ["debugfs", "-R", "htree_dump /bigdir", str(fx.part())], capture_output=True, text=True
    ).stdout
    assert "Root node dump" in out  # debugfs sees a dx root: the reader met a real htree


def test_symlinks_resolve_inside_the_filesystem(fx: Fixture) -> None:
    with vmferry.open(fx.img) as disk:
        fs = _fs(disk)
        fstab = (fx.root / "etc/fstab").read_bytes()
        assert fs.read_file("/boot/grub/fstab-link") == fstab
        assert fs.read_file("/usr/bin/escape") == fstab  # ../ past the root stops at the root
        assert fs.read_file("/etc/alt-release") == (fx.root / "etc/os-release").read_bytes()
        with pytest.raises(GuestLimitError):
            fs.read_file("/loop-a")
        with pytest.raises(GuestFileNotFound):
            fs.read_file("/etc/nonexistent")
        with pytest.raises(FileNotFoundError):  # also a plain FileNotFoundError for callers
            fs.read_file("/slowlink")
        assert fs.stat("/bigdir").kind == "dir"


def test_identity_matches_blkid(fx: Fixture) -> None:
    ids = blkid(fx.part())
    with vmferry.open(fx.img) as disk:
        fs = _fs(disk)
        assert fs.uuid == ids["UUID"]
        assert fs.version == ids["TYPE"]


def _write_and_check(fx: Fixture, writes: dict[str, bytes]) -> None:
    src_before = fx.img.read_bytes()
    with vmferry.open(fx.img) as disk:
        ov = Overlay(disk)
        fs = _fs(ov, fx.size)
        for path, data in writes.items():
            fs.write_file(path, data)
            # re-read through a fresh reader: nothing cached may hide a bad write
            assert _fs(ov, fx.size).read_file(path) == data
            out = fx.tmp / "after.raw"
            out.write_bytes(ov.read(START, fx.size))
            ok, report = e2fsck_clean(out)
            assert ok, f"e2fsck after writing {path}:\n{report}"
            assert debugfs_cat(out, path) == data
    assert fx.img.read_bytes() == src_before  # the source image was never touched


def test_rewrite_files_keeps_e2fsck_clean(fx: Fixture) -> None:
    rng = random.Random(11)
    _write_and_check(
        fx,
        {
            "/etc/fstab": b"UUID=1234 / ext4 defaults 0 1\n",  # shrink within a block
            "/boot/grub/grub.cfg": rng.randbytes(70_000),  # grow across many blocks
            "/usr/bin/big": rng.randbytes(5000),  # shrink a multi-megabyte file
            "/empty": rng.randbytes(300_000),  # grow from nothing (indirect on ext2/3)
            "/usr/bin/sparse": b"",  # truncate to nothing
        },
    )


def test_fragmented_allocation_builds_a_deeper_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    fake_root(root)
    for i in range(600):
        (root / "tmp" / f"f{i:04d}").write_bytes(b"x" * 3000)
    img, _ = make_disk(tmp_path, DISK, f"label: dos\nstart={START // 512},size={SIZE // 512}\n")
    mkfs_ext(img, START, 8 * MIB, root, "-b", "1024", "-N", "2048")
    fx = Fixture(img, root, tmp_path, 8 * MIB)
    part = fx.part()
    # free every other small file: free space becomes a comb of 3-block holes
    cmds = "\n".join(f"rm /tmp/f{i:04d}" for i in range(0, 600, 2))
    subprocess.run(
        ["debugfs", "-w", "-f", "-", str(part)],
        input=cmds,
        text=True,
        capture_output=True,
        check=True,
    )
    ok, report = e2fsck_clean(part)
    assert ok, report
    free = int(
        subprocess.run(["dumpe2fs", "-h", str(part)], capture_output=True, text=True)
        .stdout.split("Free blocks:")[1]
        .split()[0]
    )
    fx.put_back(part)
    data = random.Random(3).randbytes(min(free - 64, 2000) * 1024)
    _write_and_check(fx, {"/etc/fstab": data})
    # debugfs confirms the new file needed an extent tree with a leaf block (depth 1)
    with vmferry.open(fx.img) as disk:
        ov = Overlay(disk)
        _fs(ov, fx.size).write_file("/etc/fstab", data)
        out = tmp_path / "frag.raw"
        out.write_bytes(ov.read(START, fx.size))
    ex = subprocess.run(
        ["debugfs", "-R", "ex /etc/fstab", str(out)], capture_output=True, text=True
    ).stdout
    assert " 1/ 1 " in ex, ex


def test_needs_recovery_is_refused(tmp_path: Path) -> None:
    fx = build(tmp_path, "ext4")
    part = fx.part()
    subprocess.run(
        ["debugfs", "-w", "-R", "feature needs_recovery", str(part)],
        capture_output=True,
        check=True,
    )
    fx.put_back(part)
    with vmferry.open(fx.img) as disk, pytest.raises(InspectionError, match="recovery"):
        _fs(disk)


@pytest.mark.parametrize("feature", ["inline_data", "0x800000"])
def test_unknown_incompat_feature_is_named(tmp_path: Path, feature: str) -> None:
    fx = build(tmp_path, "ext4")
    part = fx.part()
    if feature.startswith("0x"):
        cur = subprocess.run(["dumpe2fs", "-h", str(part)], capture_output=True, text=True)
        assert cur.returncode == 0
        val = int(feature, 16) | 0x2C2  # filetype extent 64bit flex_bg (mkfs.ext4's set)
        cmd = f"ssv feature_incompat {val}"
    else:
        cmd = f"feature {feature}"
    subprocess.run(["debugfs", "-w", "-R", cmd, str(part)], capture_output=True, check=True)
    fx.put_back(part)
    with vmferry.open(fx.img) as disk, pytest.raises(UnsupportedGuestFeatureError) as exc:
        _fs(disk)
    assert feature in str(exc.value)


def test_quota_filesystem_is_read_but_not_written(tmp_path: Path) -> None:
    root = fake_root(tmp_path / "root")
    img, _ = make_disk(tmp_path, DISK, f"label: dos\nstart={START // 512},size={SIZE // 512}\n")
    mkfs_ext(img, START, SIZE, root, "-O", "quota")
    with vmferry.open(img) as disk:
        ov = Overlay(disk)
        fs = _fs(ov)
        assert fs.read_file("/etc/fstab") == (root / "etc/fstab").read_bytes()
        with pytest.raises(GuestWriteRefusedError, match="quota"):
            fs.write_file("/etc/fstab", b"x")
        assert not ov.dirty


def test_absurd_inode_count(tmp_path: Path) -> None:
    fx = build(tmp_path, "ext4-nocsum")
    part = fx.part()
    subprocess.run(
        ["debugfs", "-w", "-R", "ssv inodes_count 4000000000", str(part)],
        capture_output=True,
        check=True,
    )
    fx.put_back(part)
    with vmferry.open(fx.img) as disk, pytest.raises(CorruptGuestError, match="inode count"):
        _fs(disk)


def test_extent_past_the_end(tmp_path: Path) -> None:
    fx = build(tmp_path, "ext4")
    part = fx.part()
    # i_block words 3..5 are the first extent; word 5 is its physical start
    subprocess.run(
        ["debugfs", "-w", "-R", "sif /etc/os-release block[5] 0x7fffffff", str(part)],
        capture_output=True,
        check=True,
    )
    fx.put_back(part)
    with vmferry.open(fx.img) as disk:
        fs = _fs(disk)
        with pytest.raises(CorruptGuestError, match="past the filesystem"):
            fs.read_file("/etc/os-release")
        assert fs.read_file("/etc/fstab")  # the rest stays readable


def test_corrupt_superblocks_fail_with_named_errors(tmp_path: Path) -> None:
    fx = build(tmp_path, "ext4-nocsum")
    pristine = fx.img.read_bytes()[START + 1024 : START + 2048]
    rng = random.Random(99)
    for _ in range(300):
        buf = bytearray(pristine)
        for _ in range(rng.randrange(1, 6)):
            buf[rng.randrange(0, 0x100)] = rng.randrange(256)
        with open(fx.img, "r+b") as f:
            f.seek(START + 1024)
            f.write(buf)
        with vmferry.open(fx.img) as disk:
            try:
                fs = _fs(disk)
                fs.read_file("/etc/fstab")
                fs.listdir("/bigdir")
            except GuestError:
                pass


def test_metadata_csum_detects_a_flipped_superblock_byte(tmp_path: Path) -> None:
    fx = build(tmp_path, "ext4")
    with open(fx.img, "r+b") as f:
        f.seek(START + 1024 + 0x78)  # volume name
        f.write(b"Z")
    with vmferry.open(fx.img) as disk, pytest.raises(CorruptGuestError, match="checksum"):
        _fs(disk)


def test_directory_hard_link_loop_stays_bounded(tmp_path: Path) -> None:
    fx = build(tmp_path, "ext4")
    part = fx.part()
    subprocess.run(
        ["debugfs", "-w", "-R", "link /etc /etc/loop", str(part)], capture_output=True, check=True
    )
    fx.put_back(part)
    with vmferry.open(fx.img) as disk:
        fs = _fs(disk)
        fstab = (fx.root / "etc/fstab").read_bytes()
        assert fs.read_file("/etc/loop/loop/loop/fstab") == fstab
        with pytest.raises(GuestLimitError):
            fs.read_file("/etc" + "/loop" * 1000 + "/fstab")


def test_write_keeps_superblock_free_count_exact(tmp_path: Path) -> None:
    fx = build(tmp_path, "ext4-nocsum")
    with vmferry.open(fx.img) as disk:
        ov = Overlay(disk)
        _fs(ov).write_file("/etc/fstab", b"z" * 200_000)
        out = tmp_path / "after.raw"
        out.write_bytes(ov.read(START, SIZE))
    head = subprocess.run(["dumpe2fs", "-h", str(out)], capture_output=True, text=True).stdout
    full = subprocess.run(["dumpe2fs", str(out)], capture_output=True, text=True).stdout
    sb_free = int(head.split("Free blocks:")[1].split()[0])
    groups = sum(int(m) for m in re.findall(r"^\s+(\d+) free blocks,", full, re.MULTILINE))
    assert sb_free == groups


def test_create_files_and_symlinks_keeps_e2fsck_clean(fx: Fixture) -> None:
    rng = random.Random(21)
    big = rng.randbytes(300_000)
    long_target = "/usr/bin/" + "t" * 90
    with vmferry.open(fx.img) as disk:
        ov = Overlay(disk)
        fs = _fs(ov)
        fs.create_file("/boot/vmferry-extra.img", b"hello\n", mode=0o600)
        fs.create_file("/etc/newbig", big)
        fs.create_file("/empty-new", b"")
        fs.symlink("/etc/fastlink", "fstab")
        fs.symlink("/etc/slowlink", long_target)
        # enough long names to overflow /tmp's first directory block
        names = [f"n{i:03d}-" + "x" * 60 for i in range(80)]
        for name in names:
            fs.create_file(f"/tmp/{name}", name.encode())
        with pytest.raises(GuestWriteRefusedError, match="exists"):
            fs.create_file("/etc/fstab", b"")
        out = fx.tmp / "after.raw"
        out.write_bytes(ov.read(START, SIZE))
    ok, report = e2fsck_clean(out)
    assert ok, report
    assert debugfs_cat(out, "/boot/vmferry-extra.img") == b"hello\n"
    assert debugfs_cat(out, "/etc/newbig") == big
    assert debugfs_cat(out, "/tmp/" + names[-1]) == names[-1].encode()
    listing = subprocess.run(
        ["debugfs", "-R", "ls -l /tmp", str(out)], capture_output=True, text=True
    ).stdout
    assert all(n in listing for n in names)
    stat = subprocess.run(
        ["debugfs", "-R", "stat /etc/fastlink", str(out)], capture_output=True, text=True
    ).stdout
    assert 'Fast link dest: "fstab"' in stat
    assert debugfs_cat(out, "/etc/slowlink") == long_target.encode()
    with vmferry.open(out) as disk:
        fs = ExtFilesystem(disk)
        assert fs.read_file("/etc/fastlink") == (fx.root / "etc/fstab").read_bytes()
        assert fs.readlink("/etc/slowlink") == long_target
        assert fs.stat("/boot/vmferry-extra.img").perm == 0o600


def _thin_bigdir(fx: Fixture) -> Path:
    """The fixture's partition with three of every four /bigdir entries removed by debugfs
    (room in every htree leaf; the index itself is left as e2fsck -D built it)."""
    part = fx.part("thinned.raw")
    cmds = fx.tmp / "rm.cmds"
    cmds.write_text(
        "".join(f"rm /bigdir/entry-with-a-fairly-long-name-{i:04d}\n" for i in range(400) if i % 4)
    )
    subprocess.run(["debugfs", "-w", "-f", str(cmds), str(part)], capture_output=True, check=True)
    ok, report = e2fsck_clean(part)
    assert ok, report
    return part


#: names whose hashes spread over the whole index, two with bytes above 0x7f (where the signed
#: and unsigned hash flavours differ); short enough (~530 bytes in all) to fit even if every one
#: hashed into the same thinned 1 KiB leaf, whatever seed mke2fs picked
HTREE_NAMES = [f"n{i:02d}" for i in range(40)] + ["café-ü", "\u20ac-e"]


def test_new_entries_in_an_indexed_directory_land_where_the_index_looks(fx: Fixture) -> None:
    """e2fsck checks every htree leaf's hashes against the range its index entry gives it, so
    an entry in the wrong leaf is an error it reports (the next test proves it does)."""
    part = _thin_bigdir(fx)
    with vmferry.open(part) as disk:
        ov = Overlay(disk)
        fs = ExtFilesystem(ov)
        for name in HTREE_NAMES:
            fs.create_file(f"/bigdir/{name}", name.encode())
        out = fx.tmp / "after.raw"
        out.write_bytes(ov.read(0, ov.virtual_size))
    ok, report = e2fsck_clean(out)
    assert ok, report
    dump = subprocess.run(
        ["debugfs", "-R", "htree_dump /bigdir", str(out)], capture_output=True, text=True
    ).stdout
    assert "Root node dump" in dump  # still indexed: nothing was rebuilt
    for name in HTREE_NAMES:
        assert debugfs_cat(out, f"/bigdir/{name}") == name.encode()
    with vmferry.open(out) as disk:
        names = {e.name for e in ExtFilesystem(disk).listdir("/bigdir")}
    assert set(HTREE_NAMES) - names == set()
    assert len(names) == 100 + len(HTREE_NAMES)


def test_an_entry_in_the_wrong_leaf_is_caught_by_the_oracle(
    fx: Fixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vmferry.guest.fs.ext as ext

    part = _thin_bigdir(fx)
    monkeypatch.setattr(ext, "name_hash", lambda *a: 0)  # every name into the first leaf
    with vmferry.open(part) as disk:
        ov = Overlay(disk)
        fs = ExtFilesystem(ov)
        for name in HTREE_NAMES[:20]:
            fs.create_file(f"/bigdir/{name}", b"")
        out = fx.tmp / "wrong.raw"
        out.write_bytes(ov.read(0, ov.virtual_size))
    ok, report = e2fsck_clean(out)
    assert not ok and "HTREE" in report.upper()


def test_a_full_htree_leaf_is_refused_before_any_write(fx: Fixture) -> None:
    """vmferry does not split leaves: entries go in until the leaf a name hashes to is full,
    then that name is refused by ``check_creatable``, and nothing of it is written."""
    with vmferry.open(fx.img) as disk:
        ov = Overlay(disk)
        fs = _fs(ov)
        refused = None
        for i in range(3000):
            name = f"/bigdir/fill-{i:05d}-" + "z" * 40
            try:
                fs.check_creatable(name)
            except GuestWriteRefusedError as exc:
                refused = (name, exc)
                break
            fs.create_file(name, b"")
        assert refused is not None, "no leaf ever filled up"
        name, exc = refused
        assert "full" in str(exc)
        before = ov.read(START, SIZE)
        with pytest.raises(GuestWriteRefusedError, match="full"):
            fs.create_file(name, b"x")
        assert ov.read(START, SIZE) == before
        out = fx.tmp / "full.raw"
        out.write_bytes(before)
    ok, report = e2fsck_clean(out)
    assert ok, report


def _walk(fs: ExtFilesystem, path: str, depth: int = 0) -> None:
    for e in fs.listdir(path):
        child = path.rstrip("/") + "/" + e.name
        try:
            if e.kind == "dir" and depth < 4 and e.name != "bigdir":
                _walk(fs, child, depth + 1)
            elif e.kind == "file":
                fs.read_file(child)
            elif e.kind == "symlink":
                fs.readlink(child)
        except GuestError:
            pass


@pytest.mark.parametrize("variant", ["ext4-nocsum", "ext2-1k"])
def test_fuzzed_metadata_fails_only_with_named_errors(tmp_path: Path, variant: str) -> None:
    fx = build(tmp_path, variant)
    with vmferry.open(fx.img) as disk:
        # where the metadata lives: superblock, descriptors, bitmaps, inode tables
        fs = _fs(disk)
        g0 = fs.group(0)
        hot = (g0.inode_table * fs.block_size, 64 * fs.block_size)
    pristine = fx.img.read_bytes()
    rng = random.Random(variant)
    for _ in range(30):
        buf = bytearray(pristine)
        for _ in range(rng.randrange(1, 40)):
            at = START + hot[0] + rng.randrange(hot[1])
            buf[at] = rng.randrange(256)
        fx.img.write_bytes(buf)
        with vmferry.open(fx.img) as disk:
            try:
                _walk(_fs(disk), "/")
            except GuestError:
                pass


def test_append_keeps_e2fsck_clean(fx: Fixture) -> None:
    """Appending (in place for extent files, a rewrite for block-mapped ones) across layouts."""
    rng = random.Random(21)
    with vmferry.open(fx.img) as disk:
        ov = Overlay(disk)
        for path, extra in (
            ("/etc/fstab", b"# one line\n"),  # fills the last partial block only
            ("/usr/bin/big", rng.randbytes(2 * MIB + 77)),  # megabytes after megabytes
            ("/empty", rng.randbytes(5000)),  # from nothing
            ("/boot/grub/grub.cfg", rng.randbytes(4096 * 3)),  # whole blocks
        ):
            before = _fs(ov, fx.size).read_file(path)
            _fs(ov, fx.size).append_file(path, extra)
            assert _fs(ov, fx.size).read_file(path) == before + extra
            out = fx.tmp / "after.raw"
            out.write_bytes(ov.read(START, fx.size))
            ok, report = e2fsck_clean(out)
            assert ok, f"e2fsck after appending to {path}:\n{report}"
            assert debugfs_cat(out, path) == before + extra


def test_append_to_a_fragmented_filesystem_builds_a_two_level_tree(tmp_path: Path) -> None:
    """Hundreds of 3-block holes: the appended file needs more extents than 4 leaves hold."""
    root = tmp_path / "root"
    fake_root(root)
    for i in range(1200):
        (root / "tmp" / f"f{i:04d}").write_bytes(b"x" * 3000)
    img, _ = make_disk(tmp_path, DISK, f"label: dos\nstart={START // 512},size={SIZE // 512}\n")
    mkfs_ext(img, START, 8 * MIB, root, "-b", "1024", "-N", "2048")
    fx = Fixture(img, root, tmp_path, 8 * MIB)
    part = fx.part()
    cmds = "\n".join(f"rm /tmp/f{i:04d}" for i in range(0, 1200, 2))
    subprocess.run(
        ["debugfs", "-w", "-f", "-", str(part)], input=cmds, text=True, capture_output=True,
        check=True,
    )  # fmt: skip
    fx.put_back(part)
    extra = random.Random(4).randbytes(1500 * 1024)  # > 4 leaves x 84 extents of 3 blocks
    with vmferry.open(fx.img) as disk:
        ov = Overlay(disk)
        before = _fs(ov, fx.size).read_file("/etc/os-release")
        _fs(ov, fx.size).append_file("/etc/os-release", extra)
        assert _fs(ov, fx.size).read_file("/etc/os-release") == before + extra
        out = tmp_path / "frag.raw"
        out.write_bytes(ov.read(START, fx.size))
    ok, report = e2fsck_clean(out)
    assert ok, report
    assert debugfs_cat(out, "/etc/os-release") == before + extra
    ex = subprocess.run(
        ["debugfs", "-R", "ex /etc/os-release", str(out)], capture_output=True, text=True
    ).stdout
    assert " 0/ 2 " in ex and " 2/ 2 " in ex, ex  # an index level above the leaves
