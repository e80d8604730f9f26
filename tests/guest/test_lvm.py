"""LVM2 volumes read against lvm2 itself: PVs, VGs and LVs made by pvcreate/vgcreate/lvcreate.

The fixtures attach each PV partition of a raw image to a loop device (``losetup --offset``)
and run the lvm2 tools with activation disabled (``--driverloaded n``: no device-mapper is
needed, only metadata is written).  The physical place of every LV segment comes from
``lvs --segments -o seg_pe_ranges,stripes,stripe_size`` and ``pvs -o pe_start``, so the
expected bytes of an LV are computed from lvm2's report, not from vmferry's parser; every
512-byte sector of the PVs' data areas is tagged with (partition, sector) before reading.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import vmferry
from tests.conftest import require_tool
from tests.guest.conftest import MIB, make_disk
from vmferry.guest.fs.probe import probe
from vmferry.guest.lvm import scan_lvm
from vmferry.guest.overlay import Overlay, Slice
from vmferry.guest.partitions import read_partition_table

SECTOR = 512
GPT_LVM = "E6D6D379-F507-44C2-A23C-238F2A3DF928"  # Linux LVM partition type


def require_loop() -> None:
    """lvm2 needs block devices: loop devices, so root; skip (or fail under CI) without."""
    require_tool("pvcreate")
    require_tool("losetup")
    reason = None
    if os.geteuid() != 0:
        reason = "LVM fixtures need root for loop devices"
    elif not Path("/dev/loop-control").exists():
        reason = "no /dev/loop-control"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@dataclass
class Seg:
    lv: str
    start_pe: int  # in the LV
    ranges: list[tuple[int, int, int]]  # (partition, first PE, last PE) per stripe
    stripes: int
    stripe_size: int  # bytes


@dataclass
class LvmImage:
    """A raw image whose listed partitions are attached to loop devices while in ``with``."""

    img: Path
    parts: dict[int, tuple[int, int]]  # partition number → (start, size) bytes
    loops: dict[int, str] = field(default_factory=dict)

    def __enter__(self) -> LvmImage:
        require_loop()
        for number, (start, size) in self.parts.items():
            proc = subprocess.run(
                ["losetup", "-f", "--show", "-o", str(start), "--sizelimit", str(size), self.img],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                self.__exit__()
                reason = f"losetup failed: {proc.stderr.strip()}"
                if os.environ.get("CI"):
                    pytest.fail(reason)
                pytest.skip(reason)
            self.loops[number] = proc.stdout.strip()
        return self

    def __exit__(self, *exc: object) -> None:
        for loop in self.loops.values():
            subprocess.run(["blockdev", "--flushbufs", loop], capture_output=True)
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        self.loops.clear()

    def lvm(self, command: str, *args: str) -> str:
        accept = ",".join(f'"a|^{loop}$|"' for loop in self.loops.values())
        config = (
            f'devices {{ filter=[{accept},"r|.*|"] use_devicesfile=0 '
            "obtain_device_list_from_udev=0 } backup { backup=0 archive=0 }"
        )
        env = dict(os.environ, LVM_SUPPRESS_FD_WARNINGS="1")
        argv = [command, "--driverloaded", "n", "--config", config, *args]
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, f"{' '.join(argv)}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def dev(self, number: int) -> str:
        return self.loops[number]

    def part_of(self, loop: str) -> int:
        return next(n for n, lp in self.loops.items() if lp == loop)

    def report(self, vg: str) -> tuple[int, dict[int, int], list[Seg]]:
        """(extent size, partition → pe_start, segments) in bytes, from vgs/pvs/lvs JSON."""
        units = ("--units", "b", "--nosuffix", "--reportformat", "json")
        vgs = json.loads(self.lvm("vgs", *units, "-o", "vg_name,vg_extent_size", vg))
        ext = int(vgs["report"][0]["vg"][0]["vg_extent_size"])
        pvs = json.loads(self.lvm("pvs", *units, "-o", "pv_name,pe_start"))
        pe_start = {self.part_of(p["pv_name"]): int(p["pe_start"]) for p in pvs["report"][0]["pv"]}
        fields = "lv_name,seg_start_pe,seg_pe_ranges,stripes,stripe_size"
        lvs = json.loads(self.lvm("lvs", *units, "-a", "--segments", "-o", fields, vg))
        segs = []
        for row in lvs["report"][0]["seg"]:
            ranges = []
            for item in row["seg_pe_ranges"].split():
                m = re.fullmatch(r"(.+):(\d+)-(\d+)", item)
                assert m, item
                ranges.append((self.part_of(m.group(1)), int(m.group(2)), int(m.group(3))))
            segs.append(
                Seg(
                    row["lv_name"],
                    int(row["seg_start_pe"]),
                    ranges,
                    int(row["stripes"]),
                    int(row["stripe_size"].strip() or 0),
                )
            )
        return ext, pe_start, segs


def lvm_disk(tmp: Path, script: str, size: int = 128 * MIB) -> tuple[Path, dict[int, tuple]]:
    img, table = make_disk(tmp, size, script)
    parts = {
        int(p["node"][len(str(img)) :]): (p["start"] * SECTOR, p["size"] * SECTOR)
        for p in table["partitions"]
    }
    return img, parts


def lv_map(
    report: tuple[int, dict[int, int], list[Seg]], parts: dict[int, tuple], lv: str
) -> Iterator[tuple[int, int, int]]:
    """(LV offset, image offset, length) pieces of ``lv``, from lvm2's own segment report.

    Striped segments follow device-mapper's striped target (Documentation/admin-guide/
    device-mapper/striped.rst): chunk k of the segment is on stripe k mod n, row k div n.
    """
    ext, pe_start, segs = report
    for seg in sorted((s for s in segs if s.lv == lv), key=lambda s: s.start_pe):
        n = seg.stripes
        per = (seg.ranges[0][2] - seg.ranges[0][1] + 1) * ext
        chunk = seg.stripe_size if n > 1 else per
        base = seg.start_pe * ext
        for k in range(per * n // chunk):
            part, first, _ = seg.ranges[k % n]
            phys = parts[part][0] + pe_start[part] + first * ext + (k // n) * chunk
            yield base + k * chunk, phys, chunk


def lv_bytes(img: Path, report, parts, lv: str) -> bytes:
    out = bytearray()
    with open(img, "rb") as f:
        for lv_off, phys, n in lv_map(report, parts, lv):
            assert lv_off == len(out)
            f.seek(phys)
            out += f.read(n)
    return bytes(out)


def put_lv(img: Path, report, parts, lv: str, data: bytes) -> None:
    """Write ``data`` at the start of ``lv`` in the image, where lvm2 says its extents are."""
    with open(img, "r+b") as f:
        for lv_off, phys, n in lv_map(report, parts, lv):
            if lv_off >= len(data):
                break
            f.seek(phys)
            f.write(data[lv_off : lv_off + n])


def tag_sectors(img: Path, part: int, start: int, size: int, skip: int) -> None:
    """Write (b"SECT", partition, sector) into every sector of the partition past ``skip``."""
    with open(img, "r+b") as f:
        f.seek(start + skip)
        first = skip // SECTOR
        count = (size - skip) // SECTOR
        step = 4096
        for at in range(0, count, step):
            block = b"".join(
                struct.pack("<4sII", b"SECT", part, first + s).ljust(SECTOR, b".")
                for s in range(at, min(count, at + step))
            )
            f.write(block)


def open_scan(img: Path):
    disk = vmferry.open(img)
    table = read_partition_table(disk)
    return disk, scan_lvm(_pvs(disk, table))


def _pvs(disk, table) -> list:
    """The partitions blkid-style probing calls LVM2_member (what guest.py hands to scan_lvm)."""
    out = []
    for p in table.filesystems():
        dev = Slice(disk, p.start, p.size)
        sig = probe(dev)
        if sig is not None and sig.type == "LVM2_member":
            out.append((dev, p.index))
    return out


# --- linear and striped mapping against lvs --------------------------------------------------


@pytest.fixture
def two_pv_image(tmp_path: Path) -> Iterator[tuple[Path, dict, tuple]]:
    """GPT: p1 plain, p2 and p3 PVs of vg0 (1 MiB extents) with linear, 2-segment linear and
    striped (2 × 64 KiB) LVs; every data sector tagged."""
    img, parts = lvm_disk(
        tmp_path,
        f"label: gpt\n,8M,L\n,56M,{GPT_LVM}\n,56M,{GPT_LVM}\n",
    )
    lvm_parts = {n: parts[n] for n in (2, 3)}
    with LvmImage(img, lvm_parts) as li:
        li.lvm("pvcreate", li.dev(2), li.dev(3))
        li.lvm("vgcreate", "-s", "1M", "vg0", li.dev(2), li.dev(3))
        li.lvm("lvcreate", "-an", "-Zn", "-L", "3M", "-n", "lin", "vg0", li.dev(2))
        li.lvm("lvcreate", "-an", "-Zn", "-L", "2M", "-n", "mid", "vg0", li.dev(2))
        li.lvm("lvextend", "-L", "+4M", "vg0/lin", li.dev(3))
        li.lvm("lvcreate", "-an", "-Zn", "-i", "2", "-I", "64k", "-L", "8M", "-n", "str", "vg0")
        report = li.report("vg0")
    for n in (2, 3):
        tag_sectors(img, n, *parts[n], report[1][n])
    return img, parts, report


def test_linear_and_striped_reads_match_lvs(two_pv_image) -> None:
    img, parts, report = two_pv_image
    disk, scan = open_scan(img)
    with disk:
        assert scan.warnings == []
        (vg,) = scan.volume_groups
        assert vg.name == "vg0" and vg.extent_bytes == report[0]
        segs = {s.lv: s for s in report[2]}
        assert len([s for s in report[2] if s.lv == "lin"]) == 2  # really two segments
        assert segs["str"].stripes == 2 and segs["str"].stripe_size == 64 << 10
        assert sorted(vg.lvs) == ["lin", "mid", "str"]
        for name in ("lin", "mid", "str"):
            lvd = scan.open_lv(vg, vg.lvs[name])
            expected = lv_bytes(img, report, parts, name)
            assert lvd.virtual_size == len(expected)
            assert lvd.read(0, lvd.virtual_size) == expected
            # unaligned reads across chunk, stripe and segment boundaries
            for off, n in ((1, 511), (65536 - 7, 300), (3 * MIB - 100, 70000), (5, 0)):
                if off + n <= lvd.virtual_size:
                    assert lvd.read(off, n) == expected[off : off + n], (name, off, n)
            tags = {struct.unpack_from("<4sII", expected, o)[1] for o in (0, len(expected) - 512)}
            if name == "str":
                assert tags == {2, 3}
        assert [s.to_json()["type"] for s in vg.lvs["str"].segments] == ["striped"]
        assert vg.lvs["lin"].segment_types == ["linear"]
        json_pvs = scan.to_json()["volume_groups"][0]["pvs"]
        assert [(p["partition"], p["missing"]) for p in json_pvs] == [(2, False), (3, False)]


def test_writes_through_the_overlay_land_where_lvs_says(two_pv_image, tmp_path: Path) -> None:
    img, parts, report = two_pv_image
    copy = tmp_path / "copy.raw"
    shutil.copyfile(img, copy)
    disk = vmferry.open(copy, writable=True)
    with disk:
        overlay = Overlay(disk)
        table = read_partition_table(overlay)
        scan = scan_lvm(_pvs(overlay, table))
        vg = scan.volume_groups[0]
        payload = bytes(range(256)) * 1200  # 300 KiB: crosses chunks of both stripes
        for name, off in (("str", 65536 - 1000), ("lin", 3 * MIB - 4000)):
            lvd = scan.open_lv(vg, vg.lvs[name])
            lvd.write(off, payload)
            assert lvd.read(off, len(payload)) == payload
        overlay.commit(disk)
        disk.flush()
    for name, off in (("str", 65536 - 1000), ("lin", 3 * MIB - 4000)):
        before = lv_bytes(img, report, parts, name)
        after = lv_bytes(copy, report, parts, name)
        assert after[off : off + len(payload)] == payload
        assert after[:off] == before[:off]
        assert after[off + len(payload) :] == before[off + len(payload) :]
    assert lv_bytes(copy, report, parts, "mid") == lv_bytes(img, report, parts, "mid")


def test_missing_pv_is_named_and_other_lvs_still_read(two_pv_image) -> None:
    img, parts, report = two_pv_image
    with open(img, "r+b") as f:  # the disk that held partition 3 is "elsewhere": wipe its label
        f.seek(parts[3][0])
        f.write(bytes(4 * SECTOR))
    disk, scan = open_scan(img)
    with disk:
        (vg,) = scan.volume_groups
        pv1 = vg.pvs["pv1"]
        assert any(pv1.uuid in w and "not on this image" in w for w in scan.warnings)
        from vmferry.guest.lvm import MissingPhysicalVolumeError

        for name in ("lin", "str"):
            with pytest.raises(MissingPhysicalVolumeError) as err:
                scan.open_lv(vg, vg.lvs[name])
            assert pv1.uuid in str(err.value) and err.value.pv_uuid == pv1.uuid
        mid = scan.open_lv(vg, vg.lvs["mid"])
        assert mid.read(0, mid.virtual_size) == lv_bytes(img, report, parts, "mid")
        pvs = scan.to_json()["volume_groups"][0]["pvs"]
        assert [(p["name"], p["missing"]) for p in pvs] == [("pv0", False), ("pv1", True)]


def test_wrapped_circular_metadata_buffer(tmp_path: Path) -> None:
    """A 64 KiB metadata area filled by lvcreate until the committed copy wraps around."""
    img, parts = lvm_disk(tmp_path, "label: dos\n,60M,8e\n", size=64 * MIB)
    tag = "t" * 200
    with LvmImage(img, parts) as li:
        dev = li.dev(1)
        li.lvm("pvcreate", "--metadatasize", "32k", "--dataalignment", "64k", dev)
        li.lvm("vgcreate", "-s", "1M", "w", dev)
        wrapped = False
        for i in range(40):
            li.lvm("lvcreate", "-an", "-Zn", "-L", "1M", "-n", f"l{i}", "--addtag", tag, "w")
            with open(dev, "rb") as f:
                head = f.read(8192)
            (mda_size,) = struct.unpack_from("<Q", head, 4096 + 32)
            offset, size = struct.unpack_from("<QQ", head, 4096 + 40)
            if offset + size > mda_size:
                wrapped = True
                break
        assert wrapped, "lvm2 never wrapped its metadata buffer"
        vgs = li.lvm("vgs", "--noheadings", "-o", "vg_seqno,lv_count", "w").split()
    disk, scan = open_scan(img)
    with disk:
        assert scan.warnings == []
        (vg,) = scan.volume_groups
        assert vg.seqno == int(vgs[0])
        assert len(vg.lvs) == int(vgs[1]) == i + 1


def test_newest_metadata_copy_wins_and_stale_ones_are_reported(tmp_path: Path) -> None:
    """p3's metadata area is rolled back to before the last lvcreate: seqno decides."""
    img, parts = lvm_disk(tmp_path, "label: dos\n,30M,8e\n,30M,8e\n", size=64 * MIB)
    with LvmImage(img, parts) as li:
        li.lvm("pvcreate", li.dev(1), li.dev(2))
        li.lvm("vgcreate", "-s", "1M", "vg0", li.dev(1), li.dev(2))
        li.lvm("lvcreate", "-an", "-Zn", "-L", "2M", "-n", "old", "vg0")
        with open(li.dev(2), "rb") as f:
            saved = f.read(MIB)
        li.lvm("lvcreate", "-an", "-Zn", "-L", "2M", "-n", "new", "vg0")
        seqno = int(li.lvm("vgs", "--noheadings", "-o", "vg_seqno", "vg0"))
    with open(img, "r+b") as f:
        f.seek(parts[2][0])
        f.write(saved)
    disk, scan = open_scan(img)
    with disk:
        (vg,) = scan.volume_groups
        assert vg.seqno == seqno and sorted(vg.lvs) == ["new", "old"]
        assert any("partition 2 holds older metadata" in w for w in scan.warnings)


def test_second_metadata_area_is_used_when_the_first_is_damaged(tmp_path: Path) -> None:
    """pvcreate --pvmetadatacopies 2 puts a second area at the PV's end."""
    img, parts = lvm_disk(tmp_path, "label: dos\n,30M,8e\n", size=64 * MIB)
    with LvmImage(img, parts) as li:
        li.lvm("pvcreate", "--pvmetadatacopies", "2", li.dev(1))
        li.lvm("vgcreate", "-s", "1M", "vg0", li.dev(1))
        li.lvm("lvcreate", "-an", "-Zn", "-L", "2M", "-n", "lv", "vg0")
        mdas = li.lvm("pvs", "--noheadings", "-o", "pv_mda_count", li.dev(1)).split()
    assert mdas == ["2"]
    with open(img, "r+b") as f:  # break the first area's header magic
        f.seek(parts[1][0] + 4096 + 4)
        f.write(b"XXXX")
    disk, scan = open_scan(img)
    with disk:
        (vg,) = scan.volume_groups
        assert list(vg.lvs) == ["lv"]
        assert any("wrong magic" in w for w in scan.warnings)
        assert scan.to_json()["physical_volumes"][0]["metadata_copies"] == 1
