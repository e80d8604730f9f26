"""zlib-ng when installed, Python's zlib otherwise: the same images either way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import qemu_img
from vmferry.disk import deflate

_WITHOUT_ZLIB_NG = """
import sys
sys.modules["zlib_ng"] = None  # as if it were not installed
import vmferry
from vmferry.disk.deflate import zlib
assert zlib.__name__ == "zlib", zlib
from vmferry.ops.convert import convert
convert(sys.argv[1], sys.argv[2], dst_format="vmdk", options={"subformat": "streamOptimized"})
convert(sys.argv[2], sys.argv[3], dst_format="qcow2", options={"compress": "on"})
convert(sys.argv[3], sys.argv[4], dst_format="raw")
"""


def test_zlib_ng_is_used_when_installed() -> None:
    pytest.importorskip("zlib_ng")
    assert deflate.zlib.__name__ == "zlib_ng.zlib_ng"


def test_without_zlib_ng_the_stdlib_makes_the_same_images(tmp_path: Path) -> None:
    data = (b"some text that compresses " * 50_000)[: 1 << 20] + bytes(65536) + b"\x5a" * 70_144
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    stream, qcow, back = tmp_path / "s.vmdk", tmp_path / "c.qcow2", tmp_path / "back.raw"
    subprocess.run(
        [sys.executable, "-c", _WITHOUT_ZLIB_NG, src, stream, qcow, back],
        check=True,
        cwd=Path(__file__).parents[2],
    )
    assert back.read_bytes() == data
    qemu_img("compare", "-f", "raw", "-F", "vmdk", src, stream)
    qemu_img("check", "-f", "qcow2", qcow)
    assert qcow.stat().st_size < len(data) // 2  # the clusters really were compressed
    qemu_img("compare", "-f", "raw", "-F", "qcow2", src, qcow)
