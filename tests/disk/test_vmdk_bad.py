"""Hostile VMDKs: every bad input is a named vmferry error, never a crash or a huge allocation."""

from __future__ import annotations

import os
import random
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

import vmferry
from tests.conftest import qemu_img, qemu_io
from vmferry.errors import (
    CorruptImageError,
    NotThisFormatError,
    ParentMismatchError,
    PathEscapeError,
    ResourceLimitError,
    TruncatedImageError,
    UnsupportedFeatureError,
    VmferryError,
)

SIZE = 4 << 20
# SparseExtentHeader field offsets (VMware Virtual Disk Format 1.1, little-endian)
VERSION, CAPACITY, GRAIN, DESC_OFF, DESC_SIZE, NUM_GTES, RGD, GD, COMPRESS = (
    4,
    12,
    20,
    28,
    36,
    44,
    48,
    56,
    77,
)


def _u(buf: bytes, off: int, fmt: str) -> int:
    return struct.unpack_from("<" + fmt, buf, off)[0]


def _put(path: Path, off: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(off)
        fh.write(struct.pack("<" + fmt, value))


@pytest.fixture
def sparse(tmp_path: Path) -> Path:
    img = tmp_path / "s.vmdk"
    qemu_img("create", "-f", "vmdk", img, str(SIZE))
    qemu_io("vmdk", img, "write -P 0x5a 0 200k", "write -P 0x66 3M 64k")
    return img


def _first_gt_entry_offset(img: Path) -> int:
    head = img.read_bytes()
    gd = _u(head, GD, "Q") * 512
    gt = _u(head, gd, "I") * 512
    return gt


def _read_all(img: Path) -> None:
    with vmferry.open(img, "vmdk") as disk:
        disk.read(0, disk.virtual_size)
        list(disk.top.extents())


MUTATIONS: list[tuple[str, Callable[[Path], None], type[VmferryError]]] = [
    ("bad magic", lambda p: _put(p, 0, "I", 0x12345678), NotThisFormatError),
    ("version 4", lambda p: _put(p, VERSION, "I", 4), UnsupportedFeatureError),
    ("511 GTEs per GT", lambda p: _put(p, NUM_GTES, "I", 511), CorruptImageError),
    ("grain size 0", lambda p: _put(p, GRAIN, "Q", 0), CorruptImageError),
    ("grain size 3", lambda p: _put(p, GRAIN, "Q", 3), CorruptImageError),
    ("grain size 2^40", lambda p: _put(p, GRAIN, "Q", 1 << 40), CorruptImageError),
    ("capacity 2^60", lambda p: _put(p, CAPACITY, "Q", 1 << 60), ResourceLimitError),
    ("capacity 0", lambda p: _put(p, CAPACITY, "Q", 0), CorruptImageError),
    ("capacity past the GD", lambda p: _put(p, CAPACITY, "Q", 1 << 36), TruncatedImageError),
    ("GD past EOF", lambda p: _put(p, GD, "Q", 1 << 30), TruncatedImageError),
    ("RGD past EOF", lambda p: _put(p, RGD, "Q", 1 << 30), TruncatedImageError),
    ("descriptor 2^40 sectors", lambda p: _put(p, DESC_SIZE, "Q", 1 << 40), CorruptImageError),
    ("descriptor past EOF", lambda p: _put(p, DESC_OFF, "Q", 1 << 20), TruncatedImageError),
    ("unknown compression", lambda p: _put(p, COMPRESS, "H", 7), UnsupportedFeatureError),
    (
        "GD entry past EOF",
        lambda p: _put(p, _u(p.read_bytes(), GD, "Q") * 512, "I", 1 << 28),
        TruncatedImageError,
    ),
    (
        "grain past EOF",
        lambda p: _put(p, _first_gt_entry_offset(p), "I", 1 << 28),
        TruncatedImageError,
    ),
    (
        "grain pointing at the header",
        lambda p: _put(p, _first_gt_entry_offset(p), "I", 1),
        CorruptImageError,
    ),
    (
        "grain pointing at its own grain table",
        lambda p: _put(p, _first_gt_entry_offset(p), "I", _first_gt_entry_offset(p) // 512),
        CorruptImageError,
    ),
    (
        "garbage descriptor",
        lambda p: _put(p, 512, "Q", 0x4141414141414141),
        CorruptImageError,
    ),
]


@pytest.mark.parametrize(("what", "mutate", "error"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_header_and_table_mutations(
    sparse: Path, what: str, mutate: Callable[[Path], None], error: type[VmferryError]
) -> None:
    mutate(sparse)
    with pytest.raises(error) as exc:
        _read_all(sparse)
    assert str(exc.value)  # a readable one-line message


def test_random_corruption_never_escapes_as_a_python_error(sparse: Path) -> None:
    original = sparse.read_bytes()
    head_end = _u(original, 64, "Q") * 512  # overhead: header, descriptor, directories
    rnd = random.Random(7)
    for _ in range(150):
        buf = bytearray(original)
        for _ in range(rnd.randrange(1, 6)):
            buf[rnd.randrange(0, head_end)] = rnd.randrange(256)
        sparse.write_bytes(buf)
        try:
            _read_all(sparse)
        except VmferryError:
            pass


def test_check_reports_overlapping_grains(sparse: Path) -> None:
    gt = _first_gt_entry_offset(sparse)
    first = _u(sparse.read_bytes(), gt, "I")
    _put(sparse, gt + 4, "I", first)  # grain 1 shares grain 0's sectors
    with vmferry.open(sparse) as disk:
        report = disk.top.check()
    assert any("overlaps" in c for c in report.corruptions), report
    # and a redundant GT that disagrees with the primary one
    assert any("copy differ" in c for c in report.corruptions), report


# --- streamOptimized ----------------------------------------------------------------------------


@pytest.fixture
def stream(tmp_path: Path) -> Path:
    img = tmp_path / "st.vmdk"
    with vmferry.create(img, "vmdk", SIZE, subformat="streamOptimized") as disk:
        disk.write(0, os.urandom(65536))
        disk.write(65536, b"\x11" * 65536)
    return img


def _first_grain(img: Path) -> int:
    buf = img.read_bytes()
    return _u(buf, 64, "Q") * 512  # overhead: the first grain marker


def test_stream_footer_damage(stream: Path) -> None:
    size = stream.stat().st_size
    _put(stream, size - 1024, "I", 0)  # footer magic
    with pytest.raises(CorruptImageError, match="footer"):
        vmferry.open(stream, "vmdk")


def test_stream_truncated(stream: Path) -> None:
    os.truncate(stream, stream.stat().st_size - 512)
    with pytest.raises(CorruptImageError):
        vmferry.open(stream, "vmdk")


def test_stream_marker_with_absurd_size(stream: Path) -> None:
    _put(stream, _first_grain(stream) + 8, "I", 0xFFFFFFF0)
    with pytest.raises(CorruptImageError, match="marker"):
        _read_all(stream)


def test_stream_marker_naming_another_sector(stream: Path) -> None:
    _put(stream, _first_grain(stream), "Q", 12345)
    with pytest.raises(CorruptImageError, match="marker"):
        _read_all(stream)


def test_stream_grain_that_is_not_deflate(stream: Path) -> None:
    _put(stream, _first_grain(stream) + 12, "Q", 0xFFFFFFFFFFFFFFFF)
    with pytest.raises(CorruptImageError, match="decompress"):
        _read_all(stream)


def test_decompression_bomb_stops_at_one_grain(stream: Path) -> None:
    """A grain that inflates to 16 MiB is refused after one grain, not inflated in memory."""
    bomb = zlib.compress(bytes(16 << 20), 9)
    at = _first_grain(stream)
    slot = _u(stream.read_bytes(), at + 8, "I")  # grain 0 is random: its slot is ~64 KiB
    assert len(bomb) <= slot
    with open(stream, "r+b") as fh:
        fh.seek(at)
        fh.write(struct.pack("<QI", 0, len(bomb)) + bomb)
    with pytest.raises(CorruptImageError, match="more than a grain"):
        _read_all(stream)


def test_bomb_in_a_real_grain(tmp_path: Path) -> None:
    from vmferry.disk.vmdk.sparse import inflate_grain

    with pytest.raises(CorruptImageError, match="more than a grain"):
        inflate_grain(zlib.compress(bytes(1 << 20)), 65536, "grain 0", "x")
    assert inflate_grain(zlib.compress(b"ab"), 8, "g", "x") == b"ab" + bytes(6)


def test_stream_is_written_front_to_back(tmp_path: Path) -> None:
    img = tmp_path / "st.vmdk"
    with vmferry.create(img, "vmdk", SIZE, subformat="streamOptimized") as disk:
        disk.write(1 << 20, b"\x01" * 1000)
        with pytest.raises(UnsupportedFeatureError, match="front to back"):
            disk.write(0, b"\x02")
        disk.write((1 << 20) + 1000, b"\x03" * 10)  # carrying on in the same grain is fine
    with vmferry.open(img) as disk:
        assert disk.read(1 << 20, 1010) == b"\x01" * 1000 + b"\x03" * 10


# --- descriptors --------------------------------------------------------------------------------


def _descriptor(tmp_path: Path, extent_line: str, name: str = "d.vmdk") -> Path:
    text = (
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        f'createType="monolithicFlat"\n\n{extent_line}\n'
    )
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "C:\\\\Windows\\\\x.vmdk",
        "\\\\\\\\server\\\\share\\\\x.vmdk",
        "sub/../../outside.vmdk",
    ],
)
def test_extent_paths_cannot_escape(tmp_path: Path, name: str) -> None:
    inner = tmp_path / "vm"
    inner.mkdir()
    (tmp_path / "outside.vmdk").write_bytes(bytes(SIZE))
    desc = _descriptor(inner, f'RW 8192 FLAT "{name}" 0')
    with pytest.raises(PathEscapeError):
        vmferry.open(desc)


def test_extent_symlink_out_of_the_directory_is_refused(tmp_path: Path) -> None:
    inner = tmp_path / "vm"
    inner.mkdir()
    (tmp_path / "secret.raw").write_bytes(b"s" * SIZE)
    os.symlink(tmp_path / "secret.raw", inner / "d-flat.vmdk")
    desc = _descriptor(inner, 'RW 8192 FLAT "d-flat.vmdk" 0')
    with pytest.raises(PathEscapeError):
        vmferry.open(desc)


def test_extent_in_a_subdirectory_is_fine(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.raw").write_bytes(b"\x09" * SIZE)
    desc = _descriptor(tmp_path, 'RW 8192 FLAT "data/x.raw" 0')
    with vmferry.open(desc) as disk:
        assert disk.read(0, 4) == b"\x09" * 4


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ('RW 1125899906842624 FLAT "x.raw" 0', CorruptImageError),  # 2^50 sectors
        ('RW 0 FLAT "x.raw" 0', CorruptImageError),
        ('RW 8192 BOGUS "x.raw"', CorruptImageError),
        ('RW 8192 FLAT ""', CorruptImageError),
        ("\n".join(['RW 8 FLAT "x.raw" 0'] * 5000), ResourceLimitError),
        ('NOACCESS 8192 FLAT "x.raw" 0', UnsupportedFeatureError),
        ('RW 8192 VMFSRDM "x.raw"', UnsupportedFeatureError),
        ("", CorruptImageError),
    ],
)
def test_bad_descriptor_contents(tmp_path: Path, body: str, error: type[VmferryError]) -> None:
    (tmp_path / "x.raw").write_bytes(bytes(SIZE))
    with pytest.raises(error):
        vmferry.open(_descriptor(tmp_path, body), "vmdk")


def test_descriptor_cid_not_hex(tmp_path: Path) -> None:
    path = _descriptor(tmp_path, 'RW 8192 FLAT "x.raw" 0')
    path.write_text(path.read_text().replace("CID=12345678", "CID=zz"))
    with pytest.raises(CorruptImageError, match="CID"):
        vmferry.open(path, "vmdk")


def test_huge_file_is_not_a_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "big.vmdk"
    with open(path, "wb") as fh:
        fh.write(b"# Disk DescriptorFile\n")
        fh.truncate(2 << 20)
    with pytest.raises(NotThisFormatError):
        vmferry.open(path, "vmdk")


def test_latin1_descriptor_is_read(tmp_path: Path) -> None:
    (tmp_path / "d\xe9-flat.vmdk".encode("latin-1").decode("latin-1")).write_bytes(b"\x05" * 4096)
    text = (
        b'# Disk DescriptorFile\nversion=1\nencoding="windows-1252"\nCID=0000abcd\n'
        b'parentCID=ffffffff\ncreateType="monolithicFlat"\nRW 8 FLAT "d\xe9-flat.vmdk" 0\n'
        b'ddb.comment = "caf\xe9"\n'
    )
    path = tmp_path / "d.vmdk"
    path.write_bytes(text)
    with vmferry.open(path) as disk:
        assert disk.read(0, 8) == b"\x05" * 8
        assert disk.top.identity() == {"cid": "0000abcd"}


# --- chains ---------------------------------------------------------------------------------------


def test_parent_cid_mismatch(tmp_path: Path) -> None:
    base = tmp_path / "base.vmdk"
    child = tmp_path / "child.vmdk"
    qemu_img("create", "-f", "vmdk", base, str(SIZE))
    qemu_img("create", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", child)
    with vmferry.open(child) as disk:
        assert len(disk.layers) == 2
    qemu_io("vmdk", base, "write -P 1 0 512")  # qemu changes the CID on the first write too
    with pytest.raises(ParentMismatchError):
        vmferry.open(child)
    with vmferry.open(base) as disk:  # the parent itself is fine
        assert disk.read(0, 1) == b"\x01"


def test_unknown_ddb_entries_survive_a_cid_rewrite(tmp_path: Path) -> None:
    flat = tmp_path / "d-flat.vmdk"
    flat.write_bytes(bytes(SIZE))
    path = _descriptor(tmp_path, 'RW 8192 FLAT "d-flat.vmdk" 0')
    path.write_text(
        path.read_text().replace("version=1\n", 'version=1\nisNativeSnapshot="no"\n')
        + '\n#DDB\nddb.toolsInstallType = "1"\nddb.uuid = "60 00 C2 9a"\n'
    )
    with vmferry.open(path, writable=True) as disk:
        disk.write(0, b"z")
        cid = disk.top.identity()["cid"]
    text = path.read_text()
    assert f"CID={cid}" in text and cid != "12345678"
    assert 'isNativeSnapshot="no"' in text
    assert 'ddb.toolsInstallType = "1"' in text and 'ddb.uuid = "60 00 C2 9a"' in text
    assert text.index("CID=") < text.index("parentCID=")  # qemu finds the first "CID"
    qemu_img("info", "-f", "vmdk", path)
