"""``vmferry du`` on generated Hyper-V and VMware VM folders, figures checked by hand (issue 4).

The expected numbers come from ``os.stat`` of the files the test wrote and the virtual size it
chose, never from vmferry's own measurements; the HTML page is checked for self-containment
and rendered by headless Chromium, whose screenshot is decoded here (a tiny PNG reader over
zlib) and searched for the chart's and the tree's colours.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

import vmferry
from tests.conftest import require_tool

MIB = 1 << 20
VIRTUAL = 64 * MIB
#: the CLI of the checkout under test (not whatever vmferry an installed shim points at)
VMFERRY = [sys.executable, "-c", "import sys; from vmferry.cli.main import main; sys.exit(main())"]
ENV = {**os.environ, "PYTHONPATH": str(Path(vmferry.__file__).parents[1])}
#: what a fully grown leaf may take beyond the virtual size (block tables, bitmaps, grain
#: tables; 64 MiB of VHDX at 1 MiB blocks or VMDK at 64 KiB grains needs far less)
LEAF_OVERHEAD = 8 * MIB
IDE_CONTROLLER = "83f8638b-8dca-4152-9eda-2ca8b33039b4"  # Hyper-V's IDE controller class
HYPERV_XML = """<?xml version="1.0" encoding="UTF-16" standalone="yes"?>
<configuration>
  <properties><name type="string">web01</name></properties>
  <settings>
    <memory><bank><size type="integer">2048</size></bank></memory>
    <processors><count type="integer">2</count></processors>
  </settings>
  <_{ide}_>
    <controller0>
      <drive0>
        <pathname type="string">{disk}</pathname>
        <type type="string">VHD</type>
      </drive0>
    </controller0>
  </_{ide}_>
</configuration>
"""
VMX = """.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "14"
displayName = "vm"
memSize = "1024"
numvcpus = "1"
guestOS = "other-64"
scsi0.present = "TRUE"
scsi0.virtualDev = "lsilogic"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "vm-000002.vmdk"
"""


@dataclass
class VmFolder:
    """A generated VM folder and what the test knows about it from its own hands."""

    root: Path
    config: Path
    layers: list[Path]  # base first, the leaf in use last
    memory: list[Path]


def _fill(path: Path, fmt: str, parent: Path | None, rng: random.Random, mib: int) -> None:
    """Create a layer and give it ``mib`` MiB of data at random MiB-aligned places."""
    disk = vmferry.create(path, fmt, None if parent else VIRTUAL, parent)
    with disk:
        for _ in range(mib):
            disk.write(rng.randrange(VIRTUAL // MIB) * MIB, rng.randbytes(MIB))
        disk.flush()


def _memory_file(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(path.name).randbytes(size))
    return path


def _hyperv(root: Path) -> VmFolder:
    """Hyper-V 2012 R2 layout: disks, configs and saved state in three sibling folders."""
    rng = random.Random("hyperv")
    vhds = root / "Virtual Hard Disks"
    vhds.mkdir(parents=True)
    names = ["web01.vhdx", *(f"web01_{str(uuid.UUID(int=i)).upper()}.avhdx" for i in (1, 2))]
    layers = [vhds / n for n in names]
    for i, path in enumerate(layers):
        _fill(path, "vhdx", layers[i - 1] if i else None, rng, (6, 3, 2)[i])
    vm_guid = str(uuid.UUID(int=0xABC)).upper()
    config = root / "Virtual Machines" / f"{vm_guid}.xml"
    config.parent.mkdir()
    disk = rf"C:\Hyper-V\web01\Virtual Hard Disks\{layers[-1].name}"  # as Hyper-V stores it
    config.write_text(HYPERV_XML.format(ide=IDE_CONTROLLER, disk=disk), encoding="utf-16")
    snap = str(uuid.UUID(int=0xDEF)).upper()
    memory = [
        _memory_file(root / "Snapshots" / f"{snap}.bin", 3 * MIB + 4096),
        _memory_file(root / "Snapshots" / f"{snap}.vsv", 77 * 1024 + 13),
    ]
    return VmFolder(root, config, layers, memory)


def _vmware(root: Path) -> VmFolder:
    """Workstation layout: everything beside the .vmx, deltas named -00000N.vmdk."""
    rng = random.Random("vmware")
    root.mkdir(parents=True)
    layers = [root / "vm.vmdk", root / "vm-000001.vmdk", root / "vm-000002.vmdk"]
    for i, path in enumerate(layers):
        _fill(path, "vmdk", layers[i - 1] if i else None, rng, (5, 2, 1)[i])
    config = root / "vm.vmx"
    config.write_text(VMX)
    memory = [
        _memory_file(root / "vm-Snapshot1.vmsn", 29 * 1024 + 7),
        _memory_file(root / "vm-Snapshot1.vmem", 2 * MIB),
    ]
    return VmFolder(root, config, layers, memory)


def _du(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*VMFERRY, "du", *map(str, args)], capture_output=True, text=True, env=ENV
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, list[VmFolder]]:
    top = tmp_path / "vms"
    return top, [_hyperv(top / "web01"), _vmware(top / "vm")]


def _hand_figures(vm: VmFolder) -> dict[str, int]:
    """used / allocated / the worst case without the leaf's growth, from os.stat alone."""
    files = [*vm.layers, *vm.memory]
    stats = [os.stat(p) for p in files]
    return {
        "used": sum(st.st_size for st in stats),
        "allocated": sum(st.st_blocks * 512 for st in stats),
        # frozen layers stay as they are, memory files too; the leaf is added by the caller
        "frozen_and_memory": sum(os.stat(p).st_size for p in [*vm.layers[:-1], *vm.memory]),
    }


