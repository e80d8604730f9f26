"""Boot proof of guest repair (issue 6): guests that fail on KVM's virtio-blk, repaired by
``vmferry.guest.linux.fix.apply_fixes(..., "kvm")`` offline, boot there.

* the guest whose initramfs has every driver (``MODULES=most``) but names ``/dev/sda1`` fails
  on virtio-blk before the repair and boots after it: the name rewrite alone is proven to work;
* the classic VMware guest (initramfs with only ``vmw_pvscsi``): vmferry's plan must say it
  adds the virtio-blk drivers to the initramfs (docs/guest-initramfs.md), and after the repair
  the guest must boot from virtio-blk.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.boot.test_boot_baseline import assert_booted
from tests.bootkit.boot import boot
from tests.bootkit.guest import BuiltGuest

pytestmark = pytest.mark.boot


def _repair(image: Path, output: Path):
    from vmferry.guest.linux.fix import apply_fixes

    result = apply_fixes(image, "kvm", output=output)
    print(result.plan.diff())
    for finding in result.plan.findings:
        print(f"finding [{finding.severity}] {finding.rule}: {finding.message}")
    return result


def test_sda_named_guest_fails_on_virtio_before_repair(
    sda_named_guest: BuiltGuest, tmp_path: Path
) -> None:
    """Every driver is in its initramfs, yet /dev/sda1 does not exist on virtio-blk."""
    before = boot(sda_named_guest.path, "raw", "virtio-blk", log_path=tmp_path / "serial.log")
    print(f"before repair: {before.outcome} in {before.elapsed} s: {before.failure}")
    assert not before.booted, str(before)
    assert "ALERT!  /dev/sda1 does not exist" in before.log, str(before)


def test_sda_named_guest_boots_on_virtio_after_repair(
    sda_named_guest: BuiltGuest, tmp_path: Path
) -> None:
    fixed = tmp_path / "fixed.qcow2"  # KVM's format: conversion and repair in one pass
    result = _repair(sda_named_guest.path, fixed)
    assert result.plan.bootable, result.plan.to_json()
    assert {"/etc/fstab", "/boot/grub/grub.cfg"} <= set(result.written), result.written
    assert "/dev/sda" not in "".join(
        c.after or "" for c in result.plan.changes if c.path == "/etc/fstab"
    )
    after = boot(fixed, "qcow2", "virtio-blk", log_path=tmp_path / "serial.log")
    print(f"after repair: {after.outcome} in {after.elapsed} s")
    assert_booted(after, "virtio-blk")


def _lacks_virtio_finding(findings) -> list[str]:
    return [
        f.message
        for f in findings
        if f.rule == "initramfs" and "virtio-blk" in f.message and "lacks" in f.message
    ]


def test_vmware_guest_repair_plan_is_honest(vmware_guest: BuiltGuest) -> None:
    """The pvscsi-only initramfs cannot boot from virtio-blk: the plan must say it adds the
    virtio drivers (an archive appended to the initrd, the modules named for future rebuilds)
    while rewriting the names, and no longer report them missing."""
    from vmferry.guest.linux.fix import plan_fixes

    changes, findings = plan_fixes(vmware_guest.path, "kvm")
    by_path = {c.path: c for c in changes}
    assert {"/etc/fstab", "/boot/grub/grub.cfg", "/etc/initramfs-tools/modules"} <= set(by_path)
    initrd = by_path[f"/boot/initrd.img-{vmware_guest.kernel}"]
    assert initrd.kind == "append" and initrd.data, initrd
    assert "virtio_blk" in initrd.summary and "virtio_pci" in initrd.summary, initrd.summary
    assert "virtio_blk" in by_path["/etc/initramfs-tools/modules"].after
    adds = [f for f in findings if f.rule == "initramfs" and "adds the virtio-blk" in f.message]
    assert adds, [f.message for f in findings]
    assert not _lacks_virtio_finding(findings), [f.message for f in findings]


def test_vmware_guest_boots_on_virtio_after_repair(
    vmware_guest: BuiltGuest, tmp_path: Path
) -> None:
    """Repaired offline (names rewritten, virtio drivers added to its initramfs), the classic
    VMware guest boots from virtio-blk."""
    from vmferry.guest.linux.fix import plan_fixes

    _, findings = plan_fixes(vmware_guest.path, "kvm")
    assert not _lacks_virtio_finding(findings), [f.message for f in findings]
    fixed = tmp_path / "fixed.qcow2"
    result = _repair(vmware_guest.path, fixed)
    assert result.plan.bootable, result.plan.to_json()
    assert f"/boot/initrd.img-{vmware_guest.kernel}" in result.written, result.written
    after = boot(fixed, "qcow2", "virtio-blk", log_path=tmp_path / "serial.log")
    print(f"vmware guest after repair on virtio-blk: {after.outcome} in {after.elapsed} s")
    assert_booted(after, "virtio-blk")
