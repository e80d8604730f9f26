"""Helpers for guest tests: partitioned raw disks built with sfdisk, ext filesystems with mke2fs.

Every fixture is made in tmp_path from real tools (util-linux sfdisk, e2fsprogs), which are also
the oracles: ``sfdisk --json``, ``e2fsck -fn``, ``debugfs -R``, ``blkid -p``.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import require_tool, run


def sfdisk(img: Path, script: str) -> dict:
    """Partition ``img`` with an sfdisk script and return ``sfdisk --json`` for it."""
    require_tool("sfdisk")
    run("sfdisk", "-q", "--no-reread", "--no-tell-kernel", img, input=script.encode())
    return json.loads(run("sfdisk", "--json", img).stdout)["partitiontable"]


def make_disk(tmp_path: Path, size: int, script: str, name: str = "disk.raw") -> tuple[Path, dict]:
    img = tmp_path / name
    with open(img, "wb") as f:
        f.truncate(size)
    return img, sfdisk(img, script)


def mkfs_ext(
    img: Path,
    start: int,
    size: int,
    root: Path | None,
    *args: str,
    prog: str = "mkfs.ext4",
) -> None:
    """Make an ext filesystem inside ``img`` at byte ``start`` (no loop device, no mount)."""
    require_tool(prog)
    argv = [prog, "-q", "-F", "-E", f"offset={start}"]
    if root is not None:
        argv += ["-d", str(root)]
    env = dict(os.environ, MKE2FS_DEVICE_SECTSIZE="512", E2FSPROGS_FAKE_TIME="1700000000")
    argv += [*args, str(img), f"{size // 1024}k"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr


def extract(img: Path, start: int, size: int, out: Path) -> Path:
    """Copy a partition out of ``img`` so e2fsck/debugfs can look at it on its own."""
    with open(img, "rb") as src, open(out, "wb") as dst:
        src.seek(start)
        left = size
        while left:
            chunk = src.read(min(left, 1 << 20))
            if not chunk:
                break
            dst.write(chunk)
            left -= len(chunk)
    return out


def e2fsck_clean(fs_file: Path) -> tuple[bool, str]:
    require_tool("e2fsck")
    proc = subprocess.run(["e2fsck", "-fn", str(fs_file)], capture_output=True, text=True)
    return proc.returncode == 0, proc.stdout + proc.stderr


def debugfs_cat(fs_file: Path, path: str) -> bytes:
    require_tool("debugfs")
    proc = subprocess.run(["debugfs", "-R", f"cat {path}", str(fs_file)], capture_output=True)
    return proc.stdout


def blkid(fs_file: Path) -> dict[str, str]:
    require_tool("blkid")
    proc = subprocess.run(
        ["blkid", "-p", "-o", "export", str(fs_file)], capture_output=True, text=True
    )
    out = {}
    for line in proc.stdout.splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


def fake_root(root: Path) -> Path:
    """A small Linux root tree as VMware would have left it (files only, no binaries run)."""
    files = {
        "etc/fstab": "# /etc/fstab\n/dev/sda1  /  ext4  errors=remount-ro  0 1\n"
        "/dev/sda5  none  swap  sw  0 0\n",
        "etc/os-release": 'NAME="Debian GNU/Linux"\nID=debian\nVERSION_ID="12"\n'
        'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n',
        "etc/debian_version": "12.5\n",
        "boot/grub/menu.lst": "default 0\ntimeout 5\ntitle Debian\n  root (hd0,0)\n"
        "  kernel /boot/vmlinuz-6.1.0-18-amd64 root=/dev/sda1 ro quiet\n"
        "  initrd /boot/initrd.img-6.1.0-18-amd64\n",
        "boot/grub/grub.cfg": "menuentry 'Debian' {\n  insmod ext2\n"
        "  linux /boot/vmlinuz-6.1.0-18-amd64 root=/dev/sda1 ro quiet\n"
        "  initrd /boot/initrd.img-6.1.0-18-amd64\n}\n",
        "etc/default/grub": "GRUB_DEFAULT=0\n"
        'GRUB_CMDLINE_LINUX="root=/dev/sda1 resume=/dev/sda5"\n',
        "etc/initramfs-tools/conf.d/resume": "RESUME=/dev/sda5\n",
        "boot/vmlinuz-6.1.0-18-amd64": "not really a kernel\n",
        "var/lib/dpkg/status": "Package: open-vm-tools\nStatus: install ok installed\n\n"
        "Package: bash\nStatus: install ok installed\n",
    }
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    (root / "lib/modules/6.1.0-18-amd64/kernel").mkdir(parents=True, exist_ok=True)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    return root


KVER = "6.1.0-18-amd64"
MIB = 1 << 20


def make_initramfs(tmp: Path, modules: list[str], compress: list[str] | None = None) -> bytes:
    """A real initramfs made by GNU cpio (newc) and gzip, holding the given module files."""
    require_tool("cpio")
    tree = tmp / f"initramfs-tree-{len(list(tmp.glob('initramfs-tree-*')))}"
    for rel in [*modules, "init"]:
        p = tree / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\x7fELF module or script\n")
    names = subprocess.run(["find", "."], cwd=tree, capture_output=True, check=True).stdout
    archive = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc"],
        cwd=tree,
        input=names,
        capture_output=True,
        check=True,
    ).stdout
    return subprocess.run(
        compress or ["gzip", "-c"], input=archive, capture_output=True, check=True
    ).stdout


def vmware_root(tmp: Path, name: str = "root") -> Path:
    """fake_root plus a VMware-style initramfs (pvscsi only) and a real ELF /bin/ls."""
    import shutil

    root = fake_root(tmp / name)
    mod = f"lib/modules/{KVER}/kernel/drivers/scsi/vmw_pvscsi.ko"
    (root / "boot" / f"initrd.img-{KVER}").write_bytes(make_initramfs(tmp, [mod]))
    (root / "bin").mkdir(exist_ok=True)
    shutil.copyfile("/bin/ls", root / "bin/ls")
    (root / f"lib/modules/{KVER}/modules.builtin").write_text(
        "kernel/drivers/block/virtio_blk.ko\nkernel/fs/ext4/ext4.ko\n"
    )
    return root


@dataclass
class GuestDisk:
    img: Path
    table: dict  # sfdisk --json
    parts: dict[int, tuple[int, int]]  # partition number -> (start, size) in bytes
    root: Path

    def extract(self, number: int, out: Path) -> Path:
        start, size = self.parts[number]
        return extract(self.img, start, size, out)


def build_guest_disk(tmp: Path, root: Path, *, mkfs_args: tuple[str, ...] = ()) -> GuestDisk:
    """64 MiB MBR disk: p1 ext4 root (from ``root``), p2 extended, p5 swap (mkswap)."""
    script = (
        "label: dos\n"
        "start=2048,size=81920,type=83\n"
        "start=86016,size=40960,type=5\n"
        "start=88064,size=16384,type=82\n"
    )
    img, table = make_disk(tmp, 64 * MIB, script, "guest.raw")
    parts = {
        int(p["node"][len(str(img)) :]): (p["start"] * 512, p["size"] * 512)
        for p in table["partitions"]
    }
    mkfs_ext(img, *parts[1], root, *mkfs_args)
    swap = tmp / "swap.raw"
    with open(swap, "wb") as f:
        f.truncate(parts[5][1])
    require_tool("mkswap")
    subprocess.run(["mkswap", "-L", "swappy", str(swap)], capture_output=True, check=True)
    with open(img, "r+b") as f:
        f.seek(parts[5][0])
        f.write(swap.read_bytes())
    return GuestDisk(img, table, parts, root)
