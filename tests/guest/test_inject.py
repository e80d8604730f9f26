"""Adding the target's storage drivers to a guest's initramfs, end to end and offline.

The guest is built in tmp_path from real parts: kernel modules copied from a real module tree
with kmod's depmod run over them (tests/guest/test_kmod.py), an initramfs made by GNU cpio and
gzip/xz holding only the pvscsi stack, as initramfs-tools or dracut lay it out, on an ext4 made
by mke2fs.  After ``apply_fixes(..., "kvm")`` the judges are e2fsck -fn, debugfs, GNU cpio and
gzip/xz extracting the appended archive over the original, and kmod's modprobe resolving the
virtio driver inside the extracted initramfs.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.guest.conftest import (
    GuestDisk,
    build_guest_disk,
    debugfs_cat,
    e2fsck_clean,
    fake_root,
)
from tests.guest.test_kmod import MODULES, copy_modules, show_depends
from vmferry.guest.errors import GuestWriteRefusedError
from vmferry.guest.fs.ext import ExtFilesystem
from vmferry.guest.linux.fix import apply_fixes, plan_fixes
from vmferry.guest.linux.initramfs import read_initramfs
from vmferry.vm.targets import CONTROLLERS

PVSCSI_STACK = ("vmw_pvscsi", "sd_mod", "ext4", "crc32c_generic")
#: every boot controller's driver the matrix below needs, in the guest's /lib/modules
CONTROLLER_DRIVERS = ("virtio_scsi", "nvme", "ahci", "ata_piix", "hv_storvsc", "xen_blkfront")
COMPRESSORS = {
    "gzip": (["gzip", "-c", "-9"], ["gzip", "-dc"]),
    "xz": (["xz", "-c", "--check=crc32"], ["xz", "-dc"]),
    "none": (["cat"], ["cat"]),
}


def _initramfs(tmp: Path, generator: str, compression: str) -> tuple[bytes, str]:
    """A pvscsi-only initramfs laid out as ``generator`` does (usr-merged: lib -> usr/lib)."""
    require_tool("cpio")
    tree = tmp / "initramfs-tree"
    version = copy_modules(tree, PVSCSI_STACK, sub="usr/lib")
    (tree / "lib").symlink_to("usr/lib")
    files = {"init": "#!/bin/sh\n"}
    if generator == "initramfs-tools":
        files |= {
            "conf/initramfs.conf": "MODULES=list\n",
            "conf/modules": "vmw_pvscsi\nsd_mod\next4\n",
            "scripts/functions": "load_modules() { :; }\n",
        }
    else:
        files |= {
            "usr/lib/dracut/modules.txt": "kernel-modules\nudev-rules\n",
            "usr/lib/dracut-lib.sh": "getargs() { :; }\n",
        }
    for rel, text in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    names = subprocess.run(["find", "."], cwd=tree, capture_output=True, check=True).stdout
    archive = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc"], cwd=tree, input=names, capture_output=True,
        check=True,
    ).stdout  # fmt: skip
    require_tool(COMPRESSORS[compression][0][0])
    out = subprocess.run(COMPRESSORS[compression][0], input=archive, capture_output=True)
    return out.stdout, version


def _guest(
    tmp: Path, generator: str = "initramfs-tools", compression: str = "gzip", drop: str = ""
) -> tuple[GuestDisk, str]:
    """A guest disk whose /lib/modules has the virtio drivers and whose initramfs has not
    (``drop``: a module file removed from /lib/modules after depmod)."""
    root = fake_root(tmp / "root")
    (root / "boot/vmlinuz-6.1.0-18-amd64").unlink()
    shutil.rmtree(root / "lib/modules/6.1.0-18-amd64")
    version = copy_modules(root, MODULES + CONTROLLER_DRIVERS)  # its own /lib/modules
    (root / f"boot/vmlinuz-{version}").write_text("not really a kernel\n")
    blob, v2 = _initramfs(tmp, generator, compression)
    assert v2 == version
    (root / f"boot/initrd.img-{version}").write_bytes(blob)
    if generator == "dracut":
        (root / "etc/dracut.conf.d").mkdir(parents=True)
    if drop:
        (root / "lib/modules" / version / drop).unlink()
    return build_guest_disk(tmp, root), version


def _fixed(tmp: Path, disk: GuestDisk) -> tuple[Path, object]:
    out = tmp / "fixed.raw"
    result = apply_fixes(disk.img, "kvm", output=out)
    part = tmp / "fixed-p1.raw"
    start, size = disk.parts[1]
    with open(out, "rb") as f, open(part, "wb") as g:
        f.seek(start)
        g.write(f.read(size))
    ok, report = e2fsck_clean(part)
    assert ok, report
    return part, result


def _unpack(tmp: Path, old: bytes, new: bytes, compression: str) -> Path:
    """Extract the original archive, then the appended one over it, as the kernel would."""
    ex = tmp / "unpacked"
    ex.mkdir()
    dec = COMPRESSORS[compression][1]
    for blob in (old, new[len(old) :]):
        if compression == "none":
            blob = blob.lstrip(b"\0")
        raw = subprocess.run(dec, input=blob, capture_output=True, check=True).stdout
        subprocess.run(
            ["cpio", "-idmu", "--quiet", "--no-absolute-filenames"], cwd=ex, input=raw,
            capture_output=True, check=True,
        )  # fmt: skip
    return ex


@pytest.mark.parametrize(
    ("generator", "compression"),
    [("initramfs-tools", "gzip"), ("dracut", "xz"), ("initramfs-tools", "none")],
)
def test_virtio_drivers_are_added_and_modprobe_finds_them(
    tmp_path: Path, generator: str, compression: str
) -> None:
    disk, version = _guest(tmp_path, generator, compression)
    initrd = f"/boot/initrd.img-{version}"
    changes, findings = plan_fixes(disk.img, "kvm")
    append = [c for c in changes if c.kind == "append"]
    assert [c.path for c in append] == [initrd], [c.to_json() for c in changes]
    assert "virtio_blk" in append[0].summary and "+" in append[0].diff()
    assert not [f for f in findings if f.severity == "error"], findings
    assert any("adds the virtio-blk drivers" in f.message for f in findings), findings

    part, result = _fixed(tmp_path, disk)
    assert result.plan.bootable  # type: ignore[attr-defined]
    old = (disk.root / initrd.lstrip("/")).read_bytes()
    new = debugfs_cat(part, initrd)
    assert new[: len(old)] == old and len(new) == len(old) + len(append[0].data)
    if compression == "none":
        assert (len(new) - len(append[0].data.lstrip(b"\0"))) % 4 == 0  # cpio headers 4-aligned
    ex = _unpack(tmp_path, old, new, compression)
    # kmod inside the unpacked initramfs: the driver, its dependencies and the PCI alias resolve
    for name in (
        "virtio_blk",
        "virtio_pci",
        "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00",
    ):
        loads = show_depends(ex, version, name)
        assert loads, name
        for rel in loads:
            assert (ex / "usr/lib/modules" / version / rel).is_file(), rel
    assert "kernel/drivers/block/virtio_blk.ko" in show_depends(ex, version, "virtio_blk")
    for name in PVSCSI_STACK:  # what the image had still resolves
        assert show_depends(ex, version, name), name
    if generator == "initramfs-tools":
        assert (
            ex / "conf/modules"
        ).read_text() == "vmw_pvscsi\nsd_mod\next4\nvirtio_blk\nvirtio_pci\n"
        persisted = debugfs_cat(part, "/etc/initramfs-tools/modules").decode()
    else:
        cmdline = (ex / "etc/cmdline.d/90-vmferry-drivers.conf").read_text()
        assert cmdline == "rd.driver.pre=virtio_blk,virtio_pci\n"
        persisted = debugfs_cat(part, "/etc/dracut.conf.d/90-vmferry.conf").decode()
        assert 'add_drivers+=" virtio_blk virtio_pci "' in persisted
    assert "virtio_blk" in persisted and "virtio_pci" in persisted
    # vmferry's own reader sees every archive; a second plan has nothing left to add
    assert {"virtio_blk", "virtio_pci", "vmw_pvscsi"} <= set(read_initramfs(new).drivers)
    again, findings2 = plan_fixes(tmp_path / "fixed.raw", "kvm")
    assert not [c for c in again if c.rule == "initramfs"], [c.to_json() for c in again]
    assert not [f for f in findings2 if f.rule == "initramfs" and f.severity != "info"]


def test_lsinitramfs_still_reads_the_image(tmp_path: Path) -> None:
    """Debian's lsinitramfs decompresses the remainder as one stream: a gzip member appended
    to a gzip image keeps it readable (it lists the original part, see the docs)."""
    require_tool("lsinitramfs")
    disk, version = _guest(tmp_path)
    part, _ = _fixed(tmp_path, disk)
    image = tmp_path / "initrd.img"
    image.write_bytes(debugfs_cat(part, f"/boot/initrd.img-{version}"))
    proc = subprocess.run(["lsinitramfs", str(image)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "conf/modules" in proc.stdout.split()


def test_missing_module_file_refuses_the_injection(tmp_path: Path) -> None:
    disk, _ = _guest(tmp_path, drop="kernel/drivers/block/virtio_blk.ko")
    changes, findings = plan_fixes(disk.img, "kvm")
    assert not [c for c in changes if c.rule == "initramfs"]
    # kvm can still boot it from pvscsi: a warning that says what is missing and why
    said = [f.message for f in findings if f.rule == "initramfs" and f.severity == "warning"]
    assert any(
        "lacks drivers for virtio-blk" in m and "cannot add them" in m and "virtio_blk.ko" in m
        for m in said
    ), findings


def test_a_filesystem_without_append_is_refused_before_any_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk, _ = _guest(tmp_path)
    monkeypatch.delattr(ExtFilesystem, "append_file")
    out = tmp_path / "never.raw"
    with pytest.raises(GuestWriteRefusedError, match="cannot append"):
        apply_fixes(disk.img, "kvm", output=out)
    assert not out.exists()


@pytest.fixture(scope="module")
def matrix_guest(tmp_path_factory: pytest.TempPathFactory) -> tuple[GuestDisk, str, Path]:
    tmp = tmp_path_factory.mktemp("matrix")
    disk, version = _guest(tmp)
    return disk, version, tmp


@pytest.mark.parametrize(
    ("target", "controller", "firmware"),
    [
        ("kvm", "virtio-scsi", None),
        ("kvm", "ahci", None),
        ("hyperv", "piix4", None),
        ("hyperv-gen2", "storvsc", "uefi"),
        ("xen", "xen-blkfront", None),
        ("vmware", "nvme", None),
    ],
)
def test_every_controller_gets_its_drivers(
    matrix_guest: tuple[GuestDisk, str, Path],
    tmp_path: Path,
    target: str,
    controller: str,
    firmware: str | None,
) -> None:
    """Target-generic: the appended archive makes each controller's drivers loadable by kmod
    inside the initramfs (archive unpacked over the original, as the kernel does)."""
    disk, version, _ = matrix_guest
    changes, findings = plan_fixes(disk.img, target, controller=controller, firmware=firmware)
    append = [c for c in changes if c.kind == "append"]
    assert len(append) == 1, [f.message for f in findings]
    assert append[0].to_json()["size_after"] == append[0].old_size + len(append[0].data)
    old = (disk.root / append[0].path.lstrip("/")).read_bytes()
    ex = _unpack(tmp_path, old, old + append[0].data, "gzip")
    for driver in CONTROLLERS[controller].linux_drivers:
        loads = show_depends(ex, version, driver)
        assert loads, driver
        for rel in loads:
            assert (ex / "usr/lib/modules" / version / rel).is_file(), rel
    listed = (ex / "conf/modules").read_text().split()
    assert set(CONTROLLERS[controller].linux_drivers) <= set(listed), listed


def test_a_controller_the_target_lacks_is_a_usage_error(
    matrix_guest: tuple[GuestDisk, str, Path],
) -> None:
    from vmferry.errors import UsageError

    with pytest.raises(UsageError, match="storvsc"):
        plan_fixes(matrix_guest[0].img, "kvm", controller="storvsc")
