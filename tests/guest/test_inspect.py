"""Inspection of guests built from real tools: mke2fs -d trees, sfdisk tables, mkswap, cpio."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import pytest

from tests.guest.conftest import (
    KVER,
    MIB,
    blkid,
    build_guest_disk,
    fake_root,
    make_disk,
    mkfs_ext,
    vmware_root,
)
from vmferry.errors import InspectionError
from vmferry.guest.linux.inspect import inspect_image

_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def test_vmware_debian_guest(tmp_path: Path) -> None:
    disk = build_guest_disk(tmp_path, vmware_root(tmp_path))
    report = inspect_image(disk.img)
    json.dumps(report)  # the CLI prints it as JSON: it must serialise
    assert report["os"]["family"] == "debian"
    assert report["os"]["distro"] == "debian"
    assert report["os"]["version"] == "12"
    assert report["os"]["arch"] == _ARCH.get(platform.machine(), platform.machine())

    ids1 = blkid(disk.extract(1, tmp_path / "p1"))
    ids5 = blkid(disk.extract(5, tmp_path / "p5"))
    fss = {f["partition"]: f for f in report["filesystems"]}
    assert set(fss) == {1, 5}  # the extended container is not a filesystem
    assert fss[1]["type"] == ids1["TYPE"] and fss[1]["uuid"] == ids1["UUID"]
    assert fss[5]["type"] == ids5["TYPE"] and fss[5]["uuid"] == ids5["UUID"]
    assert fss[5]["label"] == ids5["LABEL"]
    assert fss[1]["start"] == disk.parts[1][0]

    fstab = {e["mountpoint"]: e for e in report["fstab"]}
    assert fstab["/"]["naming"] == "path"
    assert fstab["/"]["resolves_to"]["uuid"] == ids1["UUID"]
    assert fstab["none"]["resolves_to"]["uuid"] == ids5["UUID"]

    boot = report["bootloader"]
    assert boot["type"] == "grub2"
    assert "/boot/grub/menu.lst" in boot["configs"]
    assert {r["device"] for r in boot["root_args"]} == {"/dev/sda1"}
    assert {r["path"] for r in boot["root_args"]} >= {
        "/boot/grub/menu.lst",
        "/boot/grub/grub.cfg",
        "/etc/default/grub",
    }
    assert [r["device"] for r in report["resume"]] == ["/dev/sda5", "/dev/sda5"]

    (kernel,) = report["kernels"]
    assert kernel["version"] == KVER
    assert kernel["initramfs"] == f"/boot/initrd.img-{KVER}"
    assert kernel["drivers"] == ["vmw_pvscsi"]
    assert "virtio_blk" in kernel["builtin_drivers"]
    assert [t["hypervisor"] for t in report["guest_tools"]] == ["vmware"]


def test_separate_boot_partition_is_mounted_from_fstab(tmp_path: Path) -> None:
    boot_uuid = "0b0f0b0f-1111-4222-8333-444455556666"
    root = fake_root(tmp_path / "root")
    (root / "etc/fstab").write_text(
        f"/dev/sda2 / ext4 defaults 0 1\nUUID={boot_uuid} /boot ext4 defaults 0 2\n"
    )
    boot = tmp_path / "boot"
    (root / "boot").rename(boot)
    (root / "boot").mkdir()
    img, table = make_disk(tmp_path, 64 * MIB, "label: gpt\nsize=20MiB\nsize=30MiB\n")
    starts = [(p["start"] * 512, p["size"] * 512) for p in table["partitions"]]
    mkfs_ext(img, *starts[0], boot, "-U", boot_uuid)
    mkfs_ext(img, *starts[1], root)
    report = inspect_image(img)
    assert report["mounts"] == {"/": 2, "/boot": 1}
    assert report["root"]["partition"] == 2
    assert report["bootloader"]["type"] == "grub2"
    assert [k["version"] for k in report["kernels"]] == [KVER]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"etc/redhat-release": "CentOS release 5.11 (Final)\n"}, ("redhat", "centos", "5.11")),
        (
            {"etc/redhat-release": "Red Hat Enterprise Linux Server release 6.10 (Santiago)\n"},
            ("redhat", "rhel", "6.10"),
        ),
        (
            {
                "etc/SuSE-release": "SUSE Linux Enterprise Server 11 (x86_64)\nVERSION = 11\n"
                "PATCHLEVEL = 4\n"
            },
            ("suse", "sles", "11.4"),
        ),
        (
            {
                "etc/lsb-release": "DISTRIB_ID=Ubuntu\nDISTRIB_RELEASE=12.04\n",
                "etc/debian_version": "wheezy/sid\n",
            },
            ("debian", "ubuntu", "12.04"),
        ),
        ({"etc/debian_version": "7.11\n"}, ("debian", "debian", "7.11")),
        (
            {"etc/os-release": 'ID="rocky"\nID_LIKE="rhel centos fedora"\nVERSION_ID="9.3"\n'},
            ("redhat", "rocky", "9.3"),
        ),
    ],
)
def test_release_files(tmp_path: Path, files: dict[str, str], expected: tuple) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/fstab").write_text("/dev/hda1 / ext3 defaults 1 1\n")
    for rel, text in files.items():
        (root / rel).write_text(text)
    img, _ = make_disk(tmp_path, 32 * MIB, "label: dos\nstart=2048,type=83\n")
    mkfs_ext(img, MIB, 31 * MIB, root, prog="mkfs.ext3")
    os_ = inspect_image(img)["os"]
    assert (os_["family"], os_["distro"], os_["version"]) == expected


def test_no_root_filesystem(tmp_path: Path) -> None:
    img, _ = make_disk(tmp_path, 32 * MIB, "label: dos\nstart=2048,type=83\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    mkfs_ext(img, MIB, 31 * MIB, empty)
    with pytest.raises(InspectionError, match="no Linux root"):
        inspect_image(img)


def test_unpartitioned_filesystem_image(tmp_path: Path) -> None:
    root = vmware_root(tmp_path)
    img = tmp_path / "bare.raw"
    img.write_bytes(b"")
    with open(img, "wb") as f:
        f.truncate(32 * MIB)
    mkfs_ext(img, 0, 32 * MIB, root)
    report = inspect_image(img)
    assert report["partition_table"]["scheme"] == "none"
    assert report["root"]["partition"] is None
    # /dev/sda1 does not name a whole-disk filesystem: it must not resolve
    assert report["fstab"][0]["resolves_to"] is None


def test_guest_tools_and_network_leftovers(tmp_path: Path) -> None:
    root = fake_root(tmp_path / "root")
    extra = {
        "etc/X11/xorg.conf": 'Section "Device"\n  Identifier "v"\n  Driver "vmware"\nEndSection\n',
        "etc/udev/rules.d/70-persistent-net.rules": (
            'SUBSYSTEM=="net", ATTR{address}=="00:50:56:AA:bb:01", NAME="eth0"\n'
        ),
        "etc/sysconfig/network-scripts/ifcfg-eth0": "DEVICE=eth0\nHWADDR=00:50:56:aa:bb:02\n",
        "usr/sbin/VBoxService": "x",
        "usr/sbin/xe-daemon": "x",
    }
    for rel, text in extra.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    disk = build_guest_disk(tmp_path, root)
    report = inspect_image(disk.img)
    assert {t["hypervisor"] for t in report["guest_tools"]} == {"vmware", "virtualbox", "xen"}
    assert report["xorg"] == [{"path": "/etc/X11/xorg.conf", "drivers": ["vmware"]}]
    macs = {(n["kind"], n["mac"]) for n in report["network"]}
    assert macs == {("udev", "00:50:56:aa:bb:01"), ("ifcfg", "00:50:56:aa:bb:02")}


def test_damaged_initramfs_is_reported_not_fatal(tmp_path: Path) -> None:
    root = vmware_root(tmp_path)
    p = root / "boot" / f"initrd.img-{KVER}"
    p.write_bytes(b"070701" + b"FFFFFFFF" * 13 + bytes(64))
    disk = build_guest_disk(tmp_path, root)
    (kernel,) = inspect_image(disk.img)["kernels"]
    assert kernel["drivers"] == []
    assert kernel["initramfs_info"]["complete"] is False
    assert "name size" in kernel["initramfs_info"]["error"]


def test_sfdisk_and_inspect_agree_on_partition_starts(tmp_path: Path) -> None:
    disk = build_guest_disk(tmp_path, vmware_root(tmp_path))
    out = subprocess.run(["sfdisk", "--json", str(disk.img)], capture_output=True, text=True)
    oracle = {
        int(p["node"][len(str(disk.img)) :]): p["start"] * 512
        for p in json.loads(out.stdout)["partitiontable"]["partitions"]
    }
    report = inspect_image(disk.img)
    for f in report["filesystems"]:
        assert f["start"] == oracle[f["partition"]]
