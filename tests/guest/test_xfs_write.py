"""XFS in-place writes (v4 and v5) judged by xfsprogs: xfs_repair -n, xfs_db, xfs_logprint.

Fixtures are made by mkfs.xfs -p (protofile) into plain files; xfs_db -x reshapes them where
mkfs cannot (a physically fragmented file, an unwritten extent, a reflink flag), and a log
record's unmount flag is cleared by hand to make a dirty log that xfs_logprint calls DIRTY.
File contents are read back independently: xfs_db's own block map plus the raw bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import vmferry
from tests.conftest import require_tool
from tests.guest.test_xfs import FS_SIZE, MIB, _build
from vmferry.errors import GuestError, VmferryError
from vmferry.guest.errors import CorruptGuestError, GuestWriteRefusedError
from vmferry.guest.fs.xfs import XfsFilesystem
from vmferry.guest.fs.xfs_log import log_offset
from vmferry.guest.linux.fix import apply_fixes, plan_fixes

_BUILT: dict[str, tuple[Path, Path, Path]] = {}
FRAG = "/usr/bin/big"  # 2 MiB + 17 bytes, remapped into three reversed extents


@pytest.fixture(params=["v5", "v4"])
def built(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, Path, Path]:
    """(variant, disk image, source tree, bare filesystem file); copy before changing them."""
    variant = request.param
    if variant not in _BUILT:
        require_tool("xfs_db")
        tmp = tmp_path_factory.mktemp(f"xw-{variant}")
        img, root, part = _build(tmp, variant)
        _fragment(part, FRAG, variant == "v5")
        _place(part, img)
        _BUILT[variant] = (img, root, part)
    img, root, part = _BUILT[variant]
    return variant, img, root, part


def _copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    return dst


def _place(part: Path, img: Path) -> None:
    subprocess.run(
        ["dd", f"if={part}", f"of={img}", "bs=1M", "seek=1", "conv=sparse,notrunc", "status=none"],
        check=True,
    )


def _db(part: Path, *cmds: str, expert: bool = False, check: bool = True) -> str:
    argv = ["xfs_db", "-x" if expert else "-r"]
    for c in cmds:
        argv += ["-c", c]
    proc = subprocess.run([*argv, str(part)], capture_output=True, text=True)
    assert proc.returncode == 0 or not check, proc.stderr
    return proc.stdout


def _fields(text: str) -> dict[str, str]:
    return dict(line.split(" = ", 1) for line in text.splitlines() if " = " in line)


def _bmap(part: Path, path: str) -> list[tuple[int, int, int, int, int]]:
    """(file block, AG, AG block, count, flag) per extent, as xfs_db maps the data fork."""
    out = _db(part, f"path {path}", "bmap")
    pat = r"data offset (\d+) startblock \d+ \((\d+)/(\d+)\) count (\d+) flag (\d+)"
    return [tuple(map(int, m)) for m in re.findall(pat, out)]  # type: ignore[misc]


def _fragment(part: Path, path: str, v5: bool) -> None:
    """Remap a contiguous file's blocks into three extents in reverse physical order."""
    ((_, agno, agbno, count, _),) = _bmap(part, path)
    assert agno == 0 and count > 300
    fsb = agbno  # in AG 0 a filesystem block number is the AG block number
    u = "u3" if v5 else "u"
    layout = [(0, fsb + 300, count - 300), (count - 300, fsb + 200, 100), (count - 200, fsb, 200)]
    cmds = [f"path {path}", "write core.nextents 3"]
    for i, (off, blk, n) in enumerate(layout):
        cmds += [
            f"write {u}.bmx[{i}].startoff {off}",
            f"write {u}.bmx[{i}].startblock {blk}",
            f"write {u}.bmx[{i}].blockcount {n}",
        ]
    _db(part, *cmds, expert=True)
    assert len(_bmap(part, path)) == 3
    _repair_clean(part)


