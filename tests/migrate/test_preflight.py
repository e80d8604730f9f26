"""Preflight "will it boot?": blockers stop everything, and each finding says why and what next."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import qemu_img
from tests.guest.conftest import sfdisk
from tests.migrate.conftest import libvirt_xml, vmx_text
from vmferry.migrate import migrate
from vmferry.migrate.preflight import free_space

GIB = 1 << 30


def codes(result, severity: str | None = None) -> set[str]:  # type: ignore[no-untyped-def]
    return {f.code for f in result.findings if severity is None or f.severity == severity}


def test_bios_guest_to_hyperv_gen2_is_blocked_and_nothing_written(
    guest: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = migrate(guest, "hyperv-gen2", out)
    assert result.status == "blocked"
    (blocker,) = result.blockers
    assert blocker.code == "firmware-unsupported"
    assert "BIOS" in blocker.message and "hyperv" in blocker.action
    assert not out.exists()
    assert result.config_path is None and result.outputs == []


def test_uefi_guest_to_hyperv_means_generation_2(guest: Path, tmp_path: Path) -> None:
    result = migrate(guest, "hyperv", tmp_path / "out", firmware="uefi", dry_run=True)
    assert result.status == "planned" and not result.blockers
    assert result.target["name"] == "hyperv-gen2"
    assert result.to_json()["after"]["firmware"] == "uefi"
    # the disk has no EFI system partition: the override is reported, not trusted blindly
    assert "firmware-mismatch" in codes(result, "warning")
    assert any("Generation 2" in c for c in result.choices)


def test_uefi_config_to_hyperv_gen1_is_impossible_so_gen2_is_used(
    guest: Path, tmp_path: Path
) -> None:
    vmx = tmp_path / "vm.vmx"
    vmx.write_text(vmx_text("uefi-vm", guest.name, firmware="uefi"))
    result = migrate(vmx, "hyperv", tmp_path / "out", dry_run=True)
    assert result.target["name"] == "hyperv-gen2"
    assert result.to_json()["after"]["disks"][0]["controller_model"] == "storvsc"


@pytest.mark.parametrize(("target", "fmt"), [("xen", None), ("azure", None), ("hyperv", "vhd")])
def test_vhd_size_limit_is_a_blocker(tmp_path: Path, target: str, fmt: str | None) -> None:
    big = tmp_path / "big.qcow2"
    qemu_img("create", "-f", "qcow2", str(big), str(2041 * GIB))
    result = migrate(big, target, tmp_path / "out", format=fmt, dry_run=True)
    assert result.status == "blocked"
    blocker = next(f for f in result.blockers if f.code == "disk-too-large")
    assert "2040 GiB" in blocker.message
    if target == "hyperv":
        assert "vhdx" in blocker.action


def test_vhdx_takes_what_vhd_cannot(tmp_path: Path) -> None:
    big = tmp_path / "big.qcow2"
    qemu_img("create", "-f", "qcow2", str(big), str(2041 * GIB))
    result = migrate(big, "hyperv", tmp_path / "out", dry_run=True)
    assert "disk-too-large" not in codes(result)
    assert "guest-not-inspected" in codes(result, "warning")  # an empty disk has no guest


def test_no_space_at_the_output_is_a_blocker(tmp_path: Path) -> None:
    free = free_space(tmp_path)
    size = free + GIB
    if size > 2000 * GIB:
        pytest.skip("more free space here than an Azure VHD may hold")
    src = tmp_path / "empty.qcow2"
    qemu_img("create", "-f", "qcow2", str(src), str(size))
    result = migrate(src, "azure", tmp_path / "out", dry_run=True)  # fixed VHD: full size
    blocker = next(f for f in result.blockers if f.code == "no-space")
    assert result.to_json()["space"]["required"] > result.to_json()["space"]["available"]
    assert str(tmp_path / "out") in blocker.evidence[0].path


def ntfs_disk(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(16 << 20)
    sfdisk(path, "label: dos\nstart=2048,type=7,bootable\n")
    with open(path, "r+b") as f:
        f.seek(2048 * 512)
        f.write(b"\xeb\x52\x90NTFS    " + bytes(500) + b"\x55\xaa")
    return path


def test_windows_guest_moving_controller_is_a_blocker(tmp_path: Path) -> None:
    disk = ntfs_disk(tmp_path / "win.raw")
    result = migrate(disk, "kvm", tmp_path / "out", dry_run=True)
    blocker = next(f for f in result.blockers if f.code == "windows-guest")
    assert "0x7B" in blocker.message and "viostor" in blocker.message
    assert "partition 1: NTFS" in blocker.evidence[0].path


def test_windows_guest_keeping_its_controller_is_a_warning(tmp_path: Path) -> None:
    disk = ntfs_disk(tmp_path / "win.raw")
    xml = tmp_path / "win.xml"
    xml.write_text(libvirt_xml("win", [(disk, "raw", "sata")]))
    result = migrate(xml, "kvm", tmp_path / "out", dry_run=True)
    assert "windows-guest" in codes(result, "warning")
    assert not result.blockers


def test_unrepairable_guest_is_predicted_not_to_boot_and_says_why(
    pvscsi_guest: Path, tmp_path: Path
) -> None:
    """Hyper-V Gen 1 boots from IDE: a kernel with only pvscsi cannot find its root disk."""
    result = migrate(pvscsi_guest, "hyperv", tmp_path / "out")
    assert result.status == "blocked"
    initramfs = [f for f in result.blockers if f.code == "guest-initramfs"]
    assert initramfs, [f.to_json() for f in result.findings]
    assert any("ata_piix" in f.message for f in initramfs)
    assert any(e.path.startswith("guest:/boot/initrd.img-") for f in initramfs for e in f.evidence)
    assert not (tmp_path / "out").exists()


def test_guest_boots_on_the_controller_it_has_a_driver_for(
    pvscsi_guest: Path, tmp_path: Path
) -> None:
    """vmferry cannot add virtio_blk (the guest has no module file for it), but KVM offers
    pvscsi, which the guest drives: the boot disk goes there, with a warning saying why."""
    result = migrate(pvscsi_guest, "kvm", tmp_path / "out")
    assert result.status == "completed"
    assert result.target["boot_controller"] == "pvscsi"
    (fallback,) = [f for f in result.findings if f.code == "boot-controller-fallback"]
    assert fallback.severity == "warning" and "instead of virtio-blk" in fallback.message
    assert not [f for f in result.findings if f.code == "fix-initramfs"]
    assert result.disks[0].guest_after["bootable"] is True
    xml = (tmp_path / "out" / "pvscsi.xml").read_text()
    assert "vmpvscsi" in xml or "pvscsi" in xml


def test_preflight_predicts_success_after_repair(guest: Path, tmp_path: Path) -> None:
    first = migrate(guest, "kvm", tmp_path / "out")
    assert "will-fix" in {f.severity for f in first.findings}
    again = migrate(tmp_path / "out" / "guest.qcow2", "kvm", tmp_path / "out2", dry_run=True)
    assert not again.blockers
    assert [f for f in again.findings if f.severity == "will-fix"] == []
    assert again.to_json()["guest"]["bootable"] is True


def test_memory_state_and_snapshots_are_named(guest: Path, tmp_path: Path) -> None:
    vm = tmp_path / "vm"
    vm.mkdir()
    guest.rename(vm / "disk.raw")
    (vm / "web.vmx").write_text(vmx_text("web", "disk.raw"))
    (vm / "web-Snapshot1.vmsn").write_bytes(b"x")
    (vm / "web.vmss").write_bytes(b"x")
    result = migrate(vm / "web.vmx", "kvm", tmp_path / "out", dry_run=True)
    f = next(f for f in result.findings if f.code == "memory-state-dropped")
    assert f.severity == "warning"
    assert {Path(e.path).name for e in f.evidence} == {"web-Snapshot1.vmsn", "web.vmss"}
    assert "cannot move between hypervisors" in f.message


def test_dry_run_writes_nothing(guest: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = migrate(guest, "kvm", out, dry_run=True)
    assert result.status == "planned"
    assert not out.exists()
    assert result.disks[0].guest_changes  # the plan is there, with its diffs
    assert all(c["diff"].startswith("---") for c in result.disks[0].guest_changes)


@pytest.mark.parametrize(
    ("target", "fmt", "expected"),
    [
        ("kvm", None, "virtio-blk"),  # the target's preferred controller
        ("proxmox", None, "virtio-blk"),
        ("vmware", "vmdk", "pvscsi"),  # VMware's own paravirtual controller stays
        ("ovf", None, "pvscsi"),
        ("virtualbox", None, "ahci"),  # VirtualBox has no pvscsi
    ],
)
def test_one_boot_controller_for_config_and_repair(
    guest: Path, tmp_path: Path, target: str, fmt: str | None, expected: str
) -> None:
    """A pvscsi VMware guest that can be prepared for anything: the config and the repair name
    the same controller (the target's preferred one, or the source's when it is native there)."""
    vm = tmp_path / "vm"
    vm.mkdir()
    guest.rename(vm / "web.raw")
    (vm / "web.vmx").write_text(vmx_text("web", "web.raw"))
    result = migrate(vm / "web.vmx", target, tmp_path / "out", format=fmt, dry_run=True)
    assert not result.blockers, [f.to_json() for f in result.blockers]
    assert result.target["boot_controller"] == expected
    assert result.to_json()["after"]["disks"][0]["controller_model"] == expected
    assert "boot-controller-fallback" not in {f.code for f in result.findings}
