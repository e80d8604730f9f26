"""VHD driver: interop with qemu-img/qemu-io and libvhdi, the corpus, and bad input.

Oracles: qemu-img/qemu-io (fixed and dynamic VHDs both ways), libvhdi's ``pyvhdi``
(differencing chains, which qemu cannot stack), and the third-party corpus with the facts
MANIFEST.md / ground_truth.json record.  Nothing here compares vmferry with itself only.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import shutil
from pathlib import Path

import pytest

import vmferry
from tests.conftest import qemu_img, qemu_img_info, qemu_io, unpack_corpus_file
from vmferry.chain import open_layer
from vmferry.disk import Alloc
from vmferry.disk.blockfile import BlockFile
from vmferry.disk.vhd import (
    FOOTER_SIZE,
    Vhd,
    chs_geometry,
    pack_footer,
    pack_header,
    parse_footer,
    parse_header,
)

MiB = 1024 * 1024


def flatten_sha256(disk, chunk: int = 8 * MiB) -> str:
    """sha256 of the whole virtual disk, reading only what block_status calls data."""
    h = hashlib.sha256()
    zeros = bytes(chunk)
    if hasattr(disk, "map"):  # a chain: the flattened view
        runs = [(e.offset, e.end, e.data) for e in disk.map()]
    else:  # one layer alone (what qemu reads for a differencing disk)
        runs = [(e.offset, e.end, e.alloc is Alloc.DATA) for e in disk.extents()]
    for start, end, data in runs:
        pos = start
        while pos < end:
            n = min(chunk, end - pos)
            h.update(disk.read(pos, n) if data else zeros[:n])
            pos += n
    return h.hexdigest()


def random_writes(rng: random.Random, size: int, count: int, max_len: int = 300_000):
    """(offset, bytes) pairs at arbitrary (unaligned, block-crossing) places."""
    out = []
    for _ in range(count):
        off = rng.randrange(size - 1)
        n = rng.randint(1, min(max_len, size - off))
        out.append((off, bytes([rng.randrange(1, 256)]) * n))
    return out


# --- qemu makes, vmferry reads ------------------------------------------------------------------


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_reads_qemu_images_byte_identical(tmp_path: Path, subformat: str) -> None:
    img = tmp_path / "q.vhd"
    qemu_img("create", "-f", "vpc", "-o", f"subformat={subformat}", img, "24M")
    rng = random.Random(7)
    size = qemu_img_info(img, "vpc")["virtual-size"]
    cmds = [
        f"write -P 0x{rng.randrange(1, 256):02x} {o} {n}"
        for o, n in (
            (1000, 5000),  # unaligned
            (2 * MiB - 700, 4000),  # crosses a block boundary
            (size - 513, 513),  # the last bytes
            *((rng.randrange(size - 70000), rng.randint(1, 70000)) for _ in range(8)),
        )
    ]
    qemu_io("vpc", img, *cmds)
    raw = tmp_path / "q.raw"
    qemu_img("convert", "-f", "vpc", "-O", "raw", img, raw)
    with vmferry.open(img, "vhd") as disk:
        assert disk.virtual_size == size
        assert disk.read(0, size) == raw.read_bytes()
        assert flatten_sha256(disk) == hashlib.sha256(raw.read_bytes()).hexdigest()
        # a read of one unaligned span that crosses a block boundary
        assert disk.read(2 * MiB - 1234, 5000) == raw.read_bytes()[2 * MiB - 1234 : 2 * MiB + 3766]


def test_probe_finds_fixed_footer_at_the_end(tmp_path: Path) -> None:
    img = tmp_path / "f.vhd"
    qemu_img("create", "-f", "vpc", "-o", "subformat=fixed", img, "4M")
    with vmferry.open(img) as disk:  # no format given: probed from the last 512 bytes
        assert disk.format == "vhd"
        assert disk.info()["subformat"] == "fixed"


# --- vmferry makes, qemu checks -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("subformat", "block_size"), [("dynamic", None), ("dynamic", "512K"), ("fixed", None)]
)
def test_written_images_match_qemu(tmp_path: Path, subformat: str, block_size: str | None) -> None:
    size = 20 * MiB + 3 * 512  # not a CHS product: qemu must still see exactly this size
    img = tmp_path / "v.vhd"
    opts = {"subformat": subformat} | ({"block_size": block_size} if block_size else {})
    model = bytearray(size)
    rng = random.Random(11)
    with vmferry.create(img, "vhd", size, **opts) as disk:
        for off, data in random_writes(rng, size, 40):
            disk.write(off, data)
            model[off : off + len(data)] = data
        disk.write_zeroes(4096 + 7, 3 * MiB)
        model[4096 + 7 : 4096 + 7 + 3 * MiB] = bytes(3 * MiB)
        disk.write(size - 5, b"tail!")
        model[size - 5 :] = b"tail!"
    ref = tmp_path / "ref.raw"
    ref.write_bytes(model)
    assert qemu_img_info(img, "vpc")["virtual-size"] == size
    out = qemu_img("compare", "-f", "vpc", "-F", "raw", img, ref, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    with vmferry.open(img) as disk:
        assert disk.read(0, size) == model
        assert disk.top.check().clean


@pytest.mark.parametrize("block_size", [512 * 1024, 2 * MiB])
def test_long_writes_append_fresh_blocks_together_and_match_qemu(
    tmp_path: Path, block_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write over several unallocated blocks appends them in one gathered file write
    (bitmap, data, bitmap, data...), beside blocks already allocated; qemu reads it all."""
    size = 12 * block_size + 3 * 512
    img = tmp_path / "g.vhd"
    model = bytearray(size)
    gathered: list[list[int]] = []
    real = BlockFile.write_pieces

    def record(self: BlockFile, offset: int, pieces: list) -> None:
        gathered.append([len(p) for p in pieces])
        real(self, offset, pieces)

    monkeypatch.setattr(BlockFile, "write_pieces", record)
    rng = random.Random(5)
    writes = [
        (3 * block_size, 2 * block_size),  # two whole fresh blocks
        (block_size + 1000, 3 * block_size),  # fresh partial, allocated, fresh whole, partial
        (7 * block_size - 512, 4 * block_size + 700),  # ends in the last, partial block
        (0, size),  # everything again: allocated and fresh blocks side by side
    ]
    with vmferry.create(img, "vhd", size, block_size=str(block_size)) as disk:
        for off, n in writes:
            data = rng.randbytes(n)
            disk.write(off, data)
            model[off : off + n] = data
    sec = 512
    # each block's data starts on a page: its bitmap (one sector: it covers 4096 sectors, both
    # block sizes here) is the last sector of the page before, the rest of that page zeros
    page = 4096
    first = 2048  # the first block: from the end of the BAT (2048) to the page at 4096
    assert gathered == [
        [first, block_size, page, block_size],  # blocks 3, 4
        [page],  # block 1 starts 1000 bytes in: its data is not next to its bitmap
        [block_size - sec, page, block_size],  # ... from its 2nd sector on, then block 2
        [page],  # block 6, only its last sector
        [sec] + [page, block_size] * 4 + [page, sec],  # that sector, blocks 7-10, block 11's
        [page, block_size],  # block 0
        [page, block_size],  # block 5
        [page, 3 * sec],  # block 12: the disk's last 3 sectors
    ]
    with vmferry.open(img) as disk:
        entries = [e for e in disk.top.bat if e != 0xFFFFFFFF]
    assert len(entries) == 13
    assert {(e * sec + sec) % page for e in entries} == {0}
    ref = tmp_path / "ref.raw"
    ref.write_bytes(model)
    out = qemu_img("compare", "-f", "vpc", "-F", "raw", img, ref, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    with vmferry.open(img) as disk:
        assert disk.read(0, size) == model
        assert disk.top.check().clean


@pytest.mark.parametrize(
    "size", [1, 512 * 17 * 4 * 100 + 512, 1000 * MiB + 512, 127 << 30, 2040 << 30]
)
def test_qemu_sees_exactly_the_requested_size(tmp_path: Path, size: int) -> None:
    img = tmp_path / "s.vhd"
    vmferry.create(img, "vhd", size).close()
    expected = -(-size // 512) * 512  # sizes are whole sectors
    assert qemu_img_info(img, "vpc")["virtual-size"] == expected
    assert img.stat().st_size < 10 * MiB  # BAT only


def test_fixed_creation_is_sparse(tmp_path: Path) -> None:
    img = tmp_path / "big.vhd"
    vmferry.create(img, "vhd", 8 << 30, subformat="fixed").close()
    st = img.stat()
    assert st.st_size == (8 << 30) + FOOTER_SIZE
    assert st.st_blocks * 512 < 1 * MiB
    assert qemu_img_info(img, "vpc")["virtual-size"] == 8 << 30


def test_azure_option_rounds_up_to_whole_mib(tmp_path: Path) -> None:
    img = tmp_path / "azure.vhd"
    vmferry.create(img, "vhd", 10 * MiB + 1, azure="on").close()
    info = qemu_img_info(img, "vpc")
    assert info["virtual-size"] == 11 * MiB
    with vmferry.open(img) as disk:
        facts = disk.info()
        assert facts["subformat"] == "fixed"
        assert facts["azure_compatible"] is True
    with pytest.raises(vmferry.VmferryError):
        vmferry.create(tmp_path / "bad.vhd", "vhd", MiB, azure="on", subformat="dynamic")


@pytest.mark.parametrize("bad", ["3M", "256K", "1G", "two"])
def test_block_size_option_is_validated(tmp_path: Path, bad: str) -> None:
    with pytest.raises(vmferry.VmferryError):
        vmferry.create(tmp_path / "b.vhd", "vhd", 4 * MiB, block_size=bad)


def test_geometry_is_capped_at_the_spec_maximum() -> None:
    assert chs_geometry((128 << 30) // 512) == (65535, 16, 255)
    assert chs_geometry((2040 << 30) // 512) == (65535, 16, 255)


def test_geometry_agrees_with_qemu(tmp_path: Path) -> None:
    for size in (4 * MiB, 100 * MiB, 3 << 30):
        img = tmp_path / f"g{size}.vhd"
        qemu_img("create", "-f", "vpc", img, str(size))
        footer, ok = parse_footer(img.read_bytes()[:512])
        assert ok
        cyl, heads, spt = footer.cylinders, footer.heads, footer.sectors_per_track
        assert chs_geometry(cyl * heads * spt) == (cyl, heads, spt)


def test_empty_huge_dynamic_disk_maps_in_one_extent(tmp_path: Path) -> None:
    img = tmp_path / "huge.vhd"
    vmferry.create(img, "vhd", 1000 << 30).close()
    with vmferry.open(img) as disk:
        exts = list(disk.top.extents())
        assert len(exts) == 1 and exts[0].alloc is Alloc.ZERO


def test_resize_grows_fixed_and_dynamic(tmp_path: Path) -> None:
    for sub in ("fixed", "dynamic"):
        img = tmp_path / f"r{sub}.vhd"
        with vmferry.create(img, "vhd", 3 * MiB, subformat=sub) as disk:
            disk.write(3 * MiB - 4, b"end!")
            disk.top.resize(4 * MiB)  # within the BAT's room (dynamic: 2 entries of 2 MiB)
            disk.top.resize(9 * MiB)  # past it: a dynamic VHD's BAT is moved to the end
            disk.write(8 * MiB, b"tail")
        new = 9 * MiB
        assert qemu_img_info(img, "vpc")["virtual-size"] == new
        with vmferry.open(img) as disk:
            assert disk.read(3 * MiB - 4, 8) == b"end!" + bytes(4)
            assert disk.read(8 * MiB, 8) == b"tail" + bytes(4)
            assert disk.read(4 * MiB, 4 * MiB) == bytes(4 * MiB)
        raw = tmp_path / f"r{sub}.raw"
        qemu_img("convert", "-f", "vpc", "-O", "raw", str(img), str(raw))
        data = raw.read_bytes()
        assert data[3 * MiB - 4 : 3 * MiB] == b"end!" and data[8 * MiB : 8 * MiB + 4] == b"tail"


# --- differencing chains, checked with libvhdi ---------------------------------------------------


def _aligned_writes(rng: random.Random, size: int, count: int, unit: int):
    out = []
    for _ in range(count):
        off = rng.randrange(size // unit - 1) * unit
        n = rng.randint(1, min(200, (size - off) // unit)) * unit
        out.append((off, bytes([rng.randrange(1, 256)]) * n))
    return out


def _pyvhdi_chain(paths: list[Path]):
    pyvhdi = pytest.importorskip("pyvhdi")
    files = []
    for p in paths:
        f = pyvhdi.file()
        f.open(str(p))
        files.append(f)
    for child, parent in itertools.pairwise(files):
        child.set_parent(parent)
    return files


@pytest.mark.parametrize("base_maker", ["qemu", "vmferry"])
def test_three_deep_chain_matches_libvhdi(tmp_path: Path, base_maker: str) -> None:
    size = 8 * MiB
    base, child, top = tmp_path / "base.vhd", tmp_path / "child.vhd", tmp_path / "top.avhd"
    model = bytearray(size)
    rng = random.Random(5)
    if base_maker == "qemu":
        qemu_img("create", "-f", "vpc", "-o", "force_size=on", base, str(size))
        qemu_io("vpc", base, "write -P 0x5a 0 3M", "write -P 0xa5 5M 1M")
        model[0 : 3 * MiB] = b"\x5a" * 3 * MiB
        model[5 * MiB : 6 * MiB] = b"\xa5" * MiB
    else:
        with vmferry.create(base, "vhd", size) as disk:
            for off, data in _aligned_writes(rng, size, 12, 4096):
                disk.write(off, data)
                model[off : off + len(data)] = data
    # libvhdi misreads bitmap bytes that are partly set (it shifts without masking), so the
    # layers it checks are written in 4 KiB units: whole bitmap bytes.
    for path, parent in ((child, base), (top, child)):
        with vmferry.create(path, "vhd", parent=parent) as disk:
            for off, data in _aligned_writes(rng, size, 12, 4096):
                disk.write(off, data)
                model[off : off + len(data)] = data
            disk.write_zeroes(64 * 4096, 100 * 4096)
            model[64 * 4096 : 164 * 4096] = bytes(100 * 4096)
    with vmferry.open(top) as disk:
        assert len(disk.layers) == 3
        assert disk.read(0, size) == model
    files = _pyvhdi_chain([top, child, base])
    assert files[0].read_buffer_at_offset(size, 0) == bytes(model)
    with vmferry.open(child) as disk:
        child_uuid = disk.top.identity()["uuid"]
    assert files[0].get_parent_identifier() == child_uuid
    assert files[1].get_identifier() == child_uuid
    assert files[0].get_parent_filename() == "child.vhd"
    assert files[0].get_media_size() == size


def test_differencing_child_is_sector_granular(tmp_path: Path) -> None:
    size = 4 * MiB
    base, child = tmp_path / "b.vhd", tmp_path / "c.vhd"
    qemu_img("create", "-f", "vpc", "-o", "force_size=on", base, str(size))
    qemu_io("vpc", base, "write -P 0x11 0 4M")
    model = bytearray(b"\x11" * size)
    with vmferry.create(child, "vhd", parent=base) as disk:
        for off, n, byte in ((512, 512, 0x22), (3 * 512, 1024, 0x33), (2 * MiB - 512, 1536, 0x44)):
            disk.write(off, bytes([byte]) * n)
            model[off : off + n] = bytes([byte]) * n
        # a sub-sector write into a sector the child already holds is fine
        disk.write(512 + 100, b"xyz")
        model[612:615] = b"xyz"
        # into a sector it does not hold, the layer cannot read the parent: it refuses, before
        # changing anything, and the chain completes the sector from the parent instead
        assert disk.top.write_alignment == 512
        with pytest.raises(vmferry.VmferryError, match="part of sector"):
            disk.top.write(10 * 512 + 1, b"q")
        with pytest.raises(vmferry.VmferryError, match="part of sector"):
            disk.top.write_zeroes(MiB + 7, 2 * MiB)
        assert disk.read(0, size) == model
        disk.write(10 * 512 + 1, b"q")
        model[10 * 512 + 1] = ord("q")
        disk.write_zeroes(MiB, 512)  # zeros hide the parent
        model[MiB : MiB + 512] = bytes(512)
    with vmferry.open(child) as disk:
        assert disk.read(0, size) == model
        runs = [(e.offset, e.length, e.alloc) for e in disk.top.extents(0, 4096)]
        assert runs[:4] == [
            (0, 512, Alloc.UNALLOCATED),
            (512, 512, Alloc.DATA),
            (1024, 512, Alloc.UNALLOCATED),
            (1536, 1024, Alloc.DATA),
        ]


def test_child_of_qemu_dynamic_disk_reads_parent_where_unwritten(tmp_path: Path) -> None:
    base, child = tmp_path / "b.vhd", tmp_path / "c.vhd"
    qemu_img("create", "-f", "vpc", base, "6M")
    qemu_io("vpc", base, "write -P 0x77 1M 2M")
    with vmferry.create(child, "vhd", parent=base) as disk:
        disk.write(1536 * 1024, b"\x88" * 4096)
    raw = tmp_path / "b.raw"
    qemu_img("convert", "-f", "vpc", "-O", "raw", base, raw)
    expect = bytearray(raw.read_bytes())
    expect[1536 * 1024 : 1536 * 1024 + 4096] = b"\x88" * 4096
    with vmferry.open(child) as disk:
        assert disk.virtual_size == len(expect)
        assert disk.read(0, disk.virtual_size) == expect


# --- locating the parent -------------------------------------------------------------------------


def _make_pair(d: Path) -> tuple[Path, Path]:
    d.mkdir(parents=True, exist_ok=True)
    base, child = d / "base.vhd", d / "child.avhd"
    with vmferry.create(base, "vhd", 2 * MiB) as disk:
        disk.write(0, b"base" * 128)
    with vmferry.create(child, "vhd", parent=base) as disk:
        disk.write(512, b"kid!" * 128)
    return base, child


def test_parent_found_by_relative_locator_after_moving(tmp_path: Path) -> None:
    from vmferry.disk import ParentInfo

    base, child = _make_pair(tmp_path / "a" / "vm")
    sub = tmp_path / "a" / "vm" / "parents"
    sub.mkdir()
    shutil.move(base, sub / "base.vhd")
    with _writable(child) as top:  # rebase: metadata only
        parent = open_layer(sub / "base.vhd", "vhd")
        top.set_parent(ParentInfo(parent, str(sub / "base.vhd"), "parents/base.vhd", "vhd"))
        parent.close()
    ref = _layer(child).parent_ref()
    assert ref is not None and ref.hints[0] == "parents/base.vhd"
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "a" / "vm", moved)  # the absolute locator is now stale
    with vmferry.open(moved / "child.avhd") as disk:
        assert len(disk.layers) == 2
        assert disk.read(0, 4) == b"base" and disk.read(512, 4) == b"kid!"
        assert disk.read(1024, 4) == bytes(4)


class _writable:
    """Open one layer writable as a context manager (set_parent works on a bare layer)."""

    def __init__(self, path: Path) -> None:
        self.layer = open_layer(path, "vhd", writable=True)

    def __enter__(self) -> Vhd:
        return self.layer  # type: ignore[return-value]

    def __exit__(self, *exc: object) -> None:
        self.layer.flush()
        self.layer.close()


def _layer(path: Path) -> Vhd:
    layer = open_layer(path, "vhd")
    layer.close()
    return layer  # type: ignore[return-value]


def test_parent_outside_allowed_dir_is_refused(tmp_path: Path) -> None:
    _base, child = _make_pair(tmp_path / "pdir")
    inner = tmp_path / "pdir" / "inner"
    inner.mkdir()
    shutil.move(child, inner / "child.avhd")
    # the stored relative path (.\base.vhd) misses; the absolute one points outside inner/
    with pytest.raises(vmferry.VmferryError) as err:
        vmferry.open(inner / "child.avhd")
    assert type(err.value).__name__ == "PathEscapeError"
    with vmferry.open(inner / "child.avhd", allowed_dirs=[tmp_path]) as disk:
        assert disk.read(0, 4) == b"base"


def test_wrong_parent_is_a_mismatch(tmp_path: Path) -> None:
    base, child = _make_pair(tmp_path)
    base.unlink()
    vmferry.create(base, "vhd", 2 * MiB).close()  # same name, new uuid
    with pytest.raises(vmferry.VmferryError) as err:
        vmferry.open(child)
    assert type(err.value).__name__ == "ParentMismatchError"
    assert "uuid" in str(err.value)


def test_missing_parent_names_the_locator(tmp_path: Path) -> None:
    base, child = _make_pair(tmp_path)
    base.unlink()
    with pytest.raises(vmferry.VmferryError) as err:
        vmferry.open(child)
    assert type(err.value).__name__ == "ParentNotFoundError"
    assert "base.vhd" in str(err.value)


def test_self_reference_and_loops_are_detected(tmp_path: Path) -> None:
    from vmferry.disk import ParentInfo

    _base, a = _make_pair(tmp_path)
    b = tmp_path / "b.avhd"
    vmferry.create(b, "vhd", parent=a).close()
    # a names b as its parent (b's uuid, b's path): b -> a -> b
    with _writable(a) as layer:
        other = open_layer(b, "vhd")
        layer.set_parent(ParentInfo(other, str(b), "b.avhd", "vhd"))
        other.close()
    with pytest.raises(vmferry.VmferryError) as err:
        vmferry.open(b)
    assert type(err.value).__name__ == "ChainLoopError"
    # a child naming itself (a copy supplies its own uuid while it is open for writing)
    twin = tmp_path / "twin.avhd"
    shutil.copyfile(b, twin)
    with _writable(b) as layer:
        me = open_layer(twin, "vhd")
        layer.set_parent(ParentInfo(me, str(b), "b.avhd", "vhd"))
        me.close()
    twin.unlink()
    with pytest.raises(vmferry.VmferryError) as err:
        vmferry.open(b)
    assert type(err.value).__name__ == "ChainLoopError"


# --- crash safety --------------------------------------------------------------------------------


class _Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at", range(17))  # 16 writes and fsyncs, then none
def test_a_crash_during_allocation_leaves_a_readable_image(tmp_path: Path, crash_at: int) -> None:
    img = tmp_path / "c.vhd"
    with vmferry.create(img, "vhd", 10 * MiB) as disk:
        disk.write(0, b"\x01" * 4096)
    layer = open_layer(img, "vhd", writable=True)
    calls = 0
    real_write, real_pieces, real_fsync = (
        layer.file.write,
        layer.file.write_pieces,
        layer.file.fsync,
    )

    def counting(fn):
        def wrapper(*args):
            nonlocal calls
            if calls == crash_at:
                raise _Crash
            calls += 1
            return fn(*args)

        return wrapper

    layer.file.write = counting(real_write)  # type: ignore[method-assign]
    layer.file.write_pieces = counting(real_pieces)  # type: ignore[method-assign]
    layer.file.fsync = counting(real_fsync)  # type: ignore[method-assign]
    try:
        layer.write(3 * MiB, b"\x02" * 4096)  # allocates block 1
        layer.write(5, b"\x03" * 600)  # in place: sectors the block already holds
        layer.write(5000, b"\x04" * 600)  # existing block, new bitmap bits
        layer.write(6 * MiB, b"\x05" * (4 * MiB))  # blocks 3 and 4 whole, in one append
        layer.flush()
        finished = True
    except _Crash:
        finished = False
    layer.file.close()
    with vmferry.open(img) as disk:  # whatever happened, it opens and reads sanely
        new = disk.read(3 * MiB, 4096)
        assert new in (bytes(4096), b"\x02" * 4096)
        head = disk.read(0, 4096)
        assert head[:5] == b"\x01" * 5 and head[605:] == b"\x01" * (4096 - 605)
        assert head[5:605] in (b"\x01" * 600, b"\x03" * 600)
        assert disk.read(4096, 8192) in (
            bytes(8192),
            bytes(5000 - 4096) + b"\x04" * 600 + bytes(8192 - 600 - (5000 - 4096)),
        )
        appended = [disk.read(at, 2 * MiB) for at in (6 * MiB, 8 * MiB)]
        assert all(block in (bytes(2 * MiB), b"\x05" * 2 * MiB) for block in appended)
        if finished:
            assert disk.read(5000, 600) == b"\x04" * 600 and new == b"\x02" * 4096
            assert appended == [b"\x05" * 2 * MiB] * 2
        report = disk.top.check()
        assert not report.corruptions or all("footer" in c for c in report.corruptions)
    assert qemu_img_info(img, "vpc")["virtual-size"] == 10 * MiB


def test_check_reports_a_leaked_block(tmp_path: Path) -> None:
    img = tmp_path / "l.vhd"
    vmferry.create(img, "vhd", 6 * MiB).close()
    layer = open_layer(img, "vhd", writable=True)
    real_write = layer.file.write

    def no_bat(offset, data):  # the BAT entry never reaches the disk
        if offset < 4096 and len(data) == 4:
            raise _Crash
        return real_write(offset, data)

    layer.file.write = no_bat  # type: ignore[method-assign]
    with pytest.raises(_Crash):
        layer.write(0, b"x" * 512)
    layer.file.close()
    report = _checked(img)
    assert not report.corruptions
    assert report.leaked_bytes >= 2 * MiB


def _checked(img: Path):
    layer = open_layer(img, "vhd")
    try:
        return layer.check()
    finally:
        layer.close()


def test_check_reports_overlapping_blocks(tmp_path: Path) -> None:
    img = tmp_path / "o.vhd"
    with vmferry.create(img, "vhd", 6 * MiB) as disk:
        disk.write(0, b"a" * 512)
        disk.write(2 * MiB, b"b" * 512)
    data = bytearray(img.read_bytes())
    header, _ = parse_header(bytes(data[512:1536]))
    t = header.table_offset
    data[t + 4 : t + 8] = data[t : t + 4]  # block 1 now points at block 0
    img.write_bytes(data)
    report = _checked(img)
    assert any("overlaps" in c for c in report.corruptions)
    with pytest.raises(vmferry.VmferryError) as err:  # writing through it would corrupt more
        open_layer(img, "vhd", writable=True)
    assert type(err.value).__name__ == "CorruptImageError"


# --- the corpus ----------------------------------------------------------------------------------

CORPUS_VHDS = [
    "dfvfs/ext2.vhd",
    "dissect.hypervisor/disk/vhd/fixed.vhd.gz",
    "dissect.hypervisor/disk/vhd/dynamic.vhd.gz",
    "qemu/d2v-zerofilled.vhd.bz2",
    "qemu/virtualpc-dynamic.vhd.bz2",
    "qemu/hyperv2012r2-dynamic.vhd.bz2",
]


@pytest.mark.parametrize("name", CORPUS_VHDS)
def test_corpus_vhd_matches_ground_truth(
    tmp_path: Path, corpus: Path, ground_truth: dict, name: str
) -> None:
    facts = ground_truth["files"][name]
    img = unpack_corpus_file(corpus / name, tmp_path)
    with vmferry.open(img, "vhd") as disk:
        assert disk.virtual_size == facts["virtual_size"]
        report = disk.top.check()
        assert report.clean, report
        if "raw_sha256" in facts:
            assert flatten_sha256(disk) == facts["raw_sha256"]
        else:  # the 127 GiB empty disks: nothing allocated
            assert facts["allocated_bytes"] == 0
            assert all(e.alloc is not Alloc.DATA for e in disk.top.extents())


def test_corpus_dissect_assertions(tmp_path: Path, corpus: Path, ground_truth: dict) -> None:
    truth = ground_truth["verified_upstream_assertions"]
    for kind in ("fixed", "dynamic"):
        img = unpack_corpus_file(corpus / f"dissect.hypervisor/disk/vhd/{kind}.vhd.gz", tmp_path)
        with vmferry.open(img) as disk:
            facts = truth[f"vhd/{kind}.vhd"]
            assert hashlib.sha256(disk.read(0, 512)).hexdigest() == facts["sector0_sha256"]
            assert disk.read(0x200000, 512) == b"\xff" * 512
            assert disk.read(0, 8).hex() == "33c08ed0bc007c8e"
            if kind == "dynamic":
                assert disk.read(0x3FFF * 512, 16 * 512) == bytes(16 * 512)


def test_corpus_ext2_vhd_is_the_same_volume(corpus: Path, ground_truth: dict) -> None:
    facts = ground_truth["files"]["dfvfs/ext2.vhd"]
    with vmferry.open(corpus / "dfvfs/ext2.vhd") as disk:
        head = disk.read(0, 4194304)
        assert hashlib.sha256(head).hexdigest() == facts["first_4194304_bytes_sha256"]
        assert disk.read(4194304, disk.virtual_size - 4194304) == bytes(18432)
        assert b"bank,joesmith,superrich" in head


def test_corpus_windows_differencing_without_parent(
    tmp_path: Path, corpus: Path, ground_truth: dict
) -> None:
    img = unpack_corpus_file(corpus / "dfvfs/fat-differential.vhd", tmp_path)
    facts = ground_truth["files"]["dfvfs/fat-differential.vhd"]
    layer = open_layer(img, "vhd")
    try:
        assert layer.virtual_size == facts["virtual_size"]
        # qemu reads the layer alone (no backing support): our layer alone must agree
        assert flatten_sha256(layer) == facts["raw_sha256"]
        ref = layer.parent_ref()
        assert ref is not None
        stored = {loc["platform"]: loc["path"] for loc in ref.raw["locators"]}
        assert stored == {
            "W2ku": "C:\\Projects\\dfvfs\\test_data\\fat-parent.vhd",
            "W2ru": ".\\fat-parent.vhd",
        }
        assert ref.hints[0] == "fat-parent.vhd"
        assert ref.advisory == {}  # Windows 10 stores no parent timestamp
        assert layer.info()["subformat"] == "differencing"
    finally:
        layer.close()
    with pytest.raises(vmferry.VmferryError) as err:
        vmferry.open(img)
    assert type(err.value).__name__ == "ParentNotFoundError"
    assert "fat-parent.vhd" in str(err.value)
    # libvhdi reads the same parent name
    pyvhdi = pytest.importorskip("pyvhdi")
    f = pyvhdi.file()
    f.open(str(img))
    assert f.get_parent_filename() == "C:\\Projects\\dfvfs\\test_data\\fat-parent.vhd"
    assert f.get_parent_identifier() == ref.identity["uuid"]


def test_corpus_afl5_is_refused(tmp_path: Path, corpus: Path) -> None:
    img = unpack_corpus_file(corpus / "qemu/afl5.img.bz2", tmp_path)
    with pytest.raises(vmferry.VmferryError, match=r"Max Table Entries too large \(1073741825\)"):
        vmferry.open(img, "vhd")


def test_corpus_libvhdi_fragments(corpus: Path) -> None:
    footer, ok = parse_footer((corpus / "libvhdi/tests/data/file_footer.1").read_bytes())
    assert ok and footer.cookie == b"conectix"
    assert (footer.features, footer.version, footer.data_offset) == (2, 0x10000, 0x200)
    assert (footer.creator_app, footer.creator_version, footer.creator_os) == (
        b"vpc ",
        0x10000,
        b"Wi2k",
    )
    assert footer.original_size == footer.current_size == 536870912
    assert (footer.cylinders, footer.heads, footer.sectors_per_track) == (1040, 16, 63)
    assert footer.disk_type == 4
    import uuid

    assert str(uuid.UUID(bytes=footer.unique_id)) == "40d56d36-9ab8-4fe4-a31a-121fe2bf15eb"
    raw = (corpus / "libvhdi/tests/data/dynamic_disk_header.1").read_bytes()
    header, ok = parse_header(raw)
    assert ok and header.cookie == b"cxsparse"
    assert (header.table_offset, header.max_table_entries, header.block_size) == (
        0x600,
        256,
        2 * MiB,
    )
    assert str(uuid.UUID(bytes=header.parent_uuid)) == "d49c5c80-350a-4a89-898a-5ad6d10f6578"
    from vmferry.disk.vhd import decode_parent_name

    assert decode_parent_name(header.parent_name) == "dynamic.vhd"


# --- bad input -----------------------------------------------------------------------------------


def _small_dynamic(tmp_path: Path) -> bytes:
    img = tmp_path / "seed.vhd"
    with vmferry.create(img, "vhd", 3 * MiB) as disk:
        disk.write(0, b"seed" * 1024)
    return img.read_bytes()


def _with_footer(data: bytes, **changes) -> bytes:
    footer, _ = parse_footer(data[:512])
    packed = pack_footer(footer.replace(**changes))
    return packed + data[512:-512] + packed


def _with_header(data: bytes, **changes) -> bytes:
    header, _ = parse_header(data[512:1536])
    return data[:512] + pack_header(header.replace(**changes)) + data[1536:]


def _corrupt_checksums(data: bytes) -> bytes:
    return data[:64] + b"\0\0\0\1" + data[68:-448] + b"\0\0\0\1" + data[-444:]


BAD_INPUTS = {
    "empty": (lambda d: b"", "NotThisFormatError"),
    "not a vhd": (lambda d: b"\0" * 4096, "NotThisFormatError"),
    "both footers bad checksum": (_corrupt_checksums, "CorruptImageError"),
    "header bad checksum": (lambda d: d[:548] + b"\1\2\3\4" + d[552:], "CorruptImageError"),
    "header cookie": (lambda d: d[:512] + b"cxsparsX" + d[520:], "CorruptImageError"),
    "block size not power of two": (
        lambda d: _with_header(d, block_size=3000),
        "CorruptImageError",
    ),
    "block size huge": (lambda d: _with_header(d, block_size=1 << 31), "ResourceLimitError"),
    "unknown disk type": (lambda d: _with_footer(d, disk_type=7), "UnsupportedFeatureError"),
    "header offset past EOF": (
        lambda d: _with_footer(d, data_offset=1 << 40),
        "TruncatedImageError",
    ),
    "BAT offset past EOF": (lambda d: _with_header(d, table_offset=1 << 40), "TruncatedImageError"),
    "max table entries absurd": (
        lambda d: _with_header(d, max_table_entries=0x7FFFFFFF),
        "ResourceLimitError",
    ),
    "max table entries too small": (
        lambda d: _with_header(d, max_table_entries=1),
        "CorruptImageError",
    ),
    "BAT entry past EOF": (
        lambda d: d[:1536] + b"\x00\xff\xff\x00" + d[1540:],
        "TruncatedImageError",
    ),
    "size beyond the VHD maximum": (
        lambda d: _with_footer(d, current_size=1 << 45),
        "CorruptImageError",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_named_errors(tmp_path: Path, case: str) -> None:
    mutate, expected = BAD_INPUTS[case]
    img = tmp_path / "bad.vhd"
    img.write_bytes(mutate(_small_dynamic(tmp_path)))
    with pytest.raises(vmferry.VmferryError) as err:
        layer = open_layer(img, "vhd")
        layer.read(0, layer.virtual_size)
    assert type(err.value).__name__ == expected, str(err.value)
    assert str(err.value)


def test_truncation_at_every_structure_boundary(tmp_path: Path) -> None:
    seed = _small_dynamic(tmp_path)
    header, _ = parse_header(seed[512:1536])
    block0 = int.from_bytes(seed[header.table_offset : header.table_offset + 4], "big") * 512
    cuts = [
        0,
        100,
        511,
        512,
        700,
        1536,
        header.table_offset + 2,
        block0,
        block0 + 512,
        block0 + MiB,
        len(seed) - 512,
        len(seed) - 1,
    ]
    for cut in cuts:
        img = tmp_path / f"t{cut}.vhd"
        img.write_bytes(seed[:cut])
        try:
            layer = open_layer(img, "vhd")
        except vmferry.VmferryError:
            continue  # a named error is the expected outcome
        # survivable: the reserved last footer byte (old 511-byte form), or the whole tail
        # footer (the copy at 0 is used, and check says the end copy is missing)
        assert cut in (len(seed) - 1, len(seed) - 512), cut
        assert layer.read(0, 4) == b"seed"
        assert bool(layer.check().corruptions) == (cut == len(seed) - 512)
        layer.close()


def test_bad_head_footer_falls_back_to_the_tail_copy(tmp_path: Path) -> None:
    data = bytearray(_small_dynamic(tmp_path))
    data[64:68] = b"\0\0\0\1"
    img = tmp_path / "h.vhd"
    img.write_bytes(data)
    layer = open_layer(img, "vhd")
    assert layer.read(0, 8) == b"seedseed"
    assert any("offset 0" in c for c in layer.check().corruptions)
    layer.close()


def test_old_511_byte_footer(tmp_path: Path) -> None:
    img = tmp_path / "old.vhd"
    with vmferry.create(img, "vhd", MiB, subformat="fixed") as disk:
        disk.write(0, b"old!")
    with open(img, "r+b") as f:  # the 512th footer byte is reserved (zero): drop it
        f.truncate(os.path.getsize(img) - 1)
    with vmferry.open(img) as disk:
        assert disk.virtual_size == MiB
        assert disk.read(0, 4) == b"old!"


def test_a_fixed_vhd_holding_a_vhd_is_read_as_fixed(tmp_path: Path) -> None:
    inner = tmp_path / "inner.vhd"
    vmferry.create(inner, "vhd", MiB).close()
    outer = tmp_path / "outer.vhd"
    with vmferry.create(outer, "vhd", 4 * MiB, subformat="fixed") as disk:
        disk.write(0, inner.read_bytes())
    with vmferry.open(outer) as disk:
        assert disk.info()["subformat"] == "fixed"
        assert disk.virtual_size == 4 * MiB


def _rewrite_locators(child: Path, locators: list[tuple[bytes, bytes]]) -> None:
    """Replace a child's parent locators with (platform, data) pairs placed before the footer."""
    from vmferry.disk.vhd import ParentLocator

    data = bytearray(child.read_bytes())
    footer = data[-512:]
    body = data[:-512]
    entries = []
    for platform, blob in locators:
        at = len(body)
        padded = blob.ljust(-(-len(blob) // 512) * 512, b"\0")
        entries.append(ParentLocator(platform, len(padded), len(blob), 0, at).pack())
        body += padded
    header, _ = parse_header(bytes(body[512:1536]))
    packed = pack_header(header.replace(locators=b"".join(entries).ljust(192, b"\0")))
    body[512:1536] = packed
    child.write_bytes(bytes(body) + bytes(footer))


def test_macx_locator_is_followed(tmp_path: Path) -> None:
    from urllib.parse import quote

    base, child = _make_pair(tmp_path / "m")
    sub = tmp_path / "m" / "p q"
    sub.mkdir()
    shutil.move(base, sub / "base.vhd")
    url = "file://localhost" + quote(str(sub / "base.vhd"))
    _rewrite_locators(child, [(b"MacX", url.encode())])
    layer = _layer(child)
    assert layer.parent_ref().hints[0] == str(sub / "base.vhd")
    assert not layer.problems
    with vmferry.open(child) as disk:
        assert len(disk.layers) == 2 and disk.read(0, 4) == b"base"


def test_windows_relative_locator_with_subdirectory(tmp_path: Path) -> None:
    base, child = _make_pair(tmp_path / "w")
    (tmp_path / "w" / "sub").mkdir()
    shutil.move(base, tmp_path / "w" / "sub" / "base.vhd")
    _rewrite_locators(
        child,
        [
            (b"W2ru", ".\\sub\\base.vhd".encode("utf-16-le")),
            (b"W2ku", "D:\\VMs\\sub\\base.vhd".encode("utf-16-le")),
        ],
    )
    ref = _layer(child).parent_ref()
    assert ref.hints[:2] == ("sub/base.vhd", "D:\\VMs\\sub\\base.vhd")
    with vmferry.open(child) as disk:
        assert disk.read(512, 4) == b"kid!" and disk.read(0, 4) == b"base"


def test_parent_timestamp_change_only_warns(tmp_path: Path) -> None:
    base, child = _make_pair(tmp_path)
    data = bytearray(base.read_bytes())
    footer, _ = parse_footer(bytes(data[:512]))
    packed = pack_footer(footer.replace(timestamp=footer.timestamp + 3600))
    data[:512] = packed
    data[-512:] = packed
    base.write_bytes(data)
    with vmferry.open(child) as disk:
        assert disk.read(0, 4) == b"base"
        assert any("timestamp" in w for w in disk.warnings)


def test_info_describes_the_image(tmp_path: Path) -> None:
    base, child = _make_pair(tmp_path)
    with vmferry.open(child) as disk:
        facts = disk.info()
        parent_uuid = disk.layers[1].identity()["uuid"]
    assert facts["subformat"] == "differencing"
    assert facts["parent_uuid"] == parent_uuid
    assert facts["parent_name"] == "base.vhd"
    assert {loc["platform"] for loc in facts["parent_locators"]} == {"W2ku", "W2ru"}
    assert facts["block_size"] == 2 * MiB and facts["creator_app"] == "qem2"
    assert facts["size_from"] == "current_size" and facts["saved_state"] is False
    # qemu reports the same block size for the parent (cluster_size)
    assert qemu_img_info(base, "vpc")["cluster-size"] == facts["block_size"]


def test_locator_outside_the_file_is_reported_not_fatal(tmp_path: Path) -> None:
    from vmferry.disk.vhd import ParentLocator, parse_locators

    _base, child = _make_pair(tmp_path)
    data = bytearray(child.read_bytes())
    header, _ = parse_header(bytes(data[512:1536]))
    locs = parse_locators(header)
    locs[0] = locs[0].replace(data_offset=1 << 40)
    packed = b"".join(loc.pack() for loc in locs)
    data[512:1536] = pack_header(header.replace(locators=packed))
    child.write_bytes(data)
    layer = _layer(child)
    assert any("past the end" in p for p in layer.problems)
    assert isinstance(locs[0], ParentLocator)
    with vmferry.open(child) as disk:  # the other locator still finds the parent
        assert disk.read(0, 4) == b"base"
    assert _checked(child).corruptions


@pytest.mark.parametrize("crash_at", range(7))
def test_a_crash_during_set_parent_keeps_one_valid_parent(tmp_path: Path, crash_at: int) -> None:
    from vmferry.disk import ParentInfo

    base, child = _make_pair(tmp_path)
    sub = tmp_path / "sub"
    sub.mkdir()
    shutil.copyfile(base, sub / "base.vhd")  # same uuid: a valid new location
    layer = open_layer(child, "vhd", writable=True)
    calls = 0
    real_write, real_fsync = layer.file.write, layer.file.fsync

    def counting(fn):
        def wrapper(*args):
            nonlocal calls
            if calls == crash_at:
                raise _Crash
            calls += 1
            return fn(*args)

        return wrapper

    layer.file.write = counting(real_write)  # type: ignore[method-assign]
    layer.file.fsync = counting(real_fsync)  # type: ignore[method-assign]
    parent = open_layer(sub / "base.vhd", "vhd")
    try:
        layer.set_parent(ParentInfo(parent, str(sub / "base.vhd"), "sub/base.vhd", "vhd"))
        done = True
    except _Crash:
        done = False
    parent.close()
    layer.file.close()
    hints = _layer(child).parent_ref().hints
    # writes: 2 locators, footer, fsync, header, fsync: before the header the old parent stays
    header_written = done or crash_at > 4
    assert hints[0] == ("sub/base.vhd" if header_written else "base.vhd")
    with vmferry.open(child) as disk:
        assert disk.read(0, 4) == b"base" and disk.read(512, 4) == b"kid!"


def test_bitmap_range_set_agrees_with_a_bit_by_bit_reading() -> None:
    from vmferry.disk.vhd import _bitmap_range_set, _set_bitmap_range

    rnd = random.Random(7)
    for _ in range(2000):
        bm = bytearray(8)
        for _ in range(rnd.randint(0, 3)):
            a = rnd.randint(0, 64)
            _set_bitmap_range(bm, a, rnd.randint(a, 64))
        s0 = rnd.randint(0, 64)
        s1 = rnd.randint(s0, 64)
        expected = all(bm[s // 8] & (0x80 >> (s % 8)) for s in range(s0, s1))
        assert _bitmap_range_set(bm, s0, s1) is expected, (bytes(bm).hex(), s0, s1)


@pytest.mark.parametrize("sync", [True, False], ids=["synced", "no-sync"])
@pytest.mark.parametrize("block_size", ["512K", "2M", "32M"])
def test_converted_vhd_has_page_aligned_data_and_the_measured_size(
    tmp_path: Path, block_size: str, sync: bool
) -> None:
    """convert (direct writes when synced; one tail footer at the end either way) lays each
    block's data on a page, and the file is exactly as large as measure said; qemu reads it
    as the source, and the footer copies agree."""
    from vmferry.ops.convert import convert
    from vmferry.ops.measure import measure

    size = 100 * MiB + 3 * 512
    src = tmp_path / "src.raw"
    rng = random.Random(3)
    with open(src, "wb") as f:
        f.truncate(size)
        for at in (0, 5 * MiB + 512, 40 * MiB, size - 1000):  # partial blocks, the last one
            f.seek(at)
            f.write(rng.randbytes(min(3 * MiB, size - at)))
    dst = tmp_path / "dst.vhd"
    opts = {"block_size": block_size}
    predicted = measure(src, "vhd", options=opts)
    convert(src, dst, options=opts, sync=sync)
    assert dst.stat().st_size == predicted["required"]
    out = qemu_img("compare", "-f", "vpc", "-F", "raw", dst, src, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    with vmferry.open(dst) as disk:
        layer = disk.top
        assert layer.check().clean
        entries = [e for e in layer.bat if e != 0xFFFFFFFF]
        assert entries and {(e * 512 + layer.bitmap_size) % 4096 for e in entries} == {0}
    raw = dst.read_bytes()
    assert raw[:512] == raw[-512:] and raw[:8] == b"conectix"
