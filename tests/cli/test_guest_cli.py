"""`vmferry inspect` and `vmferry fix` from the command line, judged by e2fsprogs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from click.testing import CliRunner

from tests.guest.conftest import (
    blkid,
    build_guest_disk,
    debugfs_cat,
    e2fsck_clean,
    extract,
    vmware_root,
)
from vmferry.cli.main import cli


def test_inspect_then_fix_to_new_image(tmp_path: Path) -> None:
    disk = build_guest_disk(tmp_path, vmware_root(tmp_path))
    before = hashlib.sha256(disk.img.read_bytes()).hexdigest()
    runner = CliRunner()
    r = runner.invoke(cli, ["inspect", "--json", str(disk.img)])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["os"]["family"] == "debian"
    assert {ref["device"] for ref in report["fstab"]} >= {"/dev/sda1"}

    out = tmp_path / "fixed.qcow2"
    r = runner.invoke(cli, ["fix", str(disk.img), "--target", "kvm", "-o", str(out), "--json"])
    # the fixture's initramfs holds only the VMware pvscsi stack: the fix still says so
    result = json.loads(r.output)
    assert r.exit_code == (0 if result["bootable"] else 9)
    assert "/etc/fstab" in {c["path"] for c in result["changes"]}
    assert hashlib.sha256(disk.img.read_bytes()).hexdigest() == before  # source untouched

    raw = tmp_path / "fixed.raw"
    assert runner.invoke(cli, ["convert", str(out), str(raw)]).exit_code == 0
    start, size = disk.parts[1]
    part = extract(raw, start, size, tmp_path / "p1")
    clean, log = e2fsck_clean(part)
    assert clean, log
    fstab = debugfs_cat(part, "/etc/fstab").decode()
    assert f"UUID={blkid(part)['UUID']}" in fstab and "/dev/sda1" not in fstab


def test_fix_needs_a_destination(tmp_path: Path) -> None:
    img = tmp_path / "x.raw"
    img.write_bytes(bytes(1 << 20))
    r = CliRunner().invoke(cli, ["fix", str(img), "--target", "kvm"])
    assert r.exit_code == 64 and "say where" in r.output


def test_fix_refuses_a_controller_the_target_does_not_boot_from(tmp_path: Path) -> None:
    disk = build_guest_disk(tmp_path, vmware_root(tmp_path))
    r = CliRunner().invoke(
        cli, ["fix", str(disk.img), "--target", "hyperv", "--controller", "nvme", "--dry-run"]
    )
    assert r.exit_code == 64, r.output
    assert "nvme" in r.output
