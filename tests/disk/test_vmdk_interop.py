"""VMDK against qemu-img/qemu-io, both ways, for every subformat qemu-img writes."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

import vmferry
from tests.conftest import qemu_img, qemu_img_info, qemu_io
from vmferry.disk import Alloc
from vmferry.errors import ParentMismatchError

SIZE = 48 << 20
SUBFORMATS = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
]
SPARSE = {"monolithicSparse", "twoGbMaxExtentSparse", "streamOptimized"}


def _random_writes(seed: int, count: int = 12) -> list[tuple[int, int, int]]:
    """(offset, length, byte) with odd offsets and lengths: partial sectors and grains."""
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        off = rnd.randrange(0, SIZE - 300_000)
        out.append((off, rnd.randrange(1, 300_000), rnd.randrange(1, 256)))
    return out


def _model(writes: list[tuple[int, int, int]]) -> bytearray:
    ref = bytearray(SIZE)
    for off, length, byte in writes:
        ref[off : off + length] = bytes([byte]) * length
    return ref


@pytest.mark.parametrize("sub", SUBFORMATS)
def test_qemu_made_images_read_identically(tmp_path: Path, sub: str) -> None:
    img = tmp_path / f"q-{sub}.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", f"subformat={sub}", img, str(SIZE))
    raw = tmp_path / "ref.raw"
    if sub == "streamOptimized":
        # qemu writes streamOptimized only through convert (compressed, whole clusters)
        writes = _random_writes(1)
        raw.write_bytes(_model(writes))
        img.unlink()
        qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={sub}", raw, img)
    else:
        writes = _random_writes(2)
        cmds = [f"write -P {b} {o} {n}" for o, n, b in writes]
        qemu_io("vmdk", img, *cmds)
        qemu_img("convert", "-f", "vmdk", "-O", "raw", img, raw)
    expected = raw.read_bytes()
    assert expected == _model(writes)
    with vmferry.open(img, "vmdk") as disk:
        assert disk.virtual_size == SIZE
        assert disk.read(0, SIZE) == expected
        info = disk.info()
        assert info["create_type"] == sub
        # every ZERO / UNALLOCATED run really reads as zeros
        for ext in disk.top.extents():
            if ext.alloc is not Alloc.DATA:
                assert expected[ext.offset : ext.end] == bytes(ext.length)
    probed = vmferry.open(img)
    assert probed.format == "vmdk"
    probed.close()


@pytest.mark.parametrize("sub", [*SUBFORMATS, "vmfs"])
@pytest.mark.parametrize("adapter", ["ide", "lsilogic"])
def test_vmferry_made_images_pass_qemu(tmp_path: Path, sub: str, adapter: str) -> None:
    img = tmp_path / "out.vmdk"
    writes = _random_writes(3)
    if sub == "streamOptimized":
        writes.sort()  # a stream is written front to back
        writes = [
            (o, n, b) for i, (o, n, b) in enumerate(writes) if i == 0 or o >= sum(writes[i - 1][:2])
        ]
    ref = _model(writes)
    with vmferry.create(img, "vmdk", SIZE, subformat=sub, adapter_type=adapter) as disk:
        for off, length, byte in writes:
            disk.write(off, bytes([byte]) * length)
    raw = tmp_path / "ref.raw"
    raw.write_bytes(ref)
    info = qemu_img_info(img, "vmdk")
    assert info["virtual-size"] == SIZE
    assert info["format-specific"]["data"]["create-type"] == sub
    qemu_img("compare", "-f", "vmdk", "-F", "raw", img, raw)
    if sub in SPARSE:
        qemu_img("check", "-f", "vmdk", img)
    with vmferry.open(img) as disk:
        assert disk.read(0, SIZE) == ref
        assert disk.top.check().clean, disk.top.check()
        assert disk.info()["adapter_type"] == adapter


def test_vmfs_thin_is_an_esxi_vmfs_descriptor(tmp_path: Path) -> None:
    img = tmp_path / "thin.vmdk"
    with vmferry.create(img, "vmdk", SIZE, subformat="vmfsThin", adapter_type="pvscsi") as d:
        d.write(5 << 20, b"\x42" * 4096)
    text = img.read_text()
    assert 'createType="vmfs"' in text and 'ddb.thinProvisioned = "1"' in text
    assert 'RW 98304 VMFS "thin-flat.vmdk"' in text
    flat = tmp_path / "thin-flat.vmdk"
    assert flat.stat().st_size == SIZE and flat.stat().st_blocks * 512 < 1 << 20
    qemu_img("compare", "-f", "vmdk", "-F", "raw", img, flat)
    assert flat.read_bytes()[5 << 20 : (5 << 20) + 4096] == b"\x42" * 4096


def test_qemu_delta_over_vmdk_reads_through_vmferry(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    child = tmp_path / "base-000001.vmdk"
    qemu_img("create", "-f", "vmdk", base, str(SIZE))
    qemu_io("vmdk", base, "write -P 0x11 0 8M", "write -P 0x22 20M 1M")
    qemu_img("create", "-f", "vmdk", "-b", base.name, "-F", "vmdk", child)
    qemu_io("vmdk", child, "write -P 0x33 4M 100k", "write -P 0x44 21M 3")
    raw = tmp_path / "flat.raw"
    qemu_img("convert", "-f", "vmdk", "-O", "raw", child, raw)
    with vmferry.open(child) as disk:
        assert len(disk.layers) == 2
        assert disk.read(0, SIZE) == raw.read_bytes()
        ref = disk.top.parent_ref()
        assert ref is not None and ref.identity["cid"] == disk.layers[1].identity()["cid"]


def test_vmferry_delta_over_vmdk_reads_through_qemu(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    with vmferry.create(base, "vmdk", SIZE) as disk:
        disk.write(0, b"\x11" * (8 << 20))
        disk.write(20 << 20, b"\x22" * (1 << 20))
    child = tmp_path / "base-000001.vmdk"
    with vmferry.create(child, "vmdk", parent=base) as disk:
        assert disk.top.write_alignment == 65536
        disk.write(4 << 20, b"\x33" * 100_000)  # partial grains: completed from the parent
        disk.write(21 << 20, b"\x44" * 3)
        disk.write_zeroes(30 << 20, 1 << 20)
    expected = bytearray(SIZE)
    expected[0 : 8 << 20] = b"\x11" * (8 << 20)
    expected[20 << 20 : 21 << 20] = b"\x22" * (1 << 20)
    expected[4 << 20 : (4 << 20) + 100_000] = b"\x33" * 100_000
    expected[21 << 20 : (21 << 20) + 3] = b"\x44" * 3
    raw = tmp_path / "ref.raw"
    raw.write_bytes(expected)
    info = qemu_img_info(child)
    assert info["backing-filename"] == "base.vmdk"
    qemu_img("check", "-f", "vmdk", child)
    qemu_img("compare", "-f", "vmdk", "-F", "raw", child, raw)
    with vmferry.open(child) as disk:
        assert disk.read(0, SIZE) == expected
    # qemu's map shows the child holding only the grains written to it
    mapped = json.loads(qemu_img("map", "--output=json", "-f", "vmdk", child).stdout)
    in_child = sum(m["length"] for m in mapped if m["data"] and m["depth"] == 0)
    # 4M..+100000 spans two grains, 21M one; the zeroed MiB is stored as zero grains
    # (zeroed_grain is off, so hiding the parent takes real grains, as in qemu)
    assert in_child == 3 * 65536 + (1 << 20)


def test_writing_a_parent_breaks_its_child_like_vmware(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    with vmferry.create(base, "vmdk", SIZE) as disk:
        disk.write(0, b"\x01" * 65536)
    child = tmp_path / "child.vmdk"
    vmferry.create(child, "vmdk", parent=base).close()
    with vmferry.open(child) as disk:  # still fine
        assert disk.read(0, 1) == b"\x01"
    with vmferry.open(base, writable=True) as disk:
        disk.write(65536, b"\x02")  # the base's CID changes on this first write
    with pytest.raises(ParentMismatchError) as err:
        vmferry.open(child).close()
    assert "cid" in str(err.value)
    # qemu agrees the pair is broken: reading through the child fails
    proc = qemu_img("convert", "-f", "vmdk", "-O", "raw", child, tmp_path / "x.raw", check=False)
    assert proc.returncode != 0


def test_cid_changes_on_first_write_only(tmp_path: Path) -> None:
    img = tmp_path / "a.vmdk"
    vmferry.create(img, "vmdk", SIZE).close()
    before = qemu_img_info(img)["format-specific"]["data"]["cid"]
    with vmferry.open(img, writable=True) as disk:
        disk.write(0, b"x")
        mid = disk.top.identity()["cid"]
        disk.write(512, b"y")
        assert disk.top.identity()["cid"] == mid
    after = qemu_img_info(img)["format-specific"]["data"]["cid"]
    assert after != before and f"{after:08x}" == mid


def test_extent_files_are_named_after_the_final_name(tmp_path: Path) -> None:
    img = tmp_path / "disk.vmdk"
    with vmferry.create(img, "vmdk", 5 << 30, subformat="twoGbMaxExtentSparse") as disk:
        assert [Path(p).name for p in disk.top.files()] == [
            "disk.vmdk",
            "disk-s001.vmdk",
            "disk-s002.vmdk",
            "disk-s003.vmdk",
        ]
        disk.write((2 << 30) - 100, b"\x07" * 200)  # across two extent files
    assert sorted(os.listdir(tmp_path)) == [
        "disk-s001.vmdk",
        "disk-s002.vmdk",
        "disk-s003.vmdk",
        "disk.vmdk",
    ]
    qemu_img("check", "-f", "vmdk", img)
    out = tmp_path / "whole.raw"  # sparse: qemu-img convert skips the zeros
    qemu_img("convert", "-f", "vmdk", "-O", "raw", img, out)
    with open(out, "rb") as fh:
        fh.seek((2 << 30) - 101)
        assert fh.read(202) == b"\0" + b"\x07" * 200 + b"\0"


def test_rebase_after_moving_the_parent(tmp_path: Path) -> None:
    from vmferry.chain.surgery import rebase

    base = tmp_path / "base.vmdk"
    with vmferry.create(base, "vmdk", SIZE) as disk:
        disk.write(0, b"\x31" * 65536)
    child = tmp_path / "vm" / "child.vmdk"
    child.parent.mkdir()
    with vmferry.create(child, "vmdk", parent=base) as disk:
        disk.write(65536, b"\x32" * 65536)
    moved = tmp_path / "store" / "base.vmdk"
    moved.parent.mkdir()
    base.rename(moved)
    rebase(child, moved, allowed_dirs=[moved.parent])
    assert 'parentFileNameHint="../store/base.vmdk"' in child.read_bytes()[:4096].decode("latin-1")
    info = qemu_img_info(child)
    assert info["backing-filename"] == "../store/base.vmdk"
    with vmferry.open(child, allowed_dirs=[moved.parent]) as disk:
        assert disk.read(0, 131072) == b"\x31" * 65536 + b"\x32" * 65536
    raw = tmp_path / "r.raw"
    qemu_img("convert", "-f", "vmdk", "-O", "raw", child, raw)
    assert raw.read_bytes()[:131072] == b"\x31" * 65536 + b"\x32" * 65536


def test_commit_merges_a_delta_and_repoints_the_grandchild(tmp_path: Path) -> None:
    from vmferry.chain.merge import commit

    a, b, c = (tmp_path / f"{n}.vmdk" for n in "abc")
    with vmferry.create(a, "vmdk", SIZE) as disk:
        disk.write(0, b"\x0a" * 200_000)
    with vmferry.create(b, "vmdk", parent=a) as disk:
        disk.write(100_000, b"\x0b" * 200_000)
    with vmferry.create(c, "vmdk", parent=b) as disk:
        disk.write(250_000, b"\x0c" * 10)
    before = tmp_path / "before.raw"
    qemu_img("convert", "-f", "vmdk", "-O", "raw", c, before)
    commit(b)
    assert not b.exists()
    after = tmp_path / "after.raw"
    qemu_img("convert", "-f", "vmdk", "-O", "raw", c, after)  # qemu follows c -> a, CID checked
    assert after.read_bytes() == before.read_bytes()
    qemu_img("check", "-f", "vmdk", a)
    with vmferry.open(c) as disk:
        assert len(disk.layers) == 2
        assert disk.read(0, SIZE) == before.read_bytes()


@pytest.mark.parametrize("sub", ["monolithicSparse", "streamOptimized", "monolithicFlat"])
def test_measure_bounds_what_convert_writes(tmp_path: Path, sub: str) -> None:
    from vmferry.ops.convert import convert
    from vmferry.ops.measure import measure

    src = tmp_path / "src.raw"
    with open(src, "wb") as fh:
        fh.truncate(SIZE)
        for off in (0, 5 << 20, (5 << 20) + 1000, 30 << 20):
            fh.seek(off)
            fh.write(os.urandom(100_000))
    est = measure(src, "vmdk", options={"subformat": sub})
    out = tmp_path / "out.vmdk"
    convert(src, out, dst_format="vmdk", options={"subformat": sub})
    actual = sum(p.stat().st_size for p in tmp_path.glob("out*.vmdk"))
    if sub == "monolithicSparse":
        assert est["required"] == actual  # grain-exact
    else:
        assert actual <= est["required"] <= actual + (1 << 20)
    assert est["fully-allocated"] >= est["required"] or sub == "monolithicFlat"
