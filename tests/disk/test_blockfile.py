"""BlockFile: bounded reads, and locks that a running qemu honours and that honour qemu."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import qemu_img, require_tool
from vmferry.disk.blockfile import BlockFile
from vmferry.errors import ImageLockedError, ResourceLimitError, TruncatedImageError


def test_read_exact_refuses_past_end_and_absurd_sizes(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x" * 1000)
    f = BlockFile.open(p)
    try:
        assert f.read_exact(990, 10, "tail") == b"x" * 10
        with pytest.raises(TruncatedImageError, match=r"BAT .* extends past the end"):
            f.read_exact(990, 11, "BAT")
        with pytest.raises(TruncatedImageError):
            f.read_exact(-1, 4, "header")
        with pytest.raises(ResourceLimitError, match="claims"):
            f.read_exact(0, 1 << 40, "table")
    finally:
        f.close()


class _QemuHolder:
    """qemu-io keeps an image open (as a running VM would) until its stdin closes."""

    def __init__(self, path: Path, read_only: bool = False) -> None:
        require_tool("qemu-io")
        args = ["qemu-io", "-f", "raw"] + (["-r"] if read_only else []) + [str(path)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdin is not None
        # a command that answers proves the image is open and locked
        self.proc.stdin.write("read 0 512\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + 10
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            if "read 512/512" in self.proc.stdout.readline():
                return
        raise AssertionError("qemu-io did not open the image")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def test_refuses_image_a_running_qemu_writes(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(1 << 20))
    holder = _QemuHolder(img)
    try:
        with pytest.raises(ImageLockedError, match="in use"):
            BlockFile.open(img, writable=True)
        with pytest.raises(ImageLockedError) as exc:
            BlockFile.open(img)
        assert "--force-share" in (exc.value.hint or "")
        BlockFile.open(img, force_share=True).close()  # -U: reading anyway is allowed
    finally:
        holder.close()
    BlockFile.open(img, writable=True).close()


def test_reader_beside_read_only_qemu_is_fine(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(1 << 20))
    holder = _QemuHolder(img, read_only=True)
    try:
        BlockFile.open(img).close()
    finally:
        holder.close()


def test_qemu_refuses_image_vmferry_writes(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(1 << 20))
    f = BlockFile.open(img, writable=True)
    try:
        # (qemu-img info shares everything since qemu 5; convert and qemu-io do not)
        out = tmp_path / "copy.raw"
        proc = qemu_img("convert", "-f", "raw", "-O", "raw", str(img), str(out), check=False)
        assert proc.returncode != 0
        assert 'Failed to get shared "write" lock' in proc.stderr
    finally:
        f.close()
    assert qemu_img("convert", "-f", "raw", "-O", "raw", str(img), str(out)).returncode == 0
