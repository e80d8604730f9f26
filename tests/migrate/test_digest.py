"""The content digest: format-independent, equal to the plain definition, cheap on holes."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from tests.conftest import qemu_io
from tests.migrate.conftest import MIB, raw_disk, to_format
from vmferry.chain import open_chain
from vmferry.migrate.digest import BLOCK, BlockDigest, digest_of


def reference(content: bytes) -> str:
    """The definition: sha256 over the sha256 of every 1 MiB block of the virtual disk."""
    outer = hashlib.sha256()
    for pos in range(0, len(content), BLOCK):
        outer.update(hashlib.sha256(content[pos : pos + BLOCK]).digest())
    return outer.hexdigest()


@pytest.mark.parametrize("size", [3 * MIB, 3 * MIB + 4096, 5 * MIB - 512, 512])
def test_random_feeds_match_the_definition(size: int) -> None:
    rnd = random.Random(size)
    content = bytearray(size)
    pieces = []
    pos = 0
    while pos < size:
        gap = rnd.choice([0, 0, 512, 4096, 700_000, 1 << 20])
        n = rnd.choice([1, 512, 4096, 65536, 1 << 20, 3 << 20])
        start = min(pos + gap, size)
        n = min(n, size - start)
        if n:
            data = rnd.randbytes(n)
            content[start : start + n] = data
            pieces.append((start, data))
        pos = start + n
    d = BlockDigest(size)
    for off, data in pieces:
        d.update(off, data)
    assert d.hexdigest() == reference(bytes(content))


def test_out_of_order_and_past_end_are_refused() -> None:
    d = BlockDigest(2 * MIB)
    d.update(MIB, b"x" * 10)
    with pytest.raises(ValueError):
        d.update(0, b"y")
    with pytest.raises(ValueError):
        BlockDigest(MIB).update(MIB - 1, b"ab")


def test_same_content_same_digest_in_every_format(tmp_path: Path) -> None:
    raw = raw_disk(tmp_path / "d.raw", 20 * MIB, [(0, 3 * MIB), (9 * MIB + 4096, 2 * MIB)])
    expected = reference(raw.read_bytes())
    for fmt, ext, opts in (
        ("qcow2", "qcow2", ()),
        ("vpc", "vhd", ("force_size=on",)),  # else qemu rounds the size to a CHS geometry
        ("vhdx", "vhdx", ()),
        ("vmdk", "vmdk", ()),
    ):
        out = to_format(raw, tmp_path / f"d.{ext}", fmt, *opts)
        with open_chain(out) as chain:
            assert digest_of(chain) == expected, fmt


def test_chain_digest_is_the_flattened_content(tmp_path: Path) -> None:
    raw = raw_disk(tmp_path / "base.raw", 8 * MIB, [(0, MIB)])
    base = to_format(raw, tmp_path / "base.qcow2", "qcow2")
    from tests.conftest import qemu_img

    child = tmp_path / "child.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(child))
    qemu_io("qcow2", child, "write -P 0xab 512k 1M", "write -z 4M 64k")
    flat = tmp_path / "flat.raw"
    qemu_img("convert", "-O", "raw", str(child), str(flat))  # qemu flattens: the oracle
    with open_chain(child) as chain:
        assert digest_of(chain) == reference(flat.read_bytes())
