"""Every kind of SOURCE: configs written by hand (and corpus ones), OVA, Hyper-V folder, images."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.conftest import qemu_img, qemu_io, require_tool
from tests.migrate.conftest import libvirt_xml, to_format, tree_digest, vmx_text
from vmferry.errors import ConfigError
from vmferry.migrate import migrate
from vmferry.migrate.source import host_name, resolve_source


@pytest.mark.parametrize(
    ("stored", "name"),
    [
        (r"C:\ProgramData\Hyper-V\web\Virtual Hard Disks\web.vhdx", "web.vhdx"),
        ("[datastore1] web01/web01-000001.vmdk", "web01-000001.vmdk"),
        ("local:100/vm-100-disk-0.qcow2", "vm-100-disk-0.qcow2"),
        ("/var/lib/libvirt/images/a.qcow2", "a.qcow2"),
        ("disk.vmdk", "disk.vmdk"),
    ],
)
def test_host_name(stored: str, name: str) -> None:
    assert host_name(stored) == name


def test_a_config_cannot_point_outside_the_vm_folder(tmp_path: Path) -> None:
    vm = tmp_path / "vm"
    vm.mkdir()
    (vm / "evil.vmx").write_text(vmx_text("evil", "/etc/passwd"))
    with pytest.raises(ConfigError, match="outside the VM's folder") as info:
        resolve_source(vm / "evil.vmx")
    assert info.value.hint == "--allow-dir /etc"
    (vm / "gone.vmx").write_text(vmx_text("gone", "/nonexistent/disk.vmdk"))
    with pytest.raises(ConfigError, match="not found"):
        resolve_source(vm / "gone.vmx")


def test_allow_dir_opens_disks_elsewhere(guest: Path, tmp_path: Path) -> None:
    """libvirt keeps disks in /var/lib/libvirt/images, away from its XML: --allow-dir."""
    images = tmp_path / "images"
    images.mkdir()
    disk = guest.rename(images / "web.raw")
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "web.xml").write_text(libvirt_xml("web", [(disk, "raw", "virtio")]))
    with pytest.raises(ConfigError, match="outside"):
        migrate(etc / "web.xml", "kvm", tmp_path / "out", dry_run=True)
    result = migrate(etc / "web.xml", "kvm", tmp_path / "out", dry_run=True, allowed_dirs=[images])
    assert result.disks[0].source["label"] == str(disk)


def test_vmx_with_snapshot_chain_to_proxmox(guest: Path, tmp_path: Path) -> None:
    vm = tmp_path / "vm"
    vm.mkdir()
    base = to_format(guest, vm / "web.vmdk", "vmdk")
    child = vm / "web-000001.vmdk"
    qemu_img("create", "-f", "vmdk", "-b", "web.vmdk", "-F", "vmdk", str(child))
    qemu_io("vmdk", child, "write -P 0x77 60M 1M")  # past the partitions: the snapshot's data
    (vm / "web.vmx").write_text(vmx_text("web", "web-000001.vmdk"))
    before = tree_digest(vm)
    result = migrate(vm / "web.vmx", "proxmox", tmp_path / "out", keep_macs=True)
    assert result.status == "completed"
    assert tree_digest(vm) == before
    # named as a Proxmox directory storage names VM 100's first disk (images/100/...)
    out = tmp_path / "out" / "vm-100-disk-0.qcow2"
    assert result.config_path == tmp_path / "out" / "100.conf"
    conf = result.config_path.read_text()
    assert "virtio0: local:100/vm-100-disk-0.qcow2," in conf
    assert "00:50:56:01:02:03".upper() in conf.upper()
    # the snapshot's data made it (the guest fixes are elsewhere, inside the root filesystem)
    assert qemu_img("compare", "-F", "qcow2", str(child), str(out), check=False).returncode == 1
    flat = tmp_path / "flat.raw"
    qemu_img("convert", "-O", "raw", str(out), str(flat))
    with open(flat, "rb") as f:
        f.seek(60 << 20)
        assert f.read(1 << 20) == b"\x77" * (1 << 20)
    assert {f.code for f in result.findings} >= {"chain-flattened"}
    assert base.exists()


def test_libvirt_two_disks_to_hyperv(guest: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.qcow2"
    qemu_img("create", "-f", "qcow2", str(data), "32M")
    qemu_io("qcow2", data, "write -P 0x42 1M 1M")
    xml = tmp_path / "vm.xml"
    xml.write_text(libvirt_xml("lv", [(guest, "raw", "virtio"), (data, "qcow2", "virtio")]))
    result = migrate(xml, "hyperv", tmp_path / "out")
    assert result.status == "completed"
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [".vmferry-migrate.json", "data.vhdx", "guest.vhdx", "lv.ps1"]
    after = result.to_json()["after"]
    assert [d["controller_model"] for d in after["disks"]] == ["piix4", "storvsc"]
    assert qemu_img("compare", str(data), str(tmp_path / "out" / "data.vhdx")).returncode == 0


def vbox_text(disk: str) -> str:
    return f"""<?xml version="1.0"?>
