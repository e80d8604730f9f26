"""Writers: libvirt validity, read → write → read round trips, Hyper-V generation rules, API."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.vm._models import pvscsi_bios_vm
from vmferry.errors import ConfigError
from vmferry.vm import convert, convert_config, read_config
from vmferry.vm.model import VmModel

from ._corpus import corpus_files, ids

SOURCES = [
    p
    for p in corpus_files("**/*")
    if p.suffix.lower() in (".vmx", ".ovf", ".vbox", ".conf", ".vmcx")
    or (p.suffix == ".xml" and p.parent.name in ("hyperv", "vmx2xmldata", "tests"))
]
SOURCES = [p for p in SOURCES if p.name != "data.vmcx"]
VALIDATE = shutil.which("virt-xml-validate")


def _basename(path: str | None) -> str | None:
    return None if path is None else re.split(r"[\\/:]", path)[-1]


@pytest.mark.skipif(
    VALIDATE is None, reason="virt-xml-validate (Debian libvirt-clients) not installed"
)
@pytest.mark.parametrize("src", SOURCES, ids=ids(SOURCES))
def test_libvirt_output_validates(src: Path, tmp_path: Path) -> None:
    files, _choices, _lost = convert_config(read_config(src), "kvm")
    ((_name, text),) = files.items()
    out = tmp_path / "domain.xml"
    out.write_text(text)
    proc = subprocess.run(
        [VALIDATE, str(out), "domain"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr


def _carried(vm: VmModel) -> dict:
    """The fields every writer with a reader carries; disks compared as a set plus the boot disk
    (readers list disks in their own format's order)."""
    boot = vm.boot_disk()
    return {
        "boot": None
        if boot is None
        else (boot.controller, boot.bus, boot.unit, _basename(boot.path)),
        "firmware": vm.firmware,
        "secure_boot": vm.secure_boot,
        "cpus": vm.cpus,
        "memory_mb": vm.memory_mb,
        "disks": sorted(
            (d.controller, d.controller_model, d.bus, d.unit, _basename(d.path) or "")
            for d in vm.disks
        ),
        "cdroms": sorted((c.controller, c.bus, c.unit) for c in vm.cdroms),
        "nics": [(n.mac, n.model) for n in vm.nics],
    }


ROUND_TRIP = [("kvm", "libvirt"), ("proxmox", "proxmox"), ("vmware", "vmx"), ("ovf", "ovf")]


@pytest.mark.parametrize(("target", "kind"), ROUND_TRIP)
@pytest.mark.parametrize("src", SOURCES, ids=ids(SOURCES))
def test_round_trip(src: Path, target: str, kind: str, tmp_path: Path) -> None:
    result = convert_config(read_config(src), target)
    ((name, text),) = result.files.items()
    out = tmp_path / name
    out.write_text(text)
    again = read_config(out, kind=kind)
    assert _carried(again) == _carried(result.model)
    assert again.unsupported == []  # our own output holds nothing our reader cannot place


def test_xen_ovf_round_trip_keeps_order_and_macs(corpus: Path, tmp_path: Path) -> None:
    src = read_config(corpus / "virt-v2v/tests/test-i-vmx-7.vmx")
    result = convert_config(src, "xen")
    ((name, text),) = result.files.items()
    (tmp_path / name).write_text(text)
    again = read_config(tmp_path / name)
    assert [_basename(d.path) for d in again.disks] == ["win2019.vhd", "win2019_1.vhd"]
    assert [n.mac for n in again.nics] == ["00:0c:29:46:9b:0b"]
    assert (again.firmware, again.secure_boot) == ("uefi", True)


def test_hyperv_gen1_for_bios_pvscsi() -> None:
    files, choices, _ = convert_config(pvscsi_bios_vm(), "hyperv")
    script = next(iter(files.values()))
    assert "-Generation 1 " in script
    boot = re.search(r"Add-VMHardDiskDrive .*'web\.vhdx'", script).group(0)
    assert "-ControllerType IDE -ControllerNumber 0 -ControllerLocation 0" in boot
    data = re.search(r"Add-VMHardDiskDrive .*'data\.vhdx'", script).group(0)
    assert "-ControllerType SCSI" in data
    assert "Add-VMScsiController" in script  # a Gen 1 VM has no SCSI controller by default
    assert "-StaticMacAddress '005056010203'" in script
    assert "Set-VMFirmware" not in script
    assert any("pvscsi 0:0 → ide/piix4 0:0" in c for c in choices)


def test_hyperv_gen2_for_uefi(corpus: Path) -> None:
    vm = read_config(corpus / "virt-v2v/tests/test-i-vmx-7.vmx")  # UEFI + secure boot, Windows
    files, choices, _ = convert_config(vm, "hyperv")
    script = next(iter(files.values()))
    assert "-Generation 2 " in script
    assert "ControllerType IDE" not in script
    assert re.search(
        r"Add-VMHardDiskDrive .*-ControllerType SCSI -ControllerNumber 0 -ControllerLocation 0"
        r" -Path \(Join-Path \$DiskDir 'win2019\.vhdx'\)",
        script,
    )
    assert (
        "Set-VMFirmware -VMName $VmName -EnableSecureBoot On -SecureBootTemplate MicrosoftWindows"
        in script
    )
    assert "UEFI guest → Hyper-V Generation 2" in choices


def test_hyperv_gen1_refuses_uefi_when_forced() -> None:
    vm = pvscsi_bios_vm()
    vm.firmware = "uefi"
    with pytest.raises(ConfigError):
        convert_config(vm, "hyperv", boot_controller="piix4")


def test_keep_macs_false_drops_macs() -> None:
    files, choices, _ = convert_config(pvscsi_bios_vm(), "kvm", keep_macs=False)
    assert "00:50:56:01:02:03" not in next(iter(files.values()))
    assert any("MAC 00:50:56:01:02:03 dropped" in c for c in choices)


def test_not_carried_lists_snapshots_secure_boot_and_unknowns(corpus: Path) -> None:
    vm = read_config(corpus / "proxmox-qemu-server/src/test/parse-config-input/snapshots.conf")
    _, _, lost = convert_config(vm, "vmware")
    assert any("snapshot(s)" in x for x in lost)
    assert any("unused0" in x for x in lost)
    sb = read_config(corpus / "virt-v2v/tests/test-i-vmx-7.vmx")
    sb.firmware = "bios"
    _, _, lost = convert_config(sb, "hyperv")
    assert any(x.startswith("secure boot") for x in lost)


def test_disk_over_target_limit_is_reported() -> None:
    vm = pvscsi_bios_vm()
    vm.disks[0].size_bytes = 3 * 1024**4
    _, _, lost = convert_config(vm, "azure")
    assert any("exceeds the 2040 GiB" in x for x in lost)


def test_unknown_target() -> None:
    with pytest.raises(ConfigError, match="unknown target"):
        convert_config(pvscsi_bios_vm(), "bhyve")


def test_api_convert_writes_and_refuses_overwrite(corpus: Path, tmp_path: Path) -> None:
    src = corpus / "virt-v2v/tests/test-i-vmx-4.vmx"
    result = convert(src, "kvm", tmp_path / "out")
    out = tmp_path / "out" / "Windows 7 x64.xml"
    assert out.read_text() == result.files["Windows 7 x64.xml"]
    assert (
        f"{tmp_path / 'out'}/Windows-7-x64.qcow2" in out.read_text()
        or f"{tmp_path / 'out'}/Windows 7 x64.qcow2" not in out.read_text()
    )
    with pytest.raises(ConfigError, match="overwrite"):
        convert(src, "kvm", tmp_path / "out")


def test_api_file_names_cannot_escape(tmp_path: Path) -> None:
    f = tmp_path / "evil.vmx"
    f.write_text('displayName = "../../escape"\nmemSize = "64"\n')
    convert(f, "vmware", tmp_path / "out")
    (written,) = (tmp_path / "out").iterdir()
    assert "/" not in written.name and written.name.endswith("escape.vmx")
    assert not (tmp_path / "escape.vmx").exists()


def test_hyperv_gen1_boot_disk_is_on_ide_whatever_the_model_says() -> None:
    """A Generation 1 VM boots from IDE only: the writer never attaches its boot disk to SCSI."""
    from vmferry.vm.writers.hyperv import write_hyperv

    vm = pvscsi_bios_vm()
    vm.disks[0].boot_order = 1
    (script,) = write_hyperv(vm).values()
    boot = re.search(r"Add-VMHardDiskDrive .*'web\.vmdk'", script).group(0)
    assert "-ControllerType IDE -ControllerNumber 0 -ControllerLocation 0" in boot


@pytest.mark.parametrize(("firmware", "generation"), [("bios", "V1"), ("uefi", "V2")])
def test_azure_gets_an_az_cli_script(firmware: str, generation: str, tmp_path: Path) -> None:
    """Azure imports no config: page-blob upload, managed disks, ``az vm create`` from them."""
    vm = pvscsi_bios_vm()
    vm.firmware = firmware
    vm.name = "web server"
    files, _, _ = convert_config(vm, "azure")
    ((name, script),) = files.items()
    assert name == "web-server.azure.sh"
    bash = shutil.which("bash")
    if bash:
        (tmp_path / name).write_text(script)
        subprocess.run([bash, "-n", str(tmp_path / name)], check=True)
    lines = script.splitlines()
    uploads = [ln for ln in lines if ln.startswith("az storage blob upload")]
    assert len(uploads) == 2 and all("--type page" in ln for ln in uploads)
    assert "--name web.vhd " in uploads[0] and "--name data.vhd " in uploads[1]
    (os_disk,) = [ln for ln in lines if "az disk create" in ln and "--os-type" in ln]
    assert f"--hyper-v-generation {generation}" in os_disk and '/"web.vhd ' in os_disk
    (create,) = [ln for ln in lines if ln.startswith("az vm create")]
    assert "--attach-os-disk web-server-osdisk" in create
    assert "--attach-data-disks web-server-disk1" in create
    assert "New-VM" not in script  # no Hyper-V cmdlet: Azure runs none


def test_xen_ovf_round_trips_the_xen_vbd(tmp_path: Path) -> None:
    """The xen OVF places the boot VBD on IDE (all OVF can say); reading it back names the
    disk the Linux guest really uses, xen-blkfront, as the migration result does."""
    files, _, _ = convert_config(pvscsi_bios_vm(), "xen")
    ((name, text),) = files.items()
    assert "<rasd:ResourceType>5</rasd:ResourceType>" in text.replace("ovf:", "")
    (tmp_path / name).write_text(text)
    model = read_config(tmp_path / name)
    assert [d.controller_model for d in model.disks] == ["xen-blkfront", "xen-blkfront"]
    vmware = tmp_path / "vmw.ovf"
    vmware.write_text(next(iter(convert_config(pvscsi_bios_vm(), "ovf").files.values())))
    assert read_config(vmware).disks[0].controller_model != "xen-blkfront"
