"""OVA read and write against real tools: GNU tar builds and unpacks the archives, qemu-img
makes, checks and compares the streamOptimized VMDKs, sha256sum-equivalent hashing checks the
manifest, and the virt-v2v corpus OVFs (with virt-v2v's expected disk lists) drive the parser.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

import vmferry
from tests.conftest import qemu_img, qemu_io, require_tool
from vmferry.disk.ova import list_ova_disks, open_ova_disk, parse_ovf
from vmferry.errors import ResourceLimitError, UnsupportedFeatureError, UsageError
from vmferry.ops.convert import convert

MiB = 1 << 20
V2V = "virt-v2v/tests"


def _tar(cwd: Path, out: Path, *names: str) -> None:
    require_tool("tar")
    subprocess.run(["tar", "cf", str(out), *names], cwd=cwd, check=True)


def _stream_vmdk(path: Path, size: int, pattern: int, at: int = MiB) -> None:
    qemu_img("create", "-f", "vmdk", "-o", "subformat=streamOptimized", path, size)
    # qemu writes streamOptimized images front to back, whole grains only
    qemu_io("vmdk", path, f"write -P {pattern + 1} 0 64k", f"write -P {pattern} {at} {2 * MiB}")


def _raw(tmp_path: Path, img: Path, fmt: str = "vmdk") -> bytes:
    out = tmp_path / f"{img.name}.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", img, out)
    return out.read_bytes()


def _ovf_for(corpus: Path, name: str, *hrefs: str) -> str:
    """A corpus OVF with its disk hrefs pointed at our files (in order)."""
    text = (corpus / V2V / name).read_text()
    old = re.findall(r'ovf:href="([^"]+)"', text)
    for before, after in zip(old, hrefs, strict=False):
        text = text.replace(f'ovf:href="{before}"', f'ovf:href="{after}"')
    return text


# --- reading ----------------------------------------------------------------------------------


def test_reads_disk_inside_tar_made_ova(tmp_path: Path, corpus: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _stream_vmdk(src / "test-ova.vmdk", 8 * MiB, 0x41)
    (src / "vm.ovf").write_text(_ovf_for(corpus, "test-i-ova.ovf", "test-ova.vmdk"))
    ova = tmp_path / "vm.ova"
    _tar(src, ova, "vm.ovf", "test-ova.vmdk")
    before = sorted(p.name for p in tmp_path.iterdir())
    with vmferry.open(ova) as d:  # probed
        assert d.format == "ova"
        assert d.read(0, d.virtual_size) == _raw(tmp_path, src / "test-ova.vmdk")
        info = d.top.info()
        assert info["inner_format"] == "vmdk" and info["member"] == "test-ova.vmdk"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "test-ova.vmdk.raw"])


def test_subfolders_and_descriptor_not_first(tmp_path: Path, corpus: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    _stream_vmdk(src / "sub" / "disk1.vmdk", 4 * MiB, 0x51)
    (src / "sub" / "vm.ovf").write_text(_ovf_for(corpus, "test-i-ova-subfolders.ovf", "disk1.vmdk"))
    ova = tmp_path / "vm.ova"
    _tar(src, ova, "sub/disk1.vmdk", "sub/vm.ovf")  # href is relative to the OVF's folder
    with vmferry.open(ova) as d:  # probed although the descriptor is not the first member
        assert d.format == "ova"
        assert d.read(0, d.virtual_size) == _raw(tmp_path, src / "sub" / "disk1.vmdk")


def test_two_disks_choose_by_index_or_id(tmp_path: Path, corpus: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _stream_vmdk(src / "a.vmdk", 4 * MiB, 0x10)
    _stream_vmdk(src / "b.vmdk", 6 * MiB, 0x20, at=3 * MiB)
    (src / "vm.ovf").write_text(_ovf_for(corpus, "test-i-ova-two-disks.ovf", "a.vmdk", "b.vmdk"))
    ova = tmp_path / "vm.ova"
    _tar(src, ova, "vm.ovf", "a.vmdk", "b.vmdk")
    disks = list_ova_disks(ova)
    assert [(d["disk_id"], d["href"]) for d in disks] == [
        ("vmdisk1", "a.vmdk"),
        ("vmdisk2", "b.vmdk"),
    ]
    with vmferry.open(ova) as d:
        assert d.read(0, d.virtual_size) == _raw(tmp_path, src / "a.vmdk")
    for key in (1, "vmdisk2"):
        with open_ova_disk(ova, key) as d:
            assert d.read(0, d.virtual_size) == _raw(tmp_path, src / "b.vmdk")
    with pytest.raises(UsageError):
        open_ova_disk(ova, 2)


def test_gzip_disk_member(tmp_path: Path, corpus: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _stream_vmdk(src / "disk1.vmdk", 4 * MiB, 0x33)
    (src / "disk1.vmdk.gz").write_bytes(gzip.compress((src / "disk1.vmdk").read_bytes()))
    (src / "vm.ovf").write_text((corpus / V2V / "test-i-ova-gz.ovf").read_text())
    ova = tmp_path / "vm.ova"
    _tar(src, ova, "vm.ovf", "disk1.vmdk.gz")
    with vmferry.open(ova) as d:
        assert d.top.info()["compression"] == "gzip"
        assert d.read(0, d.virtual_size) == _raw(tmp_path, src / "disk1.vmdk")


def test_gzip_bomb_is_bounded(tmp_path: Path, corpus: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    bomb = gzip.compress(b"KDMV" + bytes(80 * MiB), compresslevel=9)
    (src / "disk1.vmdk.gz").write_bytes(bomb)
    ovf = (corpus / V2V / "test-i-ova-gz.ovf").read_text()
    ovf = ovf.replace('ovf:size="7804077568"', 'ovf:size="4096"')
    ovf = ovf.replace(
        'ovf:capacity="50" ovf:capacityAllocationUnits="byte * 2^30"',
        'ovf:capacity="1" ovf:capacityAllocationUnits="byte * 2^20"',
    )
    (src / "vm.ovf").write_text(ovf)
    ova = tmp_path / "vm.ova"
    _tar(src, ova, "vm.ovf", "disk1.vmdk.gz")
    with pytest.raises(ResourceLimitError):
        vmferry.open(ova)


@pytest.mark.parametrize(
    "stem",
    [
        "test-i-ova-two-disks",
        "test-i-ova-gz",
        "test-i-ova-formats",
        "test-i-ova-snapshots",
        "test-i-ova-subfolders",
        "test-i-ova-tar",
    ],
)
def test_corpus_ovf_disk_sections(corpus: Path, stem: str) -> None:
    """Disk count as virt-v2v prints it; every disk resolves to a File with an href."""
    desc = parse_ovf((corpus / V2V / f"{stem}.ovf").read_bytes(), stem)
    expected = (corpus / V2V / f"{stem}.expected").read_text()
    block = expected.split("disks:", 1)[1].split("removable media:", 1)[0]
    assert len(desc.disks) == len(re.findall(r"^\t\d+ \[", block, re.M))
    for disk in desc.disks:
        ref = desc.files[disk.file_ref or ""]
        assert ref.href.endswith((".vmdk", ".vmdk.gz"))
        assert disk.capacity % (1 << 20) == 0 and disk.capacity >= 1 << 30
        assert (ref.compression == "gzip") == (stem == "test-i-ova-gz")


def test_corpus_ovf_capacity_units(corpus: Path) -> None:
    desc = parse_ovf((corpus / V2V / "test-i-ova.ovf").read_bytes(), "x")
    assert [d.capacity for d in desc.disks] == [32 << 30]  # "byte * 2^30" × 32
    desc = parse_ovf((corpus / V2V / "test-i-ova-as-root.ovf").read_bytes(), "x")
    assert [d.capacity for d in desc.disks] == [512 << 20]


# --- writing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["lsilogic", "ide"])
def test_convert_to_ova(tmp_path: Path, adapter: str) -> None:
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-f", "qcow2", src, 20 * MiB + 512)
    qemu_io("qcow2", src, f"write -P 0x61 {MiB - 512} {3 * MiB}", f"write -P 0x62 {17 * MiB} 4096")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    ova = out_dir / "My VM.ova"
    convert(src, ova, options={"adapter_type": adapter})
    assert sorted(p.name for p in out_dir.iterdir()) == ["My VM.ova"]  # no temporaries left
    require_tool("tar")
    names = subprocess.run(["tar", "tf", ova], capture_output=True, text=True, check=True)
    assert names.stdout.split() == ["My_VM.ovf", "My_VM.mf", "My_VM-disk1.vmdk"]
    ex = tmp_path / "ex"
    ex.mkdir()
    subprocess.run(["tar", "xf", ova, "-C", ex], check=True)
    vmdk = ex / "My_VM-disk1.vmdk"
    info = qemu_img("info", "--output=json", vmdk).stdout
    assert '"format": "vmdk"' in info and "streamOptimized" in info
    qemu_img("check", "-f", "vmdk", vmdk)
    qemu_img("compare", "-f", "qcow2", "-F", "vmdk", src, vmdk)
    manifest = (ex / "My_VM.mf").read_text().splitlines()
    for line in manifest:
        m = re.fullmatch(r"SHA256\((.+)\)= ([0-9a-f]{64})", line)
        assert m is not None, line
        assert hashlib.sha256((ex / m.group(1)).read_bytes()).hexdigest() == m.group(2)
    assert len(manifest) == 2
    ovf = (ex / "My_VM.ovf").read_text()
    assert 'ovf:href="My_VM-disk1.vmdk"' in ovf and f'ovf:size="{vmdk.stat().st_size}"' in ovf
    with vmferry.open(ova) as d:
        assert d.virtual_size == 20 * MiB + 512
        assert d.read(0, d.virtual_size) == _raw(tmp_path, src, "qcow2")
        report = d.top.check()
    assert report.clean and sum("matches the manifest" in n for n in report.notes) == 2
    # the VM-config reader of vmferry.vm sees one disk of the right size on the right bus
    from vmferry.vm.readers.ovf import read_ova

    model = read_ova(ova)
    assert [(x.size_bytes, x.controller) for x in model.disks] == [
        (20 * MiB + 512, "ide" if adapter == "ide" else "scsi")
    ]


def test_ova_is_not_writable_in_place(tmp_path: Path) -> None:
    src = tmp_path / "s.raw"
    src.write_bytes(b"\x01" * MiB)
    ova = tmp_path / "s.ova"
    convert(src, ova)
    with pytest.raises(UnsupportedFeatureError):
        vmferry.open(ova, writable=True)


def test_tar_header_sizes_past_8_gib_use_base256() -> None:
    from vmferry.disk.ova import _tar_header

    for size in (0, 8**11 - 1, 9 << 30, 3 << 40):
        info = tarfile.TarInfo.frombuf(_tar_header("d.vmdk", size), "utf-8", "strict")
        assert (info.name, info.size, info.isreg()) == ("d.vmdk", size, True)


def test_manifest_mismatch_is_a_corruption(tmp_path: Path) -> None:
    src = tmp_path / "s.raw"
    src.write_bytes(b"\x02" * MiB)
    ova = tmp_path / "s.ova"
    convert(src, ova)
    data = bytearray(ova.read_bytes())
    at = data.index(b"SHA256(s-disk1.vmdk)= ") + len("SHA256(s-disk1.vmdk)= ")
    data[at : at + 4] = b"0000" if data[at : at + 4] != b"0000" else b"1111"
    bad = tmp_path / "bad.ova"
    bad.write_bytes(data)
    with vmferry.open(bad) as d:
        assert any("does not match" in c for c in d.top.check().corruptions)
    shutil.rmtree(tmp_path / "s.ova", ignore_errors=True)


def test_convert_from_ova(tmp_path: Path, corpus: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _stream_vmdk(src / "disk1.vmdk", 6 * MiB, 0x71)
    (src / "vm.ovf").write_text(_ovf_for(corpus, "test-i-ova-tar.ovf", "disk1.vmdk"))
    ova = tmp_path / "vm.ova"
    _tar(src, ova, "vm.ovf", "disk1.vmdk")
    out = tmp_path / "vm.qcow2"
    convert(ova, out)
    qemu_img("check", "-f", "qcow2", out)
    qemu_img("compare", "-f", "vmdk", "-F", "qcow2", src / "disk1.vmdk", out)
