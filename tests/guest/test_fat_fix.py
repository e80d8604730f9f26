"""A UEFI guest end to end: the fix rules rewrite the ESP's grub.cfg through the FAT writer.

The disk is GPT with an EFI system partition (FAT32 from mkfs.fat, filled by mtools) and an ext4
root made by ``mke2fs -d`` whose fstab mounts the ESP on /boot/efi.  The fixed image is judged by
``fsck.fat -n`` and ``e2fsck -fn``, and read back with mtools and debugfs.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.guest.conftest import (
    blkid,
    debugfs_cat,
    e2fsck_clean,
    extract,
    fake_root,
    make_disk,
    mkfs_ext,
)
from tests.guest.test_fat import assert_clean, mmd, mtype, put
from vmferry.guest.errors import GuestWriteRefusedError
from vmferry.guest.linux.fix import apply_fixes, plan_fixes
from vmferry.guest.linux.inspect import inspect_image

MIB = 1 << 20
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
KVER = "6.1.0-18-amd64"
ESP_GRUB = (
    "set timeout=5\n"
    "menuentry 'Debian GNU/Linux' {\n"
    "  insmod part_gpt\n  insmod ext2\n"
    f"  linux /boot/vmlinuz-{KVER} root=/dev/sda2 ro quiet\n"
    f"  initrd /boot/initrd.img-{KVER}\n"
    "}\n"
)


def _uefi_disk(tmp: Path) -> tuple[Path, dict[int, tuple[int, int]], dict[str, bytes]]:
    require_tool("mkfs.fat")
    root = fake_root(tmp / "root")
    (root / "boot/grub/menu.lst").unlink()
    (root / "etc/initramfs-tools/conf.d/resume").unlink()
    (root / "etc/fstab").write_text(
        "/dev/sda2  /          ext4  errors=remount-ro  0 1\n"
        "/dev/sda1  /boot/efi  vfat  umask=0077         0 1\n"
    )
    (root / "etc/default/grub").write_text('GRUB_DEFAULT=0\nGRUB_CMDLINE_LINUX=""\n')
    (root / "boot/grub/grub.cfg").write_text(ESP_GRUB)
    (root / "boot/efi").mkdir(parents=True)
    script = (
        "label: gpt\n"
        f"start=2048,size=81920,type={ESP_TYPE}\n"
        f"start=83968,size=102400,type={LINUX_TYPE}\n"
    )
    img, table = make_disk(tmp, 96 * MIB, script, "uefi.raw")
    parts = {
        int(p["node"][len(str(img)) :]): (p["start"] * 512, p["size"] * 512)
        for p in table["partitions"]
    }
    mkfs_ext(img, *parts[2], root)
    esp = tmp / "esp.img"
    proc = subprocess.run(
        ["mkfs.fat", "-F", "32", "-s", "1", "-n", "ESP", "-C", str(esp), str(parts[1][1] // 1024)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    files = {
        "/EFI/debian/grub.cfg": ESP_GRUB.encode(),
        "/EFI/debian/shimx64.efi": bytes(range(256)) * 37,
        "/EFI/BOOT/BOOTX64.EFI": bytes(range(255, -1, -1)) * 23,
    }
    mmd(esp, "/EFI", "/EFI/debian", "/EFI/BOOT")
    for path, data in files.items():
        put(esp, path, data)
    with open(img, "r+b") as f:
        f.seek(parts[1][0])
        f.write(esp.read_bytes())
    esp.unlink()
    return img, parts, files


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_kvm_fix_rewrites_the_esp_grub_cfg(tmp_path: Path) -> None:
    img, parts, files = _uefi_disk(tmp_path)
    root_uuid = blkid(extract(img, *parts[2], tmp_path / "root-before.raw"))["UUID"]
    esp_uuid = blkid(extract(img, *parts[1], tmp_path / "esp-before.raw"))["UUID"]
    report = inspect_image(img)
    esp = next(f for f in report["filesystems"] if f["partition"] == 1)
    assert (esp["type"], esp["uuid"], esp["readable"]) == ("vfat", esp_uuid, True)

    changes, _ = plan_fixes(img, "kvm", firmware="uefi")
    by_path = {c.path: c for c in changes}
    esp_change = by_path["/boot/efi/EFI/debian/grub.cfg"]
    assert f"root=UUID={root_uuid} ro quiet" in esp_change.after
    assert "/dev/sda" not in esp_change.after
    assert f"UUID={esp_uuid}  /boot/efi" in by_path["/etc/fstab"].after

    before = _sha(img)
    out = tmp_path / "fixed.raw"
    result = apply_fixes(img, "kvm", output=out, firmware="uefi")
    assert "/boot/efi/EFI/debian/grub.cfg" in result.written
    assert _sha(img) == before  # the source is never touched

    esp_after = extract(out, *parts[1], tmp_path / "esp-after.raw")
    assert_clean(esp_after)
    assert mtype(esp_after, "/EFI/debian/grub.cfg").decode() == esp_change.after
    for path, data in files.items():
        if path != "/EFI/debian/grub.cfg":
            assert mtype(esp_after, path) == data, path
    assert blkid(esp_after)["UUID"] == esp_uuid

    root_after = extract(out, *parts[2], tmp_path / "root-after.raw")
    ok, log = e2fsck_clean(root_after)
    assert ok, log
    fstab = debugfs_cat(root_after, "/etc/fstab").decode()
    assert f"UUID={root_uuid}" in fstab and f"UUID={esp_uuid}" in fstab

    again, _ = plan_fixes(out, "kvm", firmware="uefi")
    assert again == []  # idempotent: the fixed guest needs nothing more


def test_dirty_esp_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    img, parts, _ = _uefi_disk(tmp_path)
    with open(img, "r+b") as f:
        f.seek(parts[1][0] + 65)  # FAT32 boot sector state byte: "mounted, not clean"
        f.write(b"\x01")
    copy = tmp_path / "copy.raw"
    shutil.copyfile(img, copy)
    before = _sha(copy)
    with pytest.raises(GuestWriteRefusedError, match="dirty"):
        apply_fixes(copy, "kvm", in_place=True, firmware="uefi")
    assert _sha(copy) == before  # not even the ext4 root's files were written
    out = tmp_path / "never.raw"
    with pytest.raises(GuestWriteRefusedError):
        apply_fixes(copy, "kvm", output=out, firmware="uefi")
    assert not out.exists()
