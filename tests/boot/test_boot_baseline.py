"""Baseline boot proof: the Debian test guests boot where they should and fail where the seed
says they fail, and disks converted by vmferry boot from every output format.

Boot matrix (about 45 s per boot under TCG; 2 workers keep the suite near 5 minutes).  Which
controller each converted format is booted on is chosen so that, across this file, every
controller ``tests.bootkit.boot`` supports is booted once; the format is what is under test,
the controller choice follows the hypervisor that uses the format where that is realistic:

=========================  ==========  ===============================================
disk                       controller  why
=========================  ==========  ===============================================
VMware guest, raw          pvscsi      its own controller: must boot
VMware guest, raw          virtio-blk  the seed's failure: ALERT! /dev/sda1 ...
generic guest, raw         virtio-blk  KVM's controller, /dev/vda1
generic guest, raw         ide         Hyper-V Gen1 / Xen HVM emulated IDE
qcow2                      virtio-scsi KVM, Proxmox, OpenStack
vhdx                       ide         Hyper-V Gen 1 (machine pc)
vhd                        megasas     (XenServer/Azure use IDE, booted above): SAS path
vmdk streamOptimized       nvme        VMware NVMe (an OVA's disk)
vmdk monolithicSparse      lsi         a parallel-SCSI HBA (VMware's family of controllers)
vdi                        sata        VirtualBox's default AHCI (q35)
=========================  ==========  ===============================================
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.bootkit.boot import boot
from tests.bootkit.guest import BuiltGuest

pytestmark = pytest.mark.boot

#: the name each controller gives the first partition of the only disk
ROOT_DEVICE = {
    "ide": "/dev/sda1",
    "sata": "/dev/sda1",
    "virtio-blk": "/dev/vda1",
    "virtio-scsi": "/dev/sda1",
    "pvscsi": "/dev/sda1",
    "lsi": "/dev/sda1",
    "megasas": "/dev/sda1",
    "nvme": "/dev/nvme0n1p1",
}


def assert_booted(result, controller: str) -> None:
    """Booted, and from the disk on that controller (the marker names the root device)."""
    assert result.booted, str(result)
    assert result.marker_line.endswith(f"root={ROOT_DEVICE[controller]}"), str(result)


def test_vmware_guest_boots_on_pvscsi(vmware_guest: BuiltGuest, tmp_path: Path) -> None:
    result = boot(vmware_guest.path, "raw", "pvscsi", log_path=tmp_path / "serial.log")
    print(f"vmware guest on pvscsi: {result.outcome} in {result.elapsed} s")
    assert_booted(result, "pvscsi")


def test_vmware_guest_fails_on_virtio_blk(vmware_guest: BuiltGuest, tmp_path: Path) -> None:
    """The same image, unchanged, on KVM's controller: the seed's failure, reproduced."""
    before = os.stat(vmware_guest.path)
    result = boot(vmware_guest.path, "raw", "virtio-blk", log_path=tmp_path / "serial.log")
    print(f"vmware guest on virtio-blk: {result.outcome} in {result.elapsed} s: {result.failure}")
    assert not result.booted, str(result)
    assert result.outcome == "failure", str(result)
    assert "ALERT!  /dev/sda1 does not exist" in result.log, str(result)
    after = os.stat(vmware_guest.path)
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)


@pytest.mark.parametrize("controller", ["virtio-blk", "ide"])
def test_generic_guest_boots(generic_guest: BuiltGuest, tmp_path: Path, controller: str) -> None:
    result = boot(generic_guest.path, "raw", controller, log_path=tmp_path / "serial.log")
    print(f"generic guest on {controller}: {result.outcome} in {result.elapsed} s")
    assert_booted(result, controller)


CONVERSIONS = [
    # (id, file name, vmferry -o options, qemu format, controller)
    ("qcow2", "disk.qcow2", {}, "qcow2", "virtio-scsi"),
    ("vhdx", "disk.vhdx", {}, "vhdx", "ide"),
    ("vhd", "disk.vhd", {}, "vpc", "megasas"),
    ("vmdk-stream", "disk.vmdk", {"subformat": "streamOptimized"}, "vmdk", "nvme"),
    ("vmdk-sparse", "disk.vmdk", {"subformat": "monolithicSparse"}, "vmdk", "lsi"),
    ("vdi", "disk.vdi", {}, "vdi", "sata"),
]


@pytest.mark.parametrize(
    ("name", "options", "qemu_fmt", "controller"),
    [pytest.param(*c[1:], id=c[0]) for c in CONVERSIONS],
)
def test_converted_guest_boots(
    generic_guest: BuiltGuest,
    tmp_path: Path,
    name: str,
    options: dict[str, str],
    qemu_fmt: str,
    controller: str,
) -> None:
    """vmferry's output, read by qemu's own driver for that format, boots the guest."""
    from vmferry.ops.convert import convert

    dst = tmp_path / name
    converted = convert(generic_guest.path, dst, options=options)
    print(f"convert to {name} {options}: {converted.seconds} s")
    result = boot(dst, qemu_fmt, controller, log_path=tmp_path / "serial.log")
    print(f"{name} on {controller}: {result.outcome} in {result.elapsed} s")
    assert_booted(result, controller)
