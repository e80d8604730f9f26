"""Hostile qcow2 input: every mutation becomes a named error, with bounded memory.

The base images are made by qemu-img/qemu-io; each case changes a few bytes of one structure
(or cuts the file inside it) and then opens the image and reads all of it.
"""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import qemu_img, qemu_io
from vmferry.disk import BlockFile
from vmferry.disk.qcow2 import Qcow2
from vmferry.errors import (
    CorruptImageError,
    FormatError,
    NotThisFormatError,
    ResourceLimitError,
    TruncatedImageError,
    UnsupportedFeatureError,
)

MiB = 1 << 20
SIZE = 4 * MiB


@dataclass
class Base:
    raw: bytes
    l1: int
    rt: int
    l2: int  # first L2 table
    data: int  # host offset of guest cluster 0
    rblock: int  # first refcount block


def u32(raw: bytearray, at: int, value: int) -> None:
    raw[at : at + 4] = struct.pack(">I", value & 0xFFFFFFFF)


def u64(raw: bytearray, at: int, value: int) -> None:
    raw[at : at + 8] = struct.pack(">Q", value & 0xFFFFFFFFFFFFFFFF)


def be64(raw: bytes, at: int) -> int:
    return int(struct.unpack_from(">Q", raw, at)[0])


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    d = tmp_path_factory.mktemp("qbad")
    img = d / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    qemu_io("qcow2", img, "write -P 0x41 0 256k", "write -P 0x42 3M 64k")
    raw = img.read_bytes()
    l1 = be64(raw, 40)
    rt = be64(raw, 48)
    l2 = be64(raw, l1) & 0x00FFFFFFFFFFFE00
    return Base(raw, l1, rt, l2, be64(raw, l2) & 0x00FFFFFFFFFFFE00, be64(raw, rt))


Mutation = Callable[[bytearray, Base], bytearray]


def cut(at: Callable[[Base], int]) -> Mutation:
    return lambda raw, b: raw[: at(b)]


def poke(fn: Callable[[bytearray, Base], None]) -> Mutation:
    def apply(raw: bytearray, b: Base) -> bytearray:
        fn(raw, b)
        return raw

    return apply


def _feature_renamed(raw: bytearray, b: Base) -> None:
    """Set incompatible bit 10 and rename the feature table's "dirty bit" entry to bit 10."""
    at = raw.find(b"dirty bit")
    assert at > 0
    raw[at - 1] = 10  # the entry's bit number (type 0 = incompatible precedes it)
    u64(raw, 72, 1 << 10)


def _ext_overrun(raw: bytearray, b: Base) -> None:
    at = 112  # first extension after qemu's 112-byte v3 header
    u32(raw, at + 4, 70_000)


