"""The VDI driver against qemu-img/qemu-io (both directions) and the dissect corpus sample.

Oracles: qemu-img makes and reads dynamic and static VDIs (qemu refuses differencing VDIs, so
chains are checked against a bytearray model built from qemu-written parents); the corpus
image has its content hash in ground_truth.json.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import struct
import uuid
from pathlib import Path

import pytest

import vmferry
from tests.conftest import qemu_img, qemu_io, unpack_corpus_file
from vmferry.chain import open_layer
from vmferry.disk import Alloc, ParentInfo
from vmferry.errors import (
    ParentMismatchError,
    ParentNotFoundError,
    PathEscapeError,
    UnsupportedFeatureError,
    UsageError,
)
from vmferry.ops.convert import convert

MiB = 1 << 20
SIZE = 12 * MiB


def _qemu_vdi(path: Path, size: int, static: bool, seed: int) -> bytearray:
    """A VDI made and written by qemu; returns the expected content."""
    qemu_img("create", "-f", "vdi", "-o", f"static={'on' if static else 'off'}", path, size)
    rng = random.Random(seed)
    model = bytearray(size)
    cmds = []
    for _ in range(10):
        length = rng.choice([512, 4096, 65536 + 512, MiB, 3 * MiB])
        off = rng.randrange(0, size - length) // 512 * 512
        byte = rng.randrange(1, 256)
        cmds.append(f"write -P {byte} {off} {length}")
        model[off : off + length] = bytes([byte]) * length
    qemu_io("vdi", path, *cmds)
    return model


def _raw_of(tmp_path: Path, img: Path) -> bytes:
    out = tmp_path / (img.name + ".raw")
    qemu_img("convert", "-f", "vdi", "-O", "raw", img, out)
    return out.read_bytes()


# --- reading ----------------------------------------------------------------------------------


def test_corpus_basic_vdi(tmp_path: Path, corpus: Path, ground_truth: dict) -> None:
    key = "dissect.hypervisor/disk/vdi/basic.vdi.gz"
    truth = ground_truth["files"][key]
    img = unpack_corpus_file(corpus / key, tmp_path)
    with vmferry.open(img) as d:  # probed, not named
        assert d.format == "vdi"
        assert d.virtual_size == truth["virtual_size"]
        assert d.top.granularity == truth["cluster_size"]
        data = d.read(0, d.virtual_size)
        info = d.top.info()
        # upstream test: first MiB unallocated (reads zero), then 4 KiB block k = byte k % 256
        first = d.block_status(0, d.virtual_size)
    assert hashlib.sha256(data).hexdigest() == truth["raw_sha256"]
    assert info["type"] == "normal" and info["flags"] == 0 and info["block_size"] == MiB
    assert info["blocks_mapped"] * MiB == truth["allocated_bytes"]
    assert first.alloc is Alloc.ZERO and first.length == MiB
    assert data[MiB : MiB + 4096] == bytes([256 % 256]) * 4096
    assert data[MiB + 4096 * 5 : MiB + 4096 * 6] == bytes([(256 + 5) % 256]) * 4096


def test_block_status_matches_qemu_map(tmp_path: Path) -> None:
    img = tmp_path / "m.vdi"
    _qemu_vdi(img, SIZE, False, 7)
    qmap = json.loads(qemu_img("map", "--output=json", "-f", "vdi", img).stdout)
    qemu_data = [(e["start"], e["length"]) for e in qmap if e["data"]]
    with vmferry.open(img, "vdi") as d:
        ours = [(e.offset, e.length) for e in d.top.extents() if e.alloc is Alloc.DATA]
    assert ours == qemu_data


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_reads_qemu_written_images(tmp_path: Path, static: bool) -> None:
    img = tmp_path / "q.vdi"
    model = _qemu_vdi(img, SIZE + 3 * 512, static, 11 + static)
    with vmferry.open(img) as d:
        assert d.top.info()["type"] == ("fixed" if static else "normal")
        got = d.read(0, d.virtual_size)
        # odd, block-spanning reads
        for off, n in ((511, 3 * MiB + 7), (MiB - 1, 2), (SIZE - 100, 100 + 3 * 512)):
            assert d.read(off, n) == model[off : off + n]
    assert got == model == _raw_of(tmp_path, img)


# --- writing ----------------------------------------------------------------------------------


def _random_writes(d: vmferry.Chain, model: bytearray, seed: int, zeroes: bool = True) -> None:
    rng = random.Random(seed)
    size = len(model)
    for i in range(25):
        off = rng.randrange(0, size)
        n = min(rng.randrange(1, 3 * MiB), size - off)
        if zeroes and i % 4 == 3:
            d.write_zeroes(off, n)
            model[off : off + n] = bytes(n)
        else:
            data = rng.randbytes(n) if i % 3 else bytes([i + 1]) * n
            d.write(off, data)
            model[off : off + n] = data


@pytest.mark.parametrize("static", ["off", "on"])
def test_our_images_pass_qemu_check_and_compare(tmp_path: Path, static: str) -> None:
    img = tmp_path / "w.vdi"
    model = bytearray(SIZE + 1536)
    with vmferry.create(img, "vdi", len(model), static=static) as d:
        _random_writes(d, model, 3)
    # whole zero blocks, then reuse of the freed slots
    with vmferry.open(img, "vdi", writable=True) as d:
        d.write_zeroes(2 * MiB, 3 * MiB)
        model[2 * MiB : 5 * MiB] = bytes(3 * MiB)
        d.write(7 * MiB + 5, b"\xaa" * (2 * MiB))
        model[7 * MiB + 5 : 9 * MiB + 5] = b"\xaa" * (2 * MiB)
    ref = tmp_path / "ref.raw"
    ref.write_bytes(model)
    qemu_img("check", "-f", "vdi", img)
    qemu_img("compare", "-f", "vdi", "-F", "raw", img, ref)
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["format"] == "vdi" and info["virtual-size"] == len(model)
    with vmferry.open(img) as d:
        assert d.read(0, d.virtual_size) == model
        assert d.top.check().clean


def test_new_blocks_of_one_write_go_out_as_one_file_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fresh blocks take consecutive slots, so a long write is one large request for them
    (a block already mapped, or a reused slot, breaks the run); qemu reads it all."""
    from vmferry.disk.blockfile import BlockFile

    img = tmp_path / "runs.vdi"
    model = bytearray(SIZE)
    writes: list[int] = []
    real = BlockFile.write

    def record(self: BlockFile, offset: int, data: bytes | memoryview) -> None:
        if len(data) >= MiB // 2:
            writes.append(len(data))
        real(self, offset, data)

    rng = random.Random(3)
    with vmferry.create(img, "vdi", SIZE) as d:
        first = rng.randbytes(MiB)
        d.write(5 * MiB, first)  # block 5 first: slot 0
        model[5 * MiB : 6 * MiB] = first
        monkeypatch.setattr(BlockFile, "write", record)
        data = rng.randbytes(6 * MiB - 100)
        d.write(2 * MiB + 100, data)  # blocks 2-4 new, 5 mapped, 6-7 new
        model[2 * MiB + 100 : 8 * MiB] = data
    monkeypatch.undo()
    assert writes == [MiB, 3 * MiB - 100, 2 * MiB], writes  # mapped block first, then runs
    ref = tmp_path / "ref.raw"
    ref.write_bytes(model)
    qemu_img("check", "-f", "vdi", img)
    qemu_img("compare", "-f", "vdi", "-F", "raw", img, ref)


