"""Damaged and hostile LVM metadata: every case is a named error or warning, never a guess.

The base image is made by lvm2 (see test_lvm.py); each case rewrites the committed metadata
text (with a fresh checksum, so the damage is in the content) or flips bytes in the binary
headers.  The metadata rewriter is itself checked by lvm2: a harmless rewrite is accepted by
``lvs``.
"""

from __future__ import annotations

import re
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

import vmferry
from tests.guest.conftest import MIB, fake_root, mkfs_ext
from tests.guest.test_lvm import LvmImage, lv_bytes, lvm_disk, open_scan, put_lv
from vmferry.errors import GuestError, InspectionError
from vmferry.guest.errors import GuestLimitError, GuestWriteRefusedError
from vmferry.guest.guest import open_guest
from vmferry.guest.lvm import LvmMetadataError, UnsupportedSegmentError
from vmferry.guest.lvm.config import parse_config
from vmferry.guest.overlay import Overlay

MDA = 4096  # lvm2 puts the first metadata area 4 KiB into the PV


def _crc(data: bytes) -> int:
    """LVM's CRC (test-side copy; lvm2 accepting the rewritten metadata validates it)."""
    return zlib.crc32(data, 0xF597A6CF ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, tuple]:
    """MBR: p1 ext4 root whose fstab mounts /dev/mapper/vg0-lv0 on /data; p2 PV of vg0 with
    lv0 (ext4 "data") and lv1 (4 MiB)."""
    tmp = tmp_path_factory.mktemp("lvmbase")
    img, parts = lvm_disk(tmp, "label: dos\n,40M,83\n,40M,8e\n", size=96 * MIB)
    root = fake_root(tmp / "root")
    (root / "etc/fstab").write_text(
        "/dev/sda1 / ext4 defaults 0 1\n/dev/mapper/vg0-lv0 /data ext4 defaults 0 2\n"
    )
    mkfs_ext(img, *parts[1], root)
    with LvmImage(img, {2: parts[2]}) as li:
        li.lvm("pvcreate", li.dev(2))
        li.lvm("vgcreate", "-s", "1M", "vg0", li.dev(2))
        li.lvm("lvcreate", "-an", "-Zn", "-L", "8M", "-n", "lv0", "vg0")
        li.lvm("lvcreate", "-an", "-Zn", "-L", "4M", "-n", "lv1", "vg0")
        report = li.report("vg0")
    data = _tree_fs(tmp, {"hello.txt": "from an LV\n"})
    put_lv(img, report, parts, "lv0", data)
    return img, parts, report


def _tree_fs(tmp: Path, files: dict[str, str]) -> bytes:
    tree = tmp / "datatree"
    for rel, text in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    fs = tmp / "data.img"
    fs.write_bytes(b"")
    mkfs_ext(fs, 0, 8 * MIB, tree, "-L", "data")
    return fs.read_bytes()


def _copy(base: tuple, tmp: Path) -> Path:
    img = tmp / "case.raw"
    shutil.copyfile(base[0], img)
    return img


def rewrite_text(img: Path, pv_start: int, edit: Callable[[str], str]) -> None:
    """Replace the committed metadata text in place, with a correct checksum and header CRC."""
    with open(img, "r+b") as f:
        f.seek(pv_start + MDA)
        head = bytearray(f.read(512))
        offset, size = struct.unpack_from("<QQ", head, 40)
        f.seek(pv_start + MDA + offset)
        text = f.read(size).rstrip(b"\0").decode()
        new = edit(text).encode() + b"\0"
        f.seek(pv_start + MDA + offset)
        f.write(new)
        struct.pack_into("<QQI", head, 40, offset, len(new), _crc(new))
        struct.pack_into("<I", head, 0, _crc(bytes(head[4:])))
        f.seek(pv_start + MDA)
        f.write(head)


def poke(img: Path, at: int, data: bytes) -> None:
    with open(img, "r+b") as f:
        f.seek(at)
        f.write(data)


def test_rewriter_is_accepted_by_lvm2(base, tmp_path: Path) -> None:
    img = _copy(base, tmp_path)
    parts = base[1]
    rewrite_text(img, parts[2][0], lambda t: t.replace("lv1 {", "renamed {"))
    with LvmImage(img, {2: parts[2]}) as li:
        names = li.lvm("lvs", "--noheadings", "-o", "lv_name", "vg0").split()
    assert sorted(names) == ["lv0", "renamed"]
    disk, scan = open_scan(img)
    with disk:
        assert sorted(scan.volume_groups[0].lvs) == ["lv0", "renamed"]


