"""One streaming pass per disk: the output is the source's active state plus exactly the fixes.

Oracles: qemu-img (convert to raw, check, map), e2fsck -fn and debugfs on the output's root
filesystem, and an independent path to the same result (``apply_fixes`` planning on its own
overlay, laid over the source bytes in memory).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import qemu_img, qemu_img_info
from tests.guest.conftest import debugfs_cat, e2fsck_clean, extract
from tests.migrate.conftest import MIB, raw_disk, sha256_files, to_format
from vmferry.migrate import migrate

ROOT_PART = (2048 * 512, 81920 * 512)  # p1 of tests/guest/conftest.build_guest_disk


def expected_content(src: Path, target: str) -> tuple[bytes, list[tuple[int, int]]]:
    """The source bytes with the guest fixes laid over them, planned independently."""
    from vmferry.guest.linux.fix import apply_fixes

    content = bytearray(src.read_bytes())
    with apply_fixes(src, target) as fr:
        assert fr.overlay is not None
        for off, data in fr.overlay.iter_changes():
            content[off : off + len(data)] = data
        return bytes(content), fr.overlay.changes()


@pytest.mark.usefixtures("fixed_clock")
@pytest.mark.parametrize(
    ("target", "ext", "qfmt"),
    [("kvm", "qcow2", "qcow2"), ("hyperv", "vhdx", "vhdx"), ("virtualbox", "vdi", "vdi")],
)
def test_output_is_source_plus_exactly_the_fixes(
    guest: Path, tmp_path: Path, target: str, ext: str, qfmt: str
) -> None:
    before = sha256_files(guest)
    result = migrate(guest, target, tmp_path / "out")
    assert result.status == "completed"
    assert sha256_files(guest) == before  # the source is never written
    out = tmp_path / "out" / f"guest.{ext}"
    assert qemu_img("check", "-f", qfmt, str(out)).returncode == 0
    flat = tmp_path / "flat.raw"
    qemu_img("convert", "-f", qfmt, "-O", "raw", str(out), str(flat))
    want, changes = expected_content(guest, target)
    assert changes, "the guest needed fixes; the test would prove nothing otherwise"
    got = flat.read_bytes()
    assert len(got) == len(want)
    assert got == want
    # the fixes are real: the root filesystem is clean and fstab no longer names /dev/sda1
    root = extract(flat, *ROOT_PART, tmp_path / "root.ext4")
    ok, log = e2fsck_clean(root)
    assert ok, log
    fstab = debugfs_cat(root, "/etc/fstab").decode()
    assert "/dev/sda1" not in fstab and "UUID=" in fstab
    disk = result.disks[0]
    assert disk.verify and disk.verify["ok"] and disk.digest
    assert disk.guest_after == {"bootable": True, "remaining_changes": [], "errors": []}


def test_output_stays_sparse(tmp_path: Path) -> None:
    """Holes and zero runs of the source are not written (no guest: plain conversion)."""
    raw = raw_disk(tmp_path / "data.raw", 256 * MIB, [(0, MIB), (200 * MIB, 2 * MIB)])
    src = to_format(raw, tmp_path / "data.vhdx", "vhdx")
    result = migrate(src, "kvm", tmp_path / "out")
    assert result.status == "completed"
    out = tmp_path / "out" / "data.qcow2"
    allocated = [
        e for e in json.loads(qemu_img("map", "--output=json", str(out)).stdout) if e["data"]
    ]
    assert sum(e["length"] for e in allocated) == 3 * MIB
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", str(raw), str(out)).returncode == 0
    assert result.disks[0].bytes_written == 3 * MIB
    assert qemu_img_info(out)["virtual-size"] == 256 * MIB


def test_kept_data_is_copied_from_every_layer_of_a_chain(tmp_path: Path) -> None:
    raw = raw_disk(tmp_path / "base.raw", 32 * MIB, [(0, 4 * MIB)])
    base = to_format(raw, tmp_path / "base.vmdk", "vmdk")
    child = tmp_path / "base-000001.vmdk"
    qemu_img("create", "-f", "vmdk", "-b", str(base), "-F", "vmdk", str(child))
    from tests.conftest import qemu_io

    qemu_io("vmdk", child, "write -P 0x5a 1M 2M", "write -P 0x11 20M 1M")
    result = migrate(child, "kvm", tmp_path / "out")
    out = tmp_path / "out" / "base.qcow2"  # named after the chain's base, not the snapshot
    assert qemu_img("compare", "-F", "qcow2", str(child), str(out)).returncode == 0
    assert len(result.disks[0].source["chain"]) == 2
    codes = {f.code for f in result.findings}
    assert "chain-flattened" in codes


@pytest.mark.usefixtures("fixed_clock")
def test_driver_injection_streams_through_the_overlay(tmp_path: Path) -> None:
    """A VMware guest whose initramfs has only pvscsi: the repair appends the virtio drivers to
    the initramfs (binary, issue 6); the migrated disk equals ``fix -o``'s output byte for byte
    and plans nothing more."""
    inject = pytest.importorskip("tests.guest.test_inject")
    from vmferry.guest.linux.fix import apply_fixes

    disk, _version = inject._guest(tmp_path / "g")
    result = migrate(disk.img, "kvm", tmp_path / "out")
    assert result.status == "completed", [f.to_json() for f in result.blockers]
    fixes = [f for f in result.findings if f.code == "fix-initramfs"]
    assert fixes and fixes[0].severity == "will-fix"
    assert result.target["boot_controller"] == "virtio-blk"
    assert result.disks[0].guest_after == {"bootable": True, "remaining_changes": [], "errors": []}
    ref = tmp_path / "ref.raw"
    apply_fixes(disk.img, "kvm", output=ref)
    out = tmp_path / "out" / f"{disk.img.stem}.qcow2"
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", str(ref), str(out)).returncode == 0


def test_source_date_epoch_makes_the_repair_reproducible(
    guest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two migrations of one guest are byte-equal under SOURCE_DATE_EPOCH, and the times the
    repair writes into the guest's ext4 are that epoch (debugfs reads them: not our code)."""
    import subprocess

    from tests.conftest import require_tool

    require_tool("debugfs")
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    outs = []
    for run in ("a", "b"):
        result = migrate(guest, "kvm", tmp_path / run, format="raw")
        assert result.status == "completed"
        assert any(c["path"] == "/etc/fstab" for c in result.disks[0].guest_changes)
        outs.append(Path(result.disks[0].output["path"]))
    assert outs[0].read_bytes() == outs[1].read_bytes()
    table = json.loads(subprocess.run(["sfdisk", "--json", str(outs[0])], capture_output=True,
                                      text=True, check=True).stdout)  # fmt: skip
    p1 = table["partitiontable"]["partitions"][0]
    fs = extract(outs[0], p1["start"] * 512, p1["size"] * 512, tmp_path / "p1.ext4")
    stat = subprocess.run(["debugfs", "-R", "stat /etc/fstab", str(fs)], capture_output=True,
                          text=True, check=True).stdout  # fmt: skip
    assert "mtime: 0x6553f100" in stat, stat
    ok, log = e2fsck_clean(fs)
    assert ok, log


def test_source_date_epoch_must_be_a_number(monkeypatch: pytest.MonkeyPatch) -> None:
    from vmferry.errors import UsageError
    from vmferry.guest.fs import clock

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(UsageError, match="SOURCE_DATE_EPOCH"):
        clock.now()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "86400")
    assert clock.now_ns() == 86400 * 10**9
    gens = {clock.generation(b"\1" * 16, ino) for ino in range(1, 1001)}
    assert len(gens) > 990  # derived, still distinct per inode
    assert clock.generation(b"\1" * 16, 12) == clock.generation(b"\1" * 16, 12)
    assert clock.generation(b"\1" * 16, 12) != clock.generation(b"\2" * 16, 12)
