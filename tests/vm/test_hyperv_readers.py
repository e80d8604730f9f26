"""Hyper-V XML and VMCX readers: dissect's asserted facts, XML/VMCX agreement, hostile binaries."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from vmferry.errors import ConfigError
from vmferry.vm.readers import read_config
from vmferry.vm.readers.hyperv import read_hyperv_xml, read_vmcx
from vmferry.vm.readers.vmcx import VmcxFile

from ._corpus import corpus_files, ids

LOADERS = "dissect.target/loaders/hyperv"
GEN1_XML = f"{LOADERS}/B90AC31B-C6F8-479F-9B91-07B894A6A3F6.xml"
GEN2_XML = f"{LOADERS}/D351C151-DAC7-4042-B434-B72D522C1E4A.xml"
GEN1_VMCX = f"{LOADERS}/EC04F346-DB96-4700-AF5B-77B3C56C38BD.vmcx"
GEN2_VMCX = f"{LOADERS}/993F7B33-6057-4D1E-A1FE-A1A1D77BE974.vmcx"
TEST_VMCX = "dissect.hypervisor/descriptor/hyperv/test.vmcx"
VM_CONFIGS = [
    p
    for p in corpus_files("**/hyperv/*")
    if p.suffix.lower() in (".xml", ".vmcx") and p.name != "data.vmcx"
]


def test_test_vmcx_tree_shape(corpus: Path) -> None:
    # dissect.hypervisor tests/descriptor/test_hyperv.py: version 0x400; configuration has 27 keys,
    # manifest 39, properties 11, settings 6
    vmcx = VmcxFile((corpus / TEST_VMCX).read_bytes(), TEST_VMCX)
    assert vmcx.version == 0x400
    conf = vmcx.tree["configuration"]
    assert (len(conf), len(conf["manifest"]), len(conf["properties"]), len(conf["settings"])) == (
        27,
        39,
        11,
        6,
    )


@pytest.mark.parametrize(
    ("rel", "gen", "disk"),
    [
        (GEN1_XML, "bios", "Default Generation 1.vhdx"),
        (GEN1_VMCX, "bios", "Default Generation 1.vhdx"),
        (GEN2_XML, "uefi", "Default Generation 2.vhdx"),
        (GEN2_VMCX, "uefi", "Default Generation 2.vhdx"),
    ],
)
def test_dissect_target_disk_and_generation(corpus: Path, rel: str, gen: str, disk: str) -> None:
    vm = read_config(corpus / rel)
    assert vm.firmware == gen
    assert [d.path.rsplit("\\", 1)[-1] for d in vm.disks] == [disk]
    # Gen 1 boots from emulated IDE 0:0, Gen 2 from synthetic SCSI
    expected = ("ide", "piix4", 0, 0) if gen == "bios" else ("scsi", "storvsc", 0, 0)
    assert (
        vm.disks[0].controller,
        vm.disks[0].controller_model,
        vm.disks[0].bus,
        vm.disks[0].unit,
    ) == expected
    assert [n.model for n in vm.nics] == ["netvsc"]


def test_xml_names_disk_literally(corpus: Path) -> None:
    assert read_hyperv_xml(corpus / GEN1_XML).disks[0].path == r"C:\Disks\Default Generation 1.vhdx"
    gen2 = read_hyperv_xml(corpus / GEN2_XML)
    assert gen2.disks[0].path == r"C:\Disks\Default Generation 2.vhdx"
    assert gen2.secure_boot is True
    assert gen2.uuid == "d351c151-dac7-4042-b434-b72d522c1e4a"  # the file is named after the VM id


@pytest.mark.parametrize("cfg", VM_CONFIGS, ids=ids(VM_CONFIGS))
def test_every_hyperv_config_parses(cfg: Path) -> None:
    vm = read_config(cfg)
    assert vm.uuid is not None and cfg.stem.lower() in (vm.uuid, "test")


def test_host_registry_and_vmrs_are_refused_clearly(corpus: Path) -> None:
    with pytest.raises(ConfigError, match="no VM configuration"):
        read_config(corpus / "dissect.target/plugins/child/hyperv/data.vmcx")
    with pytest.raises(ConfigError, match="runtime state"):
        read_config(corpus / "dissect.hypervisor/descriptor/hyperv/test.VMRS")


@pytest.mark.parametrize("size", [0, 10, 46, 0x1000, 0x2004, 0x2100, 0x8000])
def test_truncated_vmcx(tmp_path: Path, corpus: Path, size: int) -> None:
    f = tmp_path / "t.vmcx"
    f.write_bytes((corpus / GEN1_VMCX).read_bytes()[:size])
    with pytest.raises(ConfigError):
        read_vmcx(f)


def test_garbage_vmcx(tmp_path: Path) -> None:
    f = tmp_path / "g.vmcx"
    f.write_bytes(random.Random(5).randbytes(65536))
    with pytest.raises(ConfigError, match="not a Hyper-V"):
        read_config(f)


def test_huge_object_count(tmp_path: Path, corpus: Path) -> None:
    data = bytearray((corpus / GEN1_VMCX).read_bytes())
    struct.pack_into("<I", data, 0x2004, 0xFFFFFFFF)
    f = tmp_path / "h.vmcx"
    f.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="more than the file holds"):
        read_vmcx(f)


def test_unknown_version(tmp_path: Path, corpus: Path) -> None:
    data = bytearray((corpus / GEN1_VMCX).read_bytes())
    for off in (0, 0x1000):
        struct.pack_into("<I", data, off + 10, 0x300)
    f = tmp_path / "v.vmcx"
    f.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="version"):
        read_vmcx(f)


def test_mutated_vmcx_never_escapes(tmp_path: Path, corpus: Path) -> None:
    """Random byte flips in the structures: either a model or a ConfigError, nothing else."""
    original = (corpus / GEN2_VMCX).read_bytes()
    rng = random.Random(1234)
    f = tmp_path / "m.vmcx"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(300):
        data = bytearray(original)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(0x2000, min(len(data), 0x6000))] = rng.randrange(256)
        f.write_bytes(bytes(data))
        try:
            read_vmcx(f)
            outcomes["ok"] += 1
        except ConfigError:
            outcomes["error"] += 1
    assert outcomes["error"] > 0  # the mutations did hit structures
