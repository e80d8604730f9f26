"""Fix rules end to end: plan on real images, apply through the overlay, judge with e2fsprogs."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.guest.conftest import (
    GuestDisk,
    blkid,
    build_guest_disk,
    debugfs_cat,
    e2fsck_clean,
    make_initramfs,
    vmware_root,
)
from vmferry.guest.errors import GuestWriteRefusedError
from vmferry.guest.linux.fix import apply_fixes, plan_fixes


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _disk(tmp_path: Path, extra: dict[str, str] | None = None, **kw: object) -> GuestDisk:
    root = vmware_root(tmp_path)
    for rel, text in (extra or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return build_guest_disk(tmp_path, root, **kw)  # type: ignore[arg-type]


def _uuids(disk: GuestDisk, tmp: Path) -> tuple[str, str]:
    return (
        blkid(disk.extract(1, tmp / "u1"))["UUID"],
        blkid(disk.extract(5, tmp / "u5"))["UUID"],
    )


def test_plan_rewrites_every_controller_bound_reference(tmp_path: Path) -> None:
    disk = _disk(tmp_path)
    root_uuid, swap_uuid = _uuids(disk, tmp_path)
    changes, findings = plan_fixes(disk.img, "kvm")
    assert [f for f in findings if f.rule != "initramfs"] == []
    final = {}
    for c in changes:
        final[c.path] = c.after
        assert c.diff().startswith(f"--- a{c.path}\n+++ b{c.path}\n")
    src = disk.root
    assert final["/etc/fstab"] == (src / "etc/fstab").read_text().replace(
        "/dev/sda1", f"UUID={root_uuid}"
    ).replace("/dev/sda5", f"UUID={swap_uuid}")
    for path in ("boot/grub/menu.lst", "boot/grub/grub.cfg"):
        want = (src / path).read_text().replace("root=/dev/sda1", f"root=UUID={root_uuid}")
        assert final["/" + path] == want
    assert "root (hd0,0)" in final["/boot/grub/menu.lst"]  # GRUB's own name: BIOS order
    assert final["/etc/default/grub"] == (
        f'GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX="root=UUID={root_uuid} resume=UUID={swap_uuid}"\n'
    )
    assert final["/etc/initramfs-tools/conf.d/resume"] == f"RESUME=UUID={swap_uuid}\n"
    rules = {(c.rule, c.path) for c in changes}
    assert ("grub", "/etc/default/grub") in rules and ("resume", "/etc/default/grub") in rules


def _check_output(out: Path, disk: GuestDisk, tmp: Path, changes: list) -> None:
    start, size = disk.parts[1]
    part = tmp / "out-p1.raw"
    with open(out, "rb") as f, open(part, "wb") as g:
        f.seek(start)
        g.write(f.read(size))
    ok, report = e2fsck_clean(part)
    assert ok, report
    final = {c.path: c.after for c in changes}
    for path, text in final.items():
        assert debugfs_cat(part, path) == text.encode()
    # everything outside partition 1 is byte-identical to the source
    src, dst = disk.img.read_bytes(), out.read_bytes()
    assert src[:start] == dst[:start] and src[start + size :] == dst[start + size :]


def test_apply_to_new_image_then_replan_is_empty(tmp_path: Path) -> None:
    disk = _disk(tmp_path)
    before = _sha(disk.img)
    out = tmp_path / "fixed.raw"
    result = apply_fixes(disk.img, "kvm", output=out)
    assert _sha(disk.img) == before  # the source is never modified
    assert set(result.written) == set(result.plan.files)
    _check_output(out, disk, tmp_path, result.plan.changes)
    changes, findings = plan_fixes(out, "kvm")
    assert changes == []  # idempotent
    assert findings == [f for f in result.plan.findings if f.rule == "initramfs"]


@pytest.mark.parametrize(
    ("name", "options"), [("fixed.vmdk", {"subformat": "streamOptimized"}), ("fixed.ova", {})]
)
def test_fix_into_an_append_only_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, options: dict
) -> None:
    """A streamOptimized VMDK (alone or in an OVA) is written front to back, once: the fixes
    must be laid over the source in the same pass, not written over a finished copy."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # both plans write the same times
    disk = _disk(tmp_path)
    with apply_fixes(disk.img, "vmware") as planned:
        assert planned.overlay is not None and planned.overlay.changes()
        want = bytearray(disk.img.read_bytes())
        for off, data in planned.overlay.iter_changes():
            want[off : off + len(data)] = data
    out = tmp_path / name
    result = apply_fixes(disk.img, "vmware", output=out, options=options)
    assert result.output == str(out)
    vmdk = out
    if name.endswith(".ova"):  # the disk inside, taken out by Python's tarfile
        with tarfile.open(out) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(".vmdk"))
            vmdk = tmp_path / "inside.vmdk"
            vmdk.write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    flat = tmp_path / "flat.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "vmdk", "-O", "raw", str(vmdk), str(flat)], check=True
    )
    assert flat.read_bytes() == bytes(want)
    _check_output(flat, disk, tmp_path, result.plan.changes)


