"""XFS block allocation (growing files, files with content) judged by xfsprogs and the kernel.

Oracles: ``xfs_repair -n -f`` after every write; ``xfs_db`` for the block map, the AGF and
superblock counters, and the file contents (``_db_cat`` reads through xfs_db's own block map);
the Linux kernel through a loop mount reads what vmferry grew, then allocates and frees in the
same filesystem, and ``xfs_repair`` stays clean.  Refusals are checked by hashing the image.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

import vmferry
from tests.conftest import require_tool
from tests.guest import test_xfs_write as xw
from tests.guest.conftest import fake_root
from tests.guest.test_xfs_write import (
    FRAG,
    _bmap,
    _copy,
    _db,
    _db_cat,
    _fields,
    _mount,
    _open_rw,
    _repair_clean,
    _sha,
)
from vmferry.errors import VmferryError
from vmferry.guest.errors import GuestWriteRefusedError
from vmferry.guest.fs.xfs import XfsFilesystem

MIB = 1 << 20
BS = 4096
Built = tuple[str, Path, Path, Path]


@pytest.fixture(params=["v5", "v4"])
def small(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """test_xfs_write's fixtures (built once per session): (variant, image, tree, filesystem)."""
    variant = request.param
    if variant not in xw._BUILT:
        require_tool("xfs_db")
        tmp = tmp_path_factory.mktemp(f"xw-{variant}")
        img, root, part = xw._build(tmp, variant)
        xw._fragment(part, FRAG, variant == "v5")
        xw._place(part, img)
        xw._BUILT[variant] = (img, root, part)
    img, root, part = xw._BUILT[variant]
    return variant, img, root, part


