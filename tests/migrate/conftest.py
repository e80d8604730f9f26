"""Fixtures for migrate: small Linux guests (sfdisk + mke2fs -d), VM configs written by hand.

The guests come from tests/guest/conftest.py (a 64 MiB MBR disk, ext4 root made by ``mke2fs -d``
from a directory, swap, a VMware-style initramfs built by GNU cpio).  ``drivers`` says which
storage drivers the guest's kernel has built in (``modules.builtin``), which is what decides
whether it can boot on a target's controller.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
from pathlib import Path

import pytest

from tests.conftest import qemu_img, require_tool
from tests.guest.conftest import KVER, build_guest_disk, vmware_root
from vmferry.vm.targets import CONTROLLERS

MIB = 1 << 20
#: how many tests of this run read each target's end-to-end outputs (test_e2e_migrate.py)
E2E_READERS = pytest.StashKey[dict[str, int]]()
ALL_DRIVERS = tuple(sorted({m for c in CONTROLLERS.values() for m in c.linux_drivers}))


def make_guest(tmp: Path, drivers: tuple[str, ...] = ALL_DRIVERS, name: str = "guest") -> Path:
    """A raw 64 MiB Linux guest disk (fstab and grub naming /dev/sda1, open-vm-tools installed)."""
    work = tmp / f"{name}-build"
    work.mkdir()
    root = vmware_root(work)
    (root / f"lib/modules/{KVER}/modules.builtin").write_text(
        "".join(f"kernel/drivers/storage/{m}.ko\n" for m in drivers) + "kernel/fs/ext4/ext4.ko\n"
    )
    disk = build_guest_disk(work, root)
    out = tmp / f"{name}.raw"
    disk.img.rename(out)
    return out


def fill_random(path: Path, offset: int, length: int, seed: int = 1) -> None:
    """Write ``length`` pseudo-random bytes at ``offset`` of a raw file."""
    rnd = random.Random(seed)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(rnd.randbytes(length))


def raw_disk(path: Path, size: int, data: list[tuple[int, int]] = ()) -> Path:  # type: ignore[assignment]
    with open(path, "wb") as f:
        f.truncate(size)
    for i, (off, n) in enumerate(data):
        fill_random(path, off, n, seed=i + 7)
    return path


def to_format(src: Path, dst: Path, fmt: str, *opts: str) -> Path:
    args = ["convert", "-f", "raw", "-O", fmt]
    for o in opts:
        args += ["-o", o]
    qemu_img(*args, str(src), str(dst))
    return dst


def sha256_files(*paths: Path) -> dict[str, str]:
    out = {}
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        out[str(p)] = h.hexdigest()
    return out


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` with its sha256: "the source is unchanged" as data."""
    return sha256_files(*sorted(p for p in folder.rglob("*") if p.is_file()))


def libvirt_xml(name: str, disks: list[tuple[Path, str, str]], *, uefi: bool = False) -> str:
    """A libvirt domain; disks as (file, driver type, target bus)."""
    letters = "abcdefgh"
    items = []
    for i, (path, fmt, bus) in enumerate(disks):
        dev = {"virtio": "vd", "sata": "sd", "scsi": "sd", "ide": "hd"}[bus] + letters[i]
        items.append(
            f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
            f"<source file='{path}'/><target dev='{dev}' bus='{bus}'/></disk>"
        )
    loader = "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>"
    return (
        f"<domain type='kvm'><name>{name}</name><memory unit='MiB'>1024</memory>"
        f"<vcpu>2</vcpu><os><type arch='x86_64' machine='q35'>hvm</type>"
        f"{loader if uefi else ''}</os><devices>{''.join(items)}"
        "<interface type='network'><mac address='52:54:00:12:34:56'/>"
        "<source network='default'/><model type='virtio'/></interface>"
        "</devices></domain>"
    )


def vmx_text(name: str, disk: str, *, firmware: str = "bios", extra: str = "") -> str:
    fw = 'firmware = "efi"\n' if firmware == "uefi" else ""
    return (
        '.encoding = "UTF-8"\nconfig.version = "8"\nvirtualHW.version = "14"\n'
        f'displayName = "{name}"\nguestOS = "debian11-64"\nmemsize = "1024"\nnumvcpus = "2"\n'
        f'{fw}scsi0.present = "TRUE"\nscsi0.virtualDev = "pvscsi"\n'
        f'scsi0:0.present = "TRUE"\nscsi0:0.fileName = "{disk}"\n'
        'ethernet0.present = "TRUE"\nethernet0.virtualDev = "vmxnet3"\n'
        'ethernet0.addressType = "static"\nethernet0.address = "00:50:56:01:02:03"\n' + extra
    )


@pytest.fixture(scope="session")
def guest_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One guest built per session (mke2fs + cpio take a second); tests copy it."""
    require_tool("qemu-img")
    tmp = tmp_path_factory.mktemp("migrate-guests")
    make_guest(tmp, ALL_DRIVERS, "all")
    make_guest(tmp, ("vmw_pvscsi", "sd_mod"), "pvscsi")
    return tmp


@pytest.fixture
def guest(guest_cache: Path, tmp_path: Path) -> Path:
    """A guest whose kernel drives every controller (boots anywhere once names are fixed)."""
    dst = tmp_path / "guest.raw"
    subprocess.run(["cp", "--sparse=always", str(guest_cache / "all.raw"), str(dst)], check=True)
    return dst


@pytest.fixture
def pvscsi_guest(guest_cache: Path, tmp_path: Path) -> Path:
    """A guest that only has VMware's pvscsi driver (the unrepaired-guest case)."""
    dst = tmp_path / "pvscsi.raw"
    subprocess.run(["cp", "--sparse=always", str(guest_cache / "pvscsi.raw"), str(dst)], check=True)
    return dst


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reproducible guest repairs: the time written into the guest comes from
    SOURCE_DATE_EPOCH (vmferry.guest.fs.clock); generation numbers are derived, not random."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """test_e2e_migrate: run each target's tests one after the other, and count them.

    Every migrated disk is ~650 MB; made all at once at the start (the tests' own order) and
    kept to the end they took ~20 GB.  Grouped by target, a target's outputs are deleted as
    soon as the last of its tests has ended (``E2E_READERS``; the module's autouse fixture), so
    about two targets' outputs exist at a time.  Tests without a target keep their order, first.
    """
    slots = [i for i, item in enumerate(items) if item.module.__name__.endswith("test_e2e_migrate")]
    if not slots:
        return
    e2e = [items[i] for i in slots]
    targets: dict[str, int] = {}
    for item in e2e:
        target = _target_of(item)
        if target is not None:
            targets[target] = targets.get(target, 0) + 1
    config.stash[E2E_READERS] = targets
    order = list(targets)
    grouped = sorted(
        e2e, key=lambda it: -1 if (t := _target_of(it)) is None else order.index(t)
    )  # stable: a group keeps the tests' own order
    for slot, item in zip(slots, grouped, strict=True):
        items[slot] = item


def _target_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return None if callspec is None else callspec.params.get("target")
