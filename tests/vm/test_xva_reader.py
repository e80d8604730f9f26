"""XVA ova.xml reader on synthetic exports (no third-party XVA sample exists in the corpus)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from vmferry.errors import ConfigError
from vmferry.vm.readers import read_config


def _s(**fields: object) -> str:
    def val(v: object) -> str:
        if isinstance(v, dict):
            return (
                "<value><struct>"
                + "".join(f"<member><name>{k}</name>{val(x)}</member>" for k, x in v.items())
                + "</struct></value>"
            )
        if isinstance(v, list):
            return "<value><array><data>" + "".join(val(x) for x in v) + "</data></array></value>"
        return f"<value>{v}</value>"

    return val(fields)


def _ova_xml(mem: str = "2147483648") -> str:
    objs = [
        {
            "class": "VM",
            "id": "Ref:1",
            "snapshot": {
                "name_label": "web01",
                "uuid": "6f1c0b1e-0000-4000-8000-000000000001",
                "memory_static_max": mem,
                "VCPUs_max": "2",
                "HVM_boot_params": {"order": "cd", "firmware": "uefi"},
                "platform": {"secureboot": "true"},
                "is_a_snapshot": "false",
                "VBDs": ["Ref:2", "Ref:3"],
                "VIFs": ["Ref:5"],
            },
        },
        {
            "class": "VBD",
            "id": "Ref:2",
            "snapshot": {"userdevice": "0", "type": "Disk", "VDI": "Ref:4", "bootable": "true"},
        },
        {
            "class": "VBD",
            "id": "Ref:3",
            "snapshot": {"userdevice": "3", "type": "CD", "VDI": "OpaqueRef:NULL"},
        },
        {"class": "VDI", "id": "Ref:4", "snapshot": {"virtual_size": "10737418240"}},
        {
            "class": "VIF",
            "id": "Ref:5",
            "snapshot": {"MAC": "de:ad:be:ef:00:01", "network": "Ref:6"},
        },
        {"class": "network", "id": "Ref:6", "snapshot": {"name_label": "Pool-wide network"}},
    ]
    return _s(version={"hostname": "xs"}, objects=objs)


def test_xva_ova_xml(tmp_path: Path) -> None:
    f = tmp_path / "ova.xml"
    f.write_text(_ova_xml())
    vm = read_config(f)
    assert (vm.name, vm.memory_mb, vm.cpus, vm.firmware, vm.secure_boot) == (
        "web01",
        2048,
        2,
        "uefi",
        True,
    )
    assert [(d.controller, d.unit, d.size_bytes, d.boot_order) for d in vm.disks] == [
        ("xen", 0, 10737418240, 1)
    ]
    assert [(c.controller, c.unit) for c in vm.cdroms] == [("xen", 3)]
    assert [(n.mac, n.network) for n in vm.nics] == [("de:ad:be:ef:00:01", "Pool-wide network")]


def test_xva_tar(tmp_path: Path) -> None:
    data = _ova_xml().encode()
    f = tmp_path / "vm.xva"
    with tarfile.open(f, "w") as tar:
        info = tarfile.TarInfo("ova.xml")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    vm = read_config(f, kind="xva")
    assert vm.name == "web01"


def test_xva_huge_memory(tmp_path: Path) -> None:
    f = tmp_path / "ova.xml"
    f.write_text(_ova_xml(mem="9" * 30))
    with pytest.raises(ConfigError):
        read_config(f)
