"""``migrate --vmid``: Proxmox's VM id names the disks, the config, the notes, JSON and resume.

Sources are bare data disks (no guest: nothing to inspect, so each migration takes a second);
qemu-img is the oracle that the renamed outputs hold the source's bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import qemu_img
from tests.migrate.conftest import MIB, libvirt_xml, raw_disk
from vmferry.cli.main import cli
from vmferry.errors import UsageError
from vmferry.migrate import migrate
from vmferry.migrate.package import config_names, render_config
from vmferry.migrate.plan import build_plan
from vmferry.migrate.state import STATE_NAME


def two_disk_vm(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    boot = raw_disk(src / "boot.raw", 8 * MIB, [(0, MIB), (5 * MIB, 4096)])
    data = raw_disk(src / "data.raw", 4 * MIB, [(MIB, 2 * MIB)])
    xml = src / "two.xml"
    xml.write_text(libvirt_xml("two", [(boot, "raw", "virtio"), (data, "raw", "virtio")]))
    return xml


def run(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, ["migrate", *args], catch_exceptions=False)


# --- the plan (names, config, notes) ---------------------------------------------------------


def test_plan_names_disks_and_config_after_the_vmid(tmp_path: Path) -> None:
    plan = build_plan(two_disk_vm(tmp_path), "proxmox", tmp_path / "out", vmid=4242)
    try:
        assert plan.vmid == 4242
        assert [d.out_name for d in plan.disks] == ["vm-4242-disk-0.qcow2", "vm-4242-disk-1.qcow2"]
        assert config_names(plan) == ["4242.conf"]
        files, notes = render_config(plan)
        conf = files["4242.conf"]
        assert "virtio0: local:4242/vm-4242-disk-0.qcow2,size=8M" in conf
        assert "virtio1: local:4242/vm-4242-disk-1.qcow2,size=4M" in conf
        assert "100" not in conf
        (note,) = notes
        assert "4242.conf" in note and "/var/lib/vz/images/4242/" in note
    finally:
        plan.close()


def test_default_vmid_is_100_and_raw_disks_end_dot_raw(tmp_path: Path) -> None:
    """A Proxmox directory storage accepts .raw/.qcow2/.vmdk volumes only: never .img."""
    plan = build_plan(two_disk_vm(tmp_path), "proxmox", tmp_path / "out", format="raw")
    try:
        assert plan.vmid == 100
        assert [d.out_name for d in plan.disks] == ["vm-100-disk-0.raw", "vm-100-disk-1.raw"]
        assert "virtio0: local:100/vm-100-disk-0.raw," in render_config(plan)[0]["100.conf"]
    finally:
        plan.close()


def test_other_targets_have_no_vmid(tmp_path: Path) -> None:
    plan = build_plan(two_disk_vm(tmp_path), "kvm", tmp_path / "out")
    try:
        assert plan.vmid is None
        assert [d.out_name for d in plan.disks] == ["boot.qcow2", "data.qcow2"]
    finally:
        plan.close()


@pytest.mark.parametrize(
    ("target", "vmid", "message"),
    [("kvm", 4242, "Proxmox targets only, not kvm"), ("azure", 100, "not azure"),
     ("proxmox", 99, "outside Proxmox's range"), ("proxmox", 10**9, "outside"),
     ("proxmox", "4242", "whole number"), ("proxmox", True, "whole number")],
)  # fmt: skip
def test_bad_vmid_is_a_usage_error_before_the_source_is_read(
    tmp_path: Path, target: str, vmid: object, message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        build_plan(tmp_path / "no-such-source.raw", target, tmp_path / "out", vmid=vmid)  # type: ignore[arg-type]


# --- the command line --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [(["--to", "proxmox", "--vmid", "99"], "outside Proxmox's range 100-999999999"),
     (["--to", "proxmox", "--vmid", "abc"], "not a VMID"),
     (["--to", "proxmox", "--vmid", "0150"], "leading zero"),
     (["--to", "kvm", "--vmid", "150"], "only a Proxmox target has a VMID")],
)  # fmt: skip
def test_cli_refuses_a_bad_vmid_with_exit_2(tmp_path: Path, args: list[str], says: str) -> None:
    src = raw_disk(tmp_path / "d.raw", MIB, [(0, 4096)])
    res = run(str(src), "-o", str(tmp_path / "out"), *args)
    assert res.exit_code == 2, res.output
    assert "--vmid" in res.output and says in res.output
    assert not (tmp_path / "out").exists()


# --- whole migrations (need migrate(vmid=...) in migrate/run.py) -----------------------------


def test_api_migrate_with_a_vmid(tmp_path: Path) -> None:
    xml = two_disk_vm(tmp_path)
    out = tmp_path / "out"
    result = migrate(xml, "proxmox", out, vmid=4242)
    assert result.status == "completed"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [STATE_NAME, "4242.conf", "vm-4242-disk-0.qcow2", "vm-4242-disk-1.qcow2"]
    )
    assert result.config_path == out / "4242.conf"
    for n, src in enumerate(("boot.raw", "data.raw")):
        disk = out / f"vm-4242-disk-{n}.qcow2"
        same = qemu_img("compare", "-f", "raw", "-F", "qcow2", str(xml.parent / src), str(disk))
        assert same.returncode == 0, same.stdout
    conf = result.config_path.read_text()
    assert "virtio0: local:4242/vm-4242-disk-0.qcow2," in conf
    assert "virtio1: local:4242/vm-4242-disk-1.qcow2," in conf
    assert any("4242.conf" in n and "images/4242/" in n for n in result.notes)
    doc = result.to_json()
    assert doc["target"]["vmid"] == 4242
    assert json.loads((out / STATE_NAME).read_text())["vmid"] == 4242


def test_cli_json_carries_the_vmid(tmp_path: Path) -> None:
    src = raw_disk(tmp_path / "d.raw", 2 * MIB, [(0, MIB)])
    res = run(str(src), "--to", "proxmox", "--vmid", "777", "-o", str(tmp_path / "out"), "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["target"]["vmid"] == 777
    assert doc["config_path"] == str(tmp_path / "out" / "777.conf")
    assert doc["disks"][0]["output"]["name"] == "vm-777-disk-0.qcow2"
    other = run(str(src), "--to", "kvm", "-o", str(tmp_path / "kvm"), "--json")
    assert json.loads(other.output)["target"]["vmid"] is None


def test_resume_refuses_another_vmid(tmp_path: Path) -> None:
    src = raw_disk(tmp_path / "d.raw", 2 * MIB, [(0, MIB)])
    out = tmp_path / "out"
    migrate(src, "proxmox", out, vmid=4242)
    (out / "4242.conf").unlink()  # as if killed before the config was written
    state = json.loads((out / STATE_NAME).read_text())
    state["status"] = "running"
    (out / STATE_NAME).write_text(json.dumps(state))
    with pytest.raises(UsageError, match=r"proxmox \[qcow2\] VMID 4242, not .*VMID 4243") as info:
        migrate(src, "proxmox", out, resume=True, vmid=4243)
    assert "--vmid" in (info.value.hint or "")
    with pytest.raises(UsageError, match=r"VMID 4242, not proxmox \[qcow2\] VMID 100"):
        migrate(src, "proxmox", out, resume=True)  # no --vmid: the default, another VM
    res = run(str(src), "--to", "proxmox", "--vmid", "4243", "-o", str(out), "--resume")
    assert res.exit_code == 64 and "VMID 4242" in res.output
    assert sorted(p.name for p in out.iterdir()) == [STATE_NAME, "vm-4242-disk-0.qcow2"]
    done = migrate(src, "proxmox", out, resume=True, vmid=4242)  # the same id finishes it
    assert done.status == "completed" and done.disks[0].status == "resumed"
    assert (out / "4242.conf").is_file()