def _db_cat(part: Path, path: str) -> bytes:
    """A file's content read with xfs_db's block map and plain reads: no vmferry code."""
    sb = _fields(_db(part, "sb 0", "p agblocks blocksize"))
    agblocks, bs = int(sb["agblocks"]), int(sb["blocksize"])
    size = int(_fields(_db(part, f"path {path}", "p core.size"))["core.size"])
    buf = bytearray(size)
    with open(part, "rb") as f:
        for off, agno, agbno, count, flag in _bmap(part, path):
            if flag or off * bs >= size:
                continue
            f.seek((agno * agblocks + agbno) * bs)
            n = min(count * bs, size - off * bs)
            buf[off * bs : off * bs + n] = f.read(n)
    return bytes(buf)


def _repair_clean(part: Path) -> None:
    require_tool("xfs_repair")
    proc = subprocess.run(["xfs_repair", "-n", "-f", str(part)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _open_rw(part: Path) -> tuple[Any, XfsFilesystem]:
    disk = vmferry.open(part, "raw", writable=True)
    return disk, XfsFilesystem(disk)


def _extract(img: Path, out: Path) -> Path:
    with open(img, "rb") as src, open(out, "wb") as dst:
        src.seek(MIB)
        dst.truncate(FS_SIZE)
        left = FS_SIZE
        while left:
            chunk = src.read(min(left, 4 * MIB))
            if chunk.strip(b"\0"):
                dst.seek(FS_SIZE - left)
                dst.write(chunk)
            left -= len(chunk)
    return out


# --- rewrites ---------------------------------------------------------------------------------


def test_shrink_same_size_and_grow_within_allocation(
    built: tuple[str, Path, Path, Path], tmp_path: Path
) -> None:
    variant, _, root, base = built
    part = _copy(base, tmp_path / "fs.raw")
    before = _fields(_db(part, "path /etc/fstab", "p"))
    old = (root / "etc/fstab").read_bytes()
    steps = [
        b"/dev/vda1 / xfs defaults 0 1\n",  # shrink
        b"UUID=0000 / xfs defaults 0 1\n",  # same size
        old + b"# " + b"x" * 3000 + b"\n",  # grow, still inside the file's one block
        b"",  # empty: the block stays allocated past EOF
        b"final\n",
    ]
    for data in steps:
        disk, fs = _open_rw(part)
        with disk:
            fs.write_file("/etc/fstab", data)
            assert fs.read_file("/etc/fstab") == data
        _repair_clean(part)
        assert _db_cat(part, "/etc/fstab") == data
    after = _fields(_db(part, "path /etc/fstab", "p"))
    assert after["core.nblocks"] == before["core.nblocks"] == "1"
    assert after["core.size"] == "6"
    assert after["core.mtime.sec"] != before["core.mtime.sec"] or variant == "v4"
    if variant == "v5":
        assert int(after["v3.change_count"]) == int(before["v3.change_count"]) + len(steps)
        assert "(correct)" in _db(part, "path /etc/fstab", "p v3.crc")
    # everything else still reads as the source tree
    _, fs = _open_rw(part)
    assert fs.read_file("/etc/os-release") == (root / "etc/os-release").read_bytes()


def test_multi_extent_file_rewritten_across_its_extents(
    built: tuple[str, Path, Path, Path], tmp_path: Path
) -> None:
    _, _, root, base = built
    part = _copy(base, tmp_path / "fs.raw")
    bs = 4096
    original = _db_cat(part, FRAG)
    assert len(original) == len((root / FRAG.lstrip("/")).read_bytes())
    data = bytes(range(256)) * (350 * bs // 256) + b"tail"  # spans extents 1 and 2 of 3
    disk, fs = _open_rw(part)
    with disk:
        assert fs.read_file(FRAG) == original  # the reader follows the remapped extents
        fs.write_file(FRAG, data)
    _repair_clean(part)
    assert _db_cat(part, FRAG) == data
    assert len(_bmap(part, FRAG)) == 3  # no extent was added, trimmed or freed
    # growing back to the whole allocation fills the third extent too
    full = os.urandom(len(original))
    disk, fs = _open_rw(part)
    with disk:
        fs.write_file(FRAG, full)
    _repair_clean(part)
    assert _db_cat(part, FRAG) == full


def test_append_within_the_allocation(built: tuple[str, Path, Path, Path], tmp_path: Path) -> None:
    _, _, root, base = built
    part = _copy(base, tmp_path / "fs.raw")
    old = (root / "etc/fstab").read_bytes()
    disk, fs = _open_rw(part)
    with disk:
        fs.append_file("/etc/fstab", b"/dev/vdb1 /srv xfs defaults 0 0\n")
        # shrink the 3-extent file, then append back into the blocks it kept past EOF
        fs.write_file(FRAG, b"head\n")
        tail = os.urandom(2 * MIB)
        fs.check_append_file(FRAG, tail)
        fs.append_file(FRAG, tail)
    _repair_clean(part)
    assert len(_bmap(part, FRAG)) == 3  # nothing allocated: the blocks were the file's
    assert _db_cat(part, "/etc/fstab") == old + b"/dev/vdb1 /srv xfs defaults 0 0\n"
    assert _db_cat(part, FRAG) == b"head\n" + tail


def test_refusals_write_nothing(built: tuple[str, Path, Path, Path], tmp_path: Path) -> None:
    variant, _, _, base = built
    part = _copy(base, tmp_path / "fs.raw")
    u = "u3" if variant == "v5" else "u"
    # an unwritten extent at the start of a file, and a file without blocks
    _db(part, "path /etc/debian_version", f"write {u}.bmx[0].extentflag 1", expert=True)
    digest = _sha(part)
    disk, fs = _open_rw(part)
    with disk:
        cases = [
            ("/etc/debian_version", b"12.6\n", "unwritten"),
            ("/tmp", b"x", "not a regular file"),
            ("/etc", b"x", "not a regular file"),
        ]
        for path, data, why in cases:
            with pytest.raises(GuestWriteRefusedError, match=why):
                fs.check_write_file(path, data)
            with pytest.raises(GuestWriteRefusedError):
                fs.write_file(path, data)
    assert _sha(part) == digest


def test_refused_inode_shapes(built: tuple[str, Path, Path, Path], tmp_path: Path) -> None:
    variant, _, _, base = built
    part = _copy(base, tmp_path / "fs.raw")
    shapes = [("core.immutable 1", GuestWriteRefusedError), ("core.format 1", CorruptGuestError)]
    for i, (field, error) in enumerate(shapes):
        path = f"/dir5/s{i}"
        _db(part, f"path {path}", f"write {field}", expert=True)
        digest = _sha(part)
        disk, fs = _open_rw(part)
        with disk, pytest.raises(error):
            fs.write_file(path, b"new\n")
        assert _sha(part) == digest, field
    if variant == "v5":  # the reflink flag alone: no refcount record, so the file owns its blocks
        part = _copy(base, tmp_path / "fs2.raw")
        _db(part, "path /dir5/s3", "write v3.reflink 1", expert=True)
        disk, fs = _open_rw(part)
        with disk:
            fs.write_file("/dir5/s3", b"new\n" * 2000)  # in place and one new block
        _repair_clean(part)
        assert _db_cat(part, "/dir5/s3") == b"new\n" * 2000


def test_v5_bad_inode_checksum_is_refused(
    built: tuple[str, Path, Path, Path], tmp_path: Path
) -> None:
    variant, _, _, base = built
    if variant != "v5":
        pytest.skip("v4 inodes carry no checksum")
    part = _copy(base, tmp_path / "fs.raw")
    _db(part, "path /etc/fstab", "write -c core.uid 7", expert=True)  # -c: leave the CRC stale
    assert "(bad)" in _db(part, "path /etc/fstab", "p v3.crc", check=False)
    digest = _sha(part)
    disk, fs = _open_rw(part)
    with disk, pytest.raises(CorruptGuestError, match="checksum"):
        fs.write_file("/etc/fstab", b"x\n")
    assert _sha(part) == digest


# --- the log and the superblock ---------------------------------------------------------------


def _dirty_log(part: Path) -> None:
    """Clear the unmount flag of the log's last record: replayable work, as after a crash."""
    with open(part, "r+b") as f:
        from vmferry.guest.fs.xfs_layout import XfsSuperblock

        sb = XfsSuperblock.unpack(f.read(XfsSuperblock.size))
        start, _ = log_offset(sb)
        f.seek(start + 512 + 9)  # mkfs's unmount record: header BB, then its op header
        flags = f.read(1)[0]
        assert flags & 0x20
        f.seek(start + 512 + 9)
        f.write(bytes([flags & ~0x20]))


def test_dirty_log_is_refused(built: tuple[str, Path, Path, Path], tmp_path: Path) -> None:
    _, _, _, base = built
    require_tool("xfs_logprint")
    part = _copy(base, tmp_path / "fs.raw")
    clean = subprocess.run(["xfs_logprint", "-t", str(part)], capture_output=True, text=True)
    assert "<CLEAN>" in clean.stdout
    _dirty_log(part)
    dirty = subprocess.run(["xfs_logprint", "-t", str(part)], capture_output=True, text=True)
    assert "<DIRTY>" in dirty.stdout
    digest = _sha(part)
    disk, fs = _open_rw(part)
    with disk:
        assert fs.read_file("/etc/fstab")  # reading is still allowed
        with pytest.raises(GuestWriteRefusedError, match="log"):
            fs.write_file("/etc/fstab", b"x\n")
    assert _sha(part) == digest


def test_feature_bits_refused_by_name(built: tuple[str, Path, Path, Path], tmp_path: Path) -> None:
    variant, _, _, base = built
    part = _copy(base, tmp_path / "fs.raw")
    if variant == "v5":
        cmds, name = ["sb 0", "write features_log_incompat 0x1"], "logged_xattrs"
    else:
        cmds, name = ["sb 0", "write versionnum 0xb6a4"], "shared"  # the v4 SHARED bit
    _db(part, *cmds, expert=True)
    disk, fs = _open_rw(part)
    with disk, pytest.raises(GuestWriteRefusedError, match=name):
        fs.check_writable()


# --- the whole fix ------------------------------------------------------------------------------


def test_apply_fixes_on_xfs_root(built: tuple[str, Path, Path, Path], tmp_path: Path) -> None:
    _, img, _, _ = built
    changes, _ = plan_fixes(img, "kvm")
    edited = {c.path: c.after for c in changes}
    assert {"/etc/fstab", "/boot/grub/grub.cfg", "/etc/default/grub"} <= set(edited)
    assert all(c.kind == "edit" for c in changes)
    src_digest = _sha(img)
    out = tmp_path / "out.raw"
    result = apply_fixes(img, "kvm", output=out)
    assert sorted(result.written) == sorted(edited)
    assert _sha(img) == src_digest  # the source is untouched
    part = _extract(out, tmp_path / "out-fs.raw")
    _repair_clean(part)
    for path, after in edited.items():
        assert _db_cat(part, path) == after.encode(), path
    assert "UUID=" in edited["/etc/fstab"] and "/dev/sda1" not in edited["/etc/fstab"]
    assert plan_fixes(out, "kvm")[0] == []  # fixed means nothing left to change
    # in place, on a copy
    copy = _copy(img, tmp_path / "inplace.raw")
    apply_fixes(copy, "kvm", in_place=True)
    part2 = _extract(copy, tmp_path / "inplace-fs.raw")
    _repair_clean(part2)
    assert _db_cat(part2, "/etc/fstab") == edited["/etc/fstab"].encode()


def _fill(part: Path, path: str) -> None:
    """Grow ``path`` with vmferry until not one more block can be allocated."""
    size = 64 * MIB
    while size >= 4096:
        disk, fs = _open_rw(part)
        with disk:
            try:
                fs.append_file(path, bytes(size))
            except GuestWriteRefusedError:
                size //= 4
    _repair_clean(part)


def test_apply_fixes_refuses_whole_plan_when_one_file_does_not_fit(
    built: tuple[str, Path, Path, Path], tmp_path: Path
) -> None:
    variant, _, root, _ = built
    tree = tmp_path / "tree"
    shutil.copytree(root, tree, symlinks=True)
    fstab = tree / "etc/fstab"
    body = fstab.read_text()
    fstab.write_text(body + "#" * (4096 - len(body) - 1) + "\n")  # exactly one full block
    img, _, part = _build(tmp_path, variant, tree)
    _fill(part, FRAG)  # the fstab rewrite needs a second block and none is left
    _place(part, img)
    digest = _sha(img)
    with pytest.raises(GuestWriteRefusedError, match="/etc/fstab"):
        apply_fixes(img, "kvm", in_place=True)
    assert _sha(img) == digest
    out = tmp_path / "never.raw"
    with pytest.raises(GuestWriteRefusedError):
        apply_fixes(img, "kvm", output=out)
    assert not out.exists()


def test_apply_fixes_masks_units_on_xfs(
    built: tuple[str, Path, Path, Path], tmp_path: Path
) -> None:
    """The tools rule's /etc/systemd/system/UNIT -> /dev/null symlinks, made on XFS."""
    variant, _, root, _ = built
    tree = tmp_path / "tree"
    shutil.copytree(root, tree, symlinks=True)
    units = tree / "lib/systemd/system"
    units.mkdir(parents=True)
    for unit in ("open-vm-tools.service", "vgauth.service"):
        (units / unit).write_text("[Service]\n")
    (tree / "lib/systemd/systemd").write_text("not really systemd\n")
    wants = tree / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "open-vm-tools.service").symlink_to("/lib/systemd/system/open-vm-tools.service")
    img, _, _ = _build(tmp_path, variant, tree)
    changes, _ = plan_fixes(img, "kvm")
    links = sorted(c.path for c in changes if c.kind == "symlink")
    assert links == [
        "/etc/systemd/system/open-vm-tools.service",
        "/etc/systemd/system/vgauth.service",
    ]
    apply_fixes(img, "kvm", in_place=True)
    part = _extract(img, tmp_path / "fixed-fs.raw")
    _repair_clean(part)
    listing = _db(part, "ls /etc/systemd/system")
    for link in links:
        name = link.rsplit("/", 1)[1]
        row = next(line for line in listing.splitlines() if line.endswith(f" {name} (good)"))
        ino = row.split()[1]
        if variant == "v5":
            assert " symlink " in row  # the directory entry's file type
        fields = _fields(_db(part, f"inode {ino}", "p"))
        assert fields["core.mode"] == "0120777" and fields["core.format"].startswith("1")
        assert fields["u3.symlink" if variant == "v5" else "u.symlink"] == '"/dev/null"'
    assert _db_cat(part, "/etc/fstab").startswith(b"# /etc/fstab\nUUID=")
    assert plan_fixes(img, "kvm")[0] == []


# --- robustness ---------------------------------------------------------------------------------


def test_fuzzed_inodes_fail_only_with_named_errors(
    built: tuple[str, Path, Path, Path], tmp_path: Path
) -> None:
    import random

    _, _, _, base = built
    part = _copy(base, tmp_path / "fs.raw")
    with vmferry.open(part, "raw") as disk:
        fs = XfsFilesystem(disk)
        off, isize = fs.resolve("/etc/fstab").offset, fs.sb.inodesize
    rng = random.Random(11)
    with open(part, "r+b") as f:
        f.seek(off)
        pristine = f.read(isize)
        for _ in range(60):
            buf = bytearray(pristine)
            for _ in range(rng.randrange(1, 6)):
                buf[rng.randrange(isize)] = rng.randrange(256)
            f.seek(off)
            f.write(buf)
            f.flush()
            with vmferry.open(part, "raw", writable=True) as disk:
                try:
                    XfsFilesystem(disk).check_write_file("/etc/fstab", b"new\n")
                except VmferryError:
                    pass


# --- new entries --------------------------------------------------------------------------------


def test_create_in_short_and_block_form_directories(
    built: tuple[str, Path, Path, Path], tmp_path: Path
) -> None:
    variant, _, _, base = built
    part = _copy(base, tmp_path / "fs.raw")
    ifree = int(_fields(_db(part, "sb 0", "p ifree"))["ifree"])
    made = {
        "/dir5/masked.service": "/dev/null",  # short form, in the parent inode
        "/dir40/open-vm-tools.service": "/dev/null",  # block form
        "/dir40/" + "n" * 200: "../" + "t" * 100,  # a long name and a longer inline target
    }
    disk, fs = _open_rw(part)
    with disk:
        for path, target in made.items():
            fs.check_creatable(path)
            fs.symlink(path, target)
        fs.create_file("/dir5/empty", b"", mode=0o600)
        for path, target in made.items():
            assert fs.readlink(path) == target
        with pytest.raises(GuestWriteRefusedError, match="exists"):
            fs.symlink("/dir5/masked.service", "/dev/null")
    _repair_clean(part)
    assert int(_fields(_db(part, "sb 0", "p ifree"))["ifree"]) == ifree - 4
    for path, target in made.items():
        u = "u3" if variant == "v5" else "u"
        fields = _fields(_db(part, f"path {path}", "p"))
        assert fields[f"{u}.symlink"] == f'"{target}"', path
    empty = _fields(_db(part, "path /dir5/empty", "p"))
    assert empty["core.mode"] == "0100600" and empty["core.size"] == "0"
    names = _db(part, "ls /dir40")
    assert "open-vm-tools.service (good)" in names and "n" * 200 + " (good)" in names


def test_create_until_inodes_run_out(tmp_path: Path) -> None:
    """Fill every existing inode chunk (inobt records fill, finobt records go), then refuse."""
    require_tool("mkfs.xfs")
    lines = ["/dev/null", "0 0", "d--755 0 0", "d d--755 0 0"]
    src = tmp_path / "one"
    src.write_text("1\n")
    lines += [f"file-with-a-long-name-{i:02d} ---644 0 0 {src}" for i in range(12)]
    (tmp_path / "proto").write_text("\n".join([*lines, "$", "$", ""]))
    part = tmp_path / "fs.raw"
    with open(part, "wb") as f:
        f.truncate(FS_SIZE)
    subprocess.run(
        ["mkfs.xfs", "-q", "-p", str(tmp_path / "proto"), str(part)],
        check=True,
        capture_output=True,
    )
    assert _fields(_db(part, "path /d", "p core.format"))["core.format"].startswith("2")
    free = int(_fields(_db(part, "sb 0", "p ifree"))["ifree"])
    assert 0 < free < 200
    for n in range(free):
        disk, fs = _open_rw(part)
        with disk:
            fs.symlink(f"/d/l{n}", f"/target/{n}")
        if n in (0, free // 2, free - 1):
            _repair_clean(part)
    assert _fields(_db(part, "sb 0", "p ifree"))["ifree"] == "0"
    digest = _sha(part)
    disk, fs = _open_rw(part)
    with disk, pytest.raises(GuestWriteRefusedError, match="no allocation group has a free"):
        fs.symlink("/d/one-more", "/dev/null")
    assert _sha(part) == digest
    assert len(_db(part, "ls /d").splitlines()) == 1 + 2 + 12 + free  # header, ., ..


def test_create_refusals_write_nothing(built: tuple[str, Path, Path, Path], tmp_path: Path) -> None:
    _, _, _, base = built
    part = _copy(base, tmp_path / "fs.raw")
    disk, fs = _open_rw(part)
    with disk:  # fill the short-form directory until it would need a block
        n = 0
        while True:
            try:
                fs.symlink(f"/dir5/entry-with-a-long-name-{n}", "/dev/null")
            except GuestWriteRefusedError as e:
                assert "block" in str(e)
                break
            n += 1
            assert n < 100
    _repair_clean(part)
    digest = _sha(part)
    disk, fs = _open_rw(part)
    with disk:
        cases = [
            ("/dir5/entry-with-a-long-name-x", "/dev/null", "block"),
            ("/dir600/x", "/dev/null", "leaf or node form"),
            ("/dir40/y", "/" * 400, "does not fit inside the inode"),
            ("/nowhere/x", "/dev/null", "not found"),
            ("/etc/fstab/x", "/dev/null", "not a directory"),
        ]
        for path, target, why in cases:
            with pytest.raises(GuestError, match=why):
                fs.symlink(path, target)
    assert _sha(part) == digest


# --- the Linux kernel as a second judge (needs root and loop mounts; skipped without) ----------


def _mount(part: Path, where: Path, *opts: str) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting the image needs root and mount(8)")
    where.mkdir(exist_ok=True)
    proc = subprocess.run(
        ["mount", "-o", ",".join(["loop", *opts]), str(part), str(where)],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        pytest.skip(f"cannot loop-mount XFS here: {proc.stderr.strip()}")


def test_kernel_reads_and_extends_what_vmferry_wrote(
    built: tuple[str, Path, Path, Path], tmp_path: Path
) -> None:
    variant, _, _, base = built
    if variant != "v5":
        pytest.skip("current kernels no longer mount v4 XFS")
    require_tool("xfs_io")
    part = _copy(base, tmp_path / "fs.raw")
    mnt = tmp_path / "mnt"
    _mount(part, mnt)  # the kernel makes a file with a B+tree data fork: 41 extents, holes
    try:
        writes = [a for i in range(41) for a in ("-c", f"pwrite -q {i * 8}k 4k")]
        subprocess.run(["xfs_io", "-f", *writes, str(mnt / "frag")], check=True)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert _fields(_db(part, "path /frag", "p core.format"))["core.format"].startswith("3")
    disk, fs = _open_rw(part)
    with disk:
        fs.write_file("/etc/fstab", b"UUID=x / xfs defaults 0 0\n")
        with pytest.raises(GuestWriteRefusedError, match="hole"):
            fs.check_write_file("/frag", b"b" * 5000)
        fs.write_file("/frag", b"b" * 4000)
        fs.symlink("/dir40/open-vm-tools.service", "/dev/null")
        fs.symlink("/dir5/vgauth.service", "/dev/null")
        fs.create_file("/dir5/empty", b"")
    _repair_clean(part)
    assert _db_cat(part, "/frag") == b"b" * 4000
    _mount(part, mnt, "ro")
    try:
        assert (mnt / "etc/fstab").read_bytes() == b"UUID=x / xfs defaults 0 0\n"
        assert (mnt / "frag").read_bytes() == b"b" * 4000
        assert os.readlink(mnt / "dir40/open-vm-tools.service") == "/dev/null"
        assert os.readlink(mnt / "dir5/vgauth.service") == "/dev/null"
        assert (mnt / "dir5/empty").stat().st_size == 0
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    _mount(part, mnt)  # read-write: the kernel edits the directories vmferry edited
    try:
        (mnt / "dir40/open-vm-tools.service").unlink()
        (mnt / "dir5/from-kernel").write_text("hello\n")
        (mnt / "dir40/from-kernel").symlink_to("/dev/null")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    _repair_clean(part)
    disk, fs = _open_rw(part)
    with disk:
        assert fs.read_file("/dir5/from-kernel") == b"hello\n"
        assert not fs.exists("/dir40/open-vm-tools.service")
        fs.symlink("/dir40/open-vm-tools.service", "/dev/null")  # again, after the kernel
    _repair_clean(part)


def test_kernel_crash_leaves_a_log_vmferry_refuses(
    built: tuple[str, Path, Path, Path], tmp_path: Path
) -> None:
    variant, _, _, base = built
    if variant != "v5":
        pytest.skip("current kernels no longer mount v4 XFS")
    require_tool("xfs_io")
    part = _copy(base, tmp_path / "fs.raw")
    mnt = tmp_path / "mnt"
    _mount(part, mnt)
    try:
        (mnt / "etc/fstab").write_text("changed by the kernel\n")
        (mnt / "newdir").mkdir()
        # flush the log, then stop as a crash would: metadata stays in the log only
        subprocess.run(["xfs_io", "-x", "-c", "shutdown -f", str(mnt)], check=True)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    dirty = subprocess.run(["xfs_logprint", "-t", str(part)], capture_output=True, text=True)
    assert "<DIRTY>" in dirty.stdout
    digest = _sha(part)
    disk, fs = _open_rw(part)
    with disk, pytest.raises(GuestWriteRefusedError, match="log"):
        fs.symlink("/etc/masked.service", "/dev/null")
    assert _sha(part) == digest


def test_fuzzed_metadata_fails_creation_only_with_named_errors(
    built: tuple[str, Path, Path, Path], tmp_path: Path
) -> None:
    """Damage AG 0's headers, inode B+trees, inodes and small directories; plan creations."""
    import random

    _, _, _, base = built
    part = _copy(base, tmp_path / "fs.raw")
    hot = 2 * MIB
    rng = random.Random(21)
    with open(part, "r+b") as f:
        pristine = f.read(hot)
        for _ in range(40):
            buf = bytearray(pristine)
            for _ in range(rng.randrange(1, 40)):
                buf[rng.randrange(512, hot)] = rng.randrange(256)  # the superblock stays
            f.seek(0)
            f.write(buf)
            f.flush()
            with vmferry.open(part, "raw", writable=True) as disk:
                for path in ("/dir5/new", "/dir40/new", "/etc/new"):
                    try:
                        XfsFilesystem(disk).check_creatable(path)
                    except VmferryError:
                        pass
