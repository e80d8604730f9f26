"""Third-party VMDKs (../shared/corpus) read exactly as their ground truth says."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

import vmferry
from tests.conftest import qemu_img, unpack_corpus_file
from vmferry.chain import open_layer
from vmferry.disk import Alloc
from vmferry.disk.vmdk import descriptor as dmod
from vmferry.errors import (
    CorruptImageError,
    FormatError,
    MissingExtentError,
    ParentNotFoundError,
)

SAME_CONTENT = [
    "vmdk-rs/data/monolithicSparse.vmdk",
    "vmdk-rs/data/streamOptimized.vmdk",
    "vmdk-rs/data/twoGbMaxExtentSparse.vmdk",
    "vmdk-rs/data/streamOptimizedWithMarkers.vmdk",
    "vmdk-rs/data/vmfs_thick.vmdk",
    "dfvfs/ext2.vmdk",
    "go-vmdk-parser/pkg/virtualization/vmdk/testdata/vmdk-monolith.img",
    "go-vmdk-parser/pkg/virtualization/vmdk/testdata/vmdk-streamoptimized.img",
]


def _sha(disk: vmferry.Chain) -> str:
    h = hashlib.sha256()
    for off in range(0, disk.virtual_size, 4 << 20):
        h.update(disk.read(off, min(4 << 20, disk.virtual_size - off)))
    return h.hexdigest()


def _truth(ground_truth: dict, rel: str) -> dict:
    return ground_truth["files"][rel]


@pytest.mark.parametrize("rel", SAME_CONTENT)
def test_corpus_images_decode_to_their_sha256(corpus: Path, ground_truth: dict, rel: str) -> None:
    truth = _truth(ground_truth, rel)
    # vmfs_thick: the descriptor's data is its -flat file, whose own sha256 is the answer
    expected = (
        truth.get("raw_sha256")
        or ground_truth["files"]["vmdk-rs/data/vmfs_thick-flat.vmdk"]["sha256"]
    )
    with vmferry.open(corpus / rel, "vmdk") as disk:
        if "virtual_size" in truth:
            assert disk.virtual_size == truth["virtual_size"]
        assert _sha(disk) == expected
        info = disk.info()
        if "create_type" in truth:
            assert info["create_type"] == truth["create_type"]
        if "cluster_size" in truth:
            assert info["grain_size"] == truth["cluster_size"]
        # the layer's DATA runs never hide bytes: everything else reads as zeros
        for ext in disk.top.extents():
            if ext.alloc is not Alloc.DATA:
                assert disk.read(ext.offset, min(ext.length, 1 << 20)) == bytes(
                    min(ext.length, 1 << 20)
                )


def test_probe_picks_vmdk_for_every_variant(corpus: Path) -> None:
    for rel in SAME_CONTENT:
        with vmferry.open(corpus / rel) as disk:
            assert disk.format == "vmdk", rel


def test_vmware_stream_version3_sample(corpus: Path, ground_truth: dict, tmp_path: Path) -> None:
    img = unpack_corpus_file(corpus / "qemu/iotest-version3.vmdk.bz2", tmp_path)
    truth = _truth(ground_truth, "qemu/iotest-version3.vmdk.bz2")
    with vmferry.open(img) as disk:
        assert disk.virtual_size == truth["virtual_size"] == 17179869184
        info = disk.info()
        assert info["create_type"] == "streamOptimized" and info["compressed"]
        assert info["extents"][0]["version"] == 3
        for i in range(100):
            off = i * 655360 + i * 512
            assert disk.read(off, 512) == bytes([0x30 + i % 10]) * 512, i
        # the whole disk without hashing 16 GiB: write vmferry's DATA runs into a sparse raw
        # file and let qemu-img (whose decoding gave the ground-truth sha256) compare
        out = tmp_path / "mine.raw"
        with open(out, "wb") as fh:
            fh.truncate(disk.virtual_size)
            for ext in disk.top.extents():
                if ext.alloc is Alloc.DATA:
                    fh.seek(ext.offset)
                    fh.write(disk.read(ext.offset, ext.length))
                elif ext.length <= 1 << 20:
                    assert disk.read(ext.offset, ext.length) == bytes(ext.length)
    proc = qemu_img("compare", "-f", "raw", "-F", "vmdk", out, img)
    assert "identical" in proc.stdout


def test_sesparse_extent(corpus: Path, ground_truth: dict, tmp_path: Path) -> None:
    img = unpack_corpus_file(corpus / "dissect.hypervisor/disk/vmdk/sesparse.vmdk.gz", tmp_path)
    assert (
        hashlib.sha256(img.read_bytes()).hexdigest()
        == _truth(ground_truth, "dissect.hypervisor/disk/vmdk/sesparse.vmdk.gz")[
            "uncompressed_sha256"
        ]
    )
    with vmferry.open(img) as disk:
        assert disk.format == "vmdk"
        assert disk.read(0, 0x1000000) == b"a" * 0x1000000
        info = disk.info()
        assert info["extents"][0]["type"] == "SESPARSE"
        assert info["extents"][0]["grain_size"] == 4096
    layer = open_layer(img, "vmdk", writable=True)
    try:
        with pytest.raises(FormatError):
            layer.write(0, b"x")
    finally:
        layer.close()


def test_afl9_is_refused(corpus: Path, tmp_path: Path) -> None:
    img = unpack_corpus_file(corpus / "qemu/afl9.vmdk.bz2", tmp_path)
    with pytest.raises(FormatError):
        vmferry.open(img, "vmdk")


def test_go_vmdk_invalid_descriptor_is_refused(corpus: Path) -> None:
    bad = corpus / "go-vmdk-parser/pkg/virtualization/vmdk/testdata/vmdk-invalid.img"
    with pytest.raises(CorruptImageError, match="invalid VMDK descriptor"):
        vmferry.open(bad, "vmdk")


@pytest.mark.parametrize(
    ("rel", "missing"),
    [
        ("vmdk-rs/data/monolithicFlat.vmdk", "monolithicFlat-flat.vmdk"),
        ("vmdk-rs/data/twoGbMaxExtentFlat.vmdk", "twoGbMaxExtentFlat-f001.vmdk"),
        ("vmdk-rs/data/vmfs_thick-000001.vmdk", "vmfs_thick-000001-delta.vmdk"),
        ("vmdk-forensic/core/tests/data/ms3-win.vmdk", "disk-s001.vmdk"),
    ],
)
def test_descriptors_without_their_extents_name_the_missing_file(
    corpus: Path, rel: str, missing: str
) -> None:
    with pytest.raises(MissingExtentError, match=missing):
        vmferry.open(corpus / rel)


def test_ms3_win_descriptor(corpus: Path) -> None:
    desc = dmod.parse((corpus / "vmdk-forensic/core/tests/data/ms3-win.vmdk").read_bytes())
    assert desc.create_type == "twoGbMaxExtentSparse"
    assert len(desc.extents) == 16
    assert [e.sectors for e in desc.extents] == [8323072] * 15 + [983040]
    assert desc.total_sectors * 512 == 60 << 30
    assert desc.ddb["ddb.virtualHWVersion"] == "13"
    assert desc.ddb["ddb.adapterType"] == "lsilogic"
    assert (
        desc.ddb["ddb.geometry.cylinders"],
        desc.ddb["ddb.geometry.heads"],
        desc.ddb["ddb.geometry.sectors"],
    ) == ("7832", "255", "63")


def test_libvmdk_descriptor_file(corpus: Path) -> None:
    desc = dmod.parse((corpus / "libvmdk/tests/data/descriptor_file.1").read_bytes())
    assert desc.create_type == "monolithicSparse"
    assert desc.cid == 0xFFFFFFFE and desc.parent_cid == dmod.NO_PARENT_CID
    assert desc.header["encoding"] == "windows-1252"
    assert len(desc.extents) == 1
    e = desc.extents[0]
    assert (e.access, e.sectors, e.kind, e.filename) == ("RW", 16777216, "SPARSE", "test1.vmdk")
    assert e.sectors * 512 == 8 << 30
    assert desc.ddb["ddb.virtualHWVersion"] == "9"
    assert desc.ddb["ddb.geometry.cylinders"] == "16383"
    assert desc.ddb["ddb.adapterType"] == "ide"
    # written back, every key survives in order
    again = dmod.parse(desc.text())
    assert again.header == desc.header and again.ddb == desc.ddb
    line = (corpus / "libvmdk/tests/data/extent_values.1").read_text()
    assert dmod.parse('createType="x"\n' + line).extents[0].filename == "test1.vmdk"


def test_esxi_snapshot_delta_names_its_parent(corpus: Path) -> None:
    """vmfs_thick-000001.vmdk pins vmfs_thick.vmdk's CID, as ESXi wrote them."""
    delta = dmod.parse((corpus / "vmdk-rs/data/vmfs_thick-000001.vmdk").read_bytes())
    assert delta.create_type == "vmfsSparse"
    assert delta.parent_hint == "vmfs_thick.vmdk"
    assert delta.extents[0].kind == "VMFSSPARSE"
    with vmferry.open(corpus / "vmdk-rs/data/vmfs_thick.vmdk") as base:
        assert base.top.identity() == {"cid": f"{delta.parent_cid:08x}"}
        assert base.info()["create_type"] == "vmfs"
        assert base.info()["hwversion"] == "14"


