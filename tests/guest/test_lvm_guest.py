"""A Red Hat style guest on LVM, inspected and fixed: /boot on sda1, / and swap on VolGroup00.

The VG spans two PV partitions (made by lvm2 through loop devices, see test_lvm.py); the root
LV is either linear in two segments on both PVs or striped over them.  Its ext4 is made by
``mke2fs -d`` into a file and copied to the extents ``lvs`` reports; after ``fix --target kvm``
the LV's bytes are gathered again from those extents and checked by ``e2fsck -fn`` and
``debugfs``, so vmferry's mapping is judged by lvm2's report and e2fsprogs, not by itself.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import uuid as uuid_mod
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.guest.conftest import MIB, blkid, debugfs_cat, e2fsck_clean, mkfs_ext
from tests.guest.test_lvm import LvmImage, lv_bytes, lvm_disk, put_lv
from vmferry.guest.linux.fix import apply_fixes, plan_fixes
from vmferry.guest.linux.inspect import inspect_image

KVER = "3.10.0-1160.el7.x86_64"


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def _mapper(vg: str, lv: str) -> str:
    return f"/dev/mapper/{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def build_redhat_guest(tmp: Path, layout: str, vg: str, root_lv: str) -> tuple[Path, dict, tuple]:
    img, parts = lvm_disk(
        tmp, "label: dos\nstart=2048,size=40M,type=83\n,48M,8e\n,48M,8e\n", size=144 * MIB
    )
    boot = _tree(
        tmp / "boot",
        {
            f"vmlinuz-{KVER}": "not a kernel\n",
            "grub2/grub.cfg": f"menuentry 'CentOS' {{\n  linux16 /vmlinuz-{KVER} "
            f"root={_mapper(vg, root_lv)} ro rd.lvm.lv={vg}/{root_lv} rd.lvm.lv={vg}/swap "
            "crashkernel=auto\n}\n",
        },
    )
    root = _tree(
        tmp / "root",
        {
            "etc/fstab": f"{_mapper(vg, root_lv)} /  ext4  defaults 1 1\n"
            "/dev/sda1  /boot  ext4  defaults 1 2\n"
            f"/dev/{vg}/swap  swap  swap  defaults 0 0\n",
            "etc/redhat-release": "CentOS Linux release 7.9.2009 (Core)\n",
            "etc/os-release": 'NAME="CentOS Linux"\nID="centos"\nID_LIKE="rhel fedora"\n'
            'VERSION_ID="7"\nPRETTY_NAME="CentOS Linux 7 (Core)"\n',
            "etc/default/grub": f'GRUB_CMDLINE_LINUX="rd.lvm.lv={vg}/{root_lv} '
            f'resume=/dev/{vg}/swap"\n',
        },
    )
    (root / "boot").mkdir()
    (root / f"lib/modules/{KVER}").mkdir(parents=True)
    with LvmImage(img, {2: parts[2], 3: parts[3]}) as li:
        li.lvm("pvcreate", li.dev(2), li.dev(3))
        li.lvm("vgcreate", "-s", "1M", vg, li.dev(2), li.dev(3))
        if layout == "linear":  # 12 MiB on the first PV, swap after it, 20 more on the second
            li.lvm("lvcreate", "-an", "-Zn", "-L", "12M", "-n", root_lv, vg, li.dev(2))
            li.lvm("lvcreate", "-an", "-Zn", "-L", "8M", "-n", "swap", vg, li.dev(2))
            li.lvm("lvextend", "-L", "+20M", f"{vg}/{root_lv}", li.dev(3))
        else:
            li.lvm("lvcreate", "-an", "-Zn", "-i2", "-I64k", "-L", "32M", "-n", root_lv, vg)
            li.lvm("lvcreate", "-an", "-Zn", "-L", "8M", "-n", "swap", vg)
        report = li.report(vg)
    mkfs_ext(img, *parts[1], boot)
    fs = tmp / "rootfs.img"
    fs.write_bytes(b"")
    mkfs_ext(fs, 0, 32 * MIB, root, "-L", "root")
    put_lv(img, report, parts, root_lv, fs.read_bytes())
    swap = tmp / "swap.img"
    with open(swap, "wb") as f:
        f.truncate(8 * MIB)
    require_tool("mkswap")
    subprocess.run(["mkswap", str(swap)], capture_output=True, check=True)
    put_lv(img, report, parts, "swap", swap.read_bytes())
    return img, parts, report


@pytest.mark.parametrize(
    "layout,vg,root_lv",
    [("linear", "VolGroup00", "LogVol00"), ("striped", "vg-sys", "lv-root")],
)
def test_redhat_guest_on_lvm_inspected_and_fixed(
    tmp_path: Path, layout: str, vg: str, root_lv: str
) -> None:
    img, parts, report = build_redhat_guest(tmp_path, layout, vg, root_lv)
    root_fs = tmp_path / "root-before.img"
    root_fs.write_bytes(lv_bytes(img, report, parts, root_lv))
    swap_fs = tmp_path / "swap-before.img"
    swap_fs.write_bytes(lv_bytes(img, report, parts, "swap"))
    root_id, swap_id = blkid(root_fs)["UUID"], blkid(swap_fs)["UUID"]

    info = inspect_image(img)
    assert info["os"]["distro"] == "centos" and info["os"]["family"] == "redhat"
    assert (info["root"]["vg"], info["root"]["lv"], info["root"]["uuid"]) == (vg, root_lv, root_id)
    assert info["mounts"] == {"/": f"{vg}/{root_lv}", "/boot": 1}
    refs = {e["mountpoint"]: e for e in info["fstab"]}
    assert refs["/"]["naming"] == "mapper"
    assert refs["/"]["resolves_to"]["lv"] == f"{vg}/{root_lv}"
    assert refs["swap"]["naming"] == "lvm"
    assert refs["swap"]["resolves_to"]["uuid"] == swap_id
    assert refs["swap"]["resolves_to"]["type"] == "swap"
    (vg_json,) = info["lvm"]["volume_groups"]
    assert vg_json["name"] == vg
    assert [p["partition"] for p in vg_json["pvs"]] == [2, 3]
    types = {lv["name"]: lv["segment_types"] for lv in vg_json["lvs"]}
    assert types == {root_lv: [layout], "swap": ["linear"]}
    by_lv = {f["lv"]: f for f in info["filesystems"] if f["lv"]}
    assert by_lv[root_lv]["type"] == "ext4" and by_lv["swap"]["type"] == "swap"
    assert [f["type"] for f in info["filesystems"] if f["partition"] in (2, 3)] == [
        "LVM2_member",
        "LVM2_member",
    ]

    source_sha = hashlib.sha256(img.read_bytes()).hexdigest()
    out = tmp_path / "fixed.raw"
    result = apply_fixes(img, "kvm", output=out)
    assert hashlib.sha256(img.read_bytes()).hexdigest() == source_sha
    assert "/etc/fstab" in result.written
    boot_uuid = blkid(_extract(img, parts[1], tmp_path / "boot.img"))["UUID"]
    after = tmp_path / "root-after.img"
    after.write_bytes(lv_bytes(out, report, parts, root_lv))
    ok, log = e2fsck_clean(after)
    assert ok, log
    fstab = debugfs_cat(after, "/etc/fstab").decode()
    assert f"UUID={boot_uuid}  /boot" in fstab
    assert f"{_mapper(vg, root_lv)} /" in fstab and f"/dev/{vg}/swap  swap" in fstab
    grub = debugfs_cat(_extract(out, parts[1], tmp_path / "boot-after.img"), "/grub2/grub.cfg")
    assert f"root={_mapper(vg, root_lv)} " in grub.decode()  # LVM names are left alone
    changes, _ = plan_fixes(out, "kvm")
    assert [c for c in changes if c.path == "/etc/fstab"] == []


def _extract(img: Path, part: tuple[int, int], out: Path) -> Path:
    with open(img, "rb") as f:
        f.seek(part[0])
        out.write_bytes(f.read(part[1]))
    return out


# --- btrfs subvolumes as roots and mounts (Fedora layout) -------------------------------------


def build_fedora_guest(tmp: Path) -> tuple[Path, str]:
    """MBR: p1 ext4 /boot, p2 btrfs with subvolumes root and home (top level is the default),
    fstab mounting them with subvol= and subvolid=; made through a loop mount."""
    require_tool("mkfs.btrfs")
    require_tool("btrfs")
    import os

    if os.geteuid() != 0:
        message = "the btrfs subvolume fixture needs root for a loop mount"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    img, parts = lvm_disk(tmp, "label: dos\n,16M,83\n,140M,83\n", size=160 * MIB)
    boot = _tree(tmp / "boot", {f"vmlinuz-{KVER}": "not a kernel\n"})
    mkfs_ext(img, *parts[1], boot)
    fs = tmp / "btrfs.img"
    with open(fs, "wb") as f:
        f.truncate(parts[2][1])
    uuid = str(uuid_mod.uuid4())
    subprocess.run(["mkfs.btrfs", "-q", "-L", "fedora", "-U", uuid, str(fs)], check=True)
    mnt = tmp / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-o", "loop", str(fs), str(mnt)], capture_output=True)
    if proc.returncode != 0:
        message = f"cannot loop-mount btrfs here: {proc.stderr.decode().strip()}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        for sub in ("root", "home"):
            subprocess.run(
                ["btrfs", "subvolume", "create", str(mnt / sub)], check=True, capture_output=True
            )
        listing = subprocess.run(
            ["btrfs", "subvolume", "list", str(mnt)], capture_output=True, text=True, check=True
        ).stdout
        home_id = int(re.search(r"^ID (\d+) .* path home$", listing, re.M).group(1))  # type: ignore[union-attr]
        _tree(
            mnt / "root",
            {
                "etc/fstab": f"UUID={uuid} / btrfs subvol=root 0 0\n"
                f"UUID={uuid} /home btrfs subvolid={home_id} 0 0\n"
                f"UUID={uuid} /srv btrfs noatime,subvol=/home 0 0\n"
                "/dev/sda1 /boot ext4 defaults 1 2\n",
                "etc/os-release": 'ID=fedora\nVERSION_ID=39\nPRETTY_NAME="Fedora Linux 39"\n',
            },
        )
        _tree(mnt / "home", {"user/notes": "home subvolume\n"})
        (mnt / "top-level-only").write_text("x\n")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert blkid(fs)["UUID"] == uuid
    with open(img, "r+b") as f:
        f.seek(parts[2][0])
        f.write(fs.read_bytes())
    return img, uuid


def test_btrfs_root_in_a_subvolume_and_subvol_mounts(tmp_path: Path) -> None:
    import vmferry
    from vmferry.guest.guest import open_guest

    img, uuid = build_fedora_guest(tmp_path)
    with vmferry.open(img) as disk:
        guest = open_guest(disk)
        assert guest.root.subvolume == "root" and guest.root.partition.index == 2
        assert guest.mounts["/home"].subvolume == guest.mounts["/srv"].subvolume == "home"
        assert guest.read_text("/home/user/notes") == "home subvolume\n"
        assert guest.read_text("/srv/user/notes") == "home subvolume\n"
        assert guest.mounts["/boot"].partition.index == 1
        assert not guest.exists("/top-level-only")
    info = inspect_image(img)
    assert info["root"]["subvolume"] == "root" and info["root"]["uuid"] == uuid
    assert info["os"]["distro"] == "fedora"
    changes, _ = plan_fixes(img, "kvm")
    (fstab,) = [c for c in changes if c.path == "/etc/fstab"]
    assert "/dev/sda1" in fstab.before and "/dev/sda1" not in fstab.after
