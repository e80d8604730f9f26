"""Proxmox VMIDs: Proxmox's range and spelling, the names they give, ``vm convert --vmid``."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.vm._models import pvscsi_bios_vm
from vmferry.cli.main import cli
from vmferry.errors import UsageError
from vmferry.vm import convert, convert_config, read_config
from vmferry.vm.model import Disk
from vmferry.vm.writers.proxmox import check_vmid, parse_vmid, write_proxmox


@pytest.mark.parametrize("vmid", [100, 101, 4242, 999_999_999])
def test_valid_vmids(vmid: int) -> None:
    assert check_vmid(vmid) == vmid
    assert parse_vmid(str(vmid)) == vmid
    assert parse_vmid(f" {vmid}\n") == vmid


@pytest.mark.parametrize(
    ("value", "message"),
    [(99, "outside"), (0, "outside"), (-100, "outside"), (1_000_000_000, "outside"),
     (True, "whole number"), ("150", "whole number"), (150.0, "whole number"),
     (None, "whole number")],
)  # fmt: skip
def test_invalid_vmids(value: object, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        check_vmid(value)


@pytest.mark.parametrize(
    ("text", "message"),
    [("99", "outside"), ("0", "outside"), ("1000000000", "outside"), ("9" * 5000, "outside"),
     ("0150", "leading zero"), ("-150", "not a VMID"), ("+150", "not a VMID"),
     ("15O", "not a VMID"), ("", "not a VMID"), ("1e3", "not a VMID"),
     ("\u0661\u0665\u0660", "not a VMID")],  # Arabic-Indic digits: isdigit(), not a VMID
)  # fmt: skip
def test_invalid_vmid_text(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_vmid(text)


def test_writer_names_conf_and_volumes_after_the_vmid() -> None:
    vm = pvscsi_bios_vm()
    vm.disks = [Disk("vm-4242-disk-0.qcow2", "scsi", "virtio-scsi", 0, 0, boot_order=1)]
    ((name, conf),) = write_proxmox(vm, "local", 4242).items()
    assert name == "4242.conf"
    assert "scsi0: local:4242/vm-4242-disk-0.qcow2\n" in conf
    with pytest.raises(UsageError):
        write_proxmox(vm, "local", 42)


def test_convert_config_with_a_vmid_renames_the_disks(tmp_path: Path) -> None:
    files, choices, lost = convert_config(pvscsi_bios_vm(), "proxmox", vmid=4242)
    ((name, conf),) = files.items()
    assert name == "4242.conf"
    assert "scsi0: local:4242/vm-4242-disk-0.qcow2" in conf
    assert "scsi1: local:4242/vm-4242-disk-1.qcow2" in conf
    assert any("web.qcow2 → file vm-4242-disk-0.qcow2" in c for c in choices)
    assert any("local:4242/<file>" in x and "images/4242/" in x for x in lost)
    # vmferry's Proxmox reader takes the config back, volumes and all
    (tmp_path / name).write_text(conf)
    back = read_config(tmp_path / name)
    assert [d.path for d in back.disks] == ["local:4242/vm-4242-disk-0.qcow2",
                                            "local:4242/vm-4242-disk-1.qcow2"]  # fmt: skip


def test_convert_config_without_a_vmid_is_unchanged() -> None:
    files, _, lost = convert_config(pvscsi_bios_vm(), "proxmox")
    ((name, conf),) = files.items()
    assert name == "web.conf" and "scsi0: local:web.qcow2" in conf
    assert any("'local:<file>'" in x for x in lost)


def test_convert_config_refuses_a_vmid_for_another_target() -> None:
    with pytest.raises(UsageError, match="Proxmox targets only, not kvm"):
        convert_config(pvscsi_bios_vm(), "kvm", vmid=4242)
    with pytest.raises(UsageError, match="outside"):
        convert_config(pvscsi_bios_vm(), "proxmox", vmid=7)


def _vmx(tmp_path: Path) -> Path:
    src = tmp_path / "web.vmx"
    src.write_text(
        'displayName = "web"\nmemSize = "1024"\nnumvcpus = "1"\n'
        'scsi0.present = "TRUE"\nscsi0.virtualDev = "pvscsi"\n'
        'scsi0:0.present = "TRUE"\nscsi0:0.fileName = "web.vmdk"\n'
    )
    return src


def test_api_convert_writes_the_vmid_conf(tmp_path: Path) -> None:
    result = convert(_vmx(tmp_path), "proxmox", tmp_path / "out", vmid=123)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["123.conf"]
    assert "local:123/vm-123-disk-0.qcow2" in result.files["123.conf"]


def test_cli_vm_convert_vmid(tmp_path: Path) -> None:
    src = _vmx(tmp_path)
    run = CliRunner().invoke
    ok = run(cli, ["vm", "convert", str(src), "--to", "proxmox", "--vmid", "123"])
    assert ok.exit_code == 0, ok.output
    assert "# --- 123.conf ---" in ok.output and "local:123/vm-123-disk-0.qcow2" in ok.output
    for bad, says in (("99", "outside Proxmox's range 100-999999999"), ("abc", "not a VMID"),
                      ("0123", "leading zero")):  # fmt: skip
        res = run(cli, ["vm", "convert", str(src), "--to", "proxmox", "--vmid", bad])
        assert res.exit_code == 2 and "--vmid" in res.output and says in res.output, res.output
    res = run(cli, ["vm", "convert", str(src), "--to", "kvm", "--vmid", "123"])
    assert res.exit_code == 2 and "only a Proxmox target has a VMID" in res.output
