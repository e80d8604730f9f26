"""Descriptor parsing: the extent-line cases dissect.hypervisor's tests list, and round trips
checked against qemu-img (which parses the same text independently)."""

from __future__ import annotations

from pathlib import Path

import pytest

import vmferry
from tests.conftest import qemu_img, qemu_img_info
from vmferry.disk.vmdk import descriptor as dmod
from vmferry.errors import CorruptImageError

HEAD = 'createType="monolithicFlat"\n'


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('RW 123456789 SPARSE "disk.vmdk"', ("RW", 123456789, "SPARSE", "disk.vmdk", 0)),
        ('RW 123456789 FLAT "disk-flat.vmdk" 0', ("RW", 123456789, "FLAT", "disk-flat.vmdk", 0)),
        (
            'NOACCESS 123456789 SPARSE "disk-sparse.vmdk" 123 partition-uuid device-id',
            ("NOACCESS", 123456789, "SPARSE", "disk-sparse.vmdk", 123),
        ),
        (
            'RW 1234567890 SPARSE "disk with spaces.vmdk"',
            ("RW", 1234567890, "SPARSE", "disk with spaces.vmdk", 0),
        ),
        (
            'RW 1234567890 SPARSE "disk with spaces.vmdk" 123 part-uuid device-id',
            ("RW", 1234567890, "SPARSE", "disk with spaces.vmdk", 123),
        ),
        (
            'RW 16777216 SPARSE "this is an example "\' diskëäô:)\\\\\'`\\foo.vmdk" 123',
            ("RW", 16777216, "SPARSE", "this is an example \"' diskëäô:)\\\\'`\\foo.vmdk", 123),
        ),
        ('RW 13371337 SPARSE "🦊 🦊 🦊.vmdk"', ("RW", 13371337, "SPARSE", "🦊 🦊 🦊.vmdk", 0)),
        ("RDONLY 2048 ZERO", ("RDONLY", 2048, "ZERO", None, 0)),
    ],
)
def test_extent_lines(line: str, expected: tuple[object, ...]) -> None:
    desc = dmod.parse(HEAD + line + "\n")
    (e,) = desc.extents
    assert (e.access, e.sectors, e.kind, e.filename, e.offset) == expected
    # and the emitted text parses back to the same extent
    (again,) = dmod.parse(desc.text()).extents
    assert (again.access, again.sectors, again.kind, again.filename) == expected[:4]


@pytest.mark.parametrize("line", ["RW 1234567890", 'RDONLY "file.vmdk"', "NOACCESS"])
def test_malformed_extent_lines(line: str) -> None:
    with pytest.raises(CorruptImageError, match="extent line"):
        dmod.parse(HEAD + line + "\n")


def test_empty_extent_is_skipped() -> None:
    desc = dmod.parse(HEAD + 'RDONLY 0 ZERO\nRW 8 FLAT "a" 0\n')
    assert [e.kind for e in desc.extents] == ["FLAT"]


def test_windows_line_endings_and_bom() -> None:
    text = "\ufeff# Disk DescriptorFile\r\nversion=1\r\nCID=0000beef\r\n" + HEAD.replace(
        "\n", "\r\n"
    )
    desc = dmod.parse((text + 'RW 8 FLAT "a b.vmdk" 0\r\n').encode())
    assert desc.cid == 0xBEEF and desc.extents[0].filename == "a b.vmdk"


def test_probe_rules() -> None:
    assert dmod.looks_like_descriptor(b"# Disk DescriptorFile\nversion=1\n") == 100
    assert dmod.looks_like_descriptor(b"# some comment\n\nversion=1\n") == 90
    assert dmod.looks_like_descriptor(b"version=7\n") == 0
    assert dmod.looks_like_descriptor(b"\x00\x01binary") == 0


def test_text_round_trip_through_qemu(tmp_path: Path) -> None:
    """A descriptor vmferry writes (with a space in the extent name) is one qemu-img reads."""
    flat = tmp_path / "my disk-flat.vmdk"
    flat.write_bytes(b"\x07" * (1 << 20))
    desc = dmod.Descriptor(
        header={
            "version": "1",
            "CID": "0badcafe",
            "parentCID": "ffffffff",
            "createType": "monolithicFlat",
        },
        extents=[dmod.ExtentLine("RW", 2048, "FLAT", "my disk-flat.vmdk", 0)],
        ddb={"ddb.adapterType": "lsilogic", "ddb.virtualHWVersion": "13"},
    )
    path = tmp_path / "my disk.vmdk"
    path.write_text(desc.text())
    info = qemu_img_info(path, "vmdk")
    assert info["virtual-size"] == 1 << 20
    assert info["format-specific"]["data"]["cid"] == 0x0BADCAFE
    qemu_img("compare", "-f", "vmdk", "-F", "raw", path, flat)
    with vmferry.open(path) as disk:
        assert disk.read(0, 1 << 20) == flat.read_bytes()
        assert disk.info()["adapter_type"] == "lsilogic"
