"""OVF/OVA reader vs virt-v2v's expected output, govmomi's asserted facts, hostile input."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from vmferry.errors import ConfigError
from vmferry.vm.readers import read_config
from vmferry.vm.readers.ovf import read_ova, read_ovf

from ._corpus import corpus_files, ids
from .test_vmx_reader import parse_print_source

V2V_OVF = [
    p for p in corpus_files("virt-v2v/tests/test-i-ova*.ovf") if p.with_suffix(".expected").exists()
]
ALL_OVF = corpus_files("**/*.ovf")
GIB = 1024**3


@pytest.mark.parametrize("ovf", V2V_OVF, ids=ids(V2V_OVF))
def test_ovf_matches_virt_v2v(ovf: Path) -> None:
    expected = parse_print_source(ovf.with_suffix(".expected").read_text())
    vm = read_ovf(ovf)
    assert vm.name == expected["source name"]
    assert vm.memory_mb * 1024 * 1024 == int(expected["memory"].split()[0])
    assert vm.cpus == int(expected["nr vCPUs"])
    assert vm.firmware == expected["firmware"]
    assert vm.secure_boot == (expected["UEFI secureboot"] == "true")
    assert [d.controller for d in vm.disks] == expected["disks"]
    # virt-v2v's OVF input reports AddressOnParent as the slot, ignoring the IDE channel.
    assert [(c.controller, c.unit) for c in vm.cdroms] == expected["removables"]
    assert [(n.network, n.model) for n in vm.nics] == [(n[0], n[2]) for n in expected["nics"]]


@pytest.mark.parametrize("ovf", ALL_OVF, ids=ids(ALL_OVF))
def test_every_corpus_ovf_parses(ovf: Path) -> None:
    vm = read_config(ovf)
    assert vm.source_format == "ovf"
    assert vm.name


def test_govmomi_multiple_disks(corpus: Path) -> None:
    vm = read_ovf(corpus / "govmomi/ovf/fixtures/multiple_disks.ovf")
    assert [(d.path, d.size_bytes) for d in vm.disks[:3]] == [
        ("disk0.vmdk", 40 * GIB),
        ("disk1.vmdk", 50 * GIB),
        ("disk2.vmdk", 100 * GIB),
    ]
    # the fourth disk has no fileRef: it must be created (its size is a vApp property reference)
    assert vm.disks[3].path is None


def test_govmomi_mixed_disks(corpus: Path) -> None:
    vm = read_ovf(corpus / "govmomi/ovf/fixtures/mixed-disks.ovf")
    assert [(d.path, d.size_bytes) for d in vm.disks] == [("os.vmdk", 20 * GIB), (None, 10 * GIB)]


def test_govmomi_storage_group(corpus: Path) -> None:
    vm = read_ovf(corpus / "govmomi/ovf/fixtures/external/ImportOvf2014/storagegroupWithDisk.ovf")
    assert [(d.controller, d.controller_model, d.path, d.size_bytes) for d in vm.disks] == [
        ("scsi", "buslogic", "UnOS2.vmdk", 107373568)
    ]


def test_govmomi_firmware(corpus: Path) -> None:
    base = corpus / "govmomi/ovf/fixtures/external"
    assert read_ovf(base / "vbs/efi-nvram.ovf").firmware == "uefi"
    sb = read_ovf(base / "vbs/secure-boot-enabled-with-efi-firmware.ovf")
    assert (sb.firmware, sb.secure_boot) == ("uefi", True)
    assert read_ovf(corpus / "govmomi/ovf/fixtures/ubuntu24.10.ovf").firmware == "bios"
    ubuntu = read_ovf(corpus / "govmomi/ovf/fixtures/ubuntu24.10.ovf")
    assert ubuntu.disks[0].size_bytes == 10737418240
    assert ubuntu.disks[0].format == "vmdk-streamOptimized"


def test_govmomi_cores_per_socket(corpus: Path) -> None:
    vm = read_ovf(
        corpus / "govmomi/ovf/fixtures/external/cores-per-socket/multi-core-vm/multi-core-vm.ovf"
    )
    assert (vm.cpus, vm.cores_per_socket) == (4, 2)


def test_collection_reports_what_it_skipped(corpus: Path) -> None:
    vm = read_ovf(corpus / "govmomi/ovf/fixtures/virtualsystemcollection.ovf")
    assert any("VirtualSystemCollection of 2" in u for u in vm.unsupported)


def test_gzip_disk_reference(corpus: Path) -> None:
    vm = read_ovf(corpus / "virt-v2v/tests/test-i-ova-gz.ovf")
    assert (vm.disks[0].path, vm.disks[0].compression) == ("disk1.vmdk.gz", "gzip")


def test_ovirt_dialect(corpus: Path) -> None:
    vm = read_ovf(corpus / "virt-v2v/tests/test-o-ovirt.ovf.expected")
    assert (vm.name, vm.memory_mb, vm.cpus) == ("windows", 1024, 1)
    assert [(d.controller, d.size_bytes) for d in vm.disks] == [("virtio", 536870912)]
    assert [(n.mac, n.model) for n in vm.nics] == [("00:11:22:33:44:55", "virtio")]


def _ova(tmp_path: Path, members: dict[str, bytes]) -> Path:
    out = tmp_path / "t.ova"
    with tarfile.open(out, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def test_ova_reads_descriptor_in_memory(tmp_path: Path, corpus: Path) -> None:
    ovf = (corpus / "virt-v2v/tests/test-i-ova-two-disks.ovf").read_bytes()
    # a hostile member name must neither be used as a path nor stop the read
    ova = _ova(tmp_path, {"../../escape.ovf": ovf, "disk1.vmdk": b"x"})
    vm = read_config(ova)
    assert vm.source_format == "ova"
    assert [d.path for d in vm.disks] == ["disk1.vmdk", "disk2.vmdk"]
    assert not (tmp_path.parent / "escape.ovf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.ova"]


def test_ova_without_descriptor(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no \.ovf"):
        read_ova(_ova(tmp_path, {"disk.vmdk": b"x"}))


def test_ova_garbage(tmp_path: Path) -> None:
    f = tmp_path / "g.ova"
    f.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ConfigError):
        read_ova(f)


_ENVELOPE = """<?xml version="1.0"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
 xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
 <References><File ovf:id="f1" ovf:href="d.vmdk"/></References>
 <DiskSection><Disk ovf:diskId="d1" ovf:fileRef="f1" ovf:capacity="{cap}"
   ovf:capacityAllocationUnits="byte * 2^30"/></DiskSection>
 <VirtualSystem ovf:id="vm"><Name>vm</Name><VirtualHardwareSection>
  <Item><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType>
   <rasd:VirtualQuantity>{mem}</rasd:VirtualQuantity></Item>
  <Item><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>6</rasd:ResourceType></Item>
  <Item><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceType>17</rasd:ResourceType>
   <rasd:Parent>2</rasd:Parent><rasd:HostResource>ovf:/disk/d1</rasd:HostResource></Item>
 </VirtualHardwareSection></VirtualSystem></Envelope>"""


def test_minimal_ovf(tmp_path: Path) -> None:
    f = tmp_path / "m.ovf"
    f.write_text(_ENVELOPE.format(cap=8, mem=512))
    vm = read_ovf(f)
    assert vm.memory_mb == 512
    assert [(d.controller, d.controller_model, d.size_bytes) for d in vm.disks] == [
        ("scsi", "lsilogic", 8 * GIB)
    ]


@pytest.mark.parametrize(
    ("cap", "mem"),
    [("99999999999999999999", 512), (8, "99999999999999999999999"), (8, "-5"), ("8", "lots")],
)
def test_huge_or_bad_numbers(tmp_path: Path, cap: object, mem: object) -> None:
    f = tmp_path / "h.ovf"
    f.write_text(_ENVELOPE.format(cap=cap, mem=mem))
    with pytest.raises(ConfigError):
        read_ovf(f)