def _mkfs(tmp: Path, size: int, *args: str, files: dict[str, bytes] | None = None) -> Path:
    """A bare XFS filesystem file made by mkfs.xfs with ``files`` (path -> content) in it."""
    require_tool("mkfs.xfs")
    src = tmp / "src"
    src.mkdir(exist_ok=True)
    lines = ["/dev/null", "0 0", "d--755 0 0"]
    tree: dict[str, dict] = {}
    for path, data in (files or {}).items():
        parts = path.strip("/").split("/")
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        host = src / path.strip("/").replace("/", "_")
        host.write_bytes(data)
        node[parts[-1]] = host

    def walk(node: dict, depth: int) -> None:
        for name, v in sorted(node.items()):
            if isinstance(v, dict):
                lines.append(f"{' ' * depth}{name} d--755 0 0")
                walk(v, depth + 1)
                lines.append(f"{' ' * depth}$")
            else:
                lines.append(f"{' ' * depth}{name} ---644 0 0 {v}")

    walk(tree, 1)
    lines += ["$", ""]
    proto = tmp / "proto"
    proto.write_text("\n".join(lines))
    part = tmp / "fs.raw"
    with open(part, "wb") as f:
        f.truncate(size)
    proc = subprocess.run(
        ["mkfs.xfs", "-q", *args, "-p", str(proto), str(part)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return part


def _free(part: Path) -> tuple[int, list[int]]:
    """(superblock fdblocks, AGF freeblks per AG) as xfs_db prints them."""
    agcount = int(_fields(_db(part, "sb 0", "p agcount"))["agcount"])
    fd = int(_fields(_db(part, "sb 0", "p fdblocks"))["fdblocks"])
    return fd, [
        int(_fields(_db(part, f"agf {a}", "p freeblks"))["freeblks"]) for a in range(agcount)
    ]


def _nblocks(part: Path, path: str) -> int:
    return int(_fields(_db(part, f"path {path}", "p core.nblocks"))["core.nblocks"])


# --- the case that matters: an initramfs-sized append on a RHEL-style root ---------------------


@pytest.mark.parametrize("variant", ["v5", "v4"])
def test_initramfs_sized_append(variant: str, tmp_path: Path) -> None:
    """40 MiB after an 8 MiB initramfs on a 1.5 GiB filesystem made with mkfs defaults."""
    rng = random.Random(6)
    initrd = "/boot/initramfs-5.14.0-427.el9.x86_64.img"
    old = rng.randbytes(8 * MIB + 123)
    args = ["-m", "crc=0", "-n", "ftype=0"] if variant == "v4" else []
    part = _mkfs(
        tmp_path, 1536 * MIB, *args,
        files={initrd: old, "/etc/dracut.conf.d/x.conf": b"# x\n", "/etc/fstab": b"# t\n"},
    )  # fmt: skip
    fd0, agf0 = _free(part)
    blocks0 = _nblocks(part, initrd)
    extra = rng.randbytes(40 * MIB + 7)
    disk, fs = _open_rw(part)
    with disk:
        fs.check_append_file(initrd, extra)
        fs.append_file(initrd, extra)
        assert fs.read_file(initrd, limit=1 << 30) == old + extra
        # a config file grown past its block, and a new one with content
        fs.write_file("/etc/fstab", b"# t\n" * 3000)
        fs.check_create_file("/etc/dracut.conf.d/virtio.conf", b'add_drivers+=" virtio_blk "\n')
        fs.create_file("/etc/dracut.conf.d/virtio.conf", b'add_drivers+=" virtio_blk "\n')
    _repair_clean(part)
    assert _db_cat(part, initrd) == old + extra
    assert _db_cat(part, "/etc/fstab") == b"# t\n" * 3000
    assert _db_cat(part, "/etc/dracut.conf.d/virtio.conf") == b'add_drivers+=" virtio_blk "\n'
    grown = -(-(len(old) + len(extra)) // BS) - blocks0
    assert _nblocks(part, initrd) == blocks0 + grown
    # every block taken is counted: the AGFs and the superblock agree with xfs_repair
    fd1, agf1 = _free(part)
    used = grown + 2 + 1  # the initramfs, fstab's two new blocks, the new file's block
    assert fd0 - fd1 == sum(agf0) - sum(agf1) == used
    extents = _bmap(part, initrd)
    assert len(extents) <= 2  # grown in place when the blocks after it were free
    if variant == "v4":
        return
    mnt = tmp_path / "mnt"
    _mount(part, mnt)
    try:
        assert (mnt / initrd.lstrip("/")).read_bytes() == old + extra
        assert (mnt / "etc/dracut.conf.d/virtio.conf").read_text().startswith("add_drivers")
        # the kernel allocates and frees around what vmferry allocated
        (mnt / "boot/scratch").write_bytes(os.urandom(30 * MIB))
        with open(mnt / initrd.lstrip("/"), "ab") as f:
            f.write(b"k" * 100_000)
        (mnt / "boot/scratch").unlink()
        (mnt / "etc/fstab").write_text("# kernel\n")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    _repair_clean(part)
    assert _db_cat(part, initrd) == old + extra + b"k" * 100_000
    disk, fs = _open_rw(part)  # and vmferry again after the kernel
    with disk:
        fs.append_file(initrd, b"v" * (3 * MIB))
    _repair_clean(part)
    assert _db_cat(part, initrd) == old + extra + b"k" * 100_000 + b"v" * (3 * MIB)


# --- shapes on the small fixtures (v5 and v4) --------------------------------------------------


def test_growth_lands_in_new_extents(small: Built, tmp_path: Path) -> None:
    _, _, root, base = small
    part = _copy(base, tmp_path / "fs.raw")
    old_big = _db_cat(part, FRAG)
    before = len(_bmap(part, FRAG))
    fd0, _ = _free(part)
    fstab = os.urandom(3 * BS + 5)
    tail = os.urandom(MIB)
    disk, fs = _open_rw(part)
    with disk:
        fs.check_write_file("/etc/fstab", fstab)
        fs.write_file("/etc/fstab", fstab)  # one block owned, four needed
        fs.append_file(FRAG, tail)  # its last extent is followed by its own first one
        fs.append_file("/dir5/s0", b"x" * (2 * BS))
    _repair_clean(part)
    assert _db_cat(part, "/etc/fstab") == fstab
    assert _db_cat(part, FRAG) == old_big + tail
    assert _db_cat(part, "/dir5/s0") == b"5:0\n" + b"x" * (2 * BS)
    assert _nblocks(part, "/etc/fstab") == 4
    assert len(_bmap(part, FRAG)) == before + 1  # the remapped file cannot grow in place
    fd1, _ = _free(part)
    assert fd0 - fd1 == 3 + 256 + 2
    _, fs = _open_rw(part)
    assert fs.read_file("/etc/os-release") == (root / "etc/os-release").read_bytes()


def test_create_file_with_content(small: Built, tmp_path: Path) -> None:
    variant, _, _, base = small
    part = _copy(base, tmp_path / "fs.raw")
    little, big = b"options virtio_blk\n", os.urandom(3 * MIB + 1)
    disk, fs = _open_rw(part)
    with disk:
        for path, data in (("/dir5/new.conf", little), ("/dir40/big.img", big)):
            fs.check_create_file(path, data)
            ino = fs.create_file(path, data, mode=0o600)
            assert fs.stat(path).inode == ino
            assert fs.read_file(path) == data
    _repair_clean(part)
    assert _db_cat(part, "/dir5/new.conf") == little
    assert _db_cat(part, "/dir40/big.img") == big
    mode = _fields(_db(part, "path /dir40/big.img", "p core.mode"))["core.mode"]
    assert mode.endswith("100600")
    assert _nblocks(part, "/dir40/big.img") == -(-len(big) // BS)
    if variant == "v5":
        assert "(correct)" in _db(part, "path /dir40/big.img", "p v3.crc")


def test_extent_map_overflow_is_refused(small: Built, tmp_path: Path) -> None:
    """A file whose in-inode map is full cannot take one more extent: refused, nothing written."""
    variant, _, _, base = small
    part = _copy(base, tmp_path / "fs.raw")
    extents = _bmap(part, FRAG)
    first = min(e[2] for e in extents)
    total = sum(e[3] for e in extents)
    slots = 21 if variant == "v5" else 9  # literal area / 16 bytes (512 and 256-byte inodes)
    # remap the file's own blocks into ``slots`` extents in reverse physical order
    size = total // slots
    layout = []
    for i in range(slots):
        n = size if i < slots - 1 else total - size * (slots - 1)
        layout.append((i * size, first + total - i * size - n, n))
    u = "u3" if variant == "v5" else "u"
    cmds = [f"path {FRAG}", f"write core.nextents {slots}"]
    for i, (off, blk, n) in enumerate(layout):
        cmds += [
            f"write {u}.bmx[{i}].startoff {off}",
            f"write {u}.bmx[{i}].startblock {blk}",
            f"write {u}.bmx[{i}].blockcount {n}",
        ]
    _db(part, *cmds, expert=True)
    assert len(_bmap(part, FRAG)) == slots
    _repair_clean(part)
    digest = _sha(part)
    disk, fs = _open_rw(part)
    with disk:
        size_now = fs.stat(FRAG).size
        room = total * BS - size_now
        with pytest.raises(GuestWriteRefusedError, match="overflow the inode"):
            fs.check_append_file(FRAG, bytes(room + 1))
        with pytest.raises(GuestWriteRefusedError, match="overflow the inode"):
            fs.append_file(FRAG, bytes(room + 1))
        fs.check_append_file(FRAG, bytes(room))  # the blocks it owns still take data
    assert _sha(part) == digest


def test_across_allocation_groups(tmp_path: Path) -> None:
    """More than any one AG holds: the file gets pieces in several AGs, all counted."""
    part = _mkfs(tmp_path, 400 * MIB, "-d", "agcount=4", files={"/boot/initrd": b"i" * 5000})
    fd0, agf0 = _free(part)
    data = os.urandom(150 * MIB)  # an AG is 100 MiB
    disk, fs = _open_rw(part)
    with disk:
        fs.append_file("/boot/initrd", data)
    _repair_clean(part)
    assert _db_cat(part, "/boot/initrd") == b"i" * 5000 + data
    ags = {e[1] for e in _bmap(part, "/boot/initrd")}
    assert len(ags) >= 2
    fd1, agf1 = _free(part)
    assert fd0 - fd1 == sum(agf0) - sum(agf1) == -(-(5000 + len(data)) // BS) - 2
    assert sum(1 for a, b in zip(agf0, agf1, strict=True) if a != b) == len(ags)


def test_nearly_full_filesystem_refuses_and_writes_nothing(tmp_path: Path) -> None:
    part = _mkfs(tmp_path, 320 * MIB, files={"/boot/initrd": b"i" * 100, "/etc/a": b"a"})
    chunk = bytes(range(256)) * (64 * MIB // 256)
    grown = 0
    while True:  # fill with vmferry itself; xfs_repair judges every step
        disk, fs = _open_rw(part)
        with disk:
            try:
                fs.check_append_file("/boot/initrd", chunk)
            except GuestWriteRefusedError as e:
                assert "free" in str(e)
                break
            fs.append_file("/boot/initrd", chunk)
            grown += 1
        _repair_clean(part)
        assert grown < 10
    assert grown >= 3
    digest = _sha(part)
    disk, fs = _open_rw(part)
    with disk:
        with pytest.raises(GuestWriteRefusedError, match="free"):
            fs.append_file("/boot/initrd", chunk)
        with pytest.raises(GuestWriteRefusedError, match="free"):
            fs.check_create_file("/etc/b", chunk)
        with pytest.raises(GuestWriteRefusedError, match="free"):
            fs.create_file("/etc/b", chunk)
        with pytest.raises(GuestWriteRefusedError, match="free"):
            fs.write_file("/etc/a", chunk)
    assert _sha(part) == digest
    fd, _ = _free(part)
    assert fd >= min(81920 // 20, 8192)  # the reserve vmferry keeps is still free
    assert _db_cat(part, "/boot/initrd") == b"i" * 100 + chunk * grown


def test_rmapbt_records_follow_the_growth(tmp_path: Path) -> None:
    """With rmapbt=1 every new extent gets an owner record, a lengthened one a longer record."""
    old = os.urandom(MIB + 3)
    part = _mkfs(
        tmp_path, 320 * MIB, "-m", "rmapbt=1",
        files={"/boot/initrd": old, "/boot/later": bytes(64 << 10), "/etc/a": b"a\n"},
    )  # fmt: skip
    before = _bmap(part, "/boot/initrd")
    extra, more = os.urandom(3 * MIB), os.urandom(2 * MIB)
    disk, fs = _open_rw(part)
    with disk:
        fs.append_file("/boot/initrd", extra)  # followed by /boot/later's block: a new extent
        fs.append_file("/etc/a", more)  # free blocks follow it: grows in place first
        fs.create_file("/etc/b", old)
    _repair_clean(part)
    assert len(_bmap(part, "/boot/initrd")) == len(before) + 1
    assert _bmap(part, "/etc/a")[0][3] > 1  # its first extent (and rmap record) grew
    assert _db_cat(part, "/boot/initrd") == old + extra
    assert _db_cat(part, "/etc/a") == b"a\n" + more
    assert _db_cat(part, "/etc/b") == old
    mnt = tmp_path / "mnt"
    _mount(part, mnt)
    try:
        assert (mnt / "boot/initrd").read_bytes() == old + extra
        (mnt / "etc/a").unlink()  # the kernel frees through the records vmferry wrote
        (mnt / "etc/c").write_bytes(os.urandom(4 * MIB))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    _repair_clean(part)


def test_fuzzed_free_space_metadata_fails_only_with_named_errors(
    small: Built, tmp_path: Path
) -> None:
    """Damage the AGFs and free-space B+tree blocks of every AG; plan growths."""
    _, _, _, base = small
    part = _copy(base, tmp_path / "fs.raw")
    sb = _fields(_db(part, "sb 0", "p agblocks agcount"))
    agblocks, agcount = int(sb["agblocks"]), int(sb["agcount"])
    spots = []
    for a in range(agcount):
        agf = _fields(_db(part, f"agf {a}", "p bnoroot cntroot"))
        base_off = a * agblocks * BS
        spots += [base_off + 512 + i for i in range(0, 512)]
        for root in ("bnoroot", "cntroot"):
            spots += [base_off + int(agf[root]) * BS + i for i in range(0, 128)]
    rng = random.Random(31)
    with open(part, "r+b") as f:
        saved = {}
        for off in spots:
            f.seek(off)
            saved[off] = f.read(1)
        for _ in range(60):
            hit = rng.sample(spots, rng.randrange(1, 12))
            for off in hit:
                f.seek(off)
                f.write(bytes([rng.randrange(256)]))
            f.flush()
            with vmferry.open(part, "raw", writable=True) as disk:
                fs = XfsFilesystem(disk)
                for name, path, data in (
                    ("check_append_file", FRAG, bytes(3 * MIB)),
                    ("check_write_file", "/etc/fstab", bytes(5 * BS)),
                    ("check_create_file", "/dir40/n", bytes(BS)),
                ):
                    try:
                        getattr(fs, name)(path, data)
                    except VmferryError:
                        pass
            for off in hit:
                f.seek(off)
                f.write(saved[off])
        f.flush()
    _repair_clean(part)


def test_fuzzed_rmap_metadata_fails_only_with_named_errors(tmp_path: Path) -> None:
    """Damage the AGF and the rmapbt root of the AG a growth lands in; plan the growth."""
    part = _mkfs(
        tmp_path, 320 * MIB, "-m", "rmapbt=1",
        files={"/boot/initrd": bytes(MIB), "/boot/later": bytes(64 << 10)},
    )  # fmt: skip
    sb = _fields(_db(part, "sb 0", "p agblocks"))
    spots = []
    for a in range(4):
        agf = _fields(_db(part, f"agf {a}", "p rmaproot"))
        base_off = a * int(sb["agblocks"]) * BS
        spots += [base_off + 512 + i for i in range(0, 512)]
        spots += [base_off + int(agf["rmaproot"]) * BS + i for i in range(0, 56 + 24 * 12)]
    rng = random.Random(32)
    with open(part, "r+b") as f:
        saved = {}
        for off in spots:
            f.seek(off)
            saved[off] = f.read(1)
        for _ in range(60):
            hit = rng.sample(spots, rng.randrange(1, 8))
            for off in hit:
                f.seek(off)
                f.write(bytes([rng.randrange(256)]))
            f.flush()
            with vmferry.open(part, "raw", writable=True) as disk:
                fs = XfsFilesystem(disk)
                for data in (bytes(2 * MIB), b"x"):
                    try:
                        fs.check_append_file("/boot/initrd", data)
                    except VmferryError:
                        pass
            for off in hit:
                f.seek(off)
                f.write(saved[off])
        f.flush()
    _repair_clean(part)


# --- multi-level free-space B+trees (the kernel fragments free space; needs a loop mount) -----


@pytest.mark.parametrize("rmapbt", ["0", "1"])
def test_fragmented_free_space_in_multi_level_trees(tmp_path: Path, rmapbt: str) -> None:
    require_tool("xfs_io")
    args = ("-d", "agcount=2", "-m", f"rmapbt={rmapbt}")
    part = _mkfs(tmp_path, 320 * MIB, *args, files={"/etc/a": b"a"})
    mnt = tmp_path / "mnt"
    _mount(part, mnt)
    try:
        d = mnt / "frag"
        d.mkdir()
        for i in range(3000):
            (d / f"f{i:04d}").write_bytes(i.to_bytes(2, "big") * (BS // 2))
        subprocess.run(["sync", "-f", str(d)], check=True)
        for i in range(1, 3000, 2):
            (d / f"f{i:04d}").unlink()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    _repair_clean(part)
    levels = [_fields(_db(part, f"agf {a}", "p bnolevel cntlevel")) for a in (0, 1)]
    assert any(int(f["bnolevel"]) >= 2 and int(f["cntlevel"]) >= 2 for f in levels), levels
    if rmapbt == "1":
        rmap = [int(_fields(_db(part, f"agf {a}", "p rmaplevel"))["rmaplevel"]) for a in (0, 1)]
        assert max(rmap) >= 2, rmap
    grown: list[int] = []
    moved: list[int] = []  # files placed elsewhere because a leaf would have merged
    refused = None
    for i in range(0, 3000, 2):
        path = f"/frag/f{i:04d}"
        disk, fs = _open_rw(part)
        with disk:
            try:
                fs.check_append_file(path, b"+" * BS)
            except GuestWriteRefusedError as e:
                refused = (path, str(e))
                break
            fs.append_file(path, b"+" * BS)  # takes the one-block hole after it
            if len(fs._extents(fs.resolve(path))) > 1:
                moved.append(i)
        grown.append(i)
        if len(grown) % 100 == 0:
            _repair_clean(part)
        if len(moved) >= 10:
            break
    _repair_clean(part)
    assert refused is None, refused  # other free extents were taken where a leaf would merge
    assert len(moved) == 10, (len(grown), moved)  # ... as a second extent, xfs_db agrees:
    assert all(len(_bmap(part, f"/frag/f{i:04d}")) == 2 for i in moved)
    for i in grown[:: max(1, len(grown) // 40)]:
        assert _db_cat(part, f"/frag/f{i:04d}") == i.to_bytes(2, "big") * (BS // 2) + b"+" * BS
    # larger growths take from the big free extent at the end (the last by-count record)
    digest = _sha(part)
    disk, fs = _open_rw(part)
    with disk:
        try:
            fs.append_file("/etc/a", os.urandom(20 * MIB))
        except GuestWriteRefusedError as e:  # its new rmap record may meet a full leaf
            assert rmapbt == "1" and "split" in str(e), e
    if rmapbt == "0" or _sha(part) != digest:
        assert len(_db_cat(part, "/etc/a")) == 1 + 20 * MIB
    _repair_clean(part)
    _mount(part, mnt, "ro")
    try:
        for i in grown[:50]:
            body = (mnt / f"frag/f{i:04d}").read_bytes()
            assert body == i.to_bytes(2, "big") * (BS // 2) + b"+" * BS
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# --- end to end: the virtio drivers injected into a dracut initramfs on an XFS root ----------


def test_dracut_injection_on_an_xfs_root(tmp_path: Path) -> None:
    """H1's injection through ``apply_fixes``: the initramfs grows, a dracut config appears."""
    from tests.guest.test_inject import CONTROLLER_DRIVERS, _initramfs, _unpack
    from tests.guest.test_kmod import MODULES, copy_modules, show_depends
    from tests.guest.test_xfs import FS_SIZE, _build
    from vmferry.guest.linux.fix import apply_fixes, plan_fixes

    root = fake_root(tmp_path / "root")
    (root / "boot/vmlinuz-6.1.0-18-amd64").unlink()
    shutil.rmtree(root / "lib/modules/6.1.0-18-amd64")
    version = copy_modules(root, MODULES + CONTROLLER_DRIVERS)
    (root / f"boot/vmlinuz-{version}").write_text("not really a kernel\n")
    blob, _ = _initramfs(tmp_path, "dracut", "xz")
    initrd = f"/boot/initramfs-{version}.img"
    (root / initrd.lstrip("/")).write_bytes(blob)
    (root / "etc/dracut.conf.d").mkdir(parents=True)
    img, _, _ = _build(tmp_path, "v5", root)
    changes, _ = plan_fixes(img, "kvm")
    assert [c.path for c in changes if c.kind == "append"] == [initrd]
    out = tmp_path / "fixed.raw"
    apply_fixes(img, "kvm", output=out)
    part = tmp_path / "fixed-p1.raw"
    with open(out, "rb") as f, open(part, "wb") as g:
        f.seek(MIB)
        g.write(f.read(FS_SIZE))
    _repair_clean(part)
    new = _db_cat(part, initrd)
    assert new[: len(blob)] == blob and len(new) > len(blob) + BS  # it needed new blocks
    ex = _unpack(tmp_path, blob, new, "xz")
    assert "kernel/drivers/block/virtio_blk.ko" in show_depends(ex, version, "virtio_blk")
    conf = _db_cat(part, "/etc/dracut.conf.d/90-vmferry.conf").decode()
    assert 'add_drivers+=" virtio_blk virtio_pci "' in conf
    again, _ = plan_fixes(out, "kvm")
    assert not [c for c in again if c.rule == "initramfs"]


def test_reflinked_initramfs_is_grown_once_no_longer_shared(tmp_path: Path) -> None:
    """dracut's ``cp --reflink=auto`` leaves the flag; only real sharing refuses the growth."""
    initrd = "/boot/initramfs.img"
    old = os.urandom(2 * MIB + 5)
    part = _mkfs(tmp_path, 320 * MIB, "-m", "reflink=1", files={"/etc/a": b"a"})
    mnt = tmp_path / "mnt"
    _mount(part, mnt)
    try:
        (mnt / "var-tmp").mkdir()
        (mnt / "boot").mkdir()
        (mnt / "var-tmp/initramfs.img").write_bytes(old)
        subprocess.run(
            ["cp", "--reflink=always", str(mnt / "var-tmp/initramfs.img"), str(mnt / "boot")],
            check=True,
        )
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert _fields(_db(part, f"path {initrd}", "p v3.reflink"))["v3.reflink"] == "1"
    digest = _sha(part)
    disk, fs = _open_rw(part)
    with disk:
        for call in (fs.check_append_file, fs.append_file, fs.write_file):
            with pytest.raises(GuestWriteRefusedError, match="2 owners"):
                call(initrd, b"x")
    assert _sha(part) == digest
    _mount(part, mnt)
    try:
        (mnt / "var-tmp/initramfs.img").unlink()  # dracut's temporary copy goes
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    extra = os.urandom(5 * MIB)
    disk, fs = _open_rw(part)
    with disk:
        fs.append_file(initrd, extra)
    _repair_clean(part)
    assert _db_cat(part, initrd) == old + extra
    _mount(part, mnt, "ro")
    try:
        assert (mnt / initrd.lstrip("/")).read_bytes() == old + extra
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
