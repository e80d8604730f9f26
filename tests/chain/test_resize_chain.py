"""`vmferry resize IMAGE SIZE --chain`: every member grows, every leaf reads its old content
plus zeros, and without ``--chain`` a parent with children is refused with no byte changed.

Oracles: qemu-img (qcow2: convert to raw, info sizes, check), libvhdi's ``pyvhdi`` (VHD/VHDX
chains, through ``oracle_read``); VDI differencing chains only through vmferry, with
``qemu-img check`` on the base.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import vmferry
from tests.chain.test_snapshot import oracle_read
from tests.conftest import qemu_img
from tests.formats import EXTENSION, QEMU
from vmferry.chain.surgery import resize
from vmferry.cli.main import cli
from vmferry.disk import driver_by_name
from vmferry.errors import ParentMismatchError

MIB = 1 << 20
OLD, NEW = 8 * MIB, 24 * MIB
CHAIN_FORMATS = ["vhd", "vhdx", "qcow2", "vdi"]


def _tree(tmp_path: Path, fmt: str) -> dict[str, Path]:
    """base <- child <- grandchild, and a sibling of child: a snapshot tree."""
    ext = EXTENSION[fmt]
    p = {n: tmp_path / f"{n}{ext}" for n in ("base", "child", "sibling", "grand")}
    with vmferry.create(p["base"], fmt, OLD) as disk:
        disk.write(0, b"\xb0" * (2 * MIB))
        disk.write(OLD - MIB, b"\xbe" * MIB)  # up to the old end: must not leak past it
    for name, parent, fill, at in (
        ("child", "base", b"\xc1", MIB),
        ("sibling", "base", b"\x51", 3 * MIB),
        ("grand", "child", b"\x6a", 5 * MIB),
    ):
        vmferry.create(p[name], fmt, parent=p[parent]).close()
        with vmferry.open(p[name], writable=True) as disk:
            disk.write(at, fill * MIB)
    return p


def _sums(tmp_path: Path) -> dict[str, str]:
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(tmp_path.iterdir())
        if f.is_file()
    }


def _leaf_contents(p: dict[str, Path]) -> dict[str, bytes]:
    out = {}
    for leaf in ("grand", "sibling"):
        with vmferry.open(p[leaf]) as chain:
            out[leaf] = chain.read(0, chain.virtual_size)
    return out


def _assert_grown(p: dict[str, Path], fmt: str, old: dict[str, bytes]) -> None:
    for name, path in p.items():
        with vmferry.open(path) as chain:
            assert chain.virtual_size == NEW, name
            assert all(layer.virtual_size == NEW for layer in chain.layers), name
    for leaf, content in old.items():
        expected = content + bytes(NEW - OLD)
        with vmferry.open(p[leaf]) as chain:
            assert chain.read(0, NEW) == expected, leaf
        if fmt == "vhd":
            # libvhdi takes a VHD's size from the footer's original_size, which vmferry (like
            # the spec: "for informational purposes") leaves at the creation size, so it only
            # reads the old range; current_size, what hypervisors use, is checked above.
            assert oracle_read(p[leaf], OLD) == content, leaf
        elif fmt != "vdi":
            assert oracle_read(p[leaf], NEW) == expected, leaf
    if fmt == "qcow2":
        for path in p.values():
            assert json.loads(qemu_img("info", "--output=json", path).stdout)["virtual-size"] == NEW
            assert qemu_img("check", path, check=False).returncode == 0
    if fmt in ("vhd", "vhdx", "vdi"):  # qemu reads these bases (not their children)
        info = json.loads(qemu_img("info", "-f", QEMU[fmt][0], "--output=json", p["base"]).stdout)
        assert info["virtual-size"] == NEW
    if fmt in ("vhdx", "vdi"):
        assert qemu_img("check", "-f", QEMU[fmt][0], p["base"], check=False).returncode == 0


@pytest.mark.parametrize("fmt", CHAIN_FORMATS)
def test_chain_grows_and_leaves_read_old_content_plus_zeros(tmp_path: Path, fmt: str) -> None:
    p = _tree(tmp_path, fmt)
    old = _leaf_contents(p)
    assert old["grand"][5 * MIB : 6 * MIB] == b"\x6a" * MIB
    r = CliRunner().invoke(cli, ["resize", str(p["grand"]), "24M", "--chain", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["base"] == str(p["base"]) and out["new_size"] == NEW
    assert {m["image"] for m in out["members"]} == {str(v) for v in p.values()}
    assert not list(tmp_path.glob(".*vmferry-resize*"))  # the notes are cleaned up
    _assert_grown(p, fmt, old)
    again = resize(p["base"], NEW, chain=True)  # nothing left to do
    assert again["repointed"] == [] and all(
        m["old_size"] == m["new_size"] == NEW for m in again["members"]
    )


@pytest.mark.parametrize("fmt", [*CHAIN_FORMATS, "vmdk"])
def test_without_chain_a_parent_with_children_is_refused_unchanged(
    tmp_path: Path, fmt: str
) -> None:
    p = _tree(tmp_path, fmt)
    before = _sums(tmp_path)
    for target in ("base", "child"):
        r = CliRunner().invoke(cli, ["resize", str(p[target]), "24M"])
        assert r.exit_code == 5, r.output
        assert "children" in r.stderr and "--chain" in r.stderr
    assert _sums(tmp_path) == before


def test_member_that_cannot_grow_refuses_before_any_change(tmp_path: Path) -> None:
    """Split VMDKs grow by adding extent files; a taken name in the grandchild stops the whole
    chain in the preflight, before the base has grown a byte."""
    names = ("base", "child", "grand")
    p = {n: tmp_path / f"{n}.vmdk" for n in names}
    vmferry.create(p["base"], "vmdk", 16 * MIB, subformat="twoGbMaxExtentSparse").close()
    for name, parent in (("child", "base"), ("grand", "child")):
        opts = {"subformat": "twoGbMaxExtentSparse"}
        vmferry.create(p[name], "vmdk", parent=p[parent], **opts).close()
    (tmp_path / "grand-s002.vmdk").write_bytes(b"someone else's file")
    layer = vmferry.chain.open_layer(p["grand"], writable=True)
    assert "already exists" in (layer.cannot_resize(3 << 30) or "")
    assert layer.cannot_resize(16 * MIB) is None  # (the same size: nothing to add)
    layer.close()
    before = _sums(tmp_path)
    r = CliRunner().invoke(cli, ["resize", str(p["grand"]), "3G", "--chain"])
    assert r.exit_code == 5 and "grand-s002.vmdk already exists" in r.stderr, r.stderr
    assert _sums(tmp_path) == before
    (tmp_path / "grand-s002.vmdk").unlink()
    r = CliRunner().invoke(cli, ["resize", str(p["grand"]), "3G", "--chain"])
    assert r.exit_code == 0, r.stderr
    for name in names:
        info = json.loads(qemu_img("info", "--output=json", str(p[name])).stdout)
        assert info["virtual-size"] == 3 << 30
    # grand-s001 keeps its 16 MiB (a sparse extent's header and descriptor line would
    # disagree after a crash if it grew); 2 GiB and the rest follow in new files
    assert sorted(f.name for f in tmp_path.glob("grand-s*.vmdk")) == [
        "grand-s001.vmdk",
        "grand-s002.vmdk",
        "grand-s003.vmdk",
    ]


def test_shrink_with_chain_is_a_usage_error(tmp_path: Path) -> None:
    p = _tree(tmp_path, "qcow2")
    r = CliRunner().invoke(cli, ["resize", str(p["base"]), "4M", "--chain", "--shrink"])
    assert r.exit_code == 64


def test_interrupted_before_repinning_is_finished_by_a_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VHDX: the base's DataWriteGuid changes on resize; a crash before its children are
    re-pinned leaves them refusing it, and running the command again completes the job."""
    p = _tree(tmp_path, "vhdx")
    old = _leaf_contents(p)
    driver = driver_by_name("vhdx")
    original = driver.set_parent

    class Crash(Exception):
        pass

    def crash(self, parent):  # type: ignore[no-untyped-def]
        raise Crash("killed before the child was re-pinned")

    monkeypatch.setattr(driver, "set_parent", crash)
    with pytest.raises(Crash):
        resize(p["base"], NEW, chain=True)
    monkeypatch.setattr(driver, "set_parent", original)
    assert list(tmp_path.glob(".base.vhdx.vmferry-resize"))
    with pytest.raises(ParentMismatchError):
        vmferry.open(p["child"]).close()
    result = resize(p["grand"], NEW, chain=True)
    assert str(p["child"]) in result["repointed"]
    _assert_grown(p, "vhdx", old)


def test_a_foreign_broken_link_is_refused(tmp_path: Path) -> None:
    """A child whose parent changed for reasons of its own is not silently re-pinned."""
    p = _tree(tmp_path, "vhdx")
    with vmferry.open(p["base"], writable=True) as disk:  # edits the parent: breaks the link
        disk.write(0, b"\x00" * 4096)
    before = _sums(tmp_path)
    r = CliRunner().invoke(cli, ["resize", str(p["base"]), "24M", "--chain"])
    assert r.exit_code == 5 and "broken link" in r.stderr
    assert _sums(tmp_path) == before