CASES: list[tuple[str, Mutation, type[FormatError], str]] = [
    (
        "bad magic",
        poke(lambda r, b: r.__setitem__(slice(0, 4), b"QFI\x00")),
        NotThisFormatError,
        "magic",
    ),
    ("cut in v2 header", cut(lambda b: 50), TruncatedImageError, "header"),
    ("cut in v3 header", cut(lambda b: 90), TruncatedImageError, "v3 header"),
    ("cut before refcount table", cut(lambda b: b.rt + 8), TruncatedImageError, "table"),
    ("cut in L1 table", cut(lambda b: b.l1 + 4), TruncatedImageError, "L1"),
    ("cut in L2 table", cut(lambda b: b.l2 + 1000), TruncatedImageError, "L2"),
    ("cut before data", cut(lambda b: b.data), CorruptImageError, "past the end"),
    ("version 1", poke(lambda r, b: u32(r, 4, 1)), UnsupportedFeatureError, "version 1"),
    ("version 4", poke(lambda r, b: u32(r, 4, 4)), UnsupportedFeatureError, "version 4"),
    ("cluster_bits 8", poke(lambda r, b: u32(r, 20, 8)), CorruptImageError, "cluster_bits"),
    ("cluster_bits 22", poke(lambda r, b: u32(r, 20, 22)), CorruptImageError, "cluster_bits"),
    (
        "cluster_bits huge",
        poke(lambda r, b: u32(r, 20, 0xFFFFFFFF)),
        CorruptImageError,
        "cluster_bits",
    ),
    ("encrypted", poke(lambda r, b: u32(r, 32, 2)), UnsupportedFeatureError, "encrypt"),
    ("virtual size absurd", poke(lambda r, b: u64(r, 24, 1 << 63)), ResourceLimitError, "size"),
    (
        "L1 too small for size",
        poke(lambda r, b: u64(r, 24, 1 << 40)),
        CorruptImageError,
        "too small",
    ),
    ("L1 size absurd", poke(lambda r, b: u32(r, 36, 0xFFFFFFFF)), ResourceLimitError, "L1"),
    ("L1 offset past EOF", poke(lambda r, b: u64(r, 40, 1 << 40)), TruncatedImageError, "L1"),
    (
        "L1 offset unaligned",
        poke(lambda r, b: u64(r, 40, b.l1 + 512)),
        CorruptImageError,
        "aligned",
    ),
    (
        "refcount table past EOF",
        poke(lambda r, b: u64(r, 48, 1 << 45)),
        TruncatedImageError,
        "refcount table",
    ),
    (
        "refcount table absurd",
        poke(lambda r, b: u32(r, 56, 0xFFFFFFFF)),
        ResourceLimitError,
        "refcount table",
    ),
    ("no refcount table", poke(lambda r, b: u32(r, 56, 0)), CorruptImageError, "refcount"),
    (
        "snapshots absurd",
        poke(lambda r, b: u32(r, 60, 0xFFFFFFFF)),
        ResourceLimitError,
        "snapshots",
    ),
    (
        "snapshot table past EOF",
        poke(lambda r, b: (u32(r, 60, 1), u64(r, 64, 1 << 40))),
        TruncatedImageError,
        "snapshot",
    ),
    (
        "unknown incompatible bit",
        poke(lambda r, b: u64(r, 72, 1 << 20)),
        UnsupportedFeatureError,
        "bit 20",
    ),
    (
        "unknown bit named by table",
        poke(_feature_renamed),
        UnsupportedFeatureError,
        "dirty bit \\(bit 10\\)",
    ),
    ("refcount_order 7", poke(lambda r, b: u32(r, 96, 7)), CorruptImageError, "refcount_order"),
    ("header_length odd", poke(lambda r, b: u32(r, 100, 107)), CorruptImageError, "header_length"),
    (
        "header_length huge",
        poke(lambda r, b: u32(r, 100, 1 << 20)),
        CorruptImageError,
        "header_length",
    ),
    (
        "compression bit without type",
        poke(lambda r, b: u64(r, 72, 1 << 3)),
        CorruptImageError,
        "compression",
    ),
    (
        "unknown compression type",
        poke(lambda r, b: (u64(r, 72, 1 << 3), r.__setitem__(104, 9))),
        UnsupportedFeatureError,
        "compression type 9",
    ),
    ("extension overruns header", poke(_ext_overrun), CorruptImageError, "overruns"),
    (
        "backing name too long",
        poke(lambda r, b: (u64(r, 8, 4096), u32(r, 16, 5000))),
        CorruptImageError,
        "1023",
    ),
    (
        "backing name outside cluster",
        poke(lambda r, b: (u64(r, 8, 65000), u32(r, 16, 1000))),
        CorruptImageError,
        "outside",
    ),
    (
        "L1 entry past EOF",
        poke(lambda r, b: u64(r, b.l1, (1 << 40) | 1 << 63)),
        TruncatedImageError,
        "L2",
    ),
    (
        "L1 entry unaligned",
        poke(lambda r, b: u64(r, b.l1, (b.l2 + 512) | 1 << 63)),
        CorruptImageError,
        "aligned",
    ),
    (
        "L2 entry past EOF",
        poke(lambda r, b: u64(r, b.l2, (1 << 45) | 1 << 63)),
        CorruptImageError,
        "past the end",
    ),
    (
        "L2 entry unaligned",
        poke(lambda r, b: u64(r, b.l2, (b.data + 4096) | 1 << 63)),
        CorruptImageError,
        "unaligned",
    ),
    ("L2 entry points at itself", poke(lambda r, b: u64(r, b.l2, b.l2 | 1 << 63)), None, ""),
    (
        "compressed entry past EOF",
        poke(lambda r, b: u64(r, b.l2, 1 << 62 | (1 << 44))),
        CorruptImageError,
        "past the end",
    ),
    (
        "compressed entry garbage",
        poke(lambda r, b: u64(r, b.l2, 1 << 62 | (255 << 54) | 512)),
        CorruptImageError,
        "compressed cluster",
    ),
]


