"""Chain tools over every format that can make differencing children.

The oracle for the merged result is qemu-img (it reads a standalone base of every format);
the content of a chain before and after is read through vmferry's chain reader, which the
format tests check against libvhdi/qemu.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vmferry
from tests.conftest import qemu_img
from tests.formats import EXTENSION, QEMU, WITH_PARENT
from vmferry.chain.discover import discover
from vmferry.chain.du import usage
from vmferry.chain.journal import read_journal
from vmferry.chain.merge import commit, commit_all
from vmferry.chain.open import open_layer
from vmferry.chain.surgery import rebase, resize
from vmferry.errors import (
    ParentMismatchError,
    ParentNotFoundError,
    UnsafeOperationError,
    UnsupportedFeatureError,
    UsageError,
)

MIB = 1 << 20
SIZE = 32 * MIB


def _digest(path: Path) -> str:
    with vmferry.open(path) as d:
        h = hashlib.sha256()
        for off in range(0, d.virtual_size, 8 * MIB):
            h.update(d.read(off, min(8 * MIB, d.virtual_size - off)))
        return h.hexdigest()


def _raw_digest(path: Path, fmt: str) -> str:
    out = path.with_suffix(".check.raw")
    qemu_img("convert", "-f", QEMU[fmt][0], "-O", "raw", str(path), str(out))
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return digest


def _make_chain(d: Path, fmt: str, names: list[str], size: int = SIZE) -> list[Path]:
    """base + children, each writing its own pattern (some MiB overlap the layer below)."""
    ext = EXTENSION[fmt]
    paths = [d / f"{n}{ext}" for n in names]
    rng = random.Random(names[-1])
    for i, p in enumerate(paths):
        try:
            disk = vmferry.create(p, fmt, size if i == 0 else None, paths[i - 1] if i else None)
        except UnsupportedFeatureError as exc:
            pytest.skip(f"{fmt}: {exc}")
        with disk:
            for _ in range(4):
                mib = rng.randrange(0, size // MIB - 2)
                disk.write(mib * MIB, bytes([rng.randrange(1, 255)]) * (2 * MIB))
            disk.write(rng.randrange(0, size - 4096) // 512 * 512, os.urandom(4096))
    return paths


@pytest.fixture(params=WITH_PARENT)
def fmt(request: pytest.FixtureRequest) -> str:
    return request.param


def test_discover_tree_orphan_broken(tmp_path: Path, fmt: str) -> None:
    base, child, gc = _make_chain(tmp_path, fmt, ["base", "child", "gc"])
    sib = tmp_path / f"sib{EXTENSION[fmt]}"
    vmferry.create(sib, fmt, parent=base).close()
    forest = discover([tmp_path])
    by = {n.path.name: n for n in forest.nodes}
    assert [r.path.name for r in forest.roots] == [base.name]
    assert sorted(c.path.name for c in by[base.name].children) == sorted([child.name, sib.name])
    assert by[gc.name].parent is by[child.name]
    # the base moves away: its children become orphans, and the repair names the moved file
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(base, moved / base.name)
    forest = discover([tmp_path])
    orphan = {n.path.name: n for n in forest.nodes}[child.name]
    assert orphan.problem == "orphan"
    assert orphan.parent_ref is not None
    if orphan.parent_ref.identity:  # the moved parent is recognised by what the child pins
        assert orphan.repair == f"vmferry rebase {child} -b {moved / base.name}"
    else:
        assert orphan.repair and "vmferry rebase" in orphan.repair
    # a different disk under the parent's name: a broken link, not a silent mis-stack (a
    # format that pins no identity, like qcow2, can only tell from a resized parent)
    vmferry.create(base, fmt, SIZE if orphan.parent_ref.identity else 2 * SIZE).close()
    forest = discover([tmp_path])
    broken = {n.path.name: n for n in forest.nodes}[child.name]
    assert broken.parent is None
    if fmt != "vdi":  # VirtualBox links by UUID only: a replaced parent is simply not found
        assert broken.problem == "broken", broken.reason
        assert "modified or replaced" in (broken.reason or "")


def test_du_counts_files_memory_and_worst_case(tmp_path: Path, fmt: str) -> None:
    base, child = _make_chain(tmp_path, fmt, ["base", "child"])
    (tmp_path / "snap.bin").write_bytes(b"m" * 123456)
    report = usage(discover([tmp_path]))
    (chain,) = report["chains"]
    sizes = {p: p.stat().st_size for p in (base, child)}
    assert chain["used_bytes"] == sum(sizes.values()) + 123456
    assert [m["used_bytes"] for m in chain["memory_files"]] == [123456]
    # worst case: the frozen base as it is, the leaf grown to (at least) the whole disk
    assert chain["worst_case_bytes"] >= sizes[base] + SIZE + 123456
    # ... and no more than that plus the format's metadata for a fully allocated disk
    assert chain["worst_case_bytes"] <= sizes[base] + max(SIZE, sizes[child]) + 8 * MIB + 123456
    assert report["total"]["used_bytes"] == chain["used_bytes"]


def test_merge_child_keeps_content_and_repoints_grandchild(tmp_path: Path, fmt: str) -> None:
    base, child, gc = _make_chain(tmp_path, fmt, ["base", "child", "gc"])
    before = _digest(gc)
    result = commit(child)
    assert not child.exists() and result.repointed == [str(gc)]
    with vmferry.open(gc) as d:
        assert [Path(layer.file.path).name for layer in d.layers] == [gc.name, base.name]
    assert _digest(gc) == before
    commit_all(gc)
    assert not gc.exists()
    assert _raw_digest(base, fmt) == before  # qemu-img reads the merged base alone


def test_merge_refuses_parent_with_siblings_unless_preserved(tmp_path: Path, fmt: str) -> None:
    base, child = _make_chain(tmp_path, fmt, ["base", "child"])
    sib = tmp_path / f"sib{EXTENSION[fmt]}"
    vmferry.create(sib, fmt, parent=base).close()
    sib_before, child_before = _digest(sib), _digest(child)
    with pytest.raises(UnsafeOperationError, match="other children"):
        commit(child)
    assert _digest(child) == child_before
    commit(child, preserve_siblings=True)
    assert _digest(sib) == sib_before
    assert _raw_digest(base, fmt) == child_before


def test_rebase_after_move(tmp_path: Path, fmt: str) -> None:
    base, child = _make_chain(tmp_path, fmt, ["base", "child"])
    before = _digest(child)
    elsewhere = tmp_path / "store"
    elsewhere.mkdir()
    shutil.move(base, elsewhere / base.name)
    with pytest.raises(ParentNotFoundError):
        vmferry.open(child)
    other = tmp_path / f"other{EXTENSION[fmt]}"
    vmferry.create(other, fmt, SIZE).close()
    probe = open_layer(child)
    ref = probe.parent_ref()
    probe.close()
    pins = bool(ref and ref.identity)
    if pins:
        with pytest.raises(ParentMismatchError):
            rebase(child, other)
    else:  # nothing to check (qcow2): the rebase goes through, with a warning that says so
        assert "cannot verify" in rebase(child, other)["warnings"][0]
    rebase(child, elsewhere / base.name)
    with vmferry.open(child, allowed_dirs=[elsewhere]) as d:
        assert len(d.layers) == 2
    assert _digest_allowed(child, elsewhere) == before
    result = rebase(child, other, unsafe=True)
    if pins:
        assert result["warnings"] and "ignored on request" in result["warnings"][0]


def _digest_allowed(path: Path, extra: Path) -> str:
    with vmferry.open(path, allowed_dirs=[extra]) as d:
        return hashlib.sha256(d.read(0, d.virtual_size)).hexdigest()


def test_resize_refuses_with_children_and_shrink_under_data(tmp_path: Path, fmt: str) -> None:
    base, child = _make_chain(tmp_path, fmt, ["base", "child"])
    with pytest.raises(UnsafeOperationError, match="differencing children") as exc:
        resize(base, 2 * SIZE)
    assert str(child) in str(exc.value)
    with pytest.raises(UnsafeOperationError, match="apart from its parent"):
        resize(child, 2 * SIZE)
    commit(child)
    with pytest.raises(UsageError, match="shrinking loses data"):
        resize(base, SIZE // 2)
    resize(base, 2 * SIZE)
    assert (
        json.loads(qemu_img("info", "--output=json", "-f", QEMU[fmt][0], str(base)).stdout)[
            "virtual-size"
        ]
        == 2 * SIZE
    )
    with pytest.raises(UnsafeOperationError, match="holds data"):
        resize(base, MIB, shrink=True)


_MERGE_SCRIPT = """
import sys
from vmferry.chain.merge import commit
commit(sys.argv[1])
"""


@pytest.mark.parametrize("seed", range(4))
def test_merge_survives_kill_at_any_instant(tmp_path: Path, fmt: str, seed: int) -> None:
    base, child = _make_chain(tmp_path, fmt, ["base", "child"], size=64 * MIB)
    with vmferry.open(child, writable=True) as d:  # a child with plenty of data to copy
        for mib in range(0, 64, 2):
            d.write(mib * MIB, bytes([mib + 1]) * MIB)
    before = _digest(child)
    env = {**os.environ, "PYTHONPATH": str(Path(vmferry.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _MERGE_SCRIPT, str(child)], env=env)
    time.sleep(random.Random(seed).uniform(0.15, 1.2))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if child.exists():
        with vmferry.open(child) as d:  # the chain still reads what it did before
            assert hashlib.sha256(d.read(0, d.virtual_size)).hexdigest() == before
        commit(child)  # and running the merge again completes it
    assert _raw_digest(base, fmt) == before
    # killed between deleting the child and its journal: the note left names a child that is
    # gone, so nothing trusts it, and the next merge into this parent removes it
    journal = read_journal(base)
    assert journal is None or not Path(journal["child"]).exists()