<VirtualBox xmlns="http://www.virtualbox.org/" version="1.16-linux">
  <Machine uuid="{{11111111-2222-3333-4444-555555555555}}" name="vb" OSType="Debian_64">
    <MediaRegistry><HardDisks>
      <HardDisk uuid="{{aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee}}" location="{disk}" format="VDI"/>
    </HardDisks></MediaRegistry>
    <Hardware>
      <CPU count="2"/><Memory RAMSize="1024"/>
      <Network><Adapter slot="0" enabled="true" MACAddress="080027AABBCC" type="82540EM">
        <NAT/></Adapter></Network>
      <StorageControllers>
        <StorageController name="SATA" type="AHCI" PortCount="1">
          <AttachedDevice type="HardDisk" port="0" device="0">
            <Image uuid="{{aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee}}"/>
          </AttachedDevice>
        </StorageController>
      </StorageControllers>
    </Hardware>
  </Machine>
</VirtualBox>
"""


def test_vbox_snapshot_in_snapshots_folder_reaches_its_base(guest: Path, tmp_path: Path) -> None:
    """VirtualBox keeps a snapshot's differencing VDI in Snapshots/ and its base one folder up:
    the VM's folder is always a place parents may be opened from (no --allow-dir needed)."""
    import vmferry

    vm = tmp_path / "vb"
    (vm / "Snapshots").mkdir(parents=True)
    to_format(guest, vm / "vb.vdi", "vdi")
    vmferry.create(vm / "Snapshots" / "child.vdi", "vdi", parent=vm / "vb.vdi").close()
    (vm / "vb.vbox").write_text(vbox_text("Snapshots/child.vdi"))
    result = migrate(vm / "vb.vbox", "kvm", tmp_path / "out", dry_run=True)
    assert result.status == "planned", result.blockers
    layers = result.to_json()["disks"][0]["source"]["chain"]
    assert [Path(x["path"]).name for x in layers] == ["child.vdi", "vb.vdi"]


@pytest.mark.usefixtures("fixed_clock")
def test_vbox_to_vmware_is_one_ova(guest: Path, tmp_path: Path) -> None:
    vm = tmp_path / "vb"
    vm.mkdir()
    to_format(guest, vm / "vb.vdi", "vdi")
    (vm / "vb.vbox").write_text(vbox_text("vb.vdi"))
    result = migrate(vm / "vb.vbox", "vmware", tmp_path / "out")
    assert result.status == "completed"
    ova = tmp_path / "out" / "vb.ova"
    assert result.config_path == ova
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".vmferry-migrate.json",
        "vb.ova",
    ]
    with tarfile.open(ova) as tar:  # Python's tarfile: an independent reader of the archive
        members = tar.getnames()
        assert members == ["vb.ovf", "vb.mf", "vb.vmdk"]
        tar.extractall(tmp_path / "x", filter="data")
    ovf = (tmp_path / "x" / "vb.ovf").read_text()
    assert "streamOptimized" in ovf and "08:00:27:aa:bb:cc" not in ovf  # MACs not kept
    assert 'ovf:size="' in ovf and "<rasd:VirtualQuantity>1024<" in ovf
    require_tool("sha256sum")
    mf = (tmp_path / "x" / "vb.mf").read_text()
    digest = subprocess.run(["sha256sum", str(tmp_path / "x" / "vb.vmdk")], capture_output=True,
                            text=True, check=True).stdout.split()[0]  # fmt: skip
    assert f"SHA256(vb.vmdk)= {digest}" in mf
    kvm = migrate(vm / "vb.vbox", "kvm", tmp_path / "kvm")  # the same repair, another format
    assert kvm.status == "completed"
    vmdk = tmp_path / "x" / "vb.vmdk"
    assert qemu_img("check", "-f", "vmdk", str(vmdk)).returncode == 0
    assert qemu_img("compare", "-f", "vmdk", "-F", "qcow2", str(vmdk),
                    str(tmp_path / "kvm" / "vb.qcow2")).returncode == 0  # fmt: skip


