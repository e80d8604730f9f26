"""Hostile and broken OVAs: named errors, bounded memory, nothing created on disk.

Archives are built with Python's tarfile (which, unlike GNU tar, stores ``..`` and absolute
names as given) around a qemu-img-made streamOptimized VMDK.
"""

from __future__ import annotations

import io
import tarfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

import vmferry
from tests.conftest import qemu_img
from vmferry.errors import (
    CorruptImageError,
    NotThisFormatError,
    PathEscapeError,
    ResourceLimitError,
    TruncatedImageError,
    UnsupportedFeatureError,
    VmferryError,
)

MiB = 1 << 20

OVF = """<?xml version="1.0"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"
          xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References><File ovf:href="{href}" ovf:id="file1"/></References>
  <DiskSection><Info>x</Info>
    <Disk ovf:capacity="4" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1"
          ovf:fileRef="file1"/>
  </DiskSection>
</Envelope>
"""

BOMB = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1">&lol2;</Envelope>
"""


@pytest.fixture(scope="module")
def vmdk(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    p = tmp_path_factory.mktemp("v") / "d.vmdk"
    qemu_img("create", "-f", "vmdk", "-o", "subformat=streamOptimized", p, 4 * MiB)
    return p.read_bytes()


def _build(members: list[tuple[str, bytes | None, bytes]]) -> bytes:
    """(name, data or None, type) → tar bytes; type b'2' symlink, b'1' hardlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.type = kind
                info.linkname = "/etc/shadow"
                tar.addfile(info)
            else:
                info.size = len(data or b"")
                tar.addfile(info, io.BytesIO(data or b""))
    return buf.getvalue()


def _ovf(href: str = "d.vmdk") -> bytes:
    return OVF.format(href=href).encode()


def _good(v: bytes) -> bytes:
    return _build([("vm.ovf", _ovf(), tarfile.REGTYPE), ("d.vmdk", v, tarfile.REGTYPE)])


def _size_field(tar: bytes, member_index_offset: int, value: bytes) -> bytes:
    b = bytearray(tar)
    b[member_index_offset + 124 : member_index_offset + 136] = value
    chk = sum(b[member_index_offset : member_index_offset + 148]) + 8 * 32
    chk += sum(b[member_index_offset + 156 : member_index_offset + 512])
    b[member_index_offset + 148 : member_index_offset + 156] = b"%06o\0 " % chk
    return bytes(b)


