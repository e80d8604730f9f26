"""The registry's light entries must describe their drivers exactly (they stand in for them)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import qemu_img, qemu_io
from vmferry.disk import REGISTRY, BlockFile, driver_by_name, driver_for_extension, probe


def test_entries_match_their_classes() -> None:
    for entry in REGISTRY:
        cls = entry.load()
        assert (cls.name, tuple(cls.aliases), tuple(cls.extensions)) == (
            entry.name,
            entry.aliases,
            entry.extensions,
        )
        assert driver_by_name(entry.name) is cls
        for ext in entry.extensions:
            assert driver_for_extension(f"x{ext.upper()}") is cls


def test_opening_one_format_imports_only_its_driver() -> None:
    code = (
        "import sys, vmferry.cli.main, vmferry.disk as d; d.driver_by_name('vhd'); "
        "print(sorted(m for m in sys.modules if m.startswith('vmferry.disk.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = ast.literal_eval(out.stdout)  # the module names the child printed
    assert "vmferry.disk.vhd" in loaded
    assert not any(m.startswith(("vmferry.disk.qcow2", "vmferry.disk.vmdk")) for m in loaded)


def _head_tail(path: Path) -> tuple[bytes, bytes, int]:
    """What ``probe`` reads: the first 64 KiB and the last 1 KiB, and the file's size."""
    data = path.read_bytes()
    return data[: 64 * 1024], data[-1024:] if data else b"", len(data)


def _assert_magic_covers_probe(path: Path) -> None:
    head, tail, size = _head_tail(path)
    for entry in REGISTRY:
        score = entry.load().probe(head, tail, size)
        if score > 0 and entry.maybe is not None:
            assert entry.maybe(head, tail, size), f"{entry.name} magic misses {path}"


QEMU_MADE = [
    ("vpc", "subformat=dynamic", "vhd"),
    ("vpc", "subformat=fixed", "vhd"),
    ("vhdx", "subformat=dynamic", "vhdx"),
    ("vmdk", "subformat=monolithicSparse", "vmdk"),
    ("vmdk", "subformat=streamOptimized", "vmdk"),
    ("vmdk", "subformat=monolithicFlat", "vmdk"),
    ("qcow2", "compat=0.10", "qcow2"),
    ("qcow2", "compat=1.1", "qcow2"),
    ("vdi", "static=off", "vdi"),
    ("raw", "preallocation=off", "raw"),
]


@pytest.mark.parametrize(("qfmt", "opts", "ours"), QEMU_MADE, ids=lambda v: str(v))
def test_probe_by_magic_finds_what_qemu_made(
    tmp_path: Path, qfmt: str, opts: str, ours: str
) -> None:
    """qemu-img says what it made; probing (importing only drivers whose magic matches)
    must name the same format, and every driver's magic must cover its own probe."""
    img = tmp_path / f"disk.{ours}"
    qemu_img("create", "-q", "-f", qfmt, "-o", opts, img, "8M")
    qemu_io(qfmt, img, "write -P 0x5a 1M 64k")
    f = BlockFile.open(img)
    try:
        assert probe(f).name == ours
    finally:
        f.close()
    for p in tmp_path.iterdir():
        _assert_magic_covers_probe(p)


def test_magic_covers_probe_on_every_corpus_file(corpus: Path) -> None:
    """Third-party files of every kind (images, descriptors, configs, fragments, fuzzed
    headers): no driver that would score a file may be skipped by its magic."""
    files = [p for p in corpus.rglob("*") if p.is_file() and p.suffix not in (".gz", ".bz2")]
    assert len(files) > 50
    for p in files:
        _assert_magic_covers_probe(p)


def test_probing_a_qcow2_imports_no_other_image_driver(tmp_path: Path) -> None:
    img = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "8M")
    code = (
        "import sys, vmferry.disk as d; f = d.BlockFile.open(sys.argv[1]); "
        "print(d.probe(f).name); "
        "print(sorted(m for m in sys.modules if m.startswith('vmferry.disk.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(img)], capture_output=True, text=True, check=True
    )
    name, modules = out.stdout.splitlines()
    assert name == "qcow2"
    loaded = ast.literal_eval(modules)
    assert any(m.startswith("vmferry.disk.qcow2") for m in loaded)
    others = ("vmferry.disk.vhd", "vmferry.disk.vmdk", "vmferry.disk.vdi", "vmferry.disk.ova")
    assert not any(m.startswith(others) for m in loaded), loaded