def test_in_place_and_dry_run(tmp_path: Path) -> None:
    disk = _disk(tmp_path)
    copy = tmp_path / "copy.raw"
    shutil.copyfile(disk.img, copy)
    before = _sha(copy)
    dry = apply_fixes(copy, "hyperv", dry_run=True)
    assert dry.plan.changes and dry.written == []
    assert _sha(copy) == before
    done = apply_fixes(copy, "hyperv", in_place=True)
    assert done.written
    _check_output(copy, disk, tmp_path, done.plan.changes)


def test_overlay_mode_leaves_source_and_exposes_changes(tmp_path: Path) -> None:
    disk = _disk(tmp_path)
    before = _sha(disk.img)
    with apply_fixes(disk.img, "vmware") as result:
        assert result.overlay is not None and result.overlay.changes()
        start, size = disk.parts[1]
        for off, length in result.overlay.changes():
            assert start <= off and off + length <= start + size
    assert _sha(disk.img) == before


def test_references_off_the_disk_or_stable_are_left_alone(tmp_path: Path) -> None:
    fstab = (
        "/dev/sda1 / ext4 defaults 0 1\n"
        "/dev/sdb1 /data ext4 defaults 0 2\n"
        "/dev/VolGroup00/LogVol01 /srv ext3 defaults 0 2\n"
        "LABEL=stuff /stuff ext4 defaults 0 2\n"
        "/dev/disk/by-id/scsi-36000c29abc-part1 /x ext4 defaults 0 2\n"
        "proc /proc proc defaults 0 0\n"
        "/dev/hda5  none swap sw 0 0\n"
    )
    disk = _disk(tmp_path, {"etc/fstab": fstab})
    root_uuid, swap_uuid = _uuids(disk, tmp_path)
    changes, findings = plan_fixes(disk.img, "kvm")
    (fs_change,) = [c for c in changes if c.path == "/etc/fstab"]
    assert fs_change.after == fstab.replace("/dev/sda1", f"UUID={root_uuid}").replace(
        "/dev/hda5", f"UUID={swap_uuid}"
    )
    messages = [f.message for f in findings if f.path == "/etc/fstab"]
    assert any("/dev/sdb1" in m for m in messages)
    assert any("by-id" in m or "hardware" in m for m in messages)


def test_grubenv_keeps_its_size_and_device_map_follows_target(tmp_path: Path) -> None:
    body = "# GRUB Environment Block\nkernelopts=root=/dev/sda1 ro resume=/dev/sda5\n"
    disk = _disk(
        tmp_path,
        {
            "boot/grub2/grubenv": body + "#" * (1024 - len(body)),
            "boot/grub/device.map": "(hd0)\t/dev/sda\n(fd0)\t/dev/fd0\n",
            "boot/loader/entries/abc-6.1.conf": "title Debian\noptions root=/dev/sda1 ro\n",
        },
    )
    root_uuid, swap_uuid = _uuids(disk, tmp_path)
    changes, _ = plan_fixes(disk.img, "kvm")
    final = {c.path: c.after for c in changes}
    env = final["/boot/grub2/grubenv"]
    assert len(env.encode()) == 1024
    assert f"kernelopts=root=UUID={root_uuid} ro resume=UUID={swap_uuid}\n" in env
    assert final["/boot/grub/device.map"] == "(hd0)\t/dev/vda\n(fd0)\t/dev/fd0\n"
    assert f"options root=UUID={root_uuid} ro" in final["/boot/loader/entries/abc-6.1.conf"]
    out = tmp_path / "o.raw"
    apply_fixes(disk.img, "kvm", output=out)
    _check_output(out, disk, tmp_path, changes)


