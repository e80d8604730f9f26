"""The raw driver: holes are zeros on read and stay holes on write."""

from __future__ import annotations

import json
import os
from pathlib import Path

import vmferry
from tests.conftest import qemu_img
from vmferry.disk import Alloc


def test_block_status_matches_qemu_map(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
        for off in (1 << 20, 5 << 20, (15 << 20) + 4096):
            f.seek(off)
            f.write(os.urandom(64 << 10))
    qmap = json.loads(qemu_img("map", "--output=json", "-f", "raw", str(img)).stdout)
    qemu_data = [(e["start"], e["length"]) for e in qmap if e["data"]]
    with vmferry.open(img, "raw") as d:
        ours = [(e.offset, e.length) for e in d.top.extents() if e.alloc is Alloc.DATA]
    assert ours == qemu_data


def test_write_zeroes_punches_holes(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    with vmferry.create(img, "raw", 8 << 20) as d:
        d.write(0, os.urandom(8 << 20))
        d.write_zeroes(1 << 20, 2 << 20)
        d.flush()
        assert d.read(1 << 20, 2 << 20) == bytes(2 << 20)
        ext = d.block_status(1 << 20, 2 << 20)
    assert ext.alloc is Alloc.ZERO
    assert os.stat(img).st_blocks * 512 <= 6 << 20


def test_create_is_sparse_and_atomic(tmp_path: Path) -> None:
    img = tmp_path / "big.raw"
    with vmferry.create(img, "raw", 100 << 30) as d:
        assert d.virtual_size == 100 << 30
    assert os.stat(img).st_blocks == 0
    assert [p.name for p in tmp_path.iterdir()] == ["big.raw"]  # no temporary left behind
