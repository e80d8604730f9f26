"""qcow2 reading: the corpus as its ground truth says, and images qemu-img/qemu-io made.

Oracles: the corpus ground truth (upstream assertions re-verified with qemu-img), and for
generated images ``qemu-img convert -O raw`` (content) and ``qemu-img map`` (allocation).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path

import pytest

import vmferry
from tests.conftest import qemu_img, qemu_io, unpack_corpus_file
from vmferry.disk import Alloc, BlockFile
from vmferry.disk.qcow2 import Qcow2
from vmferry.errors import UnsupportedFeatureError

QCOW2_DIR = "dissect.hypervisor/disk/qcow2"
MiB = 1 << 20


def sha256_of(disk: vmferry.Chain | Qcow2, size: int | None = None) -> str:
    h = hashlib.sha256()
    end = disk.virtual_size if size is None else size
    pos = 0
    while pos < end:
        n = min(8 * MiB, end - pos)
        h.update(disk.read(pos, n))
        pos += n
    return h.hexdigest()


def zstd_in_qemu() -> bool:
    return "compression_type" in qemu_img("create", "-f", "qcow2", "-o", "help").stdout


def require_zstandard() -> None:
    pytest.importorskip("zstandard", reason="python zstandard is not installed")


def unpack_sparse(src: Path, dest: Path) -> None:
    """Stream-decompress a mostly-zero .gz sample into a sparse file (512 MiB, little RAM)."""
    block = 1 << 16
    with gzip.open(src, "rb") as fin, open(dest, "wb") as fout:
        while chunk := fin.read(block):
            if chunk.count(0) == len(chunk):
                fout.seek(len(chunk), 1)
            else:
                fout.write(chunk)
        fout.truncate()


# --- corpus -----------------------------------------------------------------------------------


def test_dfvfs_ext2(corpus: Path, ground_truth: dict) -> None:
    truth = ground_truth["files"]["dfvfs/ext2.qcow2"]
    with vmferry.open(corpus / "dfvfs/ext2.qcow2") as disk:
        assert disk.format == "qcow2"
        assert disk.virtual_size == truth["virtual_size"]
        assert sha256_of(disk) == truth["raw_sha256"]
        info = disk.info()
    assert info["cluster_size"] == truth["cluster_size"]
    assert info["compat"] == truth["qcow2"]["compat"]
    assert info["compression_type"] == truth["qcow2"]["compression-type"]
    assert info["lazy_refcounts"] == truth["qcow2"]["lazy-refcounts"]


@pytest.mark.parametrize("name", ["basic", "basic-zstd"])
def test_dissect_basic(corpus: Path, ground_truth: dict, tmp_path: Path, name: str) -> None:
    if name == "basic-zstd":
        require_zstandard()
    key = f"{QCOW2_DIR}/{name}.qcow2.gz"
    truth = ground_truth["files"][key]
    img = unpack_corpus_file(corpus / key, tmp_path)
    with vmferry.open(img) as disk:
        assert disk.virtual_size == truth["virtual_size"]
        assert len(disk.layers) == 1
        assert disk.info()["compression_type"] == truth["qcow2"]["compression-type"]
        for i in (0, 1, 77, 254):  # upstream: MiB i is filled with byte i
            assert disk.read(i * MiB, MiB) == bytes([i]) * MiB
        assert disk.read(disk.virtual_size - MiB, MiB) == bytes(MiB)
        assert sha256_of(disk) == truth["raw_sha256"]
        ext = disk.block_status(MiB, MiB)  # MiB 0 holds zeros: never written
        assert ext.alloc is Alloc.DATA and ext.compressed
        assert disk.top.check().clean


def test_dissect_snapshot(corpus: Path, ground_truth: dict, tmp_path: Path) -> None:
    key = f"{QCOW2_DIR}/snapshot.qcow2.gz"
    truth = ground_truth["files"][key]
    img = unpack_corpus_file(corpus / key, tmp_path)
    with vmferry.open(img) as disk:
        assert disk.virtual_size == truth["virtual_size"]
        assert disk.read(0, 4 * MiB) == bytes(4 * MiB)
        assert sha256_of(disk) == truth["raw_sha256"]
        snaps = disk.info()["snapshots"]
    assert [[s["id"], s["name"], s["vm_state_size"]] for s in snaps] == truth["snapshots"]
    for snap_id, want in truth["snapshot_raw_sha256"].items():
        layer = Qcow2.open(BlockFile.open(img), snapshot=snap_id)
        try:
            assert sha256_of(layer) == want
        finally:
            layer.close()
    sha1 = ground_truth["verified_upstream_assertions"]["qcow2/snapshot id=2"]["sha1_first_813857"]
    layer = Qcow2.open(BlockFile.open(img), snapshot="confused")
    try:
        assert hashlib.sha1(layer.read(0, 813857)).hexdigest() == sha1
    finally:
        layer.close()


def test_dissect_backing_chain(corpus: Path, ground_truth: dict, tmp_path: Path) -> None:
    for i in (1, 2, 3):
        unpack_corpus_file(corpus / f"{QCOW2_DIR}/backing-chain-{i}.qcow2.gz", tmp_path)
    asserted = ground_truth["verified_upstream_assertions"]
    for i in (1, 2, 3):
        key = f"{QCOW2_DIR}/backing-chain-{i}.qcow2.gz"
        with vmferry.open(tmp_path / f"backing-chain-{i}.qcow2") as disk:
            assert len(disk.layers) == 4 - i
            assert sha256_of(disk) == ground_truth["files"][key]["raw_sha256"]
            strings = asserted[f"qcow2/backing-chain-{i}.qcow2"]["mib_strings"]
            for mib, want in enumerate(strings):
                got = disk.read(mib * MiB, MiB).rstrip(b"\0").decode()
                assert got == want, (i, mib)
            if i < 3:
                ref = disk.top.parent_ref()
                assert ref is not None and ref.format == "qcow2"
                assert ref.hints == (f"backing-chain-{i + 1}.qcow2",)


def test_dissect_external_data_file(corpus: Path, ground_truth: dict, tmp_path: Path) -> None:
    key = f"{QCOW2_DIR}/data-file.qcow2.gz"
    img = unpack_corpus_file(corpus / key, tmp_path)
    with pytest.raises(UnsupportedFeatureError, match=r"data-file\.bin") as err:
        vmferry.open(img)
    assert err.value.hint and "allow_external_data" in err.value.hint
    with pytest.raises(UnsupportedFeatureError, match="not found"):
        Qcow2.open(BlockFile.open(img), allow_external_data=True)
    unpack_sparse(corpus / f"{QCOW2_DIR}/data-file.bin.gz", tmp_path / "data-file.bin")
    layer = Qcow2.open(BlockFile.open(img), allow_external_data=True)
    try:
        want = ground_truth["verified_upstream_assertions"]["qcow2/data-file.qcow2"]["raw_sha256"]
        assert sha256_of(layer) == want
        assert layer.info()["data_file"] == "data-file.bin"
        assert layer.check().clean
    finally:
        layer.close()


# --- images made by qemu ----------------------------------------------------------------------


def qemu_map_data(path: Path) -> list[tuple[int, int]]:
    out = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", str(path)).stdout)
    return merge([(e["start"], e["length"]) for e in out if e["data"] and e["depth"] == 0])


def our_map_data(disk: vmferry.Chain) -> list[tuple[int, int]]:
    return merge([(e.offset, e.length) for e in disk.top.extents() if e.alloc is Alloc.DATA])


def merge(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, n in runs:
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((off, n))
    return out


def assert_reads_like_qemu(img: Path, tmp_path: Path) -> None:
    raw = tmp_path / "ref.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(img), str(raw))
    want = raw.read_bytes()
    with vmferry.open(img) as disk:
        assert disk.virtual_size == len(want)
        assert disk.read(0, len(want)) == want
        rnd = random.Random(len(want))
        for _ in range(20):  # unaligned reads too
            off = rnd.randrange(len(want))
            n = rnd.randrange(1, min(300_000, len(want) - off) + 1)
            assert disk.read(off, n) == want[off : off + n]
        assert our_map_data(disk) == qemu_map_data(img)
        assert disk.top.check().clean


def qemu_io_random_writes(img: Path, size: int, seed: int, count: int = 40) -> None:
    rnd = random.Random(seed)
    cmds = []
    for i in range(count):
        off = rnd.randrange(0, size - 4096) // 512 * 512
        n = rnd.randrange(1, 200) * 512
        n = min(n, size - off)
        if i % 5 == 4:
            cmds.append(f"write -z {off} {n}")
        else:
            cmds.append(f"write -P {rnd.randrange(1, 256)} {off} {n}")
    qemu_io("qcow2", img, *cmds)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
@pytest.mark.parametrize("cluster_size", ["512", "4096", "65536", "2M"])
def test_reads_qemu_made_images(tmp_path: Path, compat: str, cluster_size: str) -> None:
    img = tmp_path / "q.qcow2"
    size = 24 * MiB
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        f"compat={compat},cluster_size={cluster_size}",
        str(img),
        str(size),
    )
    qemu_io_random_writes(img, size, seed=int(cluster_size.rstrip("M")) + len(compat))
    # whole-cluster zero writes over data make v3 zero clusters (v2: deallocation)
    qemu_io("qcow2", img, "write -P 0x5a 0 4M", "write -z 2M 2M")
    assert_reads_like_qemu(img, tmp_path)
    if compat == "1.1":
        with vmferry.open(img) as disk:
            assert disk.block_status(2 * MiB, 2 * MiB).alloc is Alloc.ZERO


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_reads_qemu_compressed(tmp_path: Path, ctype: str) -> None:
    if ctype == "zstd":
        require_zstandard()
        if not zstd_in_qemu():
            pytest.skip("qemu-img has no compression_type option")
    src = tmp_path / "src.raw"
    rnd = random.Random(7)
    data = bytearray(16 * MiB)
    for _ in range(60):
        off = rnd.randrange(len(data) - 70_000)
        data[off : off + 65_536] = bytes(rnd.randrange(4) for _ in range(1024)) * 64
    data[8 * MiB : 9 * MiB] = rnd.randbytes(MiB)  # incompressible: stored plain
    src.write_bytes(bytes(data))
    img = tmp_path / "c.qcow2"
    qemu_img(
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        f"compression_type={ctype}",
        str(src),
        str(img),
    )
    with vmferry.open(img) as disk:
        assert disk.info()["compression_type"] == ctype
        assert disk.read(0, len(data)) == data
        assert any(e.compressed for e in disk.top.extents())
        assert disk.top.check().clean
    assert_reads_like_qemu(img, tmp_path)


def test_reads_extended_l2(tmp_path: Path) -> None:
    img = tmp_path / "x.qcow2"
    size = 8 * MiB
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64K", str(img), str(size)
    )
    # 2 KiB subclusters: partial writes allocate some, -z marks some zero
    qemu_io(
        "qcow2",
        img,
        "write -P 0x11 0 2k",
        "write -P 0x22 6k 4k",
        "write -P 0x33 1M 100k",
        "write -z 1040k 8k",
        "write -P 0x44 5000k 1k",
    )
    with vmferry.open(img) as disk:
        assert disk.info()["extended_l2"] is True
        assert disk.top.granularity == 2048
    assert_reads_like_qemu(img, tmp_path)


def test_backing_chain_made_by_qemu(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    mid = tmp_path / "mid.raw"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "raw", str(mid), str(6 * MiB))
    qemu_io("raw", mid, "write -P 0x61 0 3M")
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(4 * MiB))
    qemu_io("qcow2", base, "write -P 0x62 1M 1M")
    # qcow2 over raw, the child larger than its parent (the tail reads as zeros)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.raw", "-F", "raw", str(top), str(10 * MiB))
    qemu_io("qcow2", top, "write -P 0x63 2M 64k", "write -z 2560k 64k")
    assert_reads_like_qemu(top, tmp_path)
    with vmferry.open(top) as disk:
        assert len(disk.layers) == 2
        assert disk.top.parent_ref().format == "raw"
        assert disk.top.write_alignment == 65536


def test_backing_format_never_probed(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(MiB))
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    raw = bytearray(top.read_bytes())
    at = raw.find(bytes.fromhex("e2792aca"))
    assert 0 < at < 4096
    raw[at : at + 4] = bytes.fromhex("0badf00d")  # now an unknown extension: format unknown
    top.write_bytes(bytes(raw))
    with pytest.raises(UnsupportedFeatureError, match="never guesses") as err:
        vmferry.open(top)
    assert err.value.hint and "-F" in err.value.hint
    layer = Qcow2.open(BlockFile.open(top))  # the layer alone still opens (for info/rebase)
    try:
        assert layer.info()["backing_file"] == "base.qcow2"
        assert layer.info()["backing_format"] is None
    finally:
        layer.close()
