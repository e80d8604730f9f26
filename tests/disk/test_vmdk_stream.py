"""streamOptimized output: the API the OVA writer uses, checked by qemu-img."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import vmferry
from tests.conftest import qemu_img, qemu_img_info
from vmferry.disk import BlockFile
from vmferry.disk.vmdk import create_stream_optimized, write_stream_optimized
from vmferry.errors import UnsupportedFeatureError

SIZE = 24 << 20 | 7 * 512  # the last grain is partial on purpose


def _qemu_equal(img: Path, ref: bytes, tmp_path: Path) -> None:
    raw = tmp_path / "ref.raw"
    raw.write_bytes(ref)
    qemu_img("compare", "-f", "vmdk", "-F", "raw", img, raw)
    qemu_img("check", "-f", "vmdk", img)


def test_ova_api_writes_a_vmware_style_stream(tmp_path: Path) -> None:
    img = tmp_path / "disk1.vmdk"
    rnd = random.Random(5)
    runs, ref = [], bytearray(SIZE)
    pos = 0
    while True:
        pos += rnd.randrange(0, 3 << 20)
        if pos >= SIZE - 200:
            break
        n = min(rnd.randrange(1, 1 << 20), SIZE - 200 - pos)
        data = os.urandom(n) if rnd.random() < 0.5 else bytes([rnd.randrange(256)]) * n
        runs.append((pos, data))
        ref[pos : pos + n] = data
        pos += n
    runs.append((SIZE - 100, b"\xee" * 100))  # the short last grain
    ref[SIZE - 100 :] = b"\xee" * 100
    f = BlockFile.open(img, writable=True, create=True)
    write_stream_optimized(f, SIZE, runs, adapter_type="lsilogic", hwversion="7")
    _qemu_equal(img, bytes(ref), tmp_path)
    info = qemu_img_info(img)["format-specific"]["data"]
    assert info["create-type"] == "streamOptimized"
    assert info["extents"][0]["compressed"] is True
    buf = img.read_bytes()
    # VMware's layout: version 3, GD at the end, and the stream ends with footer + EOS marker
    assert buf[:4] == b"KDMV" and int.from_bytes(buf[4:8], "little") == 3
    assert buf[56:64] == b"\xff" * 8
    assert buf[-1024:-1020] == b"KDMV" and buf[-512:] == bytes(512)
    with vmferry.open(img) as disk:
        assert disk.read(0, SIZE) == ref
        assert disk.info()["adapter_type"] == "lsilogic" and disk.info()["hwversion"] == "7"
        assert disk.top.check().clean


def test_finish_keeps_the_file_open_for_hashing(tmp_path: Path) -> None:
    img = tmp_path / "d.vmdk"
    f = BlockFile.open(img, writable=True, create=True)
    layer = create_stream_optimized(f, SIZE)
    layer.write(0, b"\x01" * 100_000)
    layer.finish()
    size_then = img.stat().st_size
    assert f.fd >= 0 and f.pread(size_then - 1024, 4) == b"KDMV"
    layer.close()
    assert img.stat().st_size == size_then
    ref = bytearray(SIZE)
    ref[:100_000] = b"\x01" * 100_000
    _qemu_equal(img, bytes(ref), tmp_path)


def test_flush_midway_leaves_a_valid_stream_and_writing_continues(tmp_path: Path) -> None:
    img = tmp_path / "d.vmdk"
    ref = bytearray(SIZE)
    with vmferry.create(img, "vmdk", SIZE, subformat="streamOptimized") as disk:
        disk.write(1000, b"\x02" * 5000)  # a grain still being filled
        ref[1000:6000] = b"\x02" * 5000
        disk.flush()
        snap = tmp_path / "snap.vmdk"
        snap.write_bytes(img.read_bytes())
        _qemu_equal(snap, bytes(ref), tmp_path)
        disk.write(6000, b"\x03" * 200_000)  # same grain, then more
        ref[6000:206000] = b"\x03" * 200_000
        assert disk.read(0, 300_000) == ref[:300_000]
        disk.write_zeroes(206000, 1 << 20)
        disk.write((4 << 20) + 3, b"\x04" * 10)
        ref[(4 << 20) + 3 : (4 << 20) + 13] = b"\x04" * 10
    _qemu_equal(img, bytes(ref), tmp_path)


def test_reopened_stream_appends_after_its_last_grain(tmp_path: Path) -> None:
    img = tmp_path / "d.vmdk"
    ref = bytearray(SIZE)
    with vmferry.create(img, "vmdk", SIZE, subformat="streamOptimized") as disk:
        disk.write(0, b"\x05" * 70000)
    ref[:70000] = b"\x05" * 70000
    with vmferry.open(img, writable=True) as disk:
        with pytest.raises(UnsupportedFeatureError):
            disk.write(70000, b"x")  # inside the grain already compressed
        disk.write(3 << 20, b"\x06" * 1000)
    ref[3 << 20 : (3 << 20) + 1000] = b"\x06" * 1000
    _qemu_equal(img, bytes(ref), tmp_path)


def test_zero_grains_take_no_space(tmp_path: Path) -> None:
    img = tmp_path / "z.vmdk"
    with vmferry.create(img, "vmdk", 64 << 20, subformat="streamOptimized") as disk:
        disk.write(0, bytes(32 << 20))
        disk.write(32 << 20, b"\x01")
        disk.write((32 << 20) + 1, bytes(32 << 20)[:-1])
    assert img.stat().st_size < 128 << 10  # 64 KiB header area + one grain + tables
    ref = bytearray(64 << 20)
    ref[32 << 20] = 1
    _qemu_equal(img, bytes(ref), tmp_path)


def test_convert_to_stream_is_parallel_and_correct(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    data = bytearray(os.urandom(8 << 20)) + bytes(8 << 20) + b"\x07" * (4 << 20)
    src.write_bytes(data)
    from vmferry.ops.convert import convert

    out = tmp_path / "out.vmdk"
    convert(src, out, dst_format="vmdk", options={"subformat": "streamOptimized"})
    qemu_img("compare", "-f", "vmdk", "-F", "raw", out, src)
