"""qcow2 compressed-cluster reads: any piece of a qemu-compressed image, read with ``read`` or
``read_into``, on one core or all, through windows of any size, is the source's bytes.

Oracle: the raw file qemu-img compressed (``qemu-img convert -c``), and ``qemu-img map`` for
which clusters it stored compressed.
"""

from __future__ import annotations

import json
import random
from contextlib import closing
from pathlib import Path

import pytest

from tests.conftest import qemu_img
from vmferry.disk import BlockFile
from vmferry.disk.qcow2 import Qcow2, driver
from vmferry.disk.qcow2.driver import INFLATE_WINDOW

KiB, MiB = 1 << 10, 1 << 20


def compressible(rnd: random.Random, n: int) -> bytes:
    """Bytes that deflate well but not to nothing: a few symbols in random order."""
    return bytes(rnd.choices(b"abcd\x00", k=n))


def make_compressed(tmp_path: Path, cluster_size: int) -> tuple[Path, bytes]:
    """A qemu-compressed qcow2 of compressible runs, incompressible runs and holes."""
    rnd = random.Random(cluster_size)
    data = bytearray(6 * MiB)
    data[0 : 2 * MiB] = compressible(rnd, 2 * MiB)
    data[2 * MiB + 777 : 3 * MiB] = rnd.randbytes(MiB - 777)  # stored plain by qemu
    data[4 * MiB : 5 * MiB + 12345] = compressible(rnd, MiB + 12345)
    raw = tmp_path / "src.raw"
    raw.write_bytes(bytes(data))
    img = tmp_path / f"c{cluster_size}.qcow2"
    qemu_img(
        "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={cluster_size}",
        str(raw), str(img),
    )  # fmt: skip
    return img, bytes(data)


def qemu_compressed_bytes(img: Path) -> int:
    """How many guest bytes qemu-img map reports as stored compressed (no host offset)."""
    runs = json.loads(qemu_img("map", "--output=json", str(img)).stdout)
    return sum(r["length"] for r in runs if r["data"] and "offset" not in r)


def pieces(size: int, seed: int) -> list[tuple[int, int]]:
    """Reads at odd offsets and lengths: inside one cluster, across many, and whole runs."""
    rnd = random.Random(seed)
    out = [(0, size), (1, size - 2), (2 * MiB - 5, 10), (5 * MiB, 4096)]
    for _ in range(40):
        off = rnd.randrange(size)
        out.append((off, rnd.randrange(1, min(3 * MiB, size - off) + 1)))
    return out


@pytest.mark.parametrize("cluster_size", [4 * KiB, 64 * KiB, 2 * MiB])
@pytest.mark.parametrize("workers", [1, 2])
def test_compressed_reads_match_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cluster_size: int, workers: int
) -> None:
    img, data = make_compressed(tmp_path, cluster_size)
    assert qemu_compressed_bytes(img) >= 2 * MiB  # the oracle really holds compressed clusters
    monkeypatch.setattr(driver, "parallel_workers", lambda: workers)
    with closing(Qcow2.open(BlockFile.open(img))) as disk:
        for off, n in pieces(len(data), cluster_size + workers):
            assert disk.read(off, n) == data[off : off + n], (off, n)
            buf = bytearray(b"\xee" * n)  # read_into must overwrite holes too
            disk.read_into(off, memoryview(buf))
            assert buf == data[off : off + n], (off, n)


@pytest.mark.parametrize("window", [0, 10_000, INFLATE_WINDOW])
def test_window_reloads_when_a_cluster_runs_past_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    """Windows smaller than the packed run force a reload at a cluster whose bytes straddle the
    window's end (0: the window is the smallest allowed, two clusters and a sector)."""
    img, data = make_compressed(tmp_path, 4 * KiB)
    monkeypatch.setattr(driver, "INFLATE_WINDOW", window)
    loads: list[int] = []
    with closing(Qcow2.open(BlockFile.open(img))) as disk:
        real = disk.file.pread_into
        monkeypatch.setattr(
            disk.file, "pread_into", lambda off, view: (loads.append(len(view)), real(off, view))
        )
        assert disk.read(0, 2 * MiB) == data[: 2 * MiB]
    size = max(window, 2 * 4 * KiB + 512)
    assert len(loads) >= 2 and set(loads) == {size}  # moved along, never past its size


def test_last_cluster_is_not_inflated_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small reads walking through one compressed cluster inflate it once."""
    img, data = make_compressed(tmp_path, 64 * KiB)
    calls: list[int] = []
    real = driver.decompress
    monkeypatch.setattr(
        driver,
        "decompress",
        lambda *a: (calls.append(1), real(*a))[1],  # type: ignore[misc]
    )
    with closing(Qcow2.open(BlockFile.open(img))) as disk:
        for off in range(64 * KiB, 128 * KiB, 4 * KiB):
            assert disk.read(off, 4 * KiB) == data[off : off + 4 * KiB]
    assert len(calls) == 1
