"""Hostile and damaged VDIs: each is refused with a named error, in bounded memory.

The base image is made by qemu-img; each case changes a few header or map bytes at the offsets
VirtualBox's VDICore.h gives (pre-header 72 bytes, then the v1 header).
"""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

import vmferry
from tests.conftest import qemu_img, qemu_io
from vmferry.chain import open_layer
from vmferry.errors import (
    CorruptImageError,
    NotThisFormatError,
    ResourceLimitError,
    TruncatedImageError,
    UnsupportedFeatureError,
    VmferryError,
)

MiB = 1 << 20
# byte offsets of v1 header fields in the file
HEADER_SIZE, TYPE, OFF_BMAP, OFF_DATA = 72, 76, 340, 344
DISK_SIZE, BLOCK_SIZE, BLOCK_EXTRA, BLOCKS, ALLOCATED = 368, 376, 380, 384, 388
LINK = 424


@pytest.fixture
def good(tmp_path: Path) -> Path:
    img = tmp_path / "good.vdi"
    qemu_img("create", "-f", "vdi", img, 8 * MiB)
    qemu_io("vdi", img, f"write -P 1 {MiB} {2 * MiB}", "write -P 2 0 512")
    return img


def _u32(at: int, value: int) -> Callable[[bytearray], bytearray]:
    def edit(b: bytearray) -> bytearray:
        struct.pack_into("<I", b, at, value)
        return b

    return edit


def _u64(at: int, value: int) -> Callable[[bytearray], bytearray]:
    def edit(b: bytearray) -> bytearray:
        struct.pack_into("<Q", b, at, value)
        return b

    return edit


def _cut(n: int) -> Callable[[bytearray], bytearray]:
    return lambda b: b[:n]


def _many(*edits: Callable[[bytearray], bytearray]) -> Callable[[bytearray], bytearray]:
    def edit(b: bytearray) -> bytearray:
        for e in edits:
            b = e(b)
        return b

    return edit


# qemu puts the map at 512 and data at 1024 for this size; block map entries at 512 + 4*i
CASES: list[tuple[str, Callable[[bytearray], bytearray], type[VmferryError]]] = [
    ("empty", _cut(0), TruncatedImageError),
    ("cut in pre-header", _cut(40), TruncatedImageError),
    ("cut in header", _cut(200), TruncatedImageError),
    ("cut in block map", _cut(520), TruncatedImageError),
    ("cut in data", _cut(1024 + MiB), TruncatedImageError),
    ("bad signature", _u32(64, 0xDEADBEEF), NotThisFormatError),
    ("version 2.0", _u32(68, 0x00020000), UnsupportedFeatureError),
    ("header size tiny", _u32(HEADER_SIZE, 12), CorruptImageError),
    ("header size huge", _u32(HEADER_SIZE, 0xFFFFFFFF), CorruptImageError),
    ("unknown type", _u32(TYPE, 9), UnsupportedFeatureError),
    ("diff without parent uuid", _u32(TYPE, 4), CorruptImageError),
    ("block size 3 MiB", _u32(BLOCK_SIZE, 3 * MiB), CorruptImageError),
    ("block size 0", _u32(BLOCK_SIZE, 0), CorruptImageError),
    ("block size 4 GiB-1", _u32(BLOCK_SIZE, 0xFFFFFFFF), CorruptImageError),
    ("odd block extra", _u32(BLOCK_EXTRA, 3), UnsupportedFeatureError),
    ("disk larger than map", _u64(DISK_SIZE, 9 * MiB), CorruptImageError),
    ("block map past EOF", _u32(OFF_BMAP, 0x7FFFF000), CorruptImageError),
    (
        "block map past EOF (data moved too)",
        _many(_u32(OFF_BMAP, 0x7FFFF000), _u32(OFF_DATA, 0x80000000)),
        TruncatedImageError,
    ),
    ("map overlaps header", _u32(OFF_BMAP, 100), CorruptImageError),
    ("data overlaps map", _u32(OFF_DATA, 512), CorruptImageError),
    (
        "absurd block count",
        _many(_u32(BLOCKS, 0x3F000000), _u32(OFF_DATA, 0xFFFFFE00)),
        ResourceLimitError,
    ),
    ("block count past index range", _u32(BLOCKS, 0x40000000), ResourceLimitError),
    ("allocated > blocks", _u32(ALLOCATED, 9), CorruptImageError),
    ("entry beyond block count", _u32(512 + 4, 8), CorruptImageError),
    ("entry past EOF", _u32(512 + 4 * 3, 7), TruncatedImageError),
]


@pytest.mark.parametrize(("name", "edit", "error"), CASES, ids=[c[0] for c in CASES])
def test_bad_images_raise_named_errors(
    tmp_path: Path,
    good: Path,
    name: str,
    edit: Callable[[bytearray], bytearray],
    error: type[VmferryError],
) -> None:
    bad = tmp_path / "bad.vdi"
    bad.write_bytes(bytes(edit(bytearray(good.read_bytes()))))
    tracemalloc.start()
    try:
        with pytest.raises(error) as exc, vmferry.open(bad, "vdi") as d:
            d.read(0, d.virtual_size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * MiB, f"{name}: {peak} bytes allocated"
    assert "\n" not in str(exc.value)


def test_count_mismatch_and_shared_blocks_agree_with_qemu_check(tmp_path: Path, good: Path) -> None:
    raw = bytearray(good.read_bytes())
    # qemu put blocks 1, 2 in slots 0, 1 and block 0 in slot 2: make block 3 share slot 1
    struct.pack_into("<I", raw, 512 + 4 * 3, 1)
    shared = tmp_path / "shared.vdi"
    shared.write_bytes(raw)
    assert qemu_img("check", "-f", "vdi", shared, check=False).returncode == 2
    layer = open_layer(shared, "vdi")
    try:
        report = layer.check()
    finally:
        layer.close()
    assert any("shares" in c for c in report.corruptions)
    with pytest.raises(CorruptImageError):
        vmferry.open(shared, "vdi", writable=True)

    raw = bytearray(good.read_bytes())
    struct.pack_into("<I", raw, ALLOCATED, 1)
    count = tmp_path / "count.vdi"
    count.write_bytes(raw)
    assert qemu_img("check", "-f", "vdi", count, check=False).returncode == 2
    layer = open_layer(count, "vdi")
    try:
        assert not layer.check().clean
    finally:
        layer.close()
    # writing repairs the count (the map is the truth), and qemu agrees afterwards
    with vmferry.open(count, "vdi", writable=True) as d:
        d.write(6 * MiB, b"\x09" * 512)
    qemu_img("check", "-f", "vdi", count)


def test_clean_image_checks_clean_like_qemu(good: Path) -> None:
    qemu_img("check", "-f", "vdi", good)
    layer = open_layer(good, "vdi")
    try:
        assert layer.check().clean
    finally:
        layer.close()
