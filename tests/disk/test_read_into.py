"""``read_into`` gives exactly what ``read`` gives, for every driver and subformat qemu-img makes.

Copies (convert, merge) read through ``read_into`` into reused page-aligned buffers; the
drivers that override it map extents to file offsets themselves, so it is checked against
``read`` on images qemu-io wrote (data, zeroed and untouched ranges, a compressed cluster),
at offsets and lengths that cut through sectors, blocks and extents.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.conftest import qemu_img, qemu_io
from tests.formats import EXTENSION, qemu_variants
from vmferry.chain import open_chain

SIZE = 24 << 20


@pytest.mark.parametrize(("name", "qfmt", "opts"), qemu_variants())
def test_read_into_equals_read(tmp_path: Path, name: str, qfmt: str, opts: str) -> None:
    path = tmp_path / f"img{EXTENSION[name]}"
    qemu_img("create", "-f", qfmt, *(["-o", opts] if opts else []), str(path), str(SIZE))
    rnd = random.Random(f"{name}{opts}")
    writes = []
    for k in range(12):
        off = rnd.randrange(0, SIZE - (1 << 20)) // 512 * 512
        n = rnd.choice([512, 4096, 65536 + 512, 1 << 20])
        writes.append(f"write -P {k + 1} {off} {n}")
    writes.append(f"write -z {3 << 20} {1 << 20}")
    qemu_io(qfmt, path, *writes)
    with open_chain(path, name) as chain:
        layer = chain.layers[0]
        spans = [(0, SIZE), (511, 3 << 20), (SIZE - 4097, 4097)]
        spans += [
            (o, rnd.randint(1, min(4 << 20, SIZE - o)))
            for o in (rnd.randrange(SIZE) for _ in range(40))
        ]
        for offset, length in spans:
            buf = bytearray(b"\xee" * (length + 2))  # guard bytes on both sides
            view = memoryview(buf)[1 : 1 + length]
            layer.read_into(offset, view)
            assert bytes(buf[1:-1]) == layer.read(offset, length), (offset, length)
            assert buf[0] == buf[-1] == 0xEE, "read_into wrote outside its view"


def test_read_into_of_a_compressed_qcow2(tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    data = random.Random(5).randbytes(3 << 20) + bytes(1 << 20) + b"text " * 200_000
    raw.write_bytes(data)
    path = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    with open_chain(path, "qcow2") as chain:
        layer = chain.layers[0]
        for offset, length in [(0, len(data)), (65536 - 7, 200_000), (3 << 20, 1 << 20)]:
            view = memoryview(bytearray(length))
            layer.read_into(offset, view)
            assert view.tobytes() == data[offset : offset + length]