def test_ova_source_to_kvm(guest: Path, tmp_path: Path) -> None:
    from vmferry.ops.convert import convert

    ova = tmp_path / "appliance.ova"
    convert(guest, ova)
    result = migrate(ova, "kvm", tmp_path / "out")
    assert result.status == "completed"
    assert result.source["kind"] == "ova"
    assert result.disks[0].guest_after["bootable"] is True


def test_proxmox_conf_finds_its_volume(guest: Path, tmp_path: Path) -> None:
    pve = tmp_path / "pve"
    (pve / "images" / "100").mkdir(parents=True)
    to_format(guest, pve / "images" / "100" / "vm-100-disk-0.qcow2", "qcow2")
    (pve / "100.conf").write_text(
        "boot: order=scsi0\ncores: 2\nmemory: 1024\nname: pve1\nscsihw: virtio-scsi-single\n"
        "scsi0: local:100/vm-100-disk-0.qcow2,size=64M\n"
        "net0: virtio=BC:24:11:00:00:01,bridge=vmbr0\n"
    )
    result = migrate(pve / "100.conf", "virtualbox", tmp_path / "out")
    assert result.status == "completed"
    assert (tmp_path / "out" / "vm-100-disk-0.vdi").is_file()
    assert result.to_json()["before"]["source_format"] == "proxmox"


def test_hyperv_folder_from_the_corpus_config(corpus: Path, guest: Path, tmp_path: Path) -> None:
    xml = corpus / "dissect.target/loaders/hyperv/B90AC31B-C6F8-479F-9B91-07B894A6A3F6.xml"
    if not xml.is_file():
        pytest.skip("corpus Hyper-V config missing")
    vm = tmp_path / "web"
    (vm / "Virtual Machines").mkdir(parents=True)
    (vm / "Virtual Hard Disks").mkdir()
    (vm / "Virtual Machines" / xml.name).write_bytes(xml.read_bytes())
    to_format(guest, vm / "Virtual Hard Disks" / "Default Generation 1.vhdx", "vhdx")
    result = migrate(vm, "kvm", tmp_path / "out")
    assert result.status == "completed"
    assert result.source["kind"] == "hyperv-xml"
    assert (tmp_path / "out" / "Default Generation 1.qcow2").is_file()
    assert result.to_json()["before"]["disks"][0]["controller_model"] == "piix4"


def test_bare_image_takes_memory_and_cpus(guest: Path, tmp_path: Path) -> None:
    result = migrate(guest, "kvm", tmp_path / "out", memory=4096, cpus=4, dry_run=True)
    after = result.to_json()["after"]
    assert (after["memory_mb"], after["cpus"]) == (4096, 4)
    assert result.source["kind"] == "image"


def ova_xml(size: int) -> str:
    """xapi's ova.xml for one HVM VM with one disk VDI ``Ref:3`` of ``size`` bytes."""

    def member(name: str, value: str) -> str:
        return f"<member><name>{name}</name><value>{value}</value></member>"

    def obj(cls: str, ref: str, fields: str) -> str:
        return (
            "<value><struct>" + member("class", cls) + member("id", ref)
            + member("snapshot", f"<struct>{fields}</struct>") + "</struct></value>"
        )  # fmt: skip

    vm = obj("VM", "Ref:1", member("name_label", "xen1") + member("VCPUs_max", "2")
             + member("memory_static_max", str(1 << 30))
             + member("VBDs", "<array><data><value>Ref:2</value></data></array>"))  # fmt: skip
    vbd = obj("VBD", "Ref:2", member("VDI", "Ref:3") + member("userdevice", "0")
              + member("bootable", "true") + member("type", "Disk"))  # fmt: skip
    vdi = obj("VDI", "Ref:3", member("virtual_size", str(size)))
    return (
        "<value><struct>"
        + member("objects", f"<array><data>{vm}{vbd}{vdi}</data></array>")
        + "</struct></value>"
    )


