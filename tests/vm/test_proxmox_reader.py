"""The Proxmox reader against the QEMU command lines Proxmox's own test suite expects.

Each ``X.conf.cmd`` is what qemu-server generates from ``X.conf``; the facts we can check (memory,
SMP, disk buses and slots, NIC MAC/model, OVMF, boot order) are parsed from it here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vmferry.errors import ConfigError
from vmferry.vm.readers import read_config
from vmferry.vm.readers.proxmox import read_proxmox

from ._corpus import corpus_files, ids

CFG2CMD = corpus_files("proxmox-qemu-server/src/test/cfg2cmd/*.conf")
ALL_CONF = corpus_files("proxmox-qemu-server/**/*.conf")
_QEMU_NIC = {
    "virtio-net-pci": "virtio",
    "e1000": "e1000",
    "vmxnet3": "vmxnet3",
    "rtl8139": "rtl8139",
    "e1000e": "e1000e",
}


def parse_cmd(text: str) -> dict:
    facts: dict = {"disks": [], "cdroms": [], "nics": [], "pflash": False}
    m = re.search(r"^\s*-m '?(\d+)", text, re.MULTILINE)
    facts["memory"] = int(m.group(1)) if m else None
    m = re.search(r"-smp '(\d+),sockets=(\d+),cores=(\d+)", text)
    facts["cpus"], facts["sockets"], facts["cores"] = (int(x) for x in m.groups())
    facts["pflash"] = "if=pflash" in text or '"driver":"pflash' in text or "pflash0" in text
    for dev in re.findall(r"-device '([^']+)'", text):
        kind, _, rest = dev.partition(",")
        opts = dict(p.split("=", 1) for p in rest.split(",") if "=" in p)
        if kind in ("scsi-hd", "virtio-blk-pci", "ide-hd", "scsi-cd", "ide-cd"):
            entry = (opts["id"], int(opts["bootindex"]) if "bootindex" in opts else None)
            facts["cdroms" if kind.endswith("-cd") else "disks"].append(entry)
        elif kind in _QEMU_NIC:
            facts["nics"].append((opts["mac"].lower(), _QEMU_NIC[kind]))
    return facts


@pytest.mark.parametrize("conf", CFG2CMD, ids=ids(CFG2CMD))
def test_proxmox_matches_qemu_server(conf: Path) -> None:
    exp = parse_cmd(Path(str(conf) + ".cmd").read_text())
    vm = read_proxmox(conf)
    assert vm.memory_mb == exp["memory"]
    assert (vm.cpus, vm.cores_per_socket) == (exp["cpus"], exp["cores"])
    assert (vm.firmware == "uefi") == exp["pflash"]
    names = {"virtio": "virtio", "scsi": "scsi", "ide": "ide", "sata": "sata"}
    got = []
    for d in vm.disks:
        index = (
            d.bus * 2 + d.unit
            if d.controller == "ide"
            else d.bus * 7 + d.unit
            if d.controller_model == "lsi53c895a"
            else d.unit
            if d.controller != "scsi" or d.bus == 0
            else d.bus
        )
        got.append(f"{names[d.controller]}{index}")
    assert sorted(got) == sorted(e[0] for e in exp["disks"])
    # qemu-server gives the boot disks bootindex 100, 101, ... in boot order
    booted = [
        e[0] for e in sorted((e for e in exp["disks"] if e[1] is not None), key=lambda e: e[1])
    ]
    ours = [
        g
        for g, d in sorted(zip(got, vm.disks, strict=True), key=lambda gd: gd[1].boot_order or 0)
        if d.boot_order is not None
    ]
    assert ours == booted
    assert len(vm.cdroms) == len(exp["cdroms"])
    assert [(n.mac, n.model) for n in vm.nics] == exp["nics"]


def test_pvscsi_controller(corpus: Path) -> None:
    vm = read_proxmox(corpus / "proxmox-qemu-server/src/test/cfg2cmd/scsihw-pvscsi.conf")
    assert {d.controller_model for d in vm.disks} == {"pvscsi"}
    assert [d.unit for d in vm.disks] == [0, 1, 5, 9, 16]


def test_secure_boot_from_pre_enrolled_keys(corpus: Path) -> None:
    vm = read_proxmox(corpus / "proxmox-qemu-server/src/test/cfg2cmd/efi-secboot-and-tpm-q35.conf")
    assert (vm.firmware, vm.secure_boot) == ("uefi", True)
    assert any(u.startswith("tpmstate0") for u in vm.unsupported)


def test_snapshot_tree(corpus: Path) -> None:
    vm = read_proxmox(corpus / "proxmox-qemu-server/src/test/parse-config-input/snapshots.conf")
    text = (corpus / "proxmox-qemu-server/src/test/parse-config-input/snapshots.conf").read_text()
    sections = re.findall(r"^\[([^\]]+)\]", text, re.MULTILINE)
    assert sorted(s.id for s in vm.snapshots) == sorted(
        s for s in sections if s != "PENDING" and not s.startswith("special:")
    )
    roots = vm.snapshot_children(None)
    assert [r.id for r in roots] == ["machine_version_5_1"]
    assert vm.current_snapshot == "win19_5_2_plus_stuff"


def test_pending_section_is_reported(corpus: Path) -> None:
    vm = read_proxmox(corpus / "proxmox-qemu-server/src/test/parse-config-input/sections.conf")
    assert vm.firmware == "bios"  # bios: ovmf is only pending
    assert "[PENDING] bios: ovmf" in vm.unsupported
    assert [s.id for s in vm.snapshots] == ["foo"]


@pytest.mark.parametrize("conf", ALL_CONF, ids=ids(ALL_CONF))
def test_every_proxmox_conf_parses(conf: Path) -> None:
    assert read_config(conf).source_format == "proxmox"


@pytest.mark.parametrize(
    "body",
    [
        "memory: 99999999999999999999\n",
        "cores: 0\n",
        "garbage line\n",
        "scsi0: local:1/x.raw,size=99999999999T\n",
    ],
)
def test_hostile_proxmox(tmp_path: Path, body: str) -> None:
    f = tmp_path / "100.conf"
    f.write_text(body)
    with pytest.raises(ConfigError):
        read_proxmox(f)
