"""The functions the CLI calls: ``show`` (and its JSON) and ``convert``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmferry.errors import ConfigError
from vmferry.vm import convert, show


def test_show_json_keys(corpus: Path) -> None:
    vm = show(corpus / "libvirt/tests/vmx2xmldata/esx-in-the-wild-16.vmx")
    doc = json.loads(json.dumps(vm.to_json()))
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
        assert key in doc
    assert (doc["firmware"], doc["secure_boot"]) == ("uefi", True)
    assert doc["disks"] == [
        {
            **doc["disks"][0],
            "controller": "nvme",
            "controller_model": "nvme",
            "bus": 0,
            "unit": 0,
            "path": "Auto-esx8.0-rhel9.4-efi-nvme-disk.vmdk",
        }
    ]
    assert doc["nics"][0]["mac"] == "00:50:56:a0:a6:7e" and doc["nics"][0]["model"] == "vmxnet3"


def test_show_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config"):
        show(tmp_path / "nope.vmx")


def test_show_unknown_content(tmp_path: Path) -> None:
    f = tmp_path / "mystery"
    f.write_bytes(b"\x7fELF\x02\x01\x01")
    with pytest.raises(ConfigError, match="cannot tell"):
        show(f)


def test_convert_without_out_writes_nothing(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    files, choices, not_carried = convert(corpus / "virt-v2v/tests/test-i-vmx-3.vmx", "proxmox")
    assert list(files) == ["RHEL-7.1-UEFI.conf"]
    assert "bios: ovmf" in files["RHEL-7.1-UEFI.conf"]
    assert list(tmp_path.iterdir()) == []
    assert choices and isinstance(not_carried, list)
