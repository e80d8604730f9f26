"""Target formats: defaults from the target facts, --format overrides, Azure's fixed VHD."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import qemu_img, qemu_img_info
from tests.migrate.conftest import MIB, raw_disk
from vmferry.errors import UsageError
from vmferry.migrate import migrate
from vmferry.migrate.formats import output_format
from vmferry.vm.targets import TARGETS


@pytest.mark.parametrize(
    ("target", "name", "driver", "ova"),
    [
        ("kvm", "qcow2", "qcow2", False),
        ("proxmox", "qcow2", "qcow2", False),
        ("hyperv", "vhdx", "vhdx", False),
        ("hyperv-gen2", "vhdx", "vhdx", False),
        ("vmware", "vmdk-streamOptimized", "vmdk", True),
        ("ovf", "vmdk-streamOptimized", "vmdk", True),
        ("xen", "vhd", "vhd", False),
        ("virtualbox", "vdi", "vdi", False),
        ("azure", "vhd-fixed", "vhd", False),
    ],
)
def test_defaults_follow_the_target_facts(target: str, name: str, driver: str, ova: bool) -> None:
    fmt = output_format(TARGETS[target], None)
    assert (fmt.name, fmt.driver, fmt.ova) == (name, driver, ova)


def test_overrides_are_limited_to_what_the_target_imports() -> None:
    assert output_format(TARGETS["hyperv"], "vhd").name == "vhd"
    assert output_format(TARGETS["virtualbox"], "VMDK").options["subformat"] == "monolithicSparse"
    assert output_format(TARGETS["vmware"], "vmdk").ova is False
    with pytest.raises(UsageError) as info:
        output_format(TARGETS["azure"], "vhdx")
    assert "vhd-fixed" in (info.value.hint or "")


def test_azure_gets_a_fixed_vhd_rounded_to_a_whole_mib(tmp_path: Path) -> None:
    raw = raw_disk(tmp_path / "odd.raw", 20 * MIB + 512, [(0, MIB), (20 * MIB - 4096, 4608)])
    result = migrate(raw, "azure", tmp_path / "out")
    assert result.status == "completed"
    out = tmp_path / "out" / "odd.vhd"
    info = qemu_img_info(out, "vpc")
    assert info["virtual-size"] == 21 * MIB
    footer = out.read_bytes()[-512:]
    assert footer[:8] == b"conectix" and int.from_bytes(footer[60:64], "big") == 2  # fixed
    assert out.stat().st_size == 21 * MIB + 512
    # the guest's bytes are the source's, the padding reads as zeros
    flat = tmp_path / "flat.raw"
    qemu_img("convert", "-f", "vpc", "-O", "raw", str(out), str(flat))
    data = flat.read_bytes()
    assert data[: raw.stat().st_size] == raw.read_bytes()
    assert data[raw.stat().st_size :] == bytes(MIB - 512)
    v = result.disks[0].verify
    assert v["digest_ok"] and v["tail_zero"]
    doc = result.to_json()
    assert doc["disks"][0]["output"]["virtual_size"] == 21 * MIB
    json.dumps(doc)  # serialisable as is
