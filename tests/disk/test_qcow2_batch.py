"""qcow2 writes publish their metadata in batches, and allocate around stray refcounts.

Oracles: ``qemu-img check`` run on a copy of the file taken *while vmferry still has it open*
(the file must be a consistent image at every instant, whatever is not yet published), and
``qemu-img compare`` against a raw reference once the writer has flushed.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

import vmferry
import vmferry.disk.qcow2.driver as qdriver
from tests.conftest import qemu_img

MiB = 1 << 20


def _check(img: Path) -> dict:
    """qemu-img check of what the file holds now (a copy: the writer keeps its locks)."""
    snap = img.with_name("snapshot.qcow2")
    shutil.copyfile(img, snap)
    proc = qemu_img("check", "--output=json", "-f", "qcow2", snap, check=False)
    snap.unlink()
    assert proc.returncode in (0, 2, 3), proc.stderr
    return json.loads(proc.stdout)


def _compare(img: Path, ref: Path) -> None:
    qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", img, ref)


def test_every_batch_leaves_a_consistent_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commits every 256 KiB of data (so a few writes share one): after every write the file
    checks free of corruption and of leaks, and after the flush it holds every write."""
    monkeypatch.setattr(qdriver, "COMMIT_EVERY", 256 << 10)
    img, ref = tmp_path / "b.qcow2", tmp_path / "ref.raw"
    size = 16 * MiB
    mirror = bytearray(size)
    rnd = random.Random(3)
    with vmferry.create(img, "qcow2", size, cluster_size="4K") as disk:
        for i in range(40):
            off = rnd.randrange(0, size - 200_000)
            data = rnd.randbytes(rnd.choice([4096, 65536, 100_000, 200_000]))
            disk.write(off, data)
            mirror[off : off + len(data)] = data
            if i % 5 == 0:
                result = _check(img)
                assert result.get("corruptions", 0) == 0, result
                assert result.get("leaks", 0) == 0, result
        disk.flush()
        ref.write_bytes(mirror)
        flushed = tmp_path / "flushed.qcow2"  # what the file holds once flushed, still open
        shutil.copyfile(img, flushed)
        _compare(flushed, ref)
        assert _check(img).get("leaks", 0) == 0


def test_allocation_steps_over_a_stray_refcount(tmp_path: Path) -> None:
    """A cluster past the data that still has a refcount (left by an old crash) is never
    handed out: new data goes around it, and qemu-img check sees only that one leak."""
    img, ref = tmp_path / "s.qcow2", tmp_path / "ref.raw"
    size = 8 * MiB
    with vmferry.create(img, "qcow2", size, cluster_size="64K") as disk:
        disk.write(0, b"\x11" * 65536)
    with vmferry.open(img, "qcow2", writable=True) as disk:
        layer = disk.top
        assert isinstance(layer, qdriver.Qcow2)
        rc = layer._begin_modify()
        stray = rc.next_free + 3
        rc.set(stray, 1)  # what a crash between "refcount" and "L2 entry" leaves behind
        rc.write_blocks()
        data = random.Random(5).randbytes(1 * MiB)  # 16 clusters: must go around the stray
        disk.write(2 * MiB, data)
    mirror = bytearray(size)
    mirror[:65536] = b"\x11" * 65536
    mirror[2 * MiB : 3 * MiB] = data
    ref.write_bytes(mirror)
    _compare(img, ref)
    result = _check(img)
    assert result.get("corruptions", 0) == 0, result
    assert result.get("leaks", 0) == 1, result
