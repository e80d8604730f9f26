"""VHDX writing: images vmferry creates must satisfy qemu-img and libvhdi.

Oracles: ``qemu-img check`` (structure), ``qemu-img compare`` against a raw file holding the
same writes (content), and libyal's libvhdi for differencing chains qemu cannot read.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import uuid
from contextlib import closing
from pathlib import Path

import pytest

import vmferry
from tests.conftest import qemu_img, qemu_img_info
from vmferry.chain import open_layer
from vmferry.disk import Alloc, ParentInfo
from vmferry.disk.vhdx import Vhdx
from vmferry.disk.vhdx.layout import PAYLOAD_FULLY_PRESENT, PAYLOAD_ZERO
from vmferry.errors import ParentMismatchError, ParentNotFoundError, UsageError

MiB = 1 << 20


class Model:
    """The expected disk: a bytearray plus a raw twin file for qemu-img compare."""

    def __init__(self, size: int, fill: bytes | None = None) -> None:
        self.data = bytearray(fill if fill is not None else bytes(size))

    def write(self, off: int, buf: bytes) -> None:
        self.data[off : off + len(buf)] = buf

    def to_raw(self, path: Path) -> Path:
        path.write_bytes(bytes(self.data))
        return path


def random_writes(rng: random.Random, size: int, count: int, align: int = 1):
    for _ in range(count):
        off = rng.randrange(0, size // align) * align
        n = min(size - off, rng.randrange(1, 3 * MiB // align + 2) * align)
        yield off, bytes([rng.randrange(1, 256)]) * n


def qemu_check_clean(path: Path) -> None:
    out = qemu_img("check", "-f", "vhdx", path, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "No errors were found" in out.stdout


@pytest.mark.parametrize(
    ("subformat", "block_size", "lss"),
    [("dynamic", "1M", 512), ("dynamic", "4M", 4096), ("fixed", "1M", 512), ("dynamic", None, 512)],
)
def test_vmferry_images_pass_qemu(
    tmp_path: Path, subformat: str, block_size: str | None, lss: int
) -> None:
    size = 40 * MiB
    img = tmp_path / "v.vhdx"
    opts: dict[str, object] = {"subformat": subformat, "logical_sector_size": lss}
    if block_size:
        opts["block_size"] = block_size
    model = Model(size)
    rng = random.Random(f"{subformat}{block_size}{lss}")
    with vmferry.create(img, "vhdx", size, **opts) as disk:
        for off, buf in random_writes(rng, size, 25):
            disk.write(off, buf)
            model.write(off, buf)
        off = rng.randrange(0, size - 3 * MiB)
        disk.write_zeroes(off, 3 * MiB)
        model.write(off, bytes(3 * MiB))
        assert disk.read(0, size) == bytes(model.data)
    if lss == 4096:  # qemu supports 512-byte logical sectors only: libvhdi is the oracle
        import pyvhdi

        f = pyvhdi.file()
        f.open(str(img))
        assert f.get_bytes_per_sector() == 4096
        assert f.read_buffer_at_offset(size, 0) == bytes(model.data)
        f.close()
        return
    qemu_check_clean(img)
    info = qemu_img_info(img, "vhdx")
    assert info["virtual-size"] == size
    if block_size:
        assert info["cluster-size"] == int(block_size[:-1]) * MiB
    ref = model.to_raw(tmp_path / "ref.raw")
    out = qemu_img("compare", "-f", "vhdx", "-F", "raw", img, ref, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    with vmferry.open(img) as disk:
        assert disk.read(0, size) == bytes(model.data)
        assert disk.top.info()["subformat"] == subformat
        assert disk.top.info()["log"] == "empty"
        assert disk.top.check().clean


def test_fixed_is_sparse_and_fully_present(tmp_path: Path) -> None:
    img = tmp_path / "f.vhdx"
    vmferry.create(img, "vhdx", 64 * MiB, subformat="fixed", block_size="2M").close()
    assert os.stat(img).st_size >= 64 * MiB
    assert os.stat(img).st_blocks * 512 < 8 * MiB  # no zero bytes were written
    with closing(open_layer(img)) as layer:
        assert {state for _b, state, _o in layer.iter_bat()} == {PAYLOAD_FULLY_PRESENT}
        assert layer.info()["leave_blocks_allocated"]
    qemu_check_clean(img)


def test_guids_change_on_first_write_only(tmp_path: Path) -> None:
    img = tmp_path / "g.vhdx"
    vmferry.create(img, "vhdx", 8 * MiB, block_size="1M").close()
    with closing(open_layer(img)) as layer:
        before = dict(layer.info())
    with closing(open_layer(img, writable=True)) as layer:
        layer.write(0, b"a" * 512)
        mid = layer.info()
        layer.write(MiB, b"b" * 512)
        assert layer.info()["data_write_guid"] == mid["data_write_guid"]
    with closing(open_layer(img)) as layer:
        after = layer.info()
    assert after["data_write_guid"] != before["data_write_guid"]
    assert after["file_write_guid"] != before["file_write_guid"]
    assert after["log_guid"] == "00000000-0000-0000-0000-000000000000"
    assert after["disk_id"] == before["disk_id"]
    assert layer.identity() == {"data_write_guid": after["data_write_guid"]}


def _chain(tmp_path: Path) -> tuple[list[Path], Model]:
    """base <- child <- grandchild, each written through vmferry with its own pattern."""
    size = 24 * MiB
    base, child, grand = tmp_path / "base.vhdx", tmp_path / "child.avhdx", tmp_path / "gc.avhdx"
    model = Model(size)
    rng = random.Random(7)
    with vmferry.create(base, "vhdx", size, block_size="1M") as disk:
        for off, buf in random_writes(rng, size, 10):
            disk.write(off, buf)
            model.write(off, buf)
    for path, parent in ((child, base), (grand, child)):
        with vmferry.create(path, "vhdx", parent=parent) as disk:
            assert disk.top.has_parent and disk.virtual_size == size
            for off, buf in random_writes(rng, size, 12, align=512):
                disk.write(off, buf)
                model.write(off, buf)
            # sector-sized writes make partially present blocks with sector bitmaps
            for _ in range(20):
                off = rng.randrange(0, size // 512) * 512
                buf = bytes([rng.randrange(1, 256)]) * 512 * rng.randrange(1, 9)
                buf = buf[: size - off]
                disk.write(off, buf)
                model.write(off, buf)
    return [grand, child, base], model


def test_differencing_chain_matches_model_and_libvhdi(tmp_path: Path) -> None:
    import pyvhdi

    paths, model = _chain(tmp_path)
    with vmferry.open(paths[0]) as disk:
        assert len(disk.layers) == 3
        assert disk.read(0, disk.virtual_size) == bytes(model.data)
        states = {s for _b, s, _o in disk.top.iter_bat()}
        assert 7 in states  # PARTIALLY_PRESENT blocks were made
        linkage = disk.top.parent_ref().identity["data_write_guid"]
        assert linkage == disk.layers[1].identity()["data_write_guid"]
    files = []
    for p in paths:
        f = pyvhdi.file()
        f.open(str(p))
        files.append(f)
    try:
        for child, parent in itertools.pairwise(files):
            child.set_parent(parent)
        assert files[0].get_parent_identifier() == linkage
        assert files[0].get_media_size() == len(model.data)
        got = files[0].read_buffer_at_offset(len(model.data), 0)
        assert got == bytes(model.data)
    finally:
        for f in files:
            f.close()
    for p in paths:
        qemu_info = qemu_img("info", "-f", "vhdx", p, check=False)
        if p.suffix == ".vhdx":
            assert qemu_info.returncode == 0


def test_differencing_locator_contents(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    base = tmp_path / "base.vhdx"
    vmferry.create(base, "vhdx", 4 * MiB, block_size="1M").close()
    child = sub / "c.avhdx"
    vmferry.create(child, "vhdx", parent=base).close()
    with closing(open_layer(child)) as layer:
        loc = layer.md.parent_locator
        assert loc is not None
        assert loc["relative_path"] == "..\\base.vhdx"
        assert loc["absolute_win32_path"] == str(base).replace("/", "\\")
        assert loc["parent_linkage"].startswith("{") and loc["parent_linkage"].endswith("}")
        ref = layer.parent_ref()
        assert ref.hints == ("../base.vhdx", str(base))
    with vmferry.open(child, allowed_dirs=[tmp_path]) as disk:
        assert len(disk.layers) == 2


def test_zero_state_hides_parent_and_subsector_rules(tmp_path: Path) -> None:
    base, child = tmp_path / "b.vhdx", tmp_path / "c.avhdx"
    with vmferry.create(base, "vhdx", 4 * MiB, block_size="1M") as disk:
        disk.write(0, b"\x77" * (4 * MiB))
    with vmferry.create(child, "vhdx", parent=base) as disk:
        disk.write_zeroes(MiB, MiB)  # whole unallocated block -> ZERO state
        with pytest.raises(UsageError, match="not aligned"):
            disk.top.write(2 * MiB + 100, b"x" * 10)  # the layer alone lacks the parent's bytes
        disk.write(2 * MiB, b"y" * 512)
        disk.top.write(2 * MiB + 100, b"z" * 10)  # now the sector is this layer's: fine
        disk.write(2 * MiB + 512 + 50, b"q" * 10)  # the chain completes it from the parent
        assert disk.top.block_status(MiB, MiB).alloc is Alloc.ZERO
        assert disk.top.block_status(3 * MiB, MiB).alloc is Alloc.UNALLOCATED
    with vmferry.open(child) as disk:
        top = disk.top
        assert top._payload(1)[0] == PAYLOAD_ZERO
        assert disk.read(MiB, MiB) == bytes(MiB)
        expect = bytearray(b"y" * 512)
        expect[100:110] = b"z" * 10
        second = b"\x77" * 50 + b"q" * 10 + b"\x77" * 452
        assert disk.read(2 * MiB, 1024) == bytes(expect) + second
        assert disk.read(3 * MiB, 16) == b"\x77" * 16


def test_writing_parent_after_child_breaks_identity(tmp_path: Path) -> None:
    base, child = tmp_path / "b.vhdx", tmp_path / "c.avhdx"
    vmferry.create(base, "vhdx", 4 * MiB, block_size="1M").close()
    vmferry.create(child, "vhdx", parent=base).close()
    with vmferry.open(base, writable=True) as disk:
        disk.write(0, b"changed!" * 64)
    with pytest.raises(ParentMismatchError, match="data_write_guid"):
        vmferry.open(child)


def test_set_parent_after_move(tmp_path: Path) -> None:
    import pyvhdi

    base, child = tmp_path / "b.vhdx", tmp_path / "c.avhdx"
    with vmferry.create(base, "vhdx", 4 * MiB, block_size="1M") as disk:
        disk.write(0, b"\x42" * (4 * MiB))
    with vmferry.create(child, "vhdx", parent=base) as disk:
        disk.write(MiB, b"\x43" * 4096)
    moved_dir = tmp_path / "elsewhere"
    moved_dir.mkdir()
    moved = moved_dir / "renamed-base.vhdx"
    shutil.move(base, moved)
    with pytest.raises(ParentNotFoundError):
        vmferry.open(child)
    with (
        closing(open_layer(moved)) as parent_layer,
        closing(open_layer(child, writable=True)) as layer,
    ):
        layer.set_parent(
            ParentInfo(
                layer=parent_layer,
                absolute_path=str(moved),
                relative_path=os.path.relpath(moved, child.parent),
                format="vhdx",
            )
        )
    with vmferry.open(child, allowed_dirs=[tmp_path]) as disk:
        assert disk.layers[1].file.path == moved
        assert disk.read(MiB - 2, 4) == b"\x42\x42\x43\x43"
        assert disk.top.check().clean
    f, p = pyvhdi.file(), pyvhdi.file()
    f.open(str(child))
    p.open(str(moved))
    f.set_parent(p)
    assert f.read_buffer_at_offset(4, MiB - 2) == b"\x42\x42\x43\x43"


def test_resize_grow(tmp_path: Path) -> None:
    img = tmp_path / "r.vhdx"
    with vmferry.create(img, "vhdx", 8 * MiB, block_size="1M") as disk:
        disk.write(7 * MiB, b"\x31" * MiB)
    with closing(open_layer(img, writable=True)) as layer:
        layer.resize(20 * MiB)
        layer.write(19 * MiB, b"\x32" * MiB)
    qemu_check_clean(img)
    assert qemu_img_info(img, "vhdx")["virtual-size"] == 20 * MiB
    ref = tmp_path / "ref.raw"
    model = Model(20 * MiB)
    model.write(7 * MiB, b"\x31" * MiB)
    model.write(19 * MiB, b"\x32" * MiB)
    assert qemu_img("compare", "-f", "vhdx", "-F", "raw", img, model.to_raw(ref)).returncode == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"block_size": "3M"}, "power of two"),
        ({"block_size": "512K"}, "power of two"),
        ({"logical_sector_size": "1024"}, "512 or 4096"),
        ({"subformat": "sparse"}, "dynamic or fixed"),
        ({"log_size": "1000"}, "log_size"),
    ],
)
def test_bad_create_options(tmp_path: Path, options: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        vmferry.create(tmp_path / "x.vhdx", "vhdx", 8 * MiB, **options)


def test_size_must_be_sector_multiple(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="multiple of 512"):
        vmferry.create(tmp_path / "x.vhdx", "vhdx", 8 * MiB + 1)


def test_read_through_vhdx_class_name() -> None:
    assert Vhdx.name == "vhdx" and ".avhdx" in Vhdx.extensions
    assert Vhdx.parent_formats == ("vhdx",) and Vhdx.supports_parent
    assert str(uuid.UUID(int=0)) == "00000000-0000-0000-0000-000000000000"