def test_du_json_equals_sums_by_hand(folders: tuple[Path, list[VmFolder]]) -> None:
    top, vms = folders
    report = json.loads(_du("--json", top).stdout)
    assert len(report["chains"]) == 2
    by_base = {c["base"]: c for c in report["chains"]}
    for vm in vms:
        chain = by_base[str(vm.layers[0])]
        hand = _hand_figures(vm)
        assert [f["path"] for f in chain["files"]] == [str(p) for p in vm.layers]
        assert [f["role"] for f in chain["files"]] == ["base", "frozen", "leaf"]
        for entry, path in zip(chain["files"], vm.layers, strict=True):
            st = os.stat(path)
            assert entry["used_bytes"] == st.st_size
            assert entry["allocated_bytes"] == st.st_blocks * 512
        for entry in chain["files"][:-1]:  # frozen: the worst case is what they are now
            assert entry["worst_case_bytes"] == entry["used_bytes"]
        leaf_worst = chain["files"][-1]["worst_case_bytes"]
        assert VIRTUAL <= leaf_worst <= VIRTUAL + LEAF_OVERHEAD  # a leaf can grow to it all
        assert sorted(m["path"] for m in chain["memory_files"]) == sorted(map(str, vm.memory))
        for m in chain["memory_files"]:
            st = os.stat(m["path"])
            assert (m["used_bytes"], m["allocated_bytes"]) == (st.st_size, st.st_blocks * 512)
        assert chain["used_bytes"] == hand["used"]
        assert chain["allocated_bytes"] == hand["allocated"]
        assert chain["worst_case_bytes"] == hand["frozen_and_memory"] + leaf_worst
        assert chain["worst_case_bytes"] >= hand["frozen_and_memory"] + VIRTUAL
        assert chain["away_from_vm"] == []
    total = report["total"]
    every = [p for vm in vms for p in (*vm.layers, *vm.memory)]
    assert total["used_bytes"] == sum(os.stat(p).st_size for p in every)
    assert total["allocated_bytes"] == sum(os.stat(p).st_blocks * 512 for p in every)
    assert total["worst_case_bytes"] == sum(c["worst_case_bytes"] for c in report["chains"])
    frozen = sum(_hand_figures(vm)["frozen_and_memory"] for vm in vms)
    assert frozen + 2 * VIRTUAL <= total["worst_case_bytes"]
    assert total["worst_case_bytes"] <= frozen + 2 * (VIRTUAL + LEAF_OVERHEAD)
    assert (total["chains"], total["files"]) == (2, 6)
    assert "unattributed_memory_files" not in total


