"""`vmferry snapshot`: the next child, named as each hypervisor names it, checked by oracles.

Oracles: qemu-img (qcow2 and VMDK chains: info --backing-chain, convert to raw), libvhdi's
``pyvhdi`` (VHD/VHDX chains: parent identifier and the data read through the chain).  qemu
cannot read VDI differencing images, so VDI children are checked by vmferry's reader and the
base by ``qemu-img check``.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import vmferry
from tests.conftest import qemu_img
from tests.formats import EXTENSION, QEMU
from vmferry.chain.snapshot import NAMING, child_name, snapshot
from vmferry.cli.main import cli
from vmferry.errors import UnsafeOperationError, UnsupportedFeatureError

MIB = 1 << 20
SIZE = 8 * MIB
SNAPSHOT_FORMATS = ["vhdx", "vhd", "vmdk", "qcow2", "vdi"]
GUID = r"[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}"
EXPECTED = {
    "vhdx": (rf"web01_{GUID}\.avhdx", rf"web01_{GUID}\.avhdx"),
    "vhd": (rf"web01_{GUID}\.avhd", rf"web01_{GUID}\.avhd"),
    "vmdk": (r"web01-000001\.vmdk", r"web01-000002\.vmdk"),
    "qcow2": (r"web01-snap1\.qcow2", r"web01-snap2\.qcow2"),
    "vdi": (r"\{[0-9a-f-]{36}\}\.vdi", r"\{[0-9a-f-]{36}\}\.vdi"),
}


def oracle_read(top: Path, size: int) -> bytes:
    """What an independent reader sees through ``top``'s chain (skips for VDI children)."""
    with vmferry.open(top) as chain:
        fmt = chain.format
        paths = [Path(layer.file.path) for layer in chain.layers]
    if fmt in ("qcow2", "vmdk"):
        out = top.with_name(top.name + ".oracle.raw")
        qemu_img("convert", "-f", QEMU[fmt][0], "-O", "raw", top, out)
        data = out.read_bytes()
        out.unlink()
        return data
    if fmt in ("vhd", "vhdx"):
        pyvhdi = pytest.importorskip("pyvhdi")
        files = []
        for p in paths:
            f = pyvhdi.file()
            f.open(str(p))
            files.append(f)
        try:
            for child, parent in itertools.pairwise(files):
                child.set_parent(parent)
            assert files[0].get_media_size() == size
            data: bytes = files[0].read_buffer_at_offset(size, 0)
            return data
        finally:
            for f in files:
                f.close()
    if len(paths) == 1:
        out = top.with_name(top.name + ".oracle.raw")
        qemu_img("convert", "-f", QEMU[fmt][0], "-O", "raw", top, out)
        data = out.read_bytes()
        out.unlink()
        return data
    pytest.skip(f"no independent reader for {fmt} differencing chains")


def _base(tmp_path: Path, fmt: str) -> tuple[Path, bytearray]:
    base = tmp_path / f"web01{EXTENSION[fmt]}"
    model = bytearray(SIZE)
    with vmferry.create(base, fmt, SIZE) as disk:
        disk.write(0, b"\x11" * MIB)
        disk.write(3 * MIB, b"\x33" * MIB)
    model[0:MIB] = b"\x11" * MIB
    model[3 * MIB : 4 * MIB] = b"\x33" * MIB
    return base, model