def test_guest_mounts_lv_named_by_mapper_and_dm_uuid(base, tmp_path: Path) -> None:
    img, parts, report = base
    with vmferry.open(img) as disk:
        guest = open_guest(disk)
        assert guest.root.partition is not None and guest.root.partition.index == 1
        assert guest.mounts["/data"].lv == "vg0/lv0"
        assert guest.read_text("/data/hello.txt") == "from an LV\n"
        vg = guest.lvm.volume_groups[0]
        lv0 = vg.lvs["lv0"]
        dm_uuid = "/dev/disk/by-id/dm-uuid-LVM-" + (vg.uuid + lv0.uuid).replace("-", "")
        for spec in (
            "/dev/vg0/lv0",
            "/dev/mapper/vg0-lv0",
            "/dev/disk/by-id/dm-name-vg0-lv0",
            dm_uuid,
            "LABEL=data",
        ):
            hit = guest.resolve_device(spec)
            assert hit is not None and hit.lv == "vg0/lv0", spec
        for spec in ("/dev/vg0/nope", "/dev/mapper/vg0-lv0-real", "/dev/sda", "/dev/sda2"):
            hit = guest.resolve_device(spec)
            assert hit is None or hit.lv is None, spec
        lv1 = next(g for g in guest.filesystems if g.lv == "vg0/lv1")
        assert lv1.signature is None and lv1.error is None and lv1.device is not None
        assert lv1.device.read(0, lv1.device.virtual_size) == lv_bytes(img, report, parts, "lv1")


def test_damaged_pv_does_not_stop_inspection(base, tmp_path: Path) -> None:
    img = _copy(base, tmp_path)
    poke(img, base[1][2][0] + 512 + 40, b"X")  # inside the PV header: label CRC now wrong
    with vmferry.open(img) as disk:
        guest = open_guest(disk)
        assert "/data" not in guest.mounts
        assert any("label checksum" in w for w in guest.warnings)
        assert guest.lvm.pvs[0].error and guest.lvm.volume_groups == []


def _scan_warnings(img: Path) -> tuple[list, list]:
    disk, scan = open_scan(img)
    with disk:
        return scan.volume_groups, scan.warnings


@pytest.mark.parametrize(
    "where,data,message",
    [
        (MDA + 45, b"\x7f", "metadata area header checksum mismatch"),
        (MDA + 4, b"X", "wrong magic"),
        (512 + 8, b"\x05", "says it is in sector 5"),
    ],
)
def test_binary_damage_is_named(base, tmp_path: Path, where: int, data: bytes, message) -> None:
    img = _copy(base, tmp_path)
    poke(img, base[1][2][0] + where, data)
    vgs, warnings = _scan_warnings(img)
    assert vgs == []
    assert any(message in w for w in warnings), warnings