def test_du_marks_the_vmware_leaf_in_use(folders: tuple[Path, list[VmFolder]]) -> None:
    _, (_, vmware) = folders
    report = json.loads(_du("--json", vmware.root).stdout)
    (chain,) = report["chains"]
    assert chain["used_by"] == [str(vmware.config)]
    chain_json = json.loads(
        subprocess.run(
            [*VMFERRY, "chain", "--json", str(vmware.root)], capture_output=True, text=True, env=ENV
        ).stdout
    )
    used = {Path(n["path"]).name: n["used_by"] for n in _nodes(chain_json)}
    assert used == {"vm.vmdk": [], "vm-000001.vmdk": [], "vm-000002.vmdk": [str(vmware.config)]}


def _nodes(chain_json: object) -> list[dict]:
    """Every node object in ``vmferry chain --json`` output, whatever its nesting."""
    out: list[dict] = []
    todo = [chain_json]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            if "path" in item and "used_by" in item:
                out.append(item)
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    unique = {n["path"]: n for n in out}
    return list(unique.values())


def test_du_marks_the_hyperv_leaf_in_use(folders: tuple[Path, list[VmFolder]]) -> None:
    _, (hyperv, _) = folders
    report = json.loads(_du("--json", hyperv.root).stdout)
    (chain,) = report["chains"]
    assert chain["used_by"] == [str(hyperv.config)]
    leaf = chain["files"][-1]
    assert leaf["path"] == str(hyperv.layers[-1])


# --- the HTML page -------------------------------------------------------------------------


def _png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit RGB/RGBA PNG: enough for a screenshot."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width, height, ctype = 8, b"", 0, 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6), (depth, ctype)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        filt = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if filt == 1:
                line[x] = (line[x] + a) & 0xFF
            elif filt == 2:
                line[x] = (line[x] + b) & 0xFF
            elif filt == 3:
                line[x] = (line[x] + (a + b) // 2) & 0xFF
            elif filt == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[x] = (line[x] + pred) & 0xFF
        prev = line
        rgb = line if bpp == 3 else bytes(v for i, v in enumerate(line) if i % 4 != 3)
        rows.append(bytes(rgb))
    return width, height, rows


def _count_colour(rows: list[bytes], hex_colour: str) -> int:
    rgb = bytes.fromhex(hex_colour.lstrip("#"))
    return sum(len(re.findall(re.escape(rgb), row)) for row in rows)  # overlaps: rare, fine


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    return require_tool("chromium")  # skips locally with the reason, fails under CI=true


def test_du_html_is_self_contained_and_renders(
    folders: tuple[Path, list[VmFolder]], tmp_path: Path
) -> None:
    top, vms = folders
    page = tmp_path / "du.html"
    _du("--html", page, top)
    text = page.read_text()
    # self-contained: no fetched resource (an SVG namespace name is not fetched)
    without_ns = re.sub(r'xmlns(:\w+)?="[^"]*"', "", text)
    assert "http" not in without_ns.lower()
    assert not re.search(r"<(script|link|img|iframe|object)\b|@import|url\(", text, re.I)
    # the bar chart plus one tree per chain, each tree naming every layer of its chain
    svgs = re.findall(r"<svg\b.*?</svg>", text, re.S)
    assert len(svgs) == 3
    assert 'aria-label="used vs worst case"' in svgs[0]
    assert svgs[0].count("<rect") >= 2 * 2  # per VM: disk files now and growth at least
    for vm in vms:
        tree = next(s for s in svgs[1:] if vm.layers[0].name in s)
        assert all(p.name in tree for p in vm.layers)
        assert tree.count("<rect") == len(vm.layers) and tree.count("<path") == 2
    chromium = _chromium()
    shot = tmp_path / "shot.png"
    profile = tmp_path / "profile"
    proc = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--screenshot={shot}",
            "--window-size=1200,900",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.is_file(), proc.stderr[-2000:]
    width, height, rows = _png_pixels(shot.read_bytes())
    assert (width, height) == (1200, 900)
    non_white = sum(len(r) // 3 - r.count(b"\xff\xff\xff") for r in rows)
    assert non_white > 0.01 * width * height, "the screenshot is (nearly) blank"
    # the chart's bars and the first tree's boxes are painted in their own colours
    assert _count_colour(rows, "#4477aa") > 500, "no 'used now' bars in the screenshot"
    assert _count_colour(rows, "#ee6677") > 500, "no 'growth' bars in the screenshot"
    assert _count_colour(rows, "#eeeeff") > 500, "no chain tree boxes in the screenshot"
