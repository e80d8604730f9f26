"""Hypervisor facts: consistency of the tables and agreement with HYPERVISOR-FACTS.md."""

from __future__ import annotations

import re

import pytest

from vmferry.errors import ConfigError
from vmferry.vm.targets import (
    CONTROLLERS,
    NICS,
    TARGETS,
    canonical_controller,
    canonical_nic,
    get_controller,
    get_target,
    linux_drivers_for,
)

from ._corpus import REPO

FACTS = REPO / ".." / "shared" / "HYPERVISOR-FACTS.md"
#: qemu device in the measured table → the controller it stands in for in our tables
_QEMU = {
    "`if=ide` (machine `pc`)": "piix4",
    "`if=ide` with `-M q35`": "ahci",
    "`if=virtio`": "virtio-blk",
    "`virtio-scsi-pci` + `scsi-hd`": "virtio-scsi",
    "`pvscsi` + `scsi-hd`": "pvscsi",
    "`lsi53c895a` + `scsi-hd`": "lsi53c895a",
    "`megasas` + `scsi-hd`": "megasas",
    "`mptsas1068` + `scsi-hd`": "lsisas1068",
    "`nvme`": "nvme",
}


def _measured_rows() -> list[tuple[str, str, str]]:
    if not FACTS.is_file():
        pytest.skip("../shared/HYPERVISOR-FACTS.md not present")
    rows = []
    for line in FACTS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in _QEMU:
            rows.append((_QEMU[cells[0]], cells[2], cells[3]))
    return rows


def test_measured_table_matches_controller_facts() -> None:
    rows = _measured_rows()
    assert len(rows) == len(_QEMU)
    for model, device, driver in rows:
        facts = CONTROLLERS[model]
        first_driver = re.search(r"`(\w+)`", driver).group(1)
        assert first_driver in facts.linux_drivers, (model, driver)
        dev = re.search(r"`(/dev/\w+?)(p?1)?`", device)
        if dev:  # the mptsas row found no disk within 15 s
            assert facts.linux_disk == dev.group(1), (model, device)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_target_tables_are_consistent(target: str) -> None:
    prof = TARGETS[target]
    assert prof.firmware <= {"bios", "uefi"}
    for fw, models in prof.boot_controllers.items():
        assert fw in prof.firmware
        assert set(models) <= set(prof.controllers)
    assert set(prof.controllers) <= set(CONTROLLERS)
    assert set(prof.nics) <= set(NICS)
    assert set(prof.cdrom_models()) <= set(prof.controllers)
    assert prof.disk_formats


def test_hyperv_generations() -> None:
    gen1, gen2 = get_target("hyperv"), get_target("hyperv-gen2")
    assert gen1.firmware == {"bios"} and gen1.boot_controllers["bios"] == ("piix4",)
    assert gen2.firmware == {"uefi"} and gen2.controllers == ("storvsc",)
    assert gen2.disk_formats == ("vhdx",)
    assert get_target("xen").max_disk_bytes == 2040 * 1024**3
    assert get_target("azure").max_disk_bytes == 2040 * 1024**3


def test_default_formats() -> None:
    assert {
        n: TARGETS[n].default_disk_format
        for n in ("kvm", "hyperv", "vmware", "ovf", "xen", "virtualbox")
    } == {
        "kvm": "qcow2",
        "hyperv": "vhdx",
        "vmware": "vmdk-streamOptimized",
        "ovf": "vmdk-streamOptimized",
        "xen": "vhd",
        "virtualbox": "vdi",
    }


def test_guest_device_names() -> None:
    assert CONTROLLERS["piix4"].linux_device(0) == "/dev/sda"
    assert CONTROLLERS["piix4"].linux_device(1, legacy=True) == "/dev/hdb"
    assert CONTROLLERS["virtio-blk"].linux_device(26) == "/dev/vdaa"
    assert CONTROLLERS["xen-blkfront"].linux_device(0) == "/dev/xvda"
    assert CONTROLLERS["nvme"].linux_device(1) == "/dev/nvme0n2"


def test_drivers_needed_for_hyperv_gen2() -> None:
    assert set(linux_drivers_for("hyperv-gen2", "uefi")) == {"hv_storvsc", "hv_vmbus", "sd_mod"}


def test_aliases_and_errors() -> None:
    assert canonical_controller("VirtualSCSI") == "pvscsi"  # OVF's name for PVSCSI
    assert canonical_controller("vmpvscsi") == "pvscsi"
    assert canonical_nic("vlance") == "pcnet"
    with pytest.raises(ConfigError):
        get_target("parallels")
    with pytest.raises(ConfigError):
        get_controller("floppy")
