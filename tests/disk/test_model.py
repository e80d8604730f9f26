"""Property: any sequence of writes through the API reads back as a plain bytearray would.

Runs over every registered writable format and over a three-deep chain for every format with
parents; the image is closed and reopened before the final comparison, so what is checked is
what reached the file, not a cache.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vmferry
from tests.formats import EXTENSION, OURS, WITH_PARENT, WRITABLE
from vmferry.disk import Alloc

SIZE = 6 << 20 | 3 * 512  # not a whole number of blocks on purpose
_counter = itertools.count()

write_op = st.tuples(
    st.sampled_from(["write", "zero"]),
    st.integers(0, SIZE - 1),
    st.integers(1, 3 << 20),
    st.integers(0, 255),
)
ops_list = st.lists(write_op, min_size=1, max_size=8)

SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _apply(disk: vmferry.Chain, model: bytearray, ops: list[tuple[str, int, int, int]]) -> None:
    for kind, off, length, byte in ops:
        length = min(length, SIZE - off)
        if kind == "write":
            data = bytes([byte]) * length
            disk.write(off, data)
            model[off : off + length] = data
        else:
            disk.write_zeroes(off, length)
            model[off : off + length] = bytes(length)


def _check_tiling(disk: vmferry.Chain) -> None:
    pos = 0
    for ext in disk.top.extents():
        assert ext.offset == pos and ext.length > 0
        if ext.alloc is Alloc.ZERO:
            assert disk.top.read(ext.offset, min(ext.length, 1 << 20)) == bytes(
                min(ext.length, 1 << 20)
            )
        pos = ext.end
    assert pos == disk.virtual_size


def _fresh(tmp_path: Path, fmt: str) -> Path:
    return tmp_path / f"img{next(_counter)}{EXTENSION[fmt]}"


@given(ops=ops_list)
@SETTINGS
def test_random_writes_roundtrip(tmp_path: Path, ops: list[tuple[str, int, int, int]]) -> None:
    for fmt in WRITABLE:
        for opts in OURS.get(fmt, [{}]):
            path = _fresh(tmp_path, fmt)
            model = bytearray(SIZE)
            with vmferry.create(path, fmt, SIZE, **opts) as disk:
                _apply(disk, model, ops)
            with vmferry.open(path, fmt) as disk:
                assert disk.virtual_size == SIZE, (fmt, opts)
                assert disk.read(0, SIZE) == model, (fmt, opts)
                _check_tiling(disk)


@given(layers=st.lists(ops_list, min_size=3, max_size=3))
@SETTINGS
def test_three_deep_chain_roundtrip(
    tmp_path: Path, layers: list[list[tuple[str, int, int, int]]]
) -> None:
    for fmt in WITH_PARENT:
        model = bytearray(SIZE)
        parent: Path | None = None
        for ops in layers:
            path = _fresh(tmp_path, fmt)
            with vmferry.create(path, fmt, None if parent else SIZE, parent) as disk:
                _apply(disk, model, ops)
            parent = path
        assert parent is not None
        with vmferry.open(parent, fmt) as disk:
            assert len(disk.layers) == 3
            assert disk.read(0, SIZE) == model, fmt
            _check_tiling(disk)
