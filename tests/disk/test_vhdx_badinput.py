"""Hostile and broken VHDX files: each mutation must raise its named error, in bounded memory.

The images start as valid ones made by qemu-img (so the base is an independent writer's
layout); each mutation breaks one structure, re-sealing checksums where the point is to get
past them.
"""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

import vmferry
from tests.conftest import qemu_img, qemu_io
from vmferry.chain import open_layer
from vmferry.disk.vhdx.layout import (
    HEADER_OFFSETS,
    REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE,
    Header,
    guid,
    seal,
)
from vmferry.disk.vhdx.metadata import pack_header
from vmferry.errors import (
    CorruptImageError,
    NotThisFormatError,
    ResourceLimitError,
    TruncatedImageError,
    UnsupportedFeatureError,
    VmferryError,
)

MiB = 1 << 20
META = 3 * MiB  # qemu's layout: log @1M, BAT @2M, metadata @3M, data after
BAT = 2 * MiB

Mutation = Callable[[bytearray], None]


def _headers(buf: bytearray, **changes: object) -> None:
    for off in HEADER_OFFSETS:
        hdr = Header.unpack(buf, off).replace(**changes)
        buf[off : off + 4096] = pack_header(hdr)


def _regions(buf: bytearray, edit: Callable[[bytearray], None]) -> None:
    for off in REGION_TABLE_OFFSETS:
        table = bytearray(buf[off : off + REGION_TABLE_SIZE])
        edit(table)
        buf[off : off + REGION_TABLE_SIZE] = seal(table)


def _region_entry(buf: bytearray, index: int, **fields: int | bytes) -> None:
    def edit(table: bytearray) -> None:
        base = 16 + 32 * index
        g, off, length, req = struct.unpack_from("<16sQII", table, base)
        g = fields.get("guid", g)  # type: ignore[assignment]
        off = fields.get("offset", off)  # type: ignore[assignment]
        length = fields.get("length", length)  # type: ignore[assignment]
        req = fields.get("required", req)  # type: ignore[assignment]
        struct.pack_into("<16sQII", table, base, g, off, length, req)

    _regions(buf, edit)


def _md_entry(buf: bytearray, index: int, **fields: int | bytes) -> None:
    base = META + 32 + 32 * index
    g, off, length, flags = struct.unpack_from("<16sIII", buf, base)
    struct.pack_into(
        "<16sIII",
        buf,
        base,
        fields.get("guid", g),
        fields.get("offset", off),
        fields.get("length", length),
        fields.get("flags", flags),
    )


def _md_value(buf: bytearray, index: int, fmt: str, value: int) -> None:
    _g, off, _l, _f = struct.unpack_from("<16sIII", buf, META + 32 + 32 * index)
    struct.pack_into(fmt, buf, META + off, value)


def _bat(buf: bytearray, index: int, value: int) -> None:
    struct.pack_into("<Q", buf, BAT + 8 * index, value)


def _flip(offset: int) -> Mutation:
    def m(buf: bytearray) -> None:
        buf[offset] ^= 0x55

    return m


UNKNOWN = guid("11111111-2222-3333-4444-555555555555").bytes_le