def test_qemu_io_writes_into_our_image(tmp_path: Path) -> None:
    img = tmp_path / "ours.vdi"
    with vmferry.create(img, "vdi", SIZE) as d:
        d.write(3 * MiB, b"\x11" * MiB)
    qemu_io("vdi", img, f"write -P 0x22 {5 * MiB + 512} 4096", f"write -P 0x33 {3 * MiB} 512")
    qemu_img("check", "-f", "vdi", img)
    with vmferry.open(img) as d:
        assert d.read(3 * MiB, 512) == b"\x33" * 512
        assert d.read(3 * MiB + 512, MiB - 512) == b"\x11" * (MiB - 512)
        assert d.read(5 * MiB + 512, 4096) == b"\x22" * 4096
        assert d.top.check().clean


def test_static_image_is_sparse_and_fully_mapped(tmp_path: Path) -> None:
    img = tmp_path / "s.vdi"
    with vmferry.create(img, "vdi", 64 * MiB, static="on") as d:
        info = d.top.info()
    assert info["type"] == "fixed" and info["blocks_mapped"] == 64 == info["blocks_allocated"]
    assert img.stat().st_blocks * 512 < 4 * MiB
    assert json.loads(qemu_img("info", "--output=json", img).stdout)["virtual-size"] == 64 * MiB
    qemu_img("check", "-f", "vdi", img)


