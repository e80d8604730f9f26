"""Reading streamOptimized grains: windowed, batched per core, into the caller's buffer.

The images are qemu-img's own streamOptimized output, so the grain layout is another writer's.
Each test knows what the source bytes were and checks every byte vmferry hands back, on both
inflating paths (stored grains on the reading thread, compressed grains on every core), and
with the read window so small that records keep straddling its end.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

import vmferry
from tests.conftest import qemu_img
from vmferry.disk import parallel
from vmferry.disk.vmdk import sparse
from vmferry.errors import CorruptImageError, TruncatedImageError
from vmferry.ops.convert import convert

GRAIN = 65536


def _text(rnd: random.Random, n: int) -> bytes:
    words = [rnd.randbytes(rnd.randint(2, 9)).hex() for _ in range(300)]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words).encode() + b" "
    return bytes(out[:n])


def _stream_of(tmp_path: Path, data: bytes) -> Path:
    raw = tmp_path / "src.raw"
    raw.write_bytes(data)
    img = tmp_path / "s.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, img)
    return img


def _content(kind: str, size: int) -> bytes:
    """Data with zero grains, a hole-sized run of zeros and a tail that is not grain-aligned."""
    rnd = random.Random(kind)
    make = rnd.randbytes if kind == "random" else (lambda n: _text(rnd, n))
    return (
        make(5 * GRAIN + 77)
        + bytes(3 * GRAIN)
        + make(40 * GRAIN)
        + bytes(GRAIN)
        + make(size - 49 * GRAIN - 77)
    )


def _spans(size: int) -> list[tuple[int, int]]:
    rnd = random.Random(1)
    spans = [(0, size), (GRAIN - 5, 3 * GRAIN + 9), (size - 4097, 4097), (7 * GRAIN, GRAIN)]
    spans += [(o, rnd.randint(1, size - o)) for o in (rnd.randrange(size) for _ in range(12))]
    return spans


@pytest.mark.parametrize(("kind", "parallel_path"), [("random", False), ("text", True)])
@pytest.mark.parametrize("window", [sparse.WINDOW, 0])
def test_read_into_gives_the_source_bytes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    parallel_path: bool,
    window: int,
) -> None:
    size = 64 * GRAIN + 1000
    data = _content(kind, size)
    img = _stream_of(tmp_path, data)
    monkeypatch.setattr(sparse, "WINDOW", window)  # 0: the window is one record long
    monkeypatch.setattr(parallel, "parallel_workers", lambda: 2)
    batches: list[int] = []
    real = parallel.map_batches

    def spy(fn, items):  # type: ignore[no-untyped-def]
        items = list(items)
        batches.append(len(items))
        return real(fn, items)

    monkeypatch.setattr(parallel, "map_batches", spy)
    with vmferry.open(img, "vmdk") as disk:
        layer = disk.layers[0]
        for offset, length in _spans(size):
            buf = bytearray(b"\xee" * (length + 2))  # guard bytes, and stale bytes inside
            layer.read_into(offset, memoryview(buf)[1 : 1 + length])
            assert bytes(buf[1:-1]) == data[offset : offset + length], (offset, length)
            assert buf[0] == buf[-1] == 0xEE, "read_into wrote outside its view"
            assert layer.read(offset, length) == data[offset : offset + length]
    # stored (random) grains stay on the reading thread, compressed ones go to every core
    assert bool(batches) is parallel_path


def test_convert_of_a_compressible_stream_matches_qemu(tmp_path: Path) -> None:
    data = _content("text", 200 * GRAIN)
    img = _stream_of(tmp_path, data)
    out = tmp_path / "out.raw"
    convert(img, out, dst_format="raw")
    assert out.read_bytes() == data
    qemu_img("compare", "-f", "vmdk", "-F", "raw", img, out)


def _first_marker(img: Path) -> int:
    return struct.unpack_from("<Q", img.read_bytes(), 64)[0] * 512  # the header's overhead


def test_a_damaged_grain_in_a_parallel_batch_is_a_named_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second half of the grains goes to a pool thread: its error reaches the caller."""
    monkeypatch.setattr(parallel, "parallel_workers", lambda: 2)
    img = _stream_of(tmp_path, _content("text", 64 * GRAIN))
    with vmferry.open(img, "vmdk") as disk:
        ext = disk.layers[0].parts[0]
        victim = 60
        at = ext.entry(victim) * 512
    with open(img, "r+b") as fh:
        fh.seek(at + 12)
        fh.write(b"\xff" * 16)  # not deflate any more
    with vmferry.open(img, "vmdk") as disk, pytest.raises(CorruptImageError, match="grain 60"):
        disk.layers[0].read_into(0, memoryview(bytearray(64 * GRAIN)))


def test_a_marker_running_past_the_end_of_the_file(tmp_path: Path) -> None:
    img = _stream_of(tmp_path, random.Random(3).randbytes(2 * GRAIN))
    with vmferry.open(img, "vmdk") as disk:
        last = disk.layers[0].parts[0].entry(1) * 512
    with open(img, "r+b") as fh:
        fh.seek(last + 8)
        fh.write(struct.pack("<I", 2 * GRAIN + 4096))  # allowed size, but past the end
    with (
        vmferry.open(img, "vmdk") as disk,
        pytest.raises(TruncatedImageError, match="grain 1 extends past the end"),
    ):
        disk.read(GRAIN, GRAIN)
    assert _first_marker(img) > 0


def test_small_reads_inside_one_grain_inflate_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _content("text", 16 * GRAIN)
    img = _stream_of(tmp_path, data)
    calls: list[int] = []
    real = sparse.inflate_grain

    def counting(*args):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(sparse, "inflate_grain", counting)
    with vmferry.open(img, "vmdk") as disk:
        for offset in range(10 * GRAIN, 11 * GRAIN, 4096):
            assert disk.read(offset, 4096) == data[offset : offset + 4096]
    assert len(calls) == 1
