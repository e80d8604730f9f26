"""Zero detection: convert leaves out the same 4 KiB zero pages qemu-img convert leaves out.

qemu-img convert (its ``-S 4k`` default) is the judge: a source whose data mixes zero pages,
pages with one stray byte (first, last or middle), and random pages is converted to raw by
both tools, and the outputs must hold data in exactly the same places (``qemu-img map``) and
compare identical.  ``nonzero_runs`` is also held to the plain definition on buffers of every
shape, whatever object type and alignment they come in.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from tests.conftest import qemu_img
from vmferry.ops.convert import convert
from vmferry.ops.sparse import is_zero, nonzero_runs

PAGE = 4096


def _source(path: Path, pages: int, seed: int) -> None:
    rnd = random.Random(seed)
    buf = bytearray(pages * PAGE)
    for p in range(pages):
        kind = rnd.choice(["zero", "zero", "first", "last", "middle", "random", "random"])
        at = p * PAGE
        if kind == "first":
            buf[at] = rnd.randrange(1, 256)
        elif kind == "last":
            buf[at + PAGE - 1] = rnd.randrange(1, 256)
        elif kind == "middle":
            buf[at + rnd.randrange(1, PAGE - 1)] = rnd.randrange(1, 256)
        elif kind == "random":
            buf[at : at + PAGE] = rnd.randbytes(PAGE)
    path.write_bytes(buf)  # fully allocated: only zero detection can make the output sparse


def _data_pages(path: Path) -> set[int]:
    """Pages holding data, except the first: qemu's file driver allocates the first block of
    every file it creates (for its O_DIRECT alignment probe), whatever it then writes."""
    out = json.loads(qemu_img("map", "--output=json", "-f", "raw", path).stdout)
    pages = set()
    for e in out:
        if e["data"]:
            pages |= set(range(e["start"] // PAGE, (e["start"] + e["length"]) // PAGE))
    return pages - {0}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_convert_skips_the_zero_pages_qemu_img_skips(tmp_path: Path, seed: int) -> None:
    src = tmp_path / "src.raw"
    _source(src, 3000, seed)  # ~12 MiB: more than one convert chunk
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    convert(src, ours)
    qemu_img("convert", "-f", "raw", "-O", "raw", src, theirs)
    qemu_img("compare", "-f", "raw", "-F", "raw", ours, theirs)
    assert _data_pages(ours) == _data_pages(theirs)
    assert os.stat(ours).st_blocks < os.stat(src).st_blocks  # it did leave pages out


def _reference(buf: bytes, base: int, g: int) -> list[tuple[int, int]]:
    """The definition, one piece at a time: pieces aligned to the disk, runs merged."""
    runs: list[tuple[int, int]] = []
    pos = 0
    while pos < len(buf):
        end = min(pos + g - (base + pos) % g, len(buf))
        if any(buf[pos:end]):
            if runs and runs[-1][0] + runs[-1][1] == base + pos:
                runs[-1] = (runs[-1][0], runs[-1][1] + end - pos)
            else:
                runs.append((base + pos, end - pos))
        pos = end
    return runs


def test_nonzero_runs_follow_the_definition() -> None:
    rnd = random.Random(7)
    for _ in range(400):
        n = rnd.choice([0, 1, 511, 4095, 4096, 4097, 12288, 50000, 200000])
        buf = bytearray(n)
        for _ in range(rnd.randint(0, 6)):
            if n == 0:
                break
            start = rnd.randrange(n)
            length = rnd.randint(1, min(n - start, 20000))
            if rnd.random() < 0.5:
                buf[start : start + length] = rnd.randbytes(length)
            else:  # sparse bytes: pieces whose first byte is zero but that are not empty
                step = rnd.choice([1, 512, 4096, 4097])
                for p in range(start, start + length, step):
                    buf[p] = rnd.randrange(1, 256)
        base = rnd.choice([0, 512, 4095, 4096 * 7 + 13, 1 << 40])
        g = rnd.choice([4096, 512, 65536])
        want = _reference(bytes(buf), base, g)
        # a slice of a larger (reused) buffer
        inside = memoryview(b"\x01" * 7 + bytes(buf) + b"\x01")[7 : 7 + n]
        for obj in (bytes(buf), buf, memoryview(buf), inside):
            assert list(nonzero_runs(obj, base, g)) == want
        assert is_zero(buf) == (not any(buf))
        assert is_zero(inside) == (not any(buf))


def test_zero_check_of_views_longer_than_the_shared_zero_buffer() -> None:
    big = bytearray((32 << 20) + 8192)
    assert is_zero(memoryview(big))
    assert list(nonzero_runs(memoryview(big), 0)) == []
    big[-1] = 1
    assert not is_zero(memoryview(big))
    assert list(nonzero_runs(memoryview(big), 0)) == [(len(big) - 4096, 4096)]
    assert list(nonzero_runs(memoryview(big).cast("I"), 0)) == [(len(big) - 4096, 4096)]
