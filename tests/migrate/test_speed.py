"""The shortcuts that make ``migrate`` fast must not change any answer.

* the initramfs parse cache (one walk serves inspection, the ``initramfs`` rule and driver
  injection) answers exactly what a fresh walk answers, never for other bytes, and hands out
  copies;
* the block-aligned windows of verification and the reader-thread digest of the streaming
  pass give the digest computed here independently from the raw bytes (hashlib over 1 MiB
  blocks), for data runs that start and end inside blocks.

Oracles: GNU cpio (archives), qemu-img (images), hashlib over the raw file.
"""

from __future__ import annotations

import gzip
import hashlib
import subprocess
from pathlib import Path

from tests.conftest import require_tool
from tests.migrate.conftest import MIB, raw_disk, to_format
from vmferry.chain import open_chain
from vmferry.guest.linux.initramfs import read_initramfs
from vmferry.migrate.digest import BLOCK, block_windows
from vmferry.migrate.pipeline import stream_disk
from vmferry.migrate.verify import digest_output


def _cpio(root: Path, files: dict[str, bytes]) -> bytes:
    require_tool("cpio")
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    return subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc"],
        input="\n".join(names).encode(),
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout


def _raw_tree_digest(path: Path, size: int) -> str:
    """sha256-1m-tree straight from the raw bytes: the definition, not vmferry's code."""
    outer = hashlib.sha256()
    with open(path, "rb") as f:
        for _ in range(0, size, BLOCK):
            outer.update(hashlib.sha256(f.read(BLOCK)).digest())
    return outer.hexdigest()


MOD = "usr/lib/modules/6.1.0-9-amd64/kernel/drivers/block/virtio_blk.ko"


def test_cache_answers_like_a_fresh_walk_and_hands_out_copies(tmp_path: Path) -> None:
    blob = gzip.compress(
        _cpio(tmp_path / "a", {MOD: b"m" * 100, "conf/modules": b"virtio_blk\n", "init": b"x"})
    )
    first = read_initramfs(blob)
    assert first.drivers == ["virtio_blk"] and first.captured == {}
    first.modules.clear()  # a caller's change must not leak into the cache
    first.kinds.clear()
    again = read_initramfs(blob)
    assert again.drivers == ["virtio_blk"] and again.kinds["init"] == "file"
    # conf/modules is kept by every walk, so driver injection reuses inspection's walk
    assert read_initramfs(blob, frozenset({"conf/modules"})).captured == {
        "conf/modules": b"virtio_blk\n"
    }
    # a member nobody captured before: walked again, and found
    assert read_initramfs(blob, frozenset({"init"})).captured == {"init": b"x"}


def test_cache_never_answers_for_other_bytes(tmp_path: Path) -> None:
    one = _cpio(tmp_path / "a", {MOD: b"m" * 100})
    other = _cpio(tmp_path / "b", {MOD.replace("virtio_blk", "vmw_pvscsi"): b"m" * 100})
    assert len(one) == len(other)  # same size, different content
    assert read_initramfs(one).drivers == ["virtio_blk"]
    assert read_initramfs(other).drivers == ["vmw_pvscsi"]
    # an image with an archive appended (what driver injection writes) is other bytes too
    extra = _cpio(tmp_path / "c", {MOD.replace("virtio_blk", "nvme"): b"n" * 10})
    assert read_initramfs(one + extra).drivers == ["nvme", "virtio_blk"]


def test_block_windows_cover_touched_blocks_aligned() -> None:
    runs = [
        (10, 20),
        (3 * MIB - 5, 3 * MIB + 5),
        (3 * MIB + 100, 4 * MIB),
        (40 * MIB + 1, 41 * MIB),
    ]
    wins = block_windows(runs, 41 * MIB - 7, 8 * MIB)
    assert wins == [(0, MIB), (2 * MIB, 2 * MIB), (40 * MIB, MIB - 7)]
    assert block_windows([(0, 20 * MIB)], 20 * MIB, 8 * MIB) == [
        (0, 8 * MIB), (8 * MIB, 8 * MIB), (16 * MIB, 4 * MIB),
    ]  # fmt: skip


def test_stream_and_verify_digests_match_the_raw_definition(tmp_path: Path) -> None:
    require_tool("qemu-img")
    size = 37 * MIB + 4096 * 3  # a short last block
    runs = [(12345, 70000), (MIB - 512, 3 * 4096), (5 * MIB + 7, 9 * MIB), (size - 8192, 8192)]
    raw = raw_disk(tmp_path / "d.raw", size, runs)
    src = to_format(raw, tmp_path / "d.qcow2", "qcow2", "cluster_size=65536")
    expected = _raw_tree_digest(raw, size)
    out = tmp_path / "out.qcow2"
    with open_chain(src, "qcow2") as chain:
        result = stream_disk(chain, None, size, out, "qcow2", {})
    assert result.digest == expected
    assert digest_output(out, "qcow2", size) == (expected, True)
    assert digest_output(src, "qcow2", size) == (expected, True)
