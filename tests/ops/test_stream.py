"""The one streaming pass of `fix -o` and migrate: a chain with an overlay's edits laid over it.

Oracles: qemu-img (compare, check) on what was written, and the plan checked piece by piece
against the edits that were made.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.conftest import qemu_img
from vmferry.chain import open_chain
from vmferry.disk import driver_by_name
from vmferry.errors import UsageError
from vmferry.guest.overlay import Overlay
from vmferry.ops.stream import read_plan, stream_to_image

MIB = 1 << 20
CHUNK = 1 << 20


def _raw(path: Path, size: int, data: list[tuple[int, int]]) -> Path:
    rnd = random.Random(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in data:
            f.seek(off)
            f.write(rnd.randbytes(n))
    return path


def test_read_plan_reads_only_changed_pieces_through_the_overlay(tmp_path: Path) -> None:
    raw = _raw(tmp_path / "d.raw", 64 * MIB, [(0, 20 * MIB)])
    with open_chain(raw) as chain:
        ov = Overlay(chain)
        ov.write(3 * MIB, b"x" * 100)  # inside data
        ov.write(40 * MIB, b"y" * 5000)  # where the source has a hole
        plan = read_plan(chain, ov, CHUNK)
        through = [(o, n) for o, n, src in plan if src is ov]
        direct = [(o, n) for o, n, src in plan if src is not ov]
        assert through == [(3 * MIB, CHUNK), (40 * MIB, 8192)]  # overlay chunks are 4 KiB
        pieces = [(o, CHUNK) for o in range(0, 20 * MIB, CHUNK)]
        assert direct == [p for p in pieces if p[0] != 3 * MIB]
        assert all(src is chain.layers[0] for _, _, src in plan if src is not ov)
        offsets = [o for o, _, _ in plan]
        assert offsets == sorted(offsets)


def test_edits_that_straddle_data_and_holes_become_pieces_of_their_own(tmp_path: Path) -> None:
    raw = _raw(tmp_path / "d.raw", 16 * MIB, [(4 * MIB, 2 * MIB)])
    with open_chain(raw) as chain:
        ov = Overlay(chain)
        ov.write(3 * MIB + 4096, b"z" * (MIB + 8192))  # hole, then into the data run
        plan = read_plan(chain, ov, CHUNK)
        spans = [(o, n, src is ov) for o, n, src in plan]
        assert spans == [
            (3 * MIB + 4096, MIB - 4096, True),  # the hole part, through the overlay
            (4 * MIB, MIB, True),  # the data piece holding edited bytes
            (5 * MIB, MIB, False),
        ]


@pytest.mark.parametrize(
    ("name", "fmt", "options", "qfmt"),
    [
        ("out.qcow2", "qcow2", {}, "qcow2"),
        ("out.vmdk", "vmdk", {"subformat": "streamOptimized"}, "vmdk"),
        ("out.vhdx", "vhdx", {}, "vhdx"),
    ],
)
def test_stream_writes_source_plus_edits_once_in_disk_order(
    tmp_path: Path, name: str, fmt: str, options: dict[str, str], qfmt: str
) -> None:
    """streamOptimized output is append-only: it refuses any write behind one already made,
    so it passing proves each block went out once, in order."""
    raw = _raw(tmp_path / "d.raw", 32 * MIB, [(0, 6 * MIB), (20 * MIB, 3 * MIB)])
    want = bytearray(raw.read_bytes())
    seen: list[int] = []
    with open_chain(raw) as chain:
        ov = Overlay(chain)
        for off, data in ((MIB + 10, b"a" * 70000), (12 * MIB, b"b" * 4096), (22 * MIB, b"c" * 9)):
            ov.write(off, data)
            want[off : off + len(data)] = data
        out = tmp_path / name
        done = stream_to_image(
            read_plan(chain, ov, CHUNK),
            chain.virtual_size,
            out,
            driver_by_name(fmt),
            options,
            tap=lambda off, data: seen.append(off),
        )
    expect = tmp_path / "want.raw"
    expect.write_bytes(want)
    assert qemu_img("compare", "-f", qfmt, "-F", "raw", str(out), str(expect)).returncode == 0
    assert qemu_img("check", "-f", qfmt, str(out)).returncode == 0
    assert seen == sorted(seen) and len(seen) == len(set(seen))
    assert done.bytes_read == 6 * MIB + 3 * MIB + 4096
    assert done.virtual_size == 32 * MIB


def test_unknown_option_is_refused_before_any_file_is_made(tmp_path: Path) -> None:
    raw = _raw(tmp_path / "d.raw", 4 * MIB, [(0, MIB)])
    with open_chain(raw) as chain, pytest.raises(UsageError, match="does not take"):
        stream_to_image(
            read_plan(chain, None),
            4 * MIB,
            tmp_path / "o.qcow2",
            driver_by_name("qcow2"),
            {"bogus": "1"},
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.raw"]


def test_a_write_error_names_the_output_not_its_hidden_temporary(tmp_path: Path) -> None:
    """Pieces out of order are refused by a streamOptimized output; the error must name the
    file the user asked for (the temporary one is deleted on the way out)."""
    from vmferry.errors import UnsupportedFeatureError

    raw = _raw(tmp_path / "d.raw", 8 * MIB, [(0, 4 * MIB)])
    out = tmp_path / "o.vmdk"
    with open_chain(raw) as chain:
        backwards = sorted(read_plan(chain, None), key=lambda p: -p[0])
        with pytest.raises(UnsupportedFeatureError, match="front to back") as err:
            stream_to_image(
                backwards, 8 * MIB, out, driver_by_name("vmdk"), {"subformat": "streamOptimized"}
            )
    assert err.value.path == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.raw"]
