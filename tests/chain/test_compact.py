"""`vmferry compact`: all-zero blocks give their space back and the guest sees no change.

Oracles: ``qemu-img compare`` of the image against a raw copy qemu made before compacting,
``qemu-img check`` on the result, and libvhdi (through ``oracle_read``) for differencing
VHD/VHDX chains; ``allocated bytes`` are the file system's (st_blocks), so holes count.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import vmferry
from tests.chain.test_snapshot import oracle_read
from tests.conftest import qemu_img, qemu_io
from tests.formats import EXTENSION, QEMU
from vmferry.chain.compact import compact
from vmferry.cli.main import cli
from vmferry.errors import UnsafeOperationError

MIB = 1 << 20
SIZE = 16 * MIB
BASES = [
    ("raw", {}),
    ("vhd", {"subformat": "dynamic"}),
    ("vhdx", {"subformat": "dynamic", "block_size": "1M"}),
    ("vhdx", {"subformat": "dynamic"}),  # 32 MiB blocks: zeros inside a block are punched
    ("vmdk", {}),
    ("qcow2", {}),
    ("qcow2", {"compat": "0.10"}),
    ("vdi", {}),
]
CHECKS = {"qcow2", "vmdk", "vhdx", "vdi"}  # what qemu-img check can check


def _allocated(path: Path) -> int:
    with vmferry.open(path) as chain:
        files = chain.top.files()
    return sum(os.stat(f).st_blocks * 512 for f in files)


def _fill(disk: vmferry.Chain) -> None:
    """Data with zero-filled holes in it, as a guest leaves after deleting files and fstrim."""
    disk.write(0, b"\x11" * (8 * MIB))
    disk.write(1 * MIB, bytes(4 * MIB))  # inside data, block-aligned
    disk.write(9 * MIB, bytes(3 * MIB))  # a whole run of zeros written as data
    disk.write(13 * MIB, b"\x13" * 4096 + bytes(MIB - 4096))  # a block that keeps 4 KiB of data


def _qemu_check(path: Path, fmt: str) -> None:
    if fmt in CHECKS:
        r = qemu_img("check", "-f", QEMU[fmt][0], path, check=False)
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize(("fmt", "opts"), BASES, ids=lambda v: str(v))
def test_base_gives_space_back_and_reads_the_same(
    tmp_path: Path, fmt: str, opts: dict[str, str]
) -> None:
    img = tmp_path / f"disk{EXTENSION[fmt]}"
    with vmferry.create(img, fmt, SIZE, **opts) as disk:
        _fill(disk)
    before_raw = tmp_path / "before.raw"
    qemu_img("convert", "-f", QEMU[fmt][0], "-O", "raw", img, before_raw)
    before = _allocated(img)
    result = compact(img)
    assert result["allocated_before"] == before
    assert result["allocated_after"] == _allocated(img)
    assert result["allocated_after"] < before
    # 1-5 MiB at least (9-12 MiB: if stored); the filesystem may keep a page or two of it
    assert result["freed_bytes"] >= 3 * MIB
    r = qemu_img("compare", "-f", QEMU[fmt][0], "-F", "raw", img, before_raw, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    _qemu_check(img, fmt)
    again = compact(img)  # nothing left to do: idempotent
    assert again["zeroed_bytes"] == 0 and again["allocated_after"] == result["allocated_after"]


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhdx", "vdi"])
def test_qemu_made_image(tmp_path: Path, fmt: str) -> None:
    qfmt = QEMU[fmt][0]
    img = tmp_path / f"q{EXTENSION[fmt]}"
    qemu_img("create", "-f", qfmt, img, str(SIZE))
    qemu_io(qfmt, img, "write -P 0x5a 0 4M", "write -P 0 1M 2M", "write -P 0 8M 4M")
    before_raw = tmp_path / "before.raw"
    qemu_img("convert", "-f", qfmt, "-O", "raw", img, before_raw)
    before = _allocated(img)
    result = compact(img)
    assert _allocated(img) < before and result["freed_bytes"] >= 5 * MIB
    r = qemu_img("compare", "-f", qfmt, "-F", "raw", img, before_raw, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    _qemu_check(img, fmt)


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhd", "vhdx", "vdi"])
def test_differencing_layer_keeps_hiding_its_parent(tmp_path: Path, fmt: str) -> None:
    """Zeros over parent data must stay (ZERO or zero data); over parent zeros they may go."""
    base = tmp_path / f"base{EXTENSION[fmt]}"
    child = tmp_path / f"child{EXTENSION[fmt]}"
    with vmferry.create(base, fmt, SIZE) as disk:
        disk.write(0, b"\xba" * (4 * MIB))
    vmferry.create(child, fmt, parent=base).close()
    with vmferry.open(child, writable=True) as disk:
        disk.write(0, bytes(2 * MIB))  # hides parent data: must keep hiding it
        disk.write(8 * MIB, bytes(2 * MIB))  # over parent zeros
        disk.write(12 * MIB, b"\xcc" * MIB)
        model = disk.read(0, SIZE)
    assert model[: 2 * MIB] == bytes(2 * MIB) and model[2 * MIB : 3 * MIB] == b"\xba" * MIB
    oracle_before = oracle_read(child, SIZE) if fmt != "vdi" else model
    assert oracle_before == model
    base_sum = base.read_bytes()
    before = _allocated(child)
    result = compact(child)
    assert result["zeroed_bytes"] == 4 * MIB
    with vmferry.open(child) as disk:
        assert disk.read(0, SIZE) == model
    if fmt != "vdi":
        assert oracle_read(child, SIZE) == model
    assert base.read_bytes() == base_sum  # the parent is never touched
    if fmt != "vhdx":  # vhdx: zeros over part of a partially present block are rewritten
        assert _allocated(child) < before
    _qemu_check(base, fmt)
    if fmt in ("qcow2", "vmdk"):
        _qemu_check(child, fmt)


def test_parent_with_children_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    with vmferry.create(base, "vhdx", SIZE) as disk:
        _fill(disk)
    vmferry.create(tmp_path / "child.avhdx", "vhdx", parent=base).close()
    data = base.read_bytes()
    with pytest.raises(UnsafeOperationError, match="has differencing children"):
        compact(base)
    assert base.read_bytes() == data


def test_cli_json(tmp_path: Path) -> None:
    img = tmp_path / "disk.qcow2"
    with vmferry.create(img, "qcow2", SIZE) as disk:
        _fill(disk)
    r = CliRunner().invoke(cli, ["compact", str(img), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["allocated_after"] < out["allocated_before"]
    r = CliRunner().invoke(cli, ["compact", str(img)])
    assert r.exit_code == 0 and "given back" in r.stdout
