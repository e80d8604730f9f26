"""`vmferry vm show|convert` on real configs from other projects."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.conftest import run
from vmferry.cli.main import cli


def test_vm_show_json_keys(corpus: Path) -> None:
    vmx = corpus / "virt-v2v" / "tests" / "test-i-vmx-1.vmx"
    r = CliRunner().invoke(cli, ["vm", "show", "--json", str(vmx)])
    assert r.exit_code == 0, r.output
    vm = json.loads(r.output)
    for key in (
        "name",
        "firmware",
        "secure_boot",
        "cpus",
        "memory_mb",
        "disks",
        "nics",
        "unsupported",
    ):
        assert key in vm
    assert {d["controller"] for d in vm["disks"]} == {"scsi"}
    assert vm["nics"][0]["mac"] == "00:0c:29:36:ef:31"


def test_vm_convert_to_libvirt_validates(corpus: Path, tmp_path: Path) -> None:
    if shutil.which("virt-xml-validate") is None:
        pytest.skip("virt-xml-validate not installed (libvirt-clients)")
    vmx = corpus / "virt-v2v" / "tests" / "test-i-vmx-2.vmx"
    r = CliRunner().invoke(cli, ["vm", "convert", str(vmx), "--to", "kvm", "-o", str(tmp_path)])
    assert r.exit_code == 0, r.output
    (xml,) = tmp_path.glob("*.xml")
    run("virt-xml-validate", str(xml), "domain")


def test_vm_show_bad_config_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.vmx"
    bad.write_bytes(b"\x00\xff garbage")
    r = CliRunner().invoke(cli, ["vm", "show", str(bad)])
    assert r.exit_code == 7
    assert "Traceback" not in r.output
