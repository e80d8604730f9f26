"""qcow2 writing: what vmferry writes, qemu-img checks clean and reads identically.

Oracles: ``qemu-img check`` (refcounts, leaks, corruptions), ``qemu-img compare`` against a raw
reference written alongside, ``qemu-img info``, and qemu-io reading and writing vmferry's images.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

import vmferry
from tests.conftest import qemu_img, qemu_img_info, qemu_io
from tests.disk.test_qcow2_read import our_map_data, qemu_map_data
from vmferry.disk import BlockFile, ParentInfo
from vmferry.disk.qcow2 import Qcow2
from vmferry.errors import CorruptImageError, UnsupportedFeatureError, UsageError
from vmferry.ops.convert import convert

MiB = 1 << 20


def qemu_check(img: Path) -> dict:
    proc = qemu_img("check", "--output=json", "-f", "qcow2", str(img), check=False)
    assert proc.returncode in (0, 2, 3), proc.stderr
    return json.loads(proc.stdout)


def assert_clean(img: Path) -> None:
    result = qemu_check(img)
    assert result.get("corruptions", 0) == 0 and result.get("leaks", 0) == 0, result
    assert result.get("check-errors", 0) == 0, result
    layer = Qcow2.open(BlockFile.open(img))
    try:
        assert layer.check().clean
    finally:
        layer.close()


def assert_same(img: Path, ref: Path, fmt_ref: str = "raw") -> None:
    qemu_img("compare", "-q", "-f", "qcow2", "-F", fmt_ref, str(img), str(ref))


def random_ops(
    disk: vmferry.Chain, ref: bytearray, seed: int, count: int = 120, zero_share: float = 0.2
) -> None:
    rnd = random.Random(seed)
    size = len(ref)
    for i in range(count):
        off = rnd.randrange(size)
        n = min(rnd.randrange(1, 400_000), size - off)
        if rnd.random() < zero_share:
            disk.write_zeroes(off, n)
            ref[off : off + n] = bytes(n)
        else:
            data = rnd.randbytes(n) if i % 2 else bytes([i % 251 + 1]) * n
            disk.write(off, data)
            ref[off : off + n] = data


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"compat": "0.10"},
        {"cluster_size": "512"},  # the refcount table has to grow (and move)
        {"cluster_size": "4K", "refcount_bits": "8"},
        {"cluster_size": "16K", "refcount_bits": "32"},
        {"cluster_size": "2M", "refcount_bits": "64"},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_random_writes_check_clean_and_compare(tmp_path: Path, opts: dict[str, str]) -> None:
    img, raw = tmp_path / "w.qcow2", tmp_path / "w.raw"
    size = 20 * MiB + 3 * 512
    ref = bytearray(size)
    with vmferry.create(img, "qcow2", size, **opts) as disk:
        random_ops(disk, ref, seed=len(str(opts)))
    raw.write_bytes(bytes(ref))
    assert_clean(img)
    assert_same(img, raw)
    if opts.get("cluster_size") == "512":
        layer = Qcow2.open(BlockFile.open(img))
        assert layer.meta.refcount_table_clusters > 1  # the table really moved and grew
        layer.close()
    with vmferry.open(img) as disk:  # what is allocated: the same answer as qemu-img map
        assert our_map_data(disk) == qemu_map_data(img)
    info = qemu_img_info(img)
    assert info["virtual-size"] == size
    assert info["format-specific"]["data"]["compat"] == opts.get("compat", "1.1")
    # and reopened, it keeps taking writes (in-place and new clusters, zero clusters freed)
    with vmferry.open(img, writable=True) as disk:
        random_ops(disk, ref, seed=99, count=40, zero_share=0.4)
    raw.write_bytes(bytes(ref))
    assert_clean(img)
    assert_same(img, raw)


def test_write_zeroes_frees_and_marks_zero(tmp_path: Path) -> None:
    img = tmp_path / "z.qcow2"
    with vmferry.create(img, "qcow2", 16 * MiB) as disk:
        disk.write(0, os.urandom(8 * MiB))
        disk.flush()
        before = os.stat(img).st_blocks
        disk.write_zeroes(MiB, 4 * MiB + 100)  # whole clusters + a partial one
        disk.flush()
        assert disk.read(MiB, 4 * MiB + 100) == bytes(4 * MiB + 100)
    qmap = json.loads(qemu_img("map", "--output=json", str(img)).stdout)
    zero = [e for e in qmap if e["zero"] and not e["data"] and e["start"] < 8 * MiB]
    assert zero and zero[0]["start"] == MiB and zero[0]["length"] == 4 * MiB
    assert os.stat(img).st_blocks < before - (3 * MiB) // 512  # freed clusters punched out
    assert_clean(img)


def test_qemu_io_writes_into_vmferry_image(tmp_path: Path) -> None:
    img, raw = tmp_path / "i.qcow2", tmp_path / "i.raw"
    ref = bytearray(8 * MiB)
    with vmferry.create(img, "qcow2", len(ref), cluster_size="4K") as disk:
        random_ops(disk, ref, seed=5, count=30)
    qemu_io("qcow2", img, "write -P 0x77 100k 300k", "write -z 1M 64k")
    ref[100 * 1024 : 400 * 1024] = b"\x77" * (300 * 1024)
    ref[MiB : MiB + 65536] = bytes(65536)
    raw.write_bytes(bytes(ref))
    assert_clean(img)
    with vmferry.open(img) as disk:
        assert disk.read(0, len(ref)) == ref


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_output(tmp_path: Path, ctype: str) -> None:
    if ctype == "zstd":
        pytest.importorskip("zstandard", reason="python zstandard is not installed")
    src = tmp_path / "src.raw"
    rnd = random.Random(3)
    data = bytearray(12 * MiB + 512)
    for _ in range(50):
        off = rnd.randrange(len(data) - 100_000)
        data[off : off + 90_000] = bytes(rnd.randrange(3) + 1 for _ in range(900)) * 100
    data[4 * MiB : 4 * MiB + 200_000] = rnd.randbytes(200_000)  # stays uncompressed
    src.write_bytes(bytes(data))
    dst = tmp_path / "out.qcow2"
    convert(src, dst, options={"compress": "on", "compression_type": ctype})
    assert_clean(dst)
    assert_same(dst, src)
    info = qemu_img_info(dst)
    assert info["format-specific"]["data"]["compression-type"] == ctype
    assert os.path.getsize(dst) < len(data) // 2
    qmap = json.loads(qemu_img("map", "--output=json", str(dst)).stdout)
    assert any(e["data"] and "offset" not in e for e in qmap)  # compressed: no host offset
    # writes over compressed clusters copy them out (and release the compressed bytes)
    with vmferry.open(dst, writable=True) as disk:
        disk.write(10_000, b"\xee" * 70_000)
        data[10_000:80_000] = b"\xee" * 70_000
        disk.write_zeroes(3 * MiB, MiB)
        data[3 * MiB : 4 * MiB] = bytes(MiB)
    src.write_bytes(bytes(data))
    assert_clean(dst)
    assert_same(dst, src)


@pytest.mark.parametrize("parent_format", ["qcow2", "raw"])
def test_backing_chain_written_by_vmferry(tmp_path: Path, parent_format: str) -> None:
    base = tmp_path / f"base.{parent_format}"
    size = 10 * MiB
    rnd = random.Random(11)
    ref = bytearray(rnd.randbytes(size))
    if parent_format == "raw":
        base.write_bytes(bytes(ref))
    else:
        qemu_img("create", "-q", "-f", "qcow2", str(base), str(size))
        raw0 = tmp_path / "raw0"
        raw0.write_bytes(bytes(ref))
        qemu_img("convert", "-n", "-f", "raw", "-O", "qcow2", str(raw0), str(base))
    sub = tmp_path / "sub"
    sub.mkdir()
    child = sub / "child.qcow2"
    with vmferry.create(child, "qcow2", parent=base, parent_format=parent_format) as disk:
        assert disk.top.write_alignment == 65536
        # unaligned writes: Chain.write completes clusters from the parent.  (Unaligned
        # write_zeroes on an overlay are refused by the layer; Chain does not widen them yet.)
        random_ops(disk, ref, seed=12, count=60, zero_share=0)
        disk.write_zeroes(2 * MiB, 128 * 1024)  # whole clusters: zero flag hides the parent
        ref[2 * MiB : 2 * MiB + 128 * 1024] = bytes(128 * 1024)
    info = qemu_img_info(child)
    assert info["backing-filename"] == f"../base.{parent_format}"
    assert info["backing-filename-format"] == parent_format
    assert_clean(child)
    flat = tmp_path / "flat.raw"
    flat.write_bytes(bytes(ref))
    assert_same(child, flat)  # qemu reads vmferry's chain
    with vmferry.open(child, allowed_dirs=[tmp_path]) as disk:
        assert len(disk.layers) == 2
        assert disk.read(0, size) == ref


def test_partial_write_to_overlay_refused_by_the_layer(tmp_path: Path) -> None:
    base = tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(MiB))
    child = tmp_path / "c.qcow2"
    vmferry.create(child, "qcow2", parent=base).close()
    layer = Qcow2.open(BlockFile.open(child, writable=True), writable=True)
    try:
        with pytest.raises(UsageError, match="backing file"):
            layer.write(100, b"x")
        with pytest.raises(UsageError, match="backing file"):
            layer.write_zeroes(100, 5)
        layer.write(0, b"y" * 65536)  # a whole cluster needs nobody
    finally:
        layer.close()
    assert_clean(child)


def test_chain_of_three_qemu_reads(tmp_path: Path) -> None:
    size = 4 * MiB
    ref = bytearray(size)
    parent = None
    for i in range(3):
        img = tmp_path / f"l{i}.qcow2"
        with vmferry.create(img, "qcow2", None if parent else size, parent) as disk:
            random_ops(disk, ref, seed=20 + i, count=15, zero_share=0 if parent else 0.2)
        parent = img
    flat = tmp_path / "flat.raw"
    flat.write_bytes(bytes(ref))
    assert_same(tmp_path / "l2.qcow2", flat)
    for i in range(3):
        assert_clean(tmp_path / f"l{i}.qcow2")


def test_set_parent_rebase(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(2 * MiB))
    qemu_io("qcow2", base, "write -P 0x42 0 2M")
    child = tmp_path / "child.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(child))
    qemu_io("qcow2", child, "write -P 0x43 64k 64k")
    moved = tmp_path / "moved"
    moved.mkdir()
    copy = moved / "base-copy.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(base), str(copy))
    parent = vmferry.open(copy, "raw")
    layer = Qcow2.open(BlockFile.open(child, writable=True), writable=True)
    try:
        layer.set_parent(ParentInfo(parent.top, str(copy), "moved/base-copy.raw", "raw"))
    finally:
        layer.close()
        parent.close()
    info = qemu_img_info(child)
    assert info["backing-filename"] == "moved/base-copy.raw"
    assert info["backing-filename-format"] == "raw"
    assert_clean(child)
    qemu_io("qcow2", child, "read -P 0x42 0 64k", "read -P 0x43 64k 64k", "read -P 0x42 1M 1M")
    with vmferry.open(child, allowed_dirs=[moved]) as disk:
        assert disk.read(0, 65536) == b"\x42" * 65536


def test_resize_grows(tmp_path: Path) -> None:
    img = tmp_path / "r.qcow2"
    with vmferry.create(img, "qcow2", 3 * MiB, cluster_size="512") as disk:
        disk.write(MiB, b"\x17" * MiB)
    layer = Qcow2.open(BlockFile.open(img, writable=True), writable=True)
    try:
        layer.resize(40 * MiB)  # the L1 table has to move (512-byte clusters)
        layer.write(39 * MiB, b"\x18" * 4096)
    finally:
        layer.close()
    assert qemu_img_info(img)["virtual-size"] == 40 * MiB
    assert_clean(img)
    qemu_io("qcow2", img, "read -P 0x17 1M 1M", "read -P 0x18 39M 4k", "read -P 0 2M 37M")


def test_autoclear_bits_cleared_on_write(tmp_path: Path) -> None:
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(MiB))
    raw = bytearray(img.read_bytes())
    raw[88:96] = (1 << 40).to_bytes(8, "big")  # an autoclear bit nobody knows
    img.write_bytes(bytes(raw))
    with vmferry.open(img, writable=True) as disk:
        assert disk.top.meta.autoclear == 1 << 40  # opening alone changes nothing
        disk.write(0, b"a" * 512)
    assert int.from_bytes(img.read_bytes()[88:96], "big") == 0
    assert_clean(img)


def _set_incompat(img: Path, bit: int) -> None:
    raw = bytearray(img.read_bytes())
    value = int.from_bytes(raw[72:80], "big") | 1 << bit
    raw[72:80] = value.to_bytes(8, "big")
    img.write_bytes(bytes(raw))


def test_dirty_and_corrupt_bits(tmp_path: Path) -> None:
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(MiB))
    qemu_io("qcow2", img, "write -P 0x31 0 64k")
    dirty = tmp_path / "dirty.qcow2"
    shutil.copy(img, dirty)
    _set_incompat(dirty, 0)
    with vmferry.open(dirty) as disk:  # read-only: refcounts are not needed
        assert disk.read(0, 65536) == b"\x31" * 65536
        assert disk.info()["dirty"]
    corrupt = tmp_path / "corrupt.qcow2"
    shutil.copy(img, corrupt)
    _set_incompat(corrupt, 1)
    with vmferry.open(corrupt) as disk:
        assert disk.read(0, 65536) == b"\x31" * 65536
        assert any("corrupt" in w for w in disk.info()["warnings"])
    with pytest.raises(CorruptImageError, match="marked corrupt"):
        vmferry.open(corrupt, writable=True)


def test_dirty_image_refcounts_rebuilt_on_writable_open(tmp_path: Path) -> None:
    """qemu with lazy refcounts killed mid-session: refcounts stale, dirty bit set."""
    img = tmp_path / "lazy.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(img), str(16 * MiB))
    proc = subprocess.run(
        [
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -P 0x22 5M 300k",
            "-c",
            "sigraise 9",
            str(img),
        ],
        capture_output=True,
    )
    assert proc.returncode != 0  # killed, as intended
    assert int.from_bytes(img.read_bytes()[72:80], "big") & 1  # dirty
    assert qemu_check(img).get("corruptions", 0) > 0  # refcounts are stale
    with vmferry.open(img) as disk:  # read-only: no rebuild, reads are right
        assert disk.read(0, MiB) == b"\x11" * MiB
        assert disk.top.check().corruptions
    assert int.from_bytes(img.read_bytes()[72:80], "big") & 1
    with vmferry.open(img, writable=True) as disk:
        assert any("rebuilt" in w for w in disk.info()["warnings"])
        disk.write(8 * MiB, b"\x33" * MiB)
    assert not int.from_bytes(img.read_bytes()[72:80], "big") & 1
    assert_clean(img)
    qemu_io("qcow2", img, "read -P 0x11 0 1M", "read -P 0x22 5M 300k", "read -P 0x33 8M 1M")


def test_internal_snapshots_are_read_only(tmp_path: Path) -> None:
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(MiB))
    qemu_io("qcow2", img, "write -P 0x01 0 64k")
    qemu_img("snapshot", "-c", "first", str(img))
    qemu_io("qcow2", img, "write -P 0x02 0 64k")
    with pytest.raises(UnsupportedFeatureError, match="snapshots"):
        vmferry.open(img, writable=True)
    layer = Qcow2.open(BlockFile.open(img), snapshot="first")
    try:
        assert layer.read(0, 65536) == b"\x01" * 65536
    finally:
        layer.close()
    with vmferry.open(img) as disk:
        assert disk.read(0, 65536) == b"\x02" * 65536
        assert disk.top.check().clean  # shared clusters: refcount 2, COPIED clear


def test_check_finds_leaks_and_corruptions_like_qemu(tmp_path: Path) -> None:
    img = tmp_path / "k.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(4 * MiB))
    qemu_io("qcow2", img, "write -P 0x09 0 1M")
    layer = Qcow2.open(BlockFile.open(img))
    rt_off = layer.meta.refcount_table_offset
    layer.close()
    raw = bytearray(img.read_bytes())
    block_off = int.from_bytes(raw[rt_off : rt_off + 8], "big")
    n = len(raw) // 65536
    # a leak: one more cluster at the end of the file, counted but referenced by nothing
    raw[block_off + 2 * n : block_off + 2 * n + 2] = (1).to_bytes(2, "big")
    leaky = tmp_path / "leaky.qcow2"
    leaky.write_bytes(bytes(raw) + bytes(65536))
    # a corruption: the last data cluster's refcount dropped to zero
    raw2 = bytearray(img.read_bytes())
    last = block_off + 2 * (n - 1)
    raw2[last : last + 2] = bytes(2)
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(bytes(raw2))
    for path, corrupt, leaks in ((leaky, False, True), (broken, True, False)):
        q = qemu_check(path)
        assert (q.get("corruptions", 0) > 0) == corrupt
        assert (q.get("leaks", 0) > 0) == leaks
        layer = Qcow2.open(BlockFile.open(path))
        try:
            report = layer.check()
        finally:
            layer.close()
        assert bool(report.corruptions) == corrupt
        assert bool(report.leaks) == leaks


def test_create_options(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cluster_size"):
        vmferry.create(tmp_path / "a.qcow2", "qcow2", MiB, cluster_size="3000")
    with pytest.raises(UsageError, match="compat"):
        vmferry.create(tmp_path / "b.qcow2", "qcow2", MiB, compat="2.0")
    with pytest.raises(UsageError, match="zstd"):
        vmferry.create(tmp_path / "c.qcow2", "qcow2", MiB, compat="0.10", compression_type="zstd")
    with pytest.raises(UnsupportedFeatureError, match="extended L2"):
        vmferry.create(tmp_path / "d.qcow2", "qcow2", MiB, extended_l2="on")
    # a size that is not a whole number of sectors is rounded up, as qemu-img does
    vmferry.create(tmp_path / "e.qcow2", "qcow2", MiB + 1).close()
    assert qemu_img_info(tmp_path / "e.qcow2")["virtual-size"] == MiB + 512
    assert_clean(tmp_path / "e.qcow2")


def test_measure_agrees_with_output_and_qemu(tmp_path: Path) -> None:
    src = tmp_path / "m.raw"
    with open(src, "wb") as f:
        f.truncate(256 * MiB)
        for off in (0, 70 * MiB, 200 * MiB + 4096):
            f.seek(off)
            f.write(os.urandom(3 * MiB))
    with vmferry.open(src, "raw") as disk:
        ranges = [(e.offset, e.length) for e in disk.map() if e.data]
    required, full = Qcow2.measure(256 * MiB, ranges, {})
    out = tmp_path / "m.qcow2"
    convert(src, out)
    assert os.path.getsize(out) <= required <= os.path.getsize(out) + 4 * 65536
    qemu = qemu_img("measure", "--output=json", "-O", "qcow2", "--size", str(256 * MiB)).stdout
    assert full == json.loads(qemu)["fully-allocated"]