def test_unwritable_filesystem_is_refused_before_any_write(tmp_path: Path) -> None:
    disk = _disk(tmp_path, mkfs_args=("-O", "quota"))
    copy = tmp_path / "copy.raw"
    shutil.copyfile(disk.img, copy)
    before = _sha(copy)
    with pytest.raises(GuestWriteRefusedError, match="quota"):
        apply_fixes(copy, "kvm", in_place=True)
    assert _sha(copy) == before
    out = tmp_path / "never.raw"
    with pytest.raises(GuestWriteRefusedError):
        apply_fixes(copy, "kvm", output=out)
    assert not out.exists()


def test_fixed_image_still_passes_fsck_on_every_filesystem(tmp_path: Path) -> None:
    # swap keeps its signature: blkid on the output sees the same swap UUID and label
    disk = _disk(tmp_path)
    out = tmp_path / "fixed.raw"
    apply_fixes(disk.img, "xen", output=out)
    start, size = disk.parts[5]
    swap = tmp_path / "swap-after.raw"
    with open(out, "rb") as f, open(swap, "wb") as g:
        f.seek(start)
        g.write(f.read(size))
    after = blkid(swap)
    before = blkid(disk.extract(5, tmp_path / "swap-before.raw"))
    after.pop("DEVNAME")
    before.pop("DEVNAME")
    assert after == before and after["TYPE"] == "swap"
    assert subprocess.run(["sfdisk", "--json", str(out)], capture_output=True).returncode == 0


KV = "6.1.0-18-amd64"