def test_convert_roundtrip_through_qemu(tmp_path: Path) -> None:
    src = tmp_path / "src.vdi"
    model = _qemu_vdi(src, SIZE, False, 21)
    mid = tmp_path / "mid.vdi"
    convert(src, mid)
    qemu_img("check", "-f", "vdi", mid)
    qemu_img("compare", "-f", "vdi", "-F", "vdi", src, mid)
    back = tmp_path / "back.raw"
    qemu_img("convert", "-f", "vdi", "-O", "raw", mid, back)
    assert back.read_bytes() == model


def test_bad_options(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        vmferry.create(tmp_path / "a.vdi", "vdi", MiB, static="maybe")
    with pytest.raises(UsageError):
        vmferry.create(tmp_path / "b.vdi", "vdi", MiB + 1)


# --- differencing -----------------------------------------------------------------------------


def _chain(tmp_path: Path) -> tuple[Path, Path, bytearray]:
    base = tmp_path / "base.vdi"
    model = _qemu_vdi(base, SIZE, False, 5)
    child = tmp_path / "child.vdi"
    with vmferry.create(child, "vdi", None, base) as d:
        assert d.top.info()["type"] == "diff"
        assert len(d.layers) == 2
        d.write(MiB + 100, b"\x77" * 5000)  # partial block: the chain completes it
        model[MiB + 100 : MiB + 5100] = b"\x77" * 5000
        d.write_zeroes(4 * MiB, 2 * MiB)  # whole blocks: marked zero, hide the parent
        model[4 * MiB : 6 * MiB] = bytes(2 * MiB)
    return base, child, model


def test_diff_chain_reads_through_parent_found_by_uuid(tmp_path: Path) -> None:
    _base, child, model = _chain(tmp_path)
    # unrelated VDIs and junk next to it must not confuse the search
    qemu_img("create", "-f", "vdi", tmp_path / "other.vdi", SIZE)
    (tmp_path / "junk.vdi").write_bytes(b"nonsense")
    with vmferry.open(child) as d:
        assert [layer.file.path.name for layer in d.layers] == ["child.vdi", "base.vdi"]
        assert d.read(0, SIZE) == model
        assert d.warnings == []
        top = d.top
        assert top.block_status(0, MiB).alloc is Alloc.UNALLOCATED
        assert top.block_status(MiB, MiB).alloc is Alloc.DATA
        assert top.block_status(4 * MiB, 2 * MiB) == top.block_status(4 * MiB, 2 * MiB)
        assert top.block_status(4 * MiB, 2 * MiB).alloc is Alloc.ZERO
        ref = top.parent_ref()
        base_ident = d.layers[1].identity()
    assert ref is not None and ref.hints == ("base.vdi",)
    assert ref.identity == {"uuid": base_ident["uuid"]}
    assert ref.advisory == {"modification_uuid": base_ident["modification_uuid"]}
    flat = tmp_path / "flat.vdi"
    convert(child, flat)
    (tmp_path / "model.raw").write_bytes(model)
    qemu_img("compare", "-f", "vdi", "-F", "raw", flat, tmp_path / "model.raw")


def test_diff_parent_modified_warns(tmp_path: Path) -> None:
    base, child, model = _chain(tmp_path)
    with vmferry.open(base, writable=True) as d:  # a write gives a new modification UUID
        d.write(0, b"\x01" * 512)
    model[:512] = b"\x01" * 512
    with vmferry.open(child) as d:
        assert any("modification_uuid differs" in w for w in d.warnings)
        assert d.read(0, SIZE) == model


def test_diff_parent_missing_or_impostor(tmp_path: Path) -> None:
    base, child, _ = _chain(tmp_path)
    with vmferry.open(child) as d:
        parent_uuid = d.layers[1].identity()["uuid"]
    base.unlink()
    with pytest.raises(ParentNotFoundError) as exc:
        vmferry.open(child)
    assert parent_uuid in str(exc.value)
    # a file carrying the parent's UUID-derived name but another UUID is refused
    qemu_img("create", "-f", "vdi", tmp_path / f"{{{parent_uuid}}}.vdi", SIZE)
    with pytest.raises(ParentMismatchError):
        vmferry.open(child)


def test_diff_in_snapshots_folder_is_confined(tmp_path: Path) -> None:
    _base, child, model = _chain(tmp_path)
    snaps = tmp_path / "Snapshots"
    snaps.mkdir()
    moved = snaps / "{11111111-2222-3333-4444-555555555555}.vdi"
    shutil.move(child, moved)
    with pytest.raises(PathEscapeError):
        vmferry.open(moved)
    with vmferry.open(moved, allowed_dirs=[tmp_path]) as d:
        assert d.read(0, SIZE) == model


def test_diff_refuses_partial_block_without_parent(tmp_path: Path) -> None:
    _, child, model = _chain(tmp_path)
    layer = open_layer(child, "vdi", writable=True)
    try:
        with pytest.raises(UsageError):
            layer.write(8 * MiB + 1, b"x")
        with pytest.raises(UsageError):
            layer.write_zeroes(8 * MiB + 1, 10)
        with pytest.raises(UsageError):  # two whole blocks, then part of one: nothing done
            layer.write(8 * MiB, b"y" * (2 * MiB + 10))
    finally:
        layer.close()
    with vmferry.open(child) as d:
        assert d.read(0, SIZE) == model


def test_set_parent_repoints_child(tmp_path: Path) -> None:
    base, child, model = _chain(tmp_path)
    copy = tmp_path / "copy.vdi"
    qemu_img("convert", "-f", "vdi", "-O", "vdi", base, copy)  # same content, new UUIDs
    base.unlink()
    parent = open_layer(copy, "vdi")
    layer = open_layer(child, "vdi", writable=True)
    try:
        layer.set_parent(ParentInfo(parent, str(copy), "copy.vdi", "vdi"))
    finally:
        layer.close()
        parent.close()
    with vmferry.open(child) as d:
        assert d.layers[1].file.path.name == "copy.vdi"
        assert d.read(0, SIZE) == model


# --- version 0 --------------------------------------------------------------------------------


def test_reads_version_0_header(tmp_path: Path) -> None:
    """A v0 image (VirtualBox 1.x): the header has no offsets; map right after the header."""
    blocks = 4
    pre = b"<<< innotek VirtualBox Disk Image >>>\n".ljust(64, b"\0") + struct.pack(
        "<II", 0xBEDA107F, 0x00000001
    )
    uid = uuid.uuid4()
    hdr = struct.pack("<II", 1, 0) + bytes(256) + struct.pack("<4I", 0, 0, 0, 512)
    hdr += struct.pack("<QIII", blocks * MiB, MiB, blocks, 2)
    hdr += uid.bytes_le + uuid.uuid4().bytes_le + bytes(16)
    assert len(pre + hdr) == 420
    bmap = struct.pack("<4I", 0xFFFFFFFF, 1, 0xFFFFFFFE, 0)
    data = b"\x05" * MiB + b"\x06" * MiB
    img = tmp_path / "v0.vdi"
    img.write_bytes(pre + hdr + bmap + data)
    with vmferry.open(img) as d:
        assert d.top.info()["version"] == "0.1"
        assert d.top.identity()["uuid"] == str(uid)
        assert d.read(0, 4 * MiB) == bytes(MiB) + b"\x06" * MiB + bytes(MiB) + b"\x05" * MiB


# --- resize -----------------------------------------------------------------------------------


@pytest.mark.parametrize("static", ["off", "on"])
def test_resize_grow_and_shrink(tmp_path: Path, static: str) -> None:
    img = tmp_path / "r.vdi"
    model = bytearray(4 * MiB)
    with vmferry.create(img, "vdi", len(model), static=static) as d:
        d.write(MiB, b"\x31" * (2 * MiB))
        model[MiB : 3 * MiB] = b"\x31" * (2 * MiB)
    layer = open_layer(img, "vdi", writable=True)
    try:
        layer.resize(10 * MiB + 512)
    finally:
        layer.close()
    model += bytes(10 * MiB + 512 - len(model))
    qemu_img("check", "-f", "vdi", img)
    assert json.loads(qemu_img("info", "--output=json", img).stdout)["virtual-size"] == len(model)
    qemu_io("vdi", img, f"write -P 0x32 {9 * MiB} {MiB}")
    model[9 * MiB : 10 * MiB] = b"\x32" * MiB
    assert _raw_of(tmp_path, img) == model
    layer = open_layer(img, "vdi", writable=True)
    try:
        if static == "off":
            with pytest.raises(UsageError):
                layer.resize(2 * MiB)  # would drop an allocated block
        layer.resize(9 * MiB + 512)  # keeps part of the block qemu wrote
    finally:
        layer.close()
    del model[9 * MiB + 512 :]
    qemu_img("check", "-f", "vdi", img)
    assert _raw_of(tmp_path, img) == model
    layer = open_layer(img, "vdi", writable=True)
    try:
        layer.resize(10 * MiB)  # the bytes cut off before must come back as zeros
    finally:
        layer.close()
    model += bytes(10 * MiB - len(model))
    assert _raw_of(tmp_path, img) == model


def test_resize_without_room_in_qemu_layout(tmp_path: Path) -> None:
    img = tmp_path / "q.vdi"
    qemu_img("create", "-f", "vdi", img, 10 * MiB)  # map at 512, data at 1024: 128 entries
    layer = open_layer(img, "vdi", writable=True)
    try:
        layer.resize(128 * MiB)
        with pytest.raises(UnsupportedFeatureError):
            layer.resize(129 * MiB)
    finally:
        layer.close()
    qemu_img("check", "-f", "vdi", img)
    assert json.loads(qemu_img("info", "--output=json", img).stdout)["virtual-size"] == 128 * MiB


# --- crash safety -----------------------------------------------------------------------------

_WRITER = """
import sys, vmferry
path = sys.argv[1]
with vmferry.open(path, "vdi", writable=True) as d:
    for round_ in range(1, 1000):
        for block in range(0, 32, 3):
            d.write(block * (1 << 20), bytes([round_ % 250 + 1]) * (1 << 20))
        d.write_zeroes(((round_ * 5) % 32) * (1 << 20), 1 << 20)
        if round_ % 4 == 0 or round_ == 1:
            d.flush()
        if round_ == 1:  # something is durably written before the kill can come
            print("writing", flush=True)
"""


@pytest.mark.parametrize("seed", range(3))
def test_kill_while_writing_never_corrupts(tmp_path: Path, seed: int) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    img = tmp_path / "k.vdi"
    vmferry.create(img, "vdi", 32 * MiB).close()
    env = {**os.environ, "PYTHONPATH": str(Path(vmferry.__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(img)], env=env, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"writing\n"
    time.sleep(random.Random(seed).uniform(0.0, 0.8))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # qemu: no corruption (exit 0 = clean, 3 = leaks only)
    assert qemu_img("check", "-f", "vdi", img, check=False).returncode in (0, 3)
    seen = set()
    with vmferry.open(img) as d:
        # every sector holds one of the values written to it, or zeros: a block rewritten in
        # place when the kill came may mix the old and the new write (a disk promises no more
        # than whole sectors), but never shows anything that was not written there
        for block in range(32):
            data = d.read(block * MiB, MiB)
            for at in range(0, MiB, 512):
                assert data[at : at + 512] == bytes([data[at]]) * 512, (block, at)
            seen.update(data[::512])
    assert seen - {0}, "the writer was killed before it wrote anything"
    with vmferry.open(img, writable=True) as d:  # and writing carries on cleanly
        d.write(31 * MiB, b"\x07" * MiB)
    qemu_img("check", "-f", "vdi", img)


def test_parent_in_another_directory_and_rebase_after_move(tmp_path: Path) -> None:
    """The parent's relative path is noted in the comment field; UUIDs still decide."""
    from vmferry.chain.surgery import rebase

    (tmp_path / "p").mkdir()
    (tmp_path / "c").mkdir()
    base = tmp_path / "p" / "base.vdi"
    model = _qemu_vdi(base, SIZE, False, 9)
    child = tmp_path / "c" / "child.vdi"
    with vmferry.create(child, "vdi", None, base) as d:
        d.write(2 * MiB, b"\x44" * MiB)
    model[2 * MiB : 3 * MiB] = b"\x44" * MiB
    with vmferry.open(child, allowed_dirs=[tmp_path]) as d:
        assert d.top.parent_ref().hints[0] == "../p/base.vdi"
        assert d.read(0, SIZE) == model
    store = tmp_path / "store"
    store.mkdir()
    shutil.move(base, store / "base.vdi")
    with pytest.raises(ParentNotFoundError):
        vmferry.open(child, allowed_dirs=[tmp_path])
    rebase(child, store / "base.vdi", allowed_dirs=[tmp_path])
    with vmferry.open(child, allowed_dirs=[tmp_path]) as d:
        assert d.top.parent_ref().hints[0] == "../store/base.vdi"
        assert d.read(0, SIZE) == model


def test_reads_block_extra_and_zero_blocks(tmp_path: Path) -> None:
    """Per-block extra data (VDICore.h cbBlockExtra) sits before each block's bytes."""
    bs, extra, blocks = 4096, 512, 4
    pre = b"<<< Oracle VM VirtualBox Disk Image >>>\n".ljust(64, b"\0")
    pre += struct.pack("<II", 0xBEDA107F, 0x00010001)
    hdr = struct.pack("<III", 400, 1, 0) + bytes(256)
    hdr += struct.pack("<II", 512, 1024) + struct.pack("<5I", 0, 0, 0, 512, 0)
    hdr += struct.pack("<QIIII", blocks * bs, bs, extra, blocks, 2)
    hdr += uuid.uuid4().bytes_le + uuid.uuid4().bytes_le + bytes(32) + bytes(16)
    assert len(pre + hdr) == 472
    bmap = struct.pack("<4I", 1, 0xFFFFFFFE, 0xFFFFFFFF, 0)
    slot0 = b"\xee" * extra + b"\x0a" * bs
    slot1 = b"\xee" * extra + b"\x0b" * bs
    img = tmp_path / "extra.vdi"
    img.write_bytes((pre + hdr).ljust(512, b"\0") + bmap.ljust(512, b"\0") + slot0 + slot1)
    with vmferry.open(img) as d:
        assert d.read(0, blocks * bs) == b"\x0b" * bs + bytes(2 * bs) + b"\x0a" * bs
        assert d.top.block_status(bs, bs).alloc is Alloc.ZERO
        assert [e.alloc for e in d.top.extents()] == [Alloc.DATA, Alloc.ZERO, Alloc.DATA]
