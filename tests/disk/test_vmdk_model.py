"""Property: random writes to VMDK images and delta chains read back as a bytearray model,
and qemu-img agrees with vmferry about the result."""

from __future__ import annotations

import itertools
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vmferry
from tests.conftest import qemu_img

SIZE = 3 << 20 | 5 * 512  # not a whole number of grains on purpose
_counter = itertools.count()

op = st.tuples(
    st.sampled_from(["write", "zero"]),
    st.integers(0, SIZE - 1),
    st.integers(1, 400_000),
    st.integers(0, 255),
)
ops_list = st.lists(op, min_size=1, max_size=6)
SETTINGS = settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _apply(disk: vmferry.Chain, model: bytearray, ops: list[tuple[str, int, int, int]]) -> None:
    for kind, off, length, byte in ops:
        length = min(length, SIZE - off)
        # partial grains of a delta: Chain.write / write_zeroes complete them from the parent
        if kind == "write":
            disk.write(off, bytes([byte]) * length)
            model[off : off + length] = bytes([byte]) * length
        else:
            disk.write_zeroes(off, length)
            model[off : off + length] = bytes(length)


def _qemu_agrees(path: Path, model: bytearray) -> None:
    raw = path.with_suffix(".raw")
    raw.write_bytes(model)
    qemu_img("compare", "-f", "vmdk", "-F", "raw", path, raw)
    qemu_img("check", "-f", "vmdk", path)


@given(ops=ops_list, zeroed=st.booleans())
@SETTINGS
def test_random_writes(tmp_path: Path, ops: list[tuple[str, int, int, int]], zeroed: bool) -> None:
    path = tmp_path / f"m{next(_counter)}.vmdk"
    model = bytearray(SIZE)
    opts = {"zeroed_grain": "on" if zeroed else "off"}
    with vmferry.create(path, "vmdk", SIZE, **opts) as disk:
        _apply(disk, model, ops)
    with vmferry.open(path) as disk:
        assert disk.read(0, SIZE) == model
        assert disk.top.check().clean
    _qemu_agrees(path, model)


@given(layers=st.lists(ops_list, min_size=3, max_size=3), zeroed=st.booleans())
@SETTINGS
def test_three_deep_delta_chain(
    tmp_path: Path, layers: list[list[tuple[str, int, int, int]]], zeroed: bool
) -> None:
    model = bytearray(SIZE)
    parent: Path | None = None
    opts = {"zeroed_grain": "on" if zeroed else "off"}
    for ops in layers:
        path = tmp_path / f"c{next(_counter)}.vmdk"
        with vmferry.create(path, "vmdk", None if parent else SIZE, parent, **opts) as disk:
            _apply(disk, model, ops)
        parent = path
    assert parent is not None
    with vmferry.open(parent) as disk:
        assert len(disk.layers) == 3
        assert disk.read(0, SIZE) == model
    _qemu_agrees(parent, model)