@pytest.mark.parametrize("fmt", SNAPSHOT_FORMATS)
def test_two_snapshots_named_and_stacked(tmp_path: Path, fmt: str) -> None:
    base, model = _base(tmp_path, fmt)
    first = Path(snapshot(base)["image"])
    assert first.parent == tmp_path
    assert re.fullmatch(EXPECTED[fmt][0], first.name), first.name
    with vmferry.open(first, writable=True) as disk:
        disk.write(MIB, b"\x22" * MIB)
    model[MIB : 2 * MIB] = b"\x22" * MIB
    second = Path(snapshot(first)["image"])
    assert re.fullmatch(EXPECTED[fmt][1], second.name), second.name
    assert second != first
    with vmferry.open(second, writable=True) as disk:
        disk.write(5 * MIB, b"\x55" * MIB)
    model[5 * MIB : 6 * MIB] = b"\x55" * MIB
    with vmferry.open(second) as chain:
        assert [Path(layer.file.path) for layer in chain.layers] == [second, first, base]
        assert chain.read(0, SIZE) == model
    if fmt in ("qcow2", "vmdk"):
        info = json.loads(qemu_img("info", "--backing-chain", "--output=json", second).stdout)
        assert [Path(i["filename"]).name for i in info] == [second.name, first.name, base.name]
    if fmt != "vdi":
        assert oracle_read(second, SIZE) == model
    else:
        assert qemu_img("check", base, check=False).returncode == 0


@pytest.mark.parametrize("fmt", ["vhd", "vhdx"])
def test_hyperv_child_pins_its_parent_for_libvhdi(tmp_path: Path, fmt: str) -> None:
    pyvhdi = pytest.importorskip("pyvhdi")
    base, _ = _base(tmp_path, fmt)
    child = Path(snapshot(base)["image"])
    with vmferry.open(child) as chain:
        pinned = chain.top.parent_ref().identity  # type: ignore[union-attr]
    f = pyvhdi.file()
    f.open(str(child))
    try:
        assert f.get_parent_identifier() in pinned.values()
    finally:
        f.close()


@pytest.mark.parametrize("fmt", SNAPSHOT_FORMATS)
def test_inner_image_refused_unless_branch(tmp_path: Path, fmt: str) -> None:
    base, _ = _base(tmp_path, fmt)
    first = Path(snapshot(base)["image"])
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UnsafeOperationError, match="already has differencing children") as exc:
        snapshot(base)
    assert "--branch" in (exc.value.hint or "")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    result = snapshot(base, branch=True)
    sibling = Path(result["image"])
    assert sibling != first and result["branch"] and result["siblings"] == [str(first)]
    with vmferry.open(sibling) as chain:
        assert len(chain.layers) == 2


def test_raw_has_no_snapshots(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    vmferry.create(raw, "raw", MIB).close()
    with pytest.raises(UnsupportedFeatureError, match="cannot have differencing children"):
        snapshot(raw)


def test_vmware_numbers_after_the_base_name() -> None:
    taken = ["web01.vmdk", "web01-000001.vmdk", "WEB01-000002.VMDK"]
    assert child_name("/d/web01.vmdk", "vmdk", taken) == "web01-000003.vmdk"
    assert child_name("/d/web01-000002.vmdk", "vmdk", taken) == "web01-000003.vmdk"
    assert child_name("/d/web01-flat.vmdk", "vmdk", []) == "web01-flat-000001.vmdk"


def test_hyperv_names_every_checkpoint_after_the_base() -> None:
    name = child_name("/d/web01_0B36DB46-236E-4514-90CA-59D059E8D18A.avhdx", "vhdx", [])
    assert re.fullmatch(rf"web01_{GUID}\.avhdx", name)


def test_unlisted_formats_get_a_numbered_name() -> None:
    assert "raw" not in NAMING
    assert child_name("/d/disk.img", "raw", ["disk-snap1.img"]) == "disk-snap2.img"


def test_cli_prints_the_child(tmp_path: Path) -> None:
    base, _ = _base(tmp_path, "qcow2")
    runner = CliRunner()
    r = runner.invoke(cli, ["snapshot", str(base)])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(tmp_path / "web01-snap1.qcow2")
    r = runner.invoke(cli, ["snapshot", str(base), "--json"])
    assert r.exit_code == 5
    assert json.loads(r.stdout)["error"] == "UnsafeOperationError"
    r = runner.invoke(cli, ["snapshot", str(base), "--branch", "--json"])
    assert r.exit_code == 0
    assert json.loads(r.stdout)["image"] == str(tmp_path / "web01-snap2.qcow2")