CASES: list[tuple[str, Callable[[bytes], bytes], type[VmferryError]]] = [
    ("empty file", lambda v: b"", TruncatedImageError),
    ("not a tar", lambda v: b"hello world" * 100, NotThisFormatError),
    ("tar without ovf", lambda v: _build([("d.vmdk", v, tarfile.REGTYPE)]), NotThisFormatError),
    (
        "dot-dot member",
        lambda v: _build(
            [
                ("vm.ovf", _ovf(), tarfile.REGTYPE),
                ("../../etc/passwd", b"x", tarfile.REGTYPE),
                ("d.vmdk", v, tarfile.REGTYPE),
            ]
        ),
        PathEscapeError,
    ),
    (
        "absolute member",
        lambda v: _build(
            [("/etc/passwd", b"x", tarfile.REGTYPE), ("vm.ovf", _ovf(), tarfile.REGTYPE)]
        ),
        PathEscapeError,
    ),
    (
        "href escapes",
        lambda v: _build(
            [("vm.ovf", _ovf("../d.vmdk"), tarfile.REGTYPE), ("d.vmdk", v, tarfile.REGTYPE)]
        ),
        PathEscapeError,
    ),
    (
        "href is a URL",
        lambda v: _build([("vm.ovf", _ovf("http://evil/d.vmdk"), tarfile.REGTYPE)]),
        UnsupportedFeatureError,
    ),
    (
        "symlink disk",
        lambda v: _build([("vm.ovf", _ovf(), tarfile.REGTYPE), ("d.vmdk", None, tarfile.SYMTYPE)]),
        UnsupportedFeatureError,
    ),
    (
        "hardlink disk",
        lambda v: _build([("vm.ovf", _ovf(), tarfile.REGTYPE), ("d.vmdk", None, tarfile.LNKTYPE)]),
        UnsupportedFeatureError,
    ),
    (
        "missing disk member",
        lambda v: _build([("vm.ovf", _ovf(), tarfile.REGTYPE)]),
        CorruptImageError,
    ),
    ("truncated in disk", lambda v: _good(v)[: 1536 + len(v) // 2], TruncatedImageError),
    ("truncated in header", lambda v: _good(v)[: 1024 + 100], TruncatedImageError),
    (
        "absurd member size",
        lambda v: _size_field(_good(v), 0, b"77777777777\0"),
        TruncatedImageError,
    ),
    (
        "absurd base-256 size",
        lambda v: _size_field(_good(v), 0, b"\x80" + (1 << 80).to_bytes(11, "big")),
        TruncatedImageError,
    ),
    (
        "huge long name",
        lambda v: _build(
            [("n" * 200_000, b"", tarfile.REGTYPE), ("vm.ovf", _ovf(), tarfile.REGTYPE)]
        ),
        ResourceLimitError,
    ),
    (
        "xml entity bomb",
        lambda v: _build([("vm.ovf", BOMB.encode(), tarfile.REGTYPE)]),
        CorruptImageError,
    ),
    (
        "ovf not xml",
        lambda v: _build([("vm.ovf", b"<Envelope", tarfile.REGTYPE)]),
        CorruptImageError,
    ),
    (
        "disk is not a sparse vmdk",
        lambda v: _build(
            [
                ("vm.ovf", _ovf(), tarfile.REGTYPE),
                ("d.vmdk", b'# Disk DescriptorFile\nRW 8 FLAT "/etc/shadow" 0\n', tarfile.REGTYPE),
            ]
        ),
        UnsupportedFeatureError,
    ),
    (
        "disk member is garbage with magic",
        lambda v: _build(
            [
                ("vm.ovf", _ovf(), tarfile.REGTYPE),
                ("d.vmdk", b"KDMV" + b"\xff" * 4000, tarfile.REGTYPE),
            ]
        ),
        VmferryError,
    ),
    (
        "bad capacity unit",
        lambda v: _build(
            [
                ("vm.ovf", _ovf().replace(b"byte * 2^20", b"furlongs"), tarfile.REGTYPE),
                ("d.vmdk", v, tarfile.REGTYPE),
            ]
        ),
        UnsupportedFeatureError,
    ),
]


@pytest.mark.parametrize(("name", "build", "error"), CASES, ids=[c[0] for c in CASES])
def test_hostile_ovas(
    tmp_path: Path,
    vmdk: bytes,
    name: str,
    build: Callable[[bytes], bytes],
    error: type[VmferryError],
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    ova = work / "x.ova"
    ova.write_bytes(build(vmdk))
    tracemalloc.start()
    try:
        with pytest.raises(error) as exc, vmferry.open(ova, "ova") as d:
            d.read(0, d.virtual_size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * MiB, f"{name}: {peak} bytes"
    assert "\n" not in str(exc.value)
    assert [p.name for p in work.iterdir()] == ["x.ova"]  # nothing extracted, nothing created
    assert not (tmp_path / "etc").exists()


def test_too_many_members(tmp_path: Path, vmdk: bytes) -> None:
    members = [("vm.ovf", _ovf(), tarfile.REGTYPE), ("d.vmdk", vmdk, tarfile.REGTYPE)]
    members += [(f"f{i}", b"", tarfile.REGTYPE) for i in range(10_001)]
    ova = tmp_path / "many.ova"
    ova.write_bytes(_build(members))
    with pytest.raises(ResourceLimitError):
        vmferry.open(ova, "ova")


def test_good_archive_reads(tmp_path: Path, vmdk: bytes) -> None:
    """The builder itself makes valid OVAs (so the cases above fail for their one defect)."""
    ova = tmp_path / "ok.ova"
    ova.write_bytes(_good(vmdk))
    with vmferry.open(ova) as d:
        assert d.virtual_size == 4 * MiB
        assert d.read(0, d.virtual_size) == bytes(4 * MiB)
