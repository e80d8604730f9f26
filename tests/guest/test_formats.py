"""The guest layer works through every disk format: third-party images and converted outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import vmferry
from tests.conftest import qemu_img
from tests.guest.conftest import build_guest_disk, debugfs_cat, e2fsck_clean, vmware_root
from vmferry.guest.fs.ext import ExtFilesystem
from vmferry.guest.linux.fix import apply_fixes, plan_fixes
from vmferry.guest.overlay import Slice
from vmferry.guest.partitions import read_partition_table

# Ground truth from the corpus MANIFEST (dfvfs test_lib.py): a 4 MiB ext2 volume, no table.
PASSWORDS = (
    b"place,user,password\nbank,joesmith,superrich\nalarm system,-,1234\n"
    b"treasure chest,-,1111\nuber secret laire,admin,admin\n"
)


@pytest.mark.parametrize("name", ["ext2.vhd", "ext2.qcow2", "ext2.vmdk"])
def test_dfvfs_ext2_through_each_format(corpus: Path, tmp_path: Path, name: str) -> None:
    src = corpus / "dfvfs" / name
    img = tmp_path / name
    shutil.copyfile(src, img)  # the corpus stays untouched (and read-only under CI)
    with vmferry.open(img) as disk:
        assert read_partition_table(disk).scheme == "none"
        fs = ExtFilesystem(Slice(disk, 0, 4 << 20))
        assert fs.version == "ext2"
        assert fs.read_file("/passwords.txt") == PASSWORDS
        assert fs.stat("/passwords.txt").inode == 14
        assert fs.stat("/a_directory/another_file").inode == 15
        assert fs.stat("/a_directory/another_file").size == 22


@pytest.mark.parametrize(
    ("fmt", "qemu_fmt"), [("qcow2", "qcow2"), ("vhdx", "vhdx"), ("vhd", "vpc"), ("vmdk", "vmdk")]
)
def test_fix_writes_any_output_format(tmp_path: Path, fmt: str, qemu_fmt: str) -> None:
    disk = build_guest_disk(tmp_path, vmware_root(tmp_path))
    src_fmt = tmp_path / f"src.{fmt}"
    qemu_img("convert", "-f", "raw", "-O", qemu_fmt, disk.img, src_fmt)
    out = tmp_path / f"fixed.{fmt}"
    result = apply_fixes(src_fmt, "kvm", output=out)
    assert result.written
    back = tmp_path / "back.raw"
    qemu_img(
        "convert", "-f", qemu_fmt, "-O", "raw", out, back
    )  # qemu reads our output independently
    start, size = disk.parts[1]
    part = tmp_path / "p1.raw"
    with open(back, "rb") as f, open(part, "wb") as g:
        f.seek(start)
        g.write(f.read(size))
    ok, report = e2fsck_clean(part)
    assert ok, report
    final = {c.path: c.after for c in result.plan.changes}
    for path, text in final.items():
        assert debugfs_cat(part, path) == text.encode()
    assert plan_fixes(out, "kvm")[0] == []
