"""convert between every pair of registered formats, with qemu-img as the judge.

Sources are made by qemu-img and written by qemu-io at scattered offsets (some unaligned, some
across block boundaries, some zero-filled data); vmferry's output must compare identical with
qemu-img compare, report the same virtual size to qemu-img info, and pass qemu-img check where
qemu can check the format.
"""

from __future__ import annotations

import random
import zlib
from pathlib import Path

import pytest

from tests.conftest import qemu_img, qemu_img_info, qemu_io
from tests.formats import EXTENSION, QEMU, our_variants, qemu_variants
from vmferry.errors import UsageError
from vmferry.ops.convert import convert

SIZE = 24 << 20
CHECKABLE = {"qcow2", "vhdx", "vdi", "vmdk"}


def _qemu_source(tmp_path: Path, fmt: str, qfmt: str, opts: str, seed: int) -> Path:
    src = tmp_path / f"src{EXTENSION[fmt]}"
    args = ["create", "-f", qfmt] + (["-o", opts] if opts else []) + [str(src), str(SIZE)]
    qemu_img(*args)
    rng = random.Random(seed)
    cmds = []
    for _ in range(12):
        length = rng.choice([512, 4096, 65536 + 512, 1 << 20, 3 << 20])
        off = rng.randrange(0, SIZE - length) // 512 * 512
        cmds.append(f"write -P {rng.randrange(1, 255)} {off} {length}")
    cmds.append(f"write -z {2 << 20} {1 << 20}")  # explicit zeros
    cmds.append(f"write -P 0 {8 << 20} {1 << 20}")  # data that happens to be zero
    qemu_io(qfmt, src, *cmds)
    return src


@pytest.mark.parametrize(
    ("src_fmt", "qfmt", "qopts"), qemu_variants(), ids=lambda v: str(v) if v else "default"
)
@pytest.mark.parametrize(("dst_fmt", "dst_opts"), our_variants(), ids=str)
def test_convert_pairs_match_qemu(
    tmp_path: Path, src_fmt: str, qfmt: str, qopts: str, dst_fmt: str, dst_opts: dict[str, str]
) -> None:
    src = _qemu_source(
        tmp_path, src_fmt, qfmt, qopts, seed=zlib.crc32(f"{src_fmt}{qopts}".encode())
    )
    dst = tmp_path / f"dst{EXTENSION[dst_fmt]}"
    result = convert(src, dst, src_format=src_fmt, options=dst_opts)
    assert result.destination_format == dst_fmt
    dq = QEMU[dst_fmt][0]
    qemu_img("compare", "-f", qfmt, "-F", dq, str(src), str(dst))
    assert qemu_img_info(dst, dq)["virtual-size"] == qemu_img_info(src, qfmt)["virtual-size"]
    if dst_fmt in CHECKABLE:
        qemu_img("check", "-f", dq, str(dst))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_convert_refuses_unknown_option_and_unknown_extension(tmp_path: Path) -> None:
    src = tmp_path / "a.raw"
    src.write_bytes(bytes(1 << 20))
    with pytest.raises(UsageError, match="does not take"):
        convert(src, tmp_path / "b.raw", options={"nonsense": "1"})
    with pytest.raises(UsageError, match="cannot tell the output format"):
        convert(src, tmp_path / "b.xyz")


def test_convert_never_leaves_partial_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "a.raw"
    src.write_bytes(b"\x01" * (4 << 20))
    import vmferry.ops.convert as conv

    def boom(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "nonzero_runs", boom)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "b.raw")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.raw"]


@pytest.mark.parametrize(("fmt", "opts"), our_variants(), ids=str)
def test_measure_predicts_the_converted_size(
    tmp_path: Path, fmt: str, opts: dict[str, str]
) -> None:
    """measure's "required" is what convert then writes (allocated, for sparse outputs)."""
    from vmferry.errors import UnsupportedFeatureError
    from vmferry.ops.measure import measure

    src = _qemu_source(tmp_path, "raw", "raw", "", seed=7)
    try:
        predicted = measure(src, fmt, options=opts)
    except UnsupportedFeatureError as exc:
        pytest.skip(str(exc))
    dst = tmp_path / f"dst{EXTENSION[fmt]}"
    convert(src, dst, options=opts)
    size = dst.stat().st_size if fmt != "raw" else dst.stat().st_blocks * 512
    assert predicted["required"] >= size * 0.97, (predicted, size)
    assert predicted["required"] <= size * 1.25 + (1 << 20), (predicted, size)
    assert predicted["fully-allocated"] >= predicted["required"]


@pytest.mark.parametrize("sync", [True, False], ids=["synced", "no-sync"])
def test_convert_syncs_before_rename_unless_told_not_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync: bool
) -> None:
    """Default: data and directory entry on disk before convert returns; ``sync=False`` (the
    CLI's --no-sync, qemu-img's default) skips both syncs but still renames only when done."""
    import os

    src = _qemu_source(tmp_path, "qcow2", "qcow2", "", seed=7)
    synced: list[str] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        os, "fdatasync", lambda fd: (synced.append("fdatasync"), real_fdatasync(fd))[1]
    )
    dst = tmp_path / "out.vhdx"
    convert(src, dst, sync=sync)
    assert bool(synced) == sync, synced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.vhdx", src.name]
    qemu_img("compare", "-f", "qcow2", "-F", "vhdx", str(src), str(dst))