def read_everything(img: Path) -> None:
    layer = Qcow2.open(BlockFile.open(img))
    try:
        pos = 0
        while pos < layer.virtual_size:
            ext = layer.block_status(pos, layer.virtual_size - pos)
            pos = ext.end
        for off in range(0, layer.virtual_size, 2 * MiB):
            layer.read(off, min(2 * MiB, layer.virtual_size - off))
    finally:
        layer.close()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_mutation_is_a_named_error(
    base: Base, tmp_path: Path, case: tuple[str, Mutation, type[FormatError] | None, str]
) -> None:
    _, mutate, error, match = case
    img = tmp_path / "m.qcow2"
    img.write_bytes(bytes(mutate(bytearray(base.raw), base)))
    tracemalloc.start()
    try:
        if error is None:  # self-reference: reads garbage, but must not crash or loop
            read_everything(img)
        else:
            with pytest.raises(error, match=match):
                read_everything(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 48 * MiB


def test_self_referencing_l2_fails_check(base: Base, tmp_path: Path) -> None:
    raw = bytearray(base.raw)
    u64(raw, base.l2, base.l2 | 1 << 63)  # guest cluster 0 "is" its own L2 table
    img = tmp_path / "self.qcow2"
    img.write_bytes(bytes(raw))
    layer = Qcow2.open(BlockFile.open(img))
    try:
        assert layer.check().corruptions
    finally:
        layer.close()


def test_refcount_block_past_eof_refuses_writes(base: Base, tmp_path: Path) -> None:
    raw = bytearray(base.raw)
    u64(raw, base.rt, 1 << 40)
    img = tmp_path / "rb.qcow2"
    img.write_bytes(bytes(raw))
    layer = Qcow2.open(BlockFile.open(img, writable=True), writable=True)
    try:
        with pytest.raises(TruncatedImageError, match="refcount block"):
            layer.write(MiB, b"x" * 65536)
        assert layer.check().corruptions
    finally:
        layer.file.close()


@pytest.mark.parametrize("inflated", [65537, 100 * MiB])
def test_decompression_bomb(tmp_path: Path, inflated: int) -> None:
    """A compressed cluster that inflates past one cluster is refused, memory stays small."""
    src = tmp_path / "s.raw"
    src.write_bytes(b"\x01\x02\x03\x04" * (MiB // 4))
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(src), str(img))
    raw = bytearray(img.read_bytes())
    layer = Qcow2.open(BlockFile.open(img))
    e, _ = layer._entry(0)
    coff, _ = layer._compressed_range(e)
    layer.close()
    c = zlib.compressobj(9, zlib.DEFLATED, -12)
    bomb = (
        b"".join(c.compress(bytes(MiB)) for _ in range(inflated // MiB))
        if inflated > MiB
        else c.compress(bytes(inflated))
    )
    bomb += c.flush()
    assert len(bomb) < 120_000
    raw[coff : coff + len(bomb)] = bomb
    l2 = be64(raw, be64(raw, 40)) & 0x00FFFFFFFFFFFE00
    sectors = ((coff + len(bomb) - 1) >> 9) - (coff >> 9)
    u64(raw, l2, 1 << 62 | sectors << 54 | coff)  # 64K clusters: sector count at bit 54
    img.write_bytes(bytes(raw))
    tracemalloc.start()
    try:
        with pytest.raises(CorruptImageError, match="inflates past one cluster"):
            read_everything(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB


def test_writable_refusals(base: Base, tmp_path: Path) -> None:
    raw = bytearray(base.raw)
    u64(raw, 72, 1 << 4)  # extended L2 (64K clusters allow it): readable, never written
    img = tmp_path / "x.qcow2"
    img.write_bytes(bytes(raw))
    with pytest.raises(UnsupportedFeatureError, match="extended L2"):
        Qcow2.open(BlockFile.open(img, writable=True), writable=True)