def test_text_checksum_mismatch(base, tmp_path: Path) -> None:
    img = _copy(base, tmp_path)
    start = base[1][2][0] + MDA
    with open(img, "rb") as f:
        f.seek(start + 40)
        offset, size = struct.unpack("<QQ", f.read(16))
    poke(img, start + offset + size // 2, b"#")
    vgs, warnings = _scan_warnings(img)
    assert vgs == [] and any("metadata text checksum mismatch" in w for w in warnings)


@pytest.mark.parametrize(
    "offset,size,message",
    [
        (512, 1 << 62, "does not fit its area"),
        (1 << 40, 100, "outside its"),
        (100, 100, "outside its"),
    ],
)
def test_raw_location_out_of_bounds(base, tmp_path: Path, offset, size, message) -> None:
    img = _copy(base, tmp_path)
    start = base[1][2][0] + MDA
    with open(img, "r+b") as f:
        f.seek(start)
        head = bytearray(f.read(512))
        struct.pack_into("<QQ", head, 40, offset, size)
        struct.pack_into("<I", head, 0, _crc(bytes(head[4:])))
        f.seek(start)
        f.write(head)
    vgs, warnings = _scan_warnings(img)
    assert vgs == [] and any(message in w for w in warnings), warnings


def _sub(pattern: str, repl: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        new, n = re.subn(pattern, repl, text, count=1, flags=re.S)
        assert n == 1, pattern
        return new

    return edit


VG_BREAKERS = [
    (_sub(r"extent_size = \d+", "extent_size = 0"), "extent_size 0"),
    (_sub(r"pe_count = \d+", "pe_count = 1099511627776"), "pe_count out of range"),
    (_sub(r"\}\s*# Generated", "# Generated"), "never closed"),
    (_sub(r"seqno = (\d+)", r"seqno = \1\nseqno = 9"), "given twice"),
    (_sub(r"^(\S+) \{", r"\1 { " + "x { " * 40 + "}" * 40), "nests deeper"),
    (_sub(r'format = "lvm2"', 'format = "lvm2" ; '), "unexpected ';'"),
    (_sub(r"status = \[", "status = [ ,"), "expected a value"),
]


@pytest.mark.parametrize("edit,message", VG_BREAKERS)
def test_broken_vg_metadata_is_named(base, tmp_path: Path, edit, message: str) -> None:
    img = _copy(base, tmp_path)
    rewrite_text(img, base[1][2][0], edit)
    vgs, warnings = _scan_warnings(img)
    assert vgs == []
    assert any(message in w for w in warnings), warnings


def _lv1_segment(repl_pattern: str, repl: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        head, tail = text.split("lv1 {", 1)
        new, n = re.subn(repl_pattern, repl, tail, count=1, flags=re.S)
        assert n == 1, repl_pattern
        return head + "lv1 {" + new

    return edit


LV_BREAKERS = [
    (_lv1_segment(r"extent_count = \d+", "extent_count = 1000000000000000"), "outside PV"),
    (_lv1_segment(r'"pv0", \d+', '"pv0", 4000000000'), "outside PV"),
    (_lv1_segment(r'"pv0", \d+', '"pv7", 0'), "not a physical volume"),
    (_lv1_segment(r"stripe_count = 1", "stripe_count = 3"), "3 stripes but 1 listed"),
    (_lv1_segment(r"start_extent = 0", "start_extent = 5"), "does not follow"),
    (_lv1_segment(r"segment_count = 1", "segment_count = 2"), "segment_count 2"),
]


@pytest.mark.parametrize("edit,message", LV_BREAKERS)
def test_broken_lv_is_named_and_others_survive(base, tmp_path, edit, message: str) -> None:
    img = _copy(base, tmp_path)
    rewrite_text(img, base[1][2][0], edit)
    disk, scan = open_scan(img)
    with disk:
        (vg,) = scan.volume_groups
        lv1 = vg.lvs["lv1"]
        assert lv1.error is not None and message in str(lv1.error), lv1.error
        with pytest.raises(GuestError):
            scan.open_lv(vg, lv1)
        lv0 = scan.open_lv(vg, vg.lvs["lv0"])
        assert lv0.read(1024 + 56, 2) == b"\x53\xef"  # the ext superblock magic


@pytest.mark.parametrize(
    "segtype", ["thin", "thin-pool", "raid1", "raid5_ls", "mirror", "cache", "vdo", "writecache"]
)
def test_unsupported_segment_types_are_refused_by_name(base, tmp_path, segtype: str) -> None:
    img = _copy(base, tmp_path)
    rewrite_text(img, base[1][2][0], _lv1_segment(r'type = "striped"', f'type = "{segtype}"'))
    with vmferry.open(img) as disk:
        guest = open_guest(disk)
        lv1 = next(g for g in guest.filesystems if g.lv == "vg0/lv1")
        assert lv1.fs is None and lv1.device is None
        assert segtype in (lv1.error or "")
        vg = guest.lvm.volume_groups[0]
        with pytest.raises(UnsupportedSegmentError) as err:
            guest.lvm.open_lv(vg, vg.lvs["lv1"])
        assert err.value.features == [segtype]
        assert guest.read_text("/data/hello.txt") == "from an LV\n"


def test_pv_larger_than_its_partition(base, tmp_path: Path) -> None:
    img = _copy(base, tmp_path)
    edit = _sub(r"pe_count = \d+", "pe_count = 100000")
    rewrite_text(img, base[1][2][0], lambda t: _lv1_segment(r'"pv0", \d+', '"pv0", 90000')(edit(t)))
    disk, scan = open_scan(img)
    with disk:
        vg = scan.volume_groups[0]
        with pytest.raises(LvmMetadataError, match="past its"):
            scan.open_lv(vg, vg.lvs["lv1"])


def test_snapshot_origin_is_read_only_and_hidden_lvs_are_skipped(base, tmp_path: Path) -> None:
    img = _copy(base, tmp_path)

    def edit(text: str) -> str:
        snap = (
            'snapshot0 {\nid = "aaaaaa-bbbb-cccc-dddd-eeee-ffff-gggggg"\n'
            'status = ["READ", "VISIBLE"]\nflags = []\nsegment_count = 1\n'
            'segment1 {\nstart_extent = 0\nextent_count = 8\ntype = "snapshot"\n'
            'chunk_size = 8\norigin = "lv0"\ncow_store = "lv1"\n}\n}\n'
        )
        text = _lv1_segment(r', "VISIBLE"', "")(text)  # lv1 becomes hidden (a COW store)
        return text.replace("lv1 {", snap + "lv1 {", 1)

    rewrite_text(img, base[1][2][0], edit)
    with vmferry.open(img) as disk:
        guest = open_guest(Overlay(disk))
        assert {g.lv for g in guest.filesystems if g.lv} == {"vg0/lv0", "vg0/snapshot0"}
        data = guest.mounts["/data"]
        assert guest.read_text("/data/hello.txt") == "from an LV\n"
        with pytest.raises(GuestWriteRefusedError, match="snapshots"):
            data.fs.check_writable()  # type: ignore[union-attr]
        with pytest.raises(GuestWriteRefusedError):
            data.device.write(0, b"x")  # type: ignore[union-attr]
        snap = next(g for g in guest.filesystems if g.lv == "vg0/snapshot0")
        assert "snapshot" in (snap.error or "")


@pytest.mark.parametrize(
    "text,error",
    [
        ("a {" * 20 + "}" * 20, GuestLimitError),
        ('a = "unterminated', LvmMetadataError),
        ("a = [1, 2", LvmMetadataError),
        ("a = [1 2]", LvmMetadataError),
        ("a = ", LvmMetadataError),
        ("}", LvmMetadataError),
        ("a = 0x", LvmMetadataError),
        ("a = {", LvmMetadataError),
        ('a = "x\\', LvmMetadataError),
        ("a" * 10 + " = 1\n" + "b = \x01", LvmMetadataError),
    ],
)
def test_parser_refuses_malformed_text(text: str, error: type) -> None:
    with pytest.raises(error):
        parse_config(text)


def test_parser_reads_lvm_syntax() -> None:
    root = parse_config(
        '# comment\nvg { id = "a\\"b" seqno = 7 # trailing\nlist = ["x", 1, -2, 0x10]\n'
        "f = 1.5\n empty = []\nsub { k = 'v' }\n}\ncontents = \"Text\"\0garbage after NUL {{{"
    )
    vg = root.sections["vg"]
    assert vg.values == {"id": 'a"b', "seqno": 7, "list": ["x", 1, -2, 16], "f": 1.5, "empty": []}
    assert vg.sections["sub"].values == {"k": "v"}
    assert root.values == {"contents": "Text"}


def test_inspection_error_names_lv_problems(base, tmp_path: Path) -> None:
    """No root anywhere: the error lists why each LV could not be read."""
    img = _copy(base, tmp_path)
    poke(img, base[1][1][0] + 1024, bytes(1024))  # wipe the root's ext superblock
    rewrite_text(img, base[1][2][0], _lv1_segment(r'type = "striped"', 'type = "thin"'))
    with vmferry.open(img) as disk, pytest.raises(InspectionError) as err:
        open_guest(disk)
    assert "LV vg0/lv1" in str(err.value) and "thin" in str(err.value)


@pytest.mark.parametrize(
    "spec,names,kind",
    [
        ("/dev/VolGroup00/LogVol00", ("VolGroup00", "LogVol00"), "lvm"),
        ("/dev/mapper/VolGroup00-LogVol00", ("VolGroup00", "LogVol00"), "mapper"),
        ("/dev/mapper/vg--sys-lv--root", ("vg-sys", "lv-root"), "mapper"),
        ("/dev/disk/by-id/dm-name-vg-root", ("vg", "root"), "mapper"),
        ("/dev/mapper/vg-root-real", None, "mapper"),  # an LVM-internal layer
        ("/dev/mapper/luks", None, "mapper"),
        ("/dev/disk/by-id/ata-QEMU_HARDDISK_QM00001", None, "by-id"),
        ("/dev/md/0", None, "other"),  # MD RAID, not LVM
    ],
)
def test_lvm_device_names(spec: str, names, kind: str) -> None:
    from vmferry.guest.linux.devices import classify, lvm_name

    assert lvm_name(spec) == names
    assert classify(spec) == kind