def make_xva(disk: Path, xva: Path) -> None:
    """An XVA as xapi writes it, with Python's tarfile: 1 MiB chunks, zero chunks left out
    (but the last), each followed by its SHA-1 ``.checksum``."""
    import hashlib
    import io

    data = disk.read_bytes()
    chunk = 1 << 20
    last = (len(data) - 1) // chunk
    with tarfile.open(xva, "w", format=tarfile.USTAR_FORMAT) as tar:

        def add(name: str, blob: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))

        add("ova.xml", ova_xml(len(data)).encode())
        for n in range(last + 1):
            piece = data[n * chunk : (n + 1) * chunk]
            if piece.count(0) == len(piece) and n != last:
                continue
            add(f"Ref:3/{n:08d}", piece)
            add(f"Ref:3/{n:08d}.checksum", hashlib.sha1(piece).hexdigest().encode())


@pytest.mark.usefixtures("fixed_clock")
def test_xva_to_kvm(guest: Path, tmp_path: Path) -> None:
    xva = tmp_path / "xen1.xva"
    make_xva(guest, xva)
    result = migrate(xva, "kvm", tmp_path / "out")
    assert result.status == "completed"
    assert result.source["kind"] == "xva"
    after = result.to_json()["after"]
    assert (after["cpus"], after["memory_mb"]) == (2, 1024)
    out = tmp_path / "out" / "xen1-disk1.qcow2"
    # the same guest migrated from the raw image: the XVA reader must give the same bytes
    plain = migrate(guest, "kvm", tmp_path / "plain")
    assert plain.disks[0].digest == result.disks[0].digest
    assert qemu_img("compare", str(out), str(tmp_path / "plain" / "guest.qcow2")).returncode == 0
    from vmferry.disk.blockfile import BlockFile
    from vmferry.migrate.xva import XvaDisk

    f = BlockFile.open(xva)
    layer = XvaDisk.open_vdi(f, "Ref:3", guest.stat().st_size)
    try:
        assert layer.check().clean
        assert len(layer.chunks) < guest.stat().st_size >> 20  # zero chunks were left out
    finally:
        layer.close()


def test_ova_xml_alone_has_no_disks(tmp_path: Path) -> None:
    xml = tmp_path / "ova.xml"
    xml.write_text(ova_xml(1 << 20))
    with pytest.raises(ConfigError, match="no disk data") as info:
        migrate(xml, "kvm", tmp_path / "out")
    assert ".xva" in (info.value.hint or "")


def test_ovf_with_gzip_disk_beside_it(guest: Path, tmp_path: Path) -> None:
    import gzip
    import re

    from vmferry.ops.convert import convert

    ova = tmp_path / "app.ova"
    convert(guest, ova)
    folder = tmp_path / "ovf"
    with tarfile.open(ova) as tar:
        tar.extractall(folder, filter="data")
    ovf = next(folder.glob("*.ovf"))
    vmdk = next(folder.glob("*.vmdk"))
    vmdk.with_name(vmdk.name).write_bytes(gzip.compress(vmdk.read_bytes(), 1))
    text = ovf.read_text()
    text = re.sub(r"(<File [^>]*?)(/?>)", r'\1 ovf:compression="gzip"\2', text, count=1)
    text = re.sub(r' ovf:size="\d+"', "", text)
    ovf.write_text(text)
    for mf in folder.glob("*.mf"):
        mf.unlink()
    result = migrate(ovf, "kvm", tmp_path / "out")
    assert result.status == "completed"
    assert result.disks[0].guest_after["bootable"] is True
    assert result.disks[0].source["chain"][0]["format"] == "vmdk"
