"""VHDX reading: qemu-made images and real Hyper-V / Disk2VHD / libvhdi samples.

Oracles: qemu-img/qemu-io write the images and convert them to raw; the corpus ground truth
(MANIFEST.md, ground_truth.json) comes from qemu's iotests and independent readers.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from contextlib import closing
from pathlib import Path

import pytest

from tests.conftest import qemu_img, qemu_io, unpack_corpus_file
from vmferry.chain import open_layer
from vmferry.disk import Alloc, probe
from vmferry.disk.blockfile import BlockFile
from vmferry.disk.vhdx import Vhdx
from vmferry.disk.vhdx.layout import (
    PAYLOAD_FULLY_PRESENT,
    FileIdentifier,
    LogEntryHeader,
    MetadataTableEntry,
    MetadataTableHeader,
    ParentLocatorEntry,
    ParentLocatorHeader,
    RegionTableEntry,
    RegionTableHeader,
    guid_from_le,
)
from vmferry.disk.vhdx.metadata import (
    header_is_valid,
    parse_parent_locator,
    pick_header,
)
from vmferry.errors import ParentNotFoundError

MiB = 1 << 20


def sha256_of_layer(layer: Vhdx) -> str:
    """sha256 of the whole virtual disk, hashing zero runs from one shared buffer."""
    h = hashlib.sha256()
    zeros = memoryview(bytes(16 * MiB))
    for ext in layer.extents():
        if ext.alloc is Alloc.DATA:
            for off in range(ext.offset, ext.end, 16 * MiB):
                h.update(layer.read(off, min(16 * MiB, ext.end - off)))
        else:
            left = ext.length
            while left:
                n = min(left, len(zeros))
                h.update(zeros[:n])
                left -= n
    return h.hexdigest()


# --- qemu writes, vmferry reads --------------------------------------------------------------


@pytest.mark.parametrize(
    ("subformat", "block_size", "size"),
    [("dynamic", "1M", 48 * MiB), ("dynamic", "8M", 40 * MiB), ("fixed", "2M", 24 * MiB)],
)
def test_qemu_written_images_read_identically(
    tmp_path: Path, subformat: str, block_size: str, size: int
) -> None:
    img = tmp_path / "q.vhdx"
    qemu_img(
        "create",
        "-f",
        "vhdx",
        "-o",
        f"subformat={subformat},block_size={block_size}",
        img,
        str(size),
    )
    rng = random.Random(f"{subformat}{block_size}")
    cmds = []
    for _ in range(12):
        off = rng.randrange(0, size // 512) * 512
        length = min(rng.randrange(1, 3 * MiB // 512) * 512, size - off)
        cmds.append(f"write -P {rng.randrange(1, 256):#x} {off} {length}")
    qemu_io("vhdx", img, *cmds)
    ref = tmp_path / "ref.raw"
    qemu_img("convert", "-f", "vhdx", "-O", "raw", img, ref)
    with closing(open_layer(img, "vhdx")) as layer:
        assert layer.virtual_size == size
        assert layer.read(0, size) == ref.read_bytes()
        # unaligned reads that straddle blocks
        data = ref.read_bytes()
        for _ in range(20):
            off = rng.randrange(0, size - 1)
            n = rng.randrange(1, min(5 * MiB, size - off) + 1)
            assert layer.read(off, n) == data[off : off + n]
        assert not layer.check().corruptions


def test_probe_and_extents_of_qemu_image(tmp_path: Path) -> None:
    img = tmp_path / "p.vhdx"
    qemu_img("create", "-f", "vhdx", "-o", "block_size=1M", img, "8M")
    qemu_io("vhdx", img, "write -P 0x5a 1M 1M")
    f = BlockFile.open(img)
    try:
        assert probe(f) is Vhdx
    finally:
        f.close()
    with closing(open_layer(img)) as layer:
        exts = list(layer.extents())
        assert [(e.offset, e.length, e.alloc) for e in exts] == [
            (0, MiB, Alloc.ZERO),
            (MiB, MiB, Alloc.DATA),
            (2 * MiB, 6 * MiB, Alloc.ZERO),
        ]
        assert layer.read(exts[1].offset, 4) == b"\x5a" * 4


# --- corpus -----------------------------------------------------------------------------------


def test_corpus_hyperv_dynamic_1g(corpus: Path, ground_truth: dict, tmp_path: Path) -> None:
    name = "qemu/iotest-dynamic-1G.vhdx.bz2"
    img = unpack_corpus_file(corpus / name, tmp_path)
    truth = ground_truth["files"][name]
    with closing(open_layer(img, "vhdx")) as layer:
        assert layer.virtual_size == truth["virtual_size"] == 1 << 30
        assert layer.block_size == truth["cluster_size"]
        assert layer.read(0, 33 * MiB) == b"\xa5" * (33 * MiB)
        assert layer.read(33 * MiB, 33 * MiB) == b"\x96" * (33 * MiB)
        assert layer.read(66 * MiB, 62 * MiB) == bytes(62 * MiB)
        assert sha256_of_layer(layer) == truth["raw_sha256"]


def test_corpus_disk2vhd(corpus: Path, ground_truth: dict, tmp_path: Path) -> None:
    name = "qemu/test-disk2vhd.vhdx.bz2"
    img = unpack_corpus_file(corpus / name, tmp_path)
    truth = ground_truth["files"][name]
    with closing(open_layer(img, "vhdx")) as layer:
        assert layer.virtual_size == truth["virtual_size"]
        assert layer.block_size == truth["cluster_size"]
        assert sha256_of_layer(layer) == truth["raw_sha256"]


@pytest.mark.parametrize(
    ("name", "block_size", "ratio", "disk_id"),
    [
        ("fixed", 0x200000, 0x800, "4a49d245-db0a-4634-9818-9f93db5ba6c1"),
        ("dynamic", 0x2000000, 0x80, "788015f0-5e93-4bd2-a5de-b0cd8459db11"),
    ],
)
def test_corpus_dissect_fixed_dynamic(
    corpus: Path,
    ground_truth: dict,
    tmp_path: Path,
    name: str,
    block_size: int,
    ratio: int,
    disk_id: str,
) -> None:
    key = f"dissect.hypervisor/disk/vhdx/{name}.vhdx.gz"
    img = unpack_corpus_file(corpus / key, tmp_path)
    truth = ground_truth["files"][key]
    upstream = ground_truth["verified_upstream_assertions"][f"vhdx/{name}.vhdx"]
    with closing(open_layer(img, "vhdx")) as layer:
        assert layer.virtual_size == truth["virtual_size"] == 0xA00000
        assert layer.block_size == block_size
        assert layer.chunk_ratio == ratio
        assert layer.sector_size == 512
        assert layer.md.disk_id == disk_id
        assert layer.parent_ref() is None
        if name == "fixed":
            assert all(state == PAYLOAD_FULLY_PRESENT for _b, state, _o in layer.iter_bat())
        assert hashlib.sha256(layer.read(0, 512)).hexdigest() == upstream["sector0_sha256"]
        assert layer.read(0x200000, 1) == b"\xff"
        assert sha256_of_layer(layer) == truth["raw_sha256"]


def test_corpus_differencing_without_parent(corpus: Path, tmp_path: Path) -> None:
    import vmferry

    src = corpus / "dissect.hypervisor/disk/vhdx/differencing.avhdx.gz"
    img = unpack_corpus_file(src, tmp_path)
    stored = ".\\Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx"
    with closing(open_layer(img, "vhdx")) as layer:
        assert layer.has_parent and layer.info()["subformat"] == "differencing"
        loc = layer.md.parent_locator
        assert loc is not None
        assert loc["relative_path"] == stored
        assert loc["absolute_win32_path"] == (
            "C:\\Users\\Public\\Documents\\Hyper-V\\Virtual hard disks\\"
            "Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx"
        )
        assert loc["volume_path"].startswith("\\\\?\\Volume{0eba351e-")
        ref = layer.parent_ref()
        assert ref is not None and ref.format == "vhdx"
        assert ref.hints[0] == stored.replace("\\", "/")
        assert ref.identity == {"data_write_guid": "ff34003b-11ed-4cf8-a166-b2be05e20b80"}
        # The layer alone, checked against libvhdi, which needs some parent: give it an empty
        # qemu-made VHDX whose DataWriteGuid is patched to the linkage the child pins.
        fake = tmp_path / "zero-parent.vhdx"
        qemu_img("create", "-f", "vhdx", fake, str(layer.virtual_size))
        _pin_data_write_guid(fake, ref.identity["data_write_guid"])
        import pyvhdi

        child, parent = pyvhdi.file(), pyvhdi.file()
        child.open(str(img))
        parent.open(str(fake))
        try:
            assert child.get_parent_identifier() == ref.identity["data_write_guid"]
            child.set_parent(parent)
            step = 8 * MiB
            for off in range(0, layer.virtual_size, step):
                n = min(step, layer.virtual_size - off)
                assert layer.read(off, n) == child.read_buffer_at_offset(n, off), off
            assert any(e.alloc is Alloc.DATA for e in layer.extents())
        finally:
            child.close()
            parent.close()
    with pytest.raises(ParentNotFoundError, match="Generation 1_49C4BAF3"):
        vmferry.open(img)


def _pin_data_write_guid(path: Path, guid: str) -> None:
    """Give an image a chosen DataWriteGuid in both header copies (CRC recomputed)."""
    from vmferry.disk.vhdx.layout import HEADER_OFFSETS, Header
    from vmferry.disk.vhdx.metadata import pack_header

    with open(path, "r+b") as fh:
        for off in HEADER_OFFSETS:
            fh.seek(off)
            hdr = Header.unpack(fh.read(Header.size))
            fh.seek(off)
            fh.write(pack_header(hdr.replace(data_write_guid=uuid.UUID(guid).bytes_le)))


# --- libvhdi structure fragments --------------------------------------------------------------


def test_libvhdi_fragments(corpus: Path) -> None:
    data = corpus / "libvhdi" / "tests" / "data"
    ident = FileIdentifier.unpack((data / "file_identifier.1").read_bytes())
    assert ident.signature == b"vhdxfile"
    assert ident.creator.decode("utf-16-le").rstrip("\0") == "Microsoft Windows 10.0.19041.0"

    hdr_buf = (data / "image_header.1").read_bytes()
    assert header_is_valid(hdr_buf)
    _i, hdr = pick_header([hdr_buf])
    assert (hdr.sequence_number, hdr.log_version, hdr.version) == (6, 0, 1)
    assert (hdr.log_length, hdr.log_offset) == (MiB, MiB)
    assert hdr.log_guid == bytes(16)
    broken = bytearray(hdr_buf)
    broken[100] ^= 1
    assert not header_is_valid(bytes(broken))

    table = (data / "region_table.1").read_bytes()
    rth = RegionTableHeader.unpack(table)
    assert (rth.signature, rth.entry_count) == (b"regi", 2)
    entries = [RegionTableEntry.unpack(table, 16 + 32 * i) for i in range(2)]
    got = {str(guid_from_le(e.guid))[:8]: (e.file_offset, e.length, e.required) for e in entries}
    assert got == {"2dc27766": (0x300000, MiB, 1), "8b7ca206": (0x200000, MiB, 1)}
    assert RegionTableHeader.unpack((data / "region_table_header.1").read_bytes()).entry_count == 2
    one = RegionTableEntry.unpack((data / "region_table_entry.1").read_bytes())
    assert str(guid_from_le(one.guid)).startswith("2dc27766")

    mth = MetadataTableHeader.unpack((data / "metadata_table_header.1").read_bytes())
    assert (mth.signature, mth.entry_count) == (b"metadata", 5)
    mte = MetadataTableEntry.unpack((data / "metadata_table_entry.1").read_bytes())
    assert str(guid_from_le(mte.item_id)) == "caa16737-fa36-4d43-b3b6-33f0aa44e76b"
    assert (mte.offset, mte.length) == (0x10000, 8)

    plh = ParentLocatorHeader.unpack((data / "parent_locator_header.1").read_bytes())
    assert str(guid_from_le(plh.locator_type)) == "b04aefb7-d19e-4a81-b789-25b8e9445913"
    assert plh.key_value_count == 5
    ple = ParentLocatorEntry.unpack((data / "parent_locator_entry.1").read_bytes())
    assert (ple.key_offset, ple.value_offset, ple.key_length, ple.value_length) == (80, 108, 28, 76)


def test_parent_locator_roundtrip() -> None:
    from vmferry.disk.vhdx.metadata import pack_parent_locator

    pairs = {"parent_linkage": "{" + str(uuid.uuid4()) + "}", "relative_path": ".\\ä b.vhdx"}
    ltype, parsed = parse_parent_locator(pack_parent_locator(pairs))
    assert ltype == "b04aefb7-d19e-4a81-b789-25b8e9445913"
    assert parsed == pairs


def test_log_entry_header_is_64_bytes() -> None:
    assert LogEntryHeader.size == 64
