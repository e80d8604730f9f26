"""The .vmx reader against virt-v2v's ``--print-source`` output and libvirt's vmx2xml results.

The expected values are read from the upstream projects' own expected-output files, parsed here
independently of our reader, so a wrong reader cannot agree with itself.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmferry.errors import ConfigError
from vmferry.vm.readers import read_config
from vmferry.vm.readers.vmx import read_vmx

from ._corpus import corpus_files, ids

V2V_VMX = corpus_files("virt-v2v/tests/test-i-vmx-*.vmx")
LIBVIRT_VMX = corpus_files("libvirt/tests/vmx2xmldata/*.vmx")
ALL_VMX = corpus_files("**/*.vmx")


def parse_print_source(text: str) -> dict:
    """virt-v2v's --print-source text → the facts it states."""
    facts: dict = {"disks": [], "removables": [], "nics": []}
    section = None
    for line in text.splitlines():
        if re.match(r"^(disks|removable media|NICs):$", line.strip()):
            section = line.strip()[:-1]
            continue
        m = re.match(r"^\s*([\w ]+?):\s?(.*)$", line)
        if section is None and m:
            facts[m.group(1).strip()] = m.group(2).strip()
        elif section == "disks" and line.strip():
            facts["disks"].append(re.search(r"\[(\w+)\]", line).group(1))
        elif section == "removable media" and line.strip():
            rm = re.match(r"\s*CD-ROM \[(\w+)\](?: in slot (\d+))?", line)
            facts["removables"].append((rm.group(1), int(rm.group(2)) if rm.group(2) else None))
        elif section == "NICs" and line.strip():
            nm = re.match(r'\s*(Network|Bridge) "([^"]*)"(?: mac: (\S+))? \[(\w+)\]', line)
            facts["nics"].append((nm.group(2), nm.group(3), nm.group(4)))
    return facts


@pytest.mark.parametrize("vmx", V2V_VMX, ids=ids(V2V_VMX))
def test_vmx_matches_virt_v2v(vmx: Path) -> None:
    expected = parse_print_source(vmx.with_suffix(".expected").read_text())
    vm = read_vmx(vmx)
    assert vm.name == expected["source name"]
    assert vm.memory_mb * 1024 * 1024 == int(expected["memory"].split()[0])
    assert vm.cpus == int(expected["nr vCPUs"])
    assert vm.firmware == expected["firmware"]
    assert vm.secure_boot == (expected["UEFI secureboot"] == "true")
    assert [d.controller for d in vm.disks] == expected["disks"]
    # virt-v2v's vmx input lists only IDE CD-ROMs (slot = channel*2 + unit), connected or not;
    # the SATA CD-ROMs of vmx-2/6/7 are absent from its output.
    got_removables = [
        (c.controller, c.bus * 2 + c.unit) for c in vm.cdroms if c.controller == "ide"
    ]
    assert got_removables == expected["removables"]
    assert [n.model for n in vm.nics] == [n[2] for n in expected["nics"]]
    assert [n.mac for n in vm.nics] == [n[1] for n in expected["nics"]]
    for nic, (network, _mac, _model) in zip(vm.nics, expected["nics"], strict=True):
        if nic.network is not None:  # virt-v2v prints the NIC's own name when no network is set
            assert nic.network == network


_LIBVIRT_SCSI = {
    "vmpvscsi": "pvscsi",
    "lsilogic": "lsilogic",
    "lsisas1068": "lsisas1068",
    "buslogic": "buslogic",
}


@pytest.mark.parametrize("vmx", LIBVIRT_VMX, ids=ids(LIBVIRT_VMX))
def test_vmx_matches_libvirt(vmx: Path) -> None:
    dom = ET.parse(vmx.with_suffix(".xml")).getroot()
    vm = read_vmx(vmx)
    assert vm.name == dom.findtext("name")
    assert vm.memory_mb * 1024 == int(dom.findtext("memory"))
    assert vm.cpus == int(dom.findtext("vcpu"))
    os_el = dom.find("os")
    assert vm.firmware == ("uefi" if os_el.get("firmware") == "efi" else "bios")
    sb = os_el.find("firmware/feature[@name='secure-boot']")
    assert vm.secure_boot == (sb is not None and sb.get("enabled") == "yes")
    disks = [d for d in dom.findall("devices/disk") if d.get("device") == "disk"]
    assert [(d.find("target").get("bus"), int(d.find("address").get("unit"))) for d in disks] == [
        (d.controller, d.unit) for d in vm.disks
    ]
    for xml_disk, disk in zip(disks, vm.disks, strict=True):
        assert xml_disk.find("source").get("file").endswith(disk.path)
    cdroms = [d for d in dom.findall("devices/disk") if d.get("device") == "cdrom"]
    assert [
        (
            d.find("target").get("bus"),
            d.find("source").get("file") if d.find("source") is not None else None,
        )
        for d in cdroms
    ] == [(c.controller, _libvirt_path(c.path)) for c in vm.cdroms]
    scsi = [c.get("model") for c in dom.findall("devices/controller[@type='scsi']")]
    used_scsi = {d.controller_model for d in vm.disks if d.controller == "scsi"}
    assert used_scsi <= {_LIBVIRT_SCSI[m] for m in scsi}
    nics = dom.findall("devices/interface")
    assert [n.find("mac").get("address") for n in nics] == [n.mac for n in vm.nics]
    assert [n.find("mac").get("type") == "static" for n in nics] == [n.mac_static for n in vm.nics]
    # libvirt omits <model> for VMware's default vlance (AMD PCnet)
    assert [
        (n.find("model").get("type") if n.find("model") is not None else "pcnet") for n in nics
    ] == [n.model for n in vm.nics]
    assert len(dom.findall("devices/serial")) == len(vm.serial_ports)
    uuid = dom.findtext("hwuuid")
    assert vm.uuid == uuid


