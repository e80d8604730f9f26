"""The writer a target gets is data (``TargetProfile.writer``), never its name."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmferry.errors import ConfigError, UsageError
from vmferry.vm import TARGETS, convert_config
from vmferry.vm.model import Disk, Nic, VmModel
from vmferry.vm.translate import translate
from vmferry.vm.writers import WRITERS, render_target_config
from vmferry.vm.writers.ovf import OVF, VSSD

WRITER_OF = {
    "kvm": "libvirt",
    "proxmox": "proxmox",
    "hyperv": "hyperv",
    "hyperv-gen2": "hyperv",
    "vmware": "vmx",
    "xen": "ovf",
    "virtualbox": "vbox",
    "azure": "azure",
    "ovf": "ovf",
}


def _vm(memory_mb: int = 2048) -> VmModel:
    return VmModel(
        name="web",
        firmware="bios",
        cpus=2,
        memory_mb=memory_mb,
        disks=[Disk("web.vmdk", "scsi", "pvscsi", 0, 0), Disk("data.vmdk", "scsi", "pvscsi", 0, 1)],
        nics=[Nic("00:50:56:01:02:03", "vmxnet3", "VM Network")],
        source_format="vmx",
    )


def test_every_target_names_a_known_writer() -> None:
    assert {name: t.writer for name, t in TARGETS.items()} == WRITER_OF
    assert set(WRITER_OF.values()) == set(WRITERS)


def _system_type(files: dict[str, str]) -> str | None:
    ((_, text),) = files.items()
    root = ET.fromstring(text)
    node = root.find(f".//{{{OVF}}}System/{{{VSSD}}}VirtualSystemType")
    return None if node is None else node.text


@pytest.mark.parametrize(("target", "system_type"), [("xen", "xen-3.0-unknown"), ("ovf", "vmx-14")])
def test_ovf_system_type_comes_from_the_profile(target: str, system_type: str) -> None:
    tr = translate(_vm(), target)
    assert _system_type(render_target_config(tr.model, tr.target, disk_dir="/d")) == system_type
    # a profile under another name but with the same facts gets the same descriptor
    renamed = dataclasses.replace(tr.target, name=f"{target}-renamed")
    assert _system_type(render_target_config(tr.model, renamed, disk_dir="/d")) == system_type


def test_azure_script_is_chosen_by_the_writer_field_not_the_name(tmp_path: Path) -> None:
    tr = translate(_vm(), "azure")
    renamed = dataclasses.replace(tr.target, name="azure-stack-hub")
    ((name, script),) = render_target_config(tr.model, renamed, disk_dir="/d").items()
    assert name == "web.azure.sh" and "az vm create" in script and "New-VM" not in script
    bash = shutil.which("bash")
    if bash:
        (tmp_path / name).write_text(script)
        subprocess.run([bash, "-n", str(tmp_path / name)], check=True)
    # and a Hyper-V-writer profile named "azure" gets the Hyper-V script: the name decides nothing
    as_hyperv = dataclasses.replace(TARGETS["hyperv"], name="azure")
    ((name, script),) = render_target_config(tr.model, as_hyperv, disk_dir="/d").items()
    assert name.endswith(".ps1") and "New-VM" in script


def test_an_unknown_writer_is_a_config_error() -> None:
    bogus = dataclasses.replace(TARGETS["kvm"], writer="bhyve")
    with pytest.raises(ConfigError, match="bhyve") as info:
        render_target_config(_vm(), bogus, disk_dir="/d")
    assert "libvirt" in (info.value.hint or "")


@pytest.mark.parametrize("target", sorted(set(TARGETS) - {"proxmox"}))
def test_a_vmid_is_refused_by_every_writer_but_proxmox(target: str) -> None:
    vm = _vm()
    vm.firmware = "uefi"  # every target boots UEFI guests
    tr = translate(vm, target)
    with pytest.raises(UsageError, match="Proxmox"):
        render_target_config(tr.model, tr.target, disk_dir="/d", vmid=200)


@pytest.mark.parametrize(
    ("target", "memory", "expected"),
    [("azure", 1023, 1024), ("hyperv", 1023, 1024), ("hyperv-gen2", 511, 512),
     ("kvm", 1023, 1023), ("proxmox", 1023, 1023), ("vmware", 1023, 1023)],
)  # fmt: skip
def test_memory_step_is_a_target_fact(target: str, memory: int, expected: int) -> None:
    """Azure kept Hyper-V's even-MiB rounding when it got its own writer."""
    vm = _vm(memory)
    if target == "hyperv-gen2":
        vm.firmware = "uefi"
    files, choices, _ = convert_config(vm, target)
    rounded = [c for c in choices if c.startswith("memory rounded up")]
    assert rounded == ([f"memory rounded up to {expected} MiB (Hyper-V needs a multiple of 2)"]
                       if expected != memory else [])  # fmt: skip
    assert convert_config(vm, target).model.memory_mb == expected
    if target == "azure":
        ((_, script),) = files.items()
        assert f"{expected} MiB" in script