def _with_initramfs(tmp_path: Path, modules: list[str]) -> GuestDisk:
    root = vmware_root(tmp_path)
    paths = [f"lib/modules/{KV}/kernel/drivers/x/{m}.ko" for m in modules]
    (root / "boot" / f"initrd.img-{KV}").write_bytes(make_initramfs(tmp_path, paths))
    (root / f"lib/modules/{KV}/modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    return build_guest_disk(tmp_path, root)


@pytest.mark.parametrize(
    ("modules", "target", "severities"),
    [
        (["virtio_blk", "virtio_pci"], "kvm", []),
        (["virtio_blk", "virtio_pci"], "hyperv", ["error", "error"]),
        (["ata_piix", "libata", "sd_mod"], "hyperv", []),
        (["vmw_pvscsi", "sd_mod"], "kvm", ["warning"]),  # boots, but not on virtio-blk
        (["vmw_pvscsi"], "kvm", ["error", "error"]),  # sd_mod missing: nothing can mount root
    ],
)
def test_initramfs_driver_findings(
    tmp_path: Path, modules: list[str], target: str, severities: list[str]
) -> None:
    disk = _with_initramfs(tmp_path, modules)
    _, findings = plan_fixes(disk.img, target)
    got = [f.severity for f in findings if f.rule == "initramfs"]
    assert got == severities, findings
    result = apply_fixes(disk.img, target, dry_run=True)
    assert result.plan.bootable == ("error" not in severities)


XORG = 'Section "Device"\n\tIdentifier "Card0"\n\tDriver "vmware"\nEndSection\n'
UDEV = (
    "# This file was automatically generated\n"
    'SUBSYSTEM=="net", ACTION=="add", ATTR{address}=="00:0c:29:aa:bb:cc", NAME="eth0"\n'
)
IFCFG = "DEVICE=eth0\nHWADDR=00:0C:29:AA:BB:CC\nBOOTPROTO=dhcp\n"


@pytest.mark.parametrize(
    ("drivers", "expected"),
    [(["fbdev_drv.so", "modesetting_drv.so"], "modesetting"), (["fbdev_drv.so"], "fbdev")],
)
def test_xorg_driver_and_mac_bindings(tmp_path: Path, drivers: list[str], expected: str) -> None:
    files = {
        "etc/X11/xorg.conf": XORG,
        "etc/udev/rules.d/70-persistent-net.rules": UDEV,
        "etc/sysconfig/network-scripts/ifcfg-eth0": IFCFG,
        "etc/network/interfaces": "auto ens192\niface ens192 inet dhcp\n",
    }
    files.update({f"usr/lib/xorg/modules/drivers/{d}": "so" for d in drivers})
    disk = _disk(tmp_path, files)
    out = tmp_path / "o.raw"
    result = apply_fixes(disk.img, "kvm", output=out)
    final = {c.path: c.after for c in result.plan.changes}
    assert final["/etc/X11/xorg.conf"] == XORG.replace('"vmware"', f'"{expected}"')
    udev = final["/etc/udev/rules.d/70-persistent-net.rules"].splitlines()
    assert udev[0] == UDEV.splitlines()[0]  # comments untouched
    assert udev[1].startswith("#") and udev[1].endswith(UDEV.splitlines()[1])
    ifcfg = final["/etc/sysconfig/network-scripts/ifcfg-eth0"].splitlines()
    assert [ln for ln in ifcfg if not ln.startswith("#")] == ["DEVICE=eth0", "BOOTPROTO=dhcp"]
    assert any("ens192" in f.message for f in result.plan.findings)
    _check_output(out, disk, tmp_path, result.plan.changes)
    assert plan_fixes(out, "kvm")[0] == []
    # on VMware itself the vmware driver is right: no xorg change
    assert "/etc/X11/xorg.conf" not in {c.path for c in plan_fixes(disk.img, "vmware")[0]}


def test_xorg_without_generic_driver_is_a_finding(tmp_path: Path) -> None:
    disk = _disk(tmp_path, {"etc/X11/xorg.conf": XORG})
    changes, findings = plan_fixes(disk.img, "hyperv")
    assert "/etc/X11/xorg.conf" not in {c.path for c in changes}
    assert any(f.rule == "xorg" for f in findings)


def _systemd_guest(tmp_path: Path) -> GuestDisk:
    root = vmware_root(tmp_path)
    unit = "[Unit]\nDescription=x\n[Service]\nExecStart=/bin/true\n"
    for rel, text in {
        "lib/systemd/systemd": "ELF",
        "lib/systemd/system/open-vm-tools.service": unit,
        "lib/systemd/system/vgauth.service": unit,
        "lib/systemd/system/vboxadd.service": unit,
        "lib/systemd/system/ssh.service": unit,
        "etc/systemd/system/vgauth.service": unit,  # the administrator's own copy
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "open-vm-tools.service").symlink_to("/lib/systemd/system/open-vm-tools.service")
    return build_guest_disk(tmp_path, root)


@pytest.mark.parametrize(
    ("target", "masked"),
    [("kvm", {"open-vm-tools.service", "vboxadd.service"}), ("vmware", {"vboxadd.service"})],
)
def test_other_hypervisors_tools_are_masked(tmp_path: Path, target: str, masked: set) -> None:
    disk = _systemd_guest(tmp_path)
    out = tmp_path / "o.raw"
    result = apply_fixes(disk.img, target, output=out)
    links = {c.path.rsplit("/", 1)[1] for c in result.plan.changes if c.kind == "symlink"}
    assert links == masked
    assert all(c.after == "/dev/null" for c in result.plan.changes if c.kind == "symlink")
    vgauth = [f for f in result.plan.findings if f.rule == "tools"]
    assert bool(vgauth) == (target != "vmware")
    start, size = disk.parts[1]
    part = tmp_path / "p.raw"
    with open(out, "rb") as f, open(part, "wb") as g:
        f.seek(start)
        g.write(f.read(size))
    ok, report = e2fsck_clean(part)
    assert ok, report
    for name in masked:
        st = subprocess.run(
            ["debugfs", "-R", f"stat /etc/systemd/system/{name}", str(part)],
            capture_output=True,
            text=True,
        ).stdout
        assert 'Fast link dest: "/dev/null"' in st
    assert [c for c in plan_fixes(out, target)[0] if c.rule == "tools"] == []


@pytest.mark.parametrize(
    ("target", "naming", "root", "swap"),
    [
        ("kvm", "target", "/dev/vda1", "/dev/vda5"),
        ("xen", "target", "/dev/xvda1", "/dev/xvda5"),
        ("hyperv", "target", "/dev/sda1", "/dev/sda5"),
        ("kvm", "label", None, "LABEL=swappy"),  # root has no label: UUID= it stays
    ],
)
def test_naming_choices(
    tmp_path: Path, target: str, naming: str, root: str | None, swap: str
) -> None:
    disk = _disk(
        tmp_path, {"etc/fstab": "/dev/hda1 / ext4 defaults 0 1\n/dev/hda5 none swap sw 0 0\n"}
    )
    root_uuid, _ = _uuids(disk, tmp_path)
    out = tmp_path / "o.raw"
    result = apply_fixes(disk.img, target, output=out, naming=naming)
    (fstab,) = [c for c in result.plan.changes if c.path == "/etc/fstab"]
    want_root = root or f"UUID={root_uuid}"
    assert fstab.after == f"{want_root} / ext4 defaults 0 1\n{swap} none swap sw 0 0\n"
    assert [c for c in plan_fixes(out, target, naming=naming)[0] if c.rule == "fstab"] == []