def _libvirt_path(path: str | None) -> str | None:
    """libvirt rewrites /vmfs/volumes/<ds>/p as '[<ds>] p'; compare in that spelling."""
    if path is None:
        return None
    m = re.match(r"^/vmfs/volumes/([^/]+)/(.*)$", path)
    return f"[{m.group(1)}] {m.group(2)}" if m else path


@pytest.mark.parametrize("vmx", ALL_VMX, ids=ids(ALL_VMX))
def test_every_corpus_vmx_parses_through_dispatch(vmx: Path) -> None:
    vm = read_config(vmx)
    assert vm.source_format == "vmx"
    assert vm.name


def test_encrypted_vmx_reports_encryption(corpus: Path) -> None:
    vm = read_vmx(corpus / "dissect.hypervisor/descriptor/vmx/encrypted.vmx")
    assert vm.name == "Encrypted VM"
    assert any(u.startswith("encryption.keysafe") for u in vm.unsupported)


def test_static_mac_and_escapes(tmp_path: Path) -> None:
    f = tmp_path / "a.vmx"
    f.write_text(
        '.encoding = "UTF-8"\ndisplayName = "a|22b"\nmemSize = "512"\n'
        'ethernet0.present = "TRUE"\nethernet0.addressType = "static"\n'
        'ethernet0.address = "00:50:56:00:00:01"\nfoo.bar = "1"\n'
    )
    vm = read_vmx(f)
    assert vm.name == 'a"b'
    assert vm.nics[0].mac == "00:50:56:00:00:01" and vm.nics[0].mac_static
    assert vm.nics[0].model == "pcnet"  # VMware's default is vlance
    assert vm.unsupported == ['foo.bar = "1"']


def test_vmsd_snapshot_tree(tmp_path: Path) -> None:
    (tmp_path / "v.vmx").write_text('displayName = "v"\nmemSize = "64"\n')
    (tmp_path / "v.vmsd").write_text(
        'snapshot.current = "2"\nsnapshot0.uid = "1"\nsnapshot0.displayName = "base"\n'
        'snapshot1.uid = "2"\nsnapshot1.displayName = "after"\nsnapshot1.parent = "1"\n'
    )
    vm = read_vmx(tmp_path / "v.vmx")
    assert [(s.id, s.name, s.parent) for s in vm.snapshots] == [
        ("1", "base", None),
        ("2", "after", "1"),
    ]
    assert vm.current_snapshot == "2"
    assert [s.name for s in vm.snapshot_children("1")] == ["after"]


@pytest.mark.parametrize(
    "body",
    [
        'memSize = "99999999999999999999999"\n',
        'numvcpus = "0"\n',
        'numvcpus = "lots"\n',
        "this is not a vmx line\n",
        'displayName = "x"\n\0\0\0garbage',
    ],
)
def test_hostile_vmx(tmp_path: Path, body: str) -> None:
    f = tmp_path / "h.vmx"
    f.write_bytes(body.encode())
    with pytest.raises(ConfigError):
        read_vmx(f)


def test_vmdk_descriptor_gives_size_type_parent(tmp_path: Path, corpus: Path) -> None:
    """vmdk-forensic's descriptor: 15 × 8323072 + 983040 sectors = 60 GiB (MANIFEST.md)."""
    desc = (corpus / "vmdk-forensic/core/tests/data/ms3-win.vmdk").read_bytes()
    (tmp_path / "ms3-win.vmdk").write_bytes(desc)
    (tmp_path / "child.vmdk").write_text(
        '# Disk DescriptorFile\ncreateType="monolithicSparse"\nparentFileNameHint="ms3-win.vmdk"\n'
        'RW 2048 SPARSE "child-s001.vmdk"\n'
    )
    (tmp_path / "v.vmx").write_text(
        'displayName = "v"\nmemSize = "64"\nscsi0.present = "TRUE"\nscsi0:0.present = "TRUE"\n'
        'scsi0:0.fileName = "ms3-win.vmdk"\nscsi0:1.present = "TRUE"\n'
        'scsi0:1.fileName = "child.vmdk"\n'
        'scsi0:2.present = "TRUE"\nscsi0:2.fileName = "../../../etc/passwd"\n'
    )
    vm = read_vmx(tmp_path / "v.vmx")
    assert (vm.disks[0].size_bytes, vm.disks[0].format) == (
        60 * 1024**3,
        "vmdk-twoGbMaxExtentSparse",
    )
    assert (vm.disks[1].size_bytes, vm.disks[1].parent) == (2048 * 512, "ms3-win.vmdk")
    assert vm.disks[2].size_bytes is None  # outside the VM directory: never opened