def test_esxi_vmfs_sparse_chain_with_a_cowd_delta(corpus: Path, tmp_path: Path) -> None:
    """The COWD delta is not in the corpus: build one and let qemu-img be the judge."""
    for name in ("vmfs_thick.vmdk", "vmfs_thick-flat.vmdk", "vmfs_thick-000001.vmdk"):
        shutil.copyfile(corpus / "vmdk-rs/data" / name, tmp_path / name)
    delta = tmp_path / "vmfs_thick-000001-delta.vmdk"
    delta.write_bytes(_cowd(4096, {0: b"\xaa", 3: b"\xbb", 17: b"\xcc"}))
    top = tmp_path / "vmfs_thick-000001.vmdk"
    raw = tmp_path / "flat.raw"
    qemu_img("convert", "-f", "vmdk", "-O", "raw", top, raw)
    with vmferry.open(top) as disk:
        assert len(disk.layers) == 2
        assert disk.read(0, disk.virtual_size) == raw.read_bytes()
        assert disk.info()["create_type"] == "vmfsSparse"
        statuses = {e.alloc for e in disk.top.extents()}
        assert statuses == {Alloc.DATA, Alloc.UNALLOCATED}
    # without its parent, the chain reports the missing parent by name
    (tmp_path / "vmfs_thick.vmdk").unlink()
    with pytest.raises(ParentNotFoundError, match=r"vmfs_thick\.vmdk"):
        vmferry.open(top)