# (id, mutation, expected error); metadata entries in qemu's order: 0 file parameters,
# 1 virtual size, 2 page83, 3 logical sector, 4 physical sector.
MUTATIONS: list[tuple[str, Mutation, type[VmferryError]]] = [
    ("no-signature", lambda b: b.__setitem__(slice(0, 8), b"notvhdx!"), NotThisFormatError),
    (
        "both-headers-bad-crc",
        lambda b: (_flip(64 * 1024 + 200)(b), _flip(128 * 1024 + 200)(b)),
        CorruptImageError,
    ),
    ("header-version-2", lambda b: _headers(b, version=2), UnsupportedFeatureError),
    ("log-version-1", lambda b: _headers(b, log_version=1), UnsupportedFeatureError),
    ("log-unaligned", lambda b: _headers(b, log_offset=MiB + 512), CorruptImageError),
    (
        "log-huge",
        lambda b: _headers(b, log_guid=b"\x01" * 16, log_length=0xFFF00000),
        ResourceLimitError,
    ),
    (
        "log-past-eof",
        lambda b: _headers(b, log_guid=b"\x01" * 16, log_offset=1 << 40),
        TruncatedImageError,
    ),
    (
        "both-region-tables-bad",
        lambda b: (_flip(192 * 1024 + 40)(b), _flip(256 * 1024 + 40)(b)),
        CorruptImageError,
    ),
    (
        "region-count-huge",
        lambda b: _regions(b, lambda t: struct.pack_into("<I", t, 8, 5000)),
        CorruptImageError,
    ),
    (
        "unknown-required-region",
        lambda b: _region_entry(b, 1, guid=UNKNOWN, required=1),
        UnsupportedFeatureError,
    ),
    ("bat-region-past-eof", lambda b: _region_entry(b, 0, offset=1 << 40), TruncatedImageError),
    (
        "metadata-region-past-eof",
        lambda b: _region_entry(b, 1, offset=1 << 40),
        TruncatedImageError,
    ),
    ("regions-overlap", lambda b: _region_entry(b, 0, offset=META), CorruptImageError),
    ("region-in-headers", lambda b: _region_entry(b, 0, offset=0), CorruptImageError),
    ("region-over-log", lambda b: _region_entry(b, 0, offset=MiB), CorruptImageError),
    ("bat-region-too-small", lambda b: _region_entry(b, 0, length=0), CorruptImageError),
    (
        "metadata-bad-signature",
        lambda b: b.__setitem__(slice(META, META + 8), b"garbage!"),
        CorruptImageError,
    ),
    (
        "metadata-count-huge",
        lambda b: struct.pack_into("<H", b, META + 10, 0xFFFF),
        CorruptImageError,
    ),
    (
        "metadata-unknown-required",
        lambda b: _md_entry(b, 4, guid=UNKNOWN, flags=4),
        UnsupportedFeatureError,
    ),
    ("metadata-missing-item", lambda b: _md_entry(b, 1, guid=UNKNOWN, flags=0), CorruptImageError),
    ("metadata-item-past-region", lambda b: _md_entry(b, 1, offset=MiB - 4), CorruptImageError),
    ("metadata-item-in-table", lambda b: _md_entry(b, 1, offset=16), CorruptImageError),
    ("metadata-item-short", lambda b: _md_entry(b, 0, length=4), CorruptImageError),
    ("block-size-3M", lambda b: _md_value(b, 0, "<I", 3 * MiB), CorruptImageError),
    ("block-size-512M", lambda b: _md_value(b, 0, "<I", 512 * MiB), CorruptImageError),
    ("block-size-0", lambda b: _md_value(b, 0, "<I", 0), CorruptImageError),
    ("virtual-size-absurd", lambda b: _md_value(b, 1, "<Q", 1 << 62), CorruptImageError),
    ("virtual-size-odd", lambda b: _md_value(b, 1, "<Q", 8 * MiB + 1), CorruptImageError),
    ("logical-sector-1024", lambda b: _md_value(b, 3, "<I", 1024), CorruptImageError),
    ("physical-sector-7", lambda b: _md_value(b, 4, "<I", 7), CorruptImageError),
    (
        "has-parent-without-locator",
        lambda b: (
            _md_value(b, 0, "<I", MiB)
            or struct.pack_into(
                "<I", b, META + struct.unpack_from("<I", b, META + 32 + 16)[0] + 4, 2
            )
        ),
        CorruptImageError,
    ),
    ("bat-reserved-state", lambda b: _bat(b, 1, 4), CorruptImageError),
    ("bat-into-headers", lambda b: _bat(b, 1, 6), CorruptImageError),
    ("bat-past-eof", lambda b: _bat(b, 1, (1 << 40) | 6), TruncatedImageError),
    ("bat-partial-in-dynamic", lambda b: _bat(b, 1, (4 * MiB) | 7), CorruptImageError),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    img = tmp_path_factory.mktemp("vhdx") / "base.vhdx"
    qemu_img("create", "-f", "vhdx", "-o", "block_size=1M", img, "8M")
    qemu_io("vhdx", img, "write -P 0x3c 0 1M")
    data = img.read_bytes()
    with closing(open_layer(img)) as layer:  # the base itself is fine
        assert layer.read(0, 4) == b"\x3c" * 4
        assert layer.chunk_ratio == 4096
    return data


@pytest.mark.parametrize(("name", "mutate", "error"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_mutation_raises_named_error(
    tmp_path: Path, pristine: bytes, name: str, mutate: Mutation, error: type[VmferryError]
) -> None:
    buf = bytearray(pristine)
    mutate(buf)
    img = tmp_path / f"{name}.vhdx"
    img.write_bytes(bytes(buf))
    tracemalloc.start()
    try:
        with pytest.raises(error) as info:
            layer = open_layer(img, "vhdx")
            layer.close()
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 48 * MiB, f"{name}: {peak} bytes"
    assert str(info.value) and "\n" not in info.value.message


def test_one_bad_header_copy_is_survived(tmp_path: Path, pristine: bytes) -> None:
    for off in HEADER_OFFSETS:
        buf = bytearray(pristine)
        buf[off + 300] ^= 1
        img = tmp_path / "one.vhdx"
        img.write_bytes(bytes(buf))
        with closing(open_layer(img)) as layer:
            assert layer.read(0, 2) == b"\x3c\x3c"
            assert layer.check().corruptions  # the bad copy is reported


def test_unknown_optional_region_and_item_are_ignored(tmp_path: Path, pristine: bytes) -> None:
    buf = bytearray(pristine)

    def add_region(t: bytearray) -> None:
        struct.pack_into("<I", t, 8, 3)
        struct.pack_into("<16sQII", t, 16 + 64, UNKNOWN, 64 * MiB, MiB, 0)

    _regions(buf, add_region)
    count = struct.unpack_from("<H", buf, META + 10)[0]
    struct.pack_into("<H", buf, META + 10, count + 1)
    struct.pack_into("<16sIII", buf, META + 32 + 32 * count, UNKNOWN, 65536, 8, 0)
    img = tmp_path / "opt.vhdx"
    img.write_bytes(bytes(buf))
    with closing(open_layer(img)) as layer:
        assert layer.read(0, 1) == b"\x3c"


@pytest.mark.parametrize(
    "cut",
    [
        0,
        8,
        520,
        64 * 1024,
        64 * 1024 + 2048,
        128 * 1024,
        192 * 1024,
        256 * 1024 + 100,
        MiB,
        META,
        META + 30000,
        BAT,
        BAT + 100,
        4 * MiB,
        4 * MiB + 1000,
    ],
)
def test_truncated_at_every_boundary(tmp_path: Path, pristine: bytes, cut: int) -> None:
    img = tmp_path / "t.vhdx"
    img.write_bytes(pristine[:cut])
    with pytest.raises((TruncatedImageError, NotThisFormatError, CorruptImageError)):
        open_layer(img, "vhdx").close()


def test_parent_locator_mutations(tmp_path: Path) -> None:
    base, child = tmp_path / "b.vhdx", tmp_path / "c.avhdx"
    vmferry.create(base, "vhdx", 4 * MiB, block_size="1M").close()
    vmferry.create(child, "vhdx", parent=base).close()
    raw = bytearray(child.read_bytes())
    with closing(open_layer(child)) as layer:
        loc_off, _length = layer.md.parent_locator_entry
        meta = layer.meta_region.offset
    start = meta + loc_off
    cases = {
        "count-huge": lambda b: struct.pack_into("<H", b, start + 18, 5000),
        "key-out-of-range": lambda b: struct.pack_into("<I", b, start + 20, 1 << 30),
        "odd-length": lambda b: struct.pack_into("<H", b, start + 20 + 8, 3),
    }
    for name, mutate in cases.items():
        buf = bytearray(raw)
        mutate(buf)
        bad = tmp_path / f"{name}.avhdx"
        bad.write_bytes(bytes(buf))
        with pytest.raises(CorruptImageError, match="parent locator"):
            open_layer(bad).close()


def test_differencing_bat_mutations(tmp_path: Path) -> None:
    base, child = tmp_path / "b.vhdx", tmp_path / "c.avhdx"
    vmferry.create(base, "vhdx", 4 * MiB, block_size="1M").close()
    vmferry.create(child, "vhdx", parent=base).close()
    raw = bytearray(child.read_bytes())
    with closing(open_layer(child)) as layer:
        bat = layer.bat_region.offset
        ratio = layer.chunk_ratio
        data_start = layer.file.size
    cases = {
        "sb-reserved-state": (8 * ratio, 3, "reserved state"),
        "partial-without-bitmap": (8, data_start | 7, "no sector bitmap"),
        "sb-past-eof": (8 * ratio, (1 << 40) | 6, "past the end"),
    }
    for name, (where, value, message) in cases.items():
        buf = bytearray(raw)
        struct.pack_into("<Q", buf, bat + where, value)
        if name == "partial-without-bitmap":
            buf += bytes(MiB)
        bad = tmp_path / f"{name}.avhdx"
        bad.write_bytes(bytes(buf))
        with pytest.raises(CorruptImageError, match=message):
            open_layer(bad).close()


def test_log_flushed_offset_past_eof(tmp_path: Path) -> None:
    from tests.disk.test_vhdx_log import _dirty_image

    img, _pattern = _dirty_image(tmp_path)
    size = img.stat().st_size
    with open(img, "r+b") as fh:
        fh.truncate(size - MiB)  # drop the block the log entry was flushed with
    with pytest.raises(CorruptImageError, match="truncated"):
        open_layer(img).close()


def test_check_reports_overlapping_blocks_like_qemu(tmp_path: Path) -> None:
    img = tmp_path / "ok.vhdx"
    with vmferry.create(img, "vhdx", 8 * MiB, block_size="1M") as disk:
        disk.write(0, b"a" * (2 * MiB))
    with closing(open_layer(img)) as layer:
        assert layer.check().clean
        bat, meta = layer.bat_region.offset, layer.meta_region.offset
    buf = bytearray(img.read_bytes())
    struct.pack_into("<Q", buf, bat + 16, meta | 6)  # block 2 -> the metadata region
    struct.pack_into("<Q", buf, bat + 24, struct.unpack_from("<Q", buf, bat)[0])  # 3 -> 0's
    bad = tmp_path / "bad.vhdx"
    bad.write_bytes(bytes(buf))
    out = qemu_img("check", "-f", "vhdx", bad, check=False)
    assert out.returncode == 2  # qemu: corrupt
    with closing(open_layer(bad)) as layer:
        problems = layer.check().corruptions
    assert any("metadata region" in p and "BAT entry 2" in p for p in problems)
    assert any("BAT entry 3" in p and "BAT entry 0" in p for p in problems)