def _cowd(capacity: int, grains: dict[int, bytes], grain_sectors: int = 1) -> bytes:
    """A vmfsSparse delta per the COWD layout: 2 KiB header, GD at sector 4, 4096-entry GTs."""
    gd_entries = -(-capacity // (4096 * grain_sectors))
    gd_sector = 4
    gt_sector = gd_sector + -(-gd_entries * 4 // 512)
    first_grain = gt_sector + gd_entries * 32
    img = bytearray(first_grain * 512)
    header = b"COWD" + b"".join(
        v.to_bytes(4, "little")
        for v in (1, 3, capacity, grain_sectors, gd_sector, gd_entries, first_grain)
    )
    img[: len(header)] = header
    for i in range(gd_entries):
        off = gd_sector * 512 + i * 4
        img[off : off + 4] = (gt_sector + i * 32).to_bytes(4, "little")
    sector = first_grain
    for gi, byte in sorted(grains.items()):
        off = gt_sector * 512 + gi * 4
        img[off : off + 4] = sector.to_bytes(4, "little")
        img += byte * (512 * grain_sectors)
        sector += grain_sectors
    return bytes(img)


def test_writing_an_esxi_cowd_delta(corpus: Path, tmp_path: Path) -> None:
    """vmferry writes into a COWD snapshot delta; qemu-img reads the chain back the same."""
    for name in ("vmfs_thick.vmdk", "vmfs_thick-flat.vmdk", "vmfs_thick-000001.vmdk"):
        shutil.copyfile(corpus / "vmdk-rs/data" / name, tmp_path / name)
        (tmp_path / name).chmod(0o644)
    delta = tmp_path / "vmfs_thick-000001-delta.vmdk"
    # 8-sector grains, so unaligned writes need the parent's bytes (Chain.write supplies them)
    delta.write_bytes(_cowd(4096, {1: b"\xaa"}, grain_sectors=8))
    top = tmp_path / "vmfs_thick-000001.vmdk"
    with vmferry.open(top, writable=True) as disk:
        assert disk.top.write_alignment == 4096
        expected = bytearray(disk.read(0, disk.virtual_size))
        for off, data in (
            (100, b"\x01" * 10),
            (4096 + 5, b"\x02" * 9000),
            (2097152 - 3, b"\x03" * 3),
        ):
            disk.write(off, data)
            expected[off : off + len(data)] = data
        disk.write_zeroes(8192 * 3, 8192)
        expected[8192 * 3 : 8192 * 4] = bytes(8192)
    raw = tmp_path / "flat.raw"
    qemu_img("convert", "-f", "vmdk", "-O", "raw", top, raw)
    assert raw.read_bytes() == expected
    with vmferry.open(top) as disk:
        assert disk.read(0, disk.virtual_size) == expected
    # the parent's flat file is untouched
    assert (tmp_path / "vmfs_thick-flat.vmdk").read_bytes() == (
        corpus / "vmdk-rs/data/vmfs_thick-flat.vmdk"
    ).read_bytes()
