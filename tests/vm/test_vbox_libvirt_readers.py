"""VirtualBox and libvirt readers against dissect.hypervisor's and virt-v2v's asserted facts."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmferry.errors import ConfigError
from vmferry.vm.readers import read_config
from vmferry.vm.readers.libvirt import read_libvirt
from vmferry.vm.readers.vbox import read_vbox

from ._corpus import corpus_files, ids

ALL_VBOX = corpus_files("**/*.vbox")


@pytest.mark.parametrize("vbox", ALL_VBOX, ids=ids(ALL_VBOX))
def test_every_vbox_parses(vbox: Path) -> None:
    assert read_config(vbox).source_format == "vbox"


def test_goad_dc01(corpus: Path) -> None:
    # dissect.hypervisor tests/descriptor/test_vbox.py
    vm = read_vbox(corpus / "dissect.hypervisor/descriptor/vbox/GOAD-DC01.vbox")
    assert vm.uuid == "a6277950-3d1b-45d3-b2fd-dc1f385027e1"
    assert vm.name == "GOAD-DC01"
    assert [d.path for d in vm.disks] == ["Snapshots/{e6800503-8273-4f16-b584-c7ba2c1df698}.vmdk"]
    snaps = {s.name: s for s in vm.snapshots}
    assert set(snaps) == {"push_1766163705_7292", "push_1766170151_8843"}
    first, second = snaps["push_1766163705_7292"], snaps["push_1766170151_8843"]
    assert first.id.startswith("95b1572d") and first.created == "2025-12-19T17:01:46Z"
    assert second.id.startswith("264ccd7e") and second.parent == first.id
    assert vm.current_snapshot == second.id


def test_encrypted_vbox_reports_encryption(corpus: Path) -> None:
    vm = read_vbox(corpus / "dissect.hypervisor/descriptor/vbox/encrypted.vbox")
    encrypted = [u for u in vm.unsupported if "encrypted" in u]
    assert any("742e6d0f" in u for u in encrypted)
    assert not any("1db0b9fe" in u for u in encrypted)


def test_virt_v2v_libvirt_xml(corpus: Path) -> None:
    # virt-v2v test-i-ova.xml: TestOva, 2 GiB, q35, virtio disk and NIC on bridge "VM Network"
    vm = read_libvirt(corpus / "virt-v2v/tests/test-i-ova.xml")
    assert (vm.name, vm.memory_mb, vm.cpus) == ("TestOva", 2048, 1)
    assert [(d.controller, d.controller_model, d.boot_order) for d in vm.disks] == [
        ("virtio", "virtio-blk", 1)
    ]
    assert [(c.controller, c.path) for c in vm.cdroms] == [("sata", None)]
    assert [(n.model, n.network) for n in vm.nics] == [("virtio", "VM Network")]
    assert vm.guest_os == "http://microsoft.com/win/2k22"
    assert "devices/disk device=floppy" in vm.unsupported


LIBVIRT_XML = corpus_files("libvirt/tests/vmx2xmldata/*.xml")


@pytest.mark.parametrize("xml", LIBVIRT_XML, ids=ids(LIBVIRT_XML))
def test_libvirt_reader_agrees_with_vmx_reader(xml: Path) -> None:
    """Reading libvirt's vmx2xml output and the .vmx itself must give the same machine."""
    a, b = read_config(xml), read_config(xml.with_suffix(".vmx"))
    assert (a.name, a.memory_mb, a.cpus, a.firmware, a.secure_boot) == (
        b.name,
        b.memory_mb,
        b.cpus,
        b.firmware,
        b.secure_boot,
    )
    assert [(d.controller, d.controller_model, d.bus, d.unit) for d in a.disks] == [
        (d.controller, d.controller_model, d.bus, d.unit) for d in b.disks
    ]
    assert [(n.mac, n.model) for n in a.nics] == [(n.mac, n.model) for n in b.nics]


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol">
<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<domain type='kvm'><name>&lol3;</name></domain>"""
EXTERNAL = b"""<?xml version="1.0"?>
<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<domain type='kvm'><name>&x;</name></domain>"""
EXTERNAL_NET = b"""<?xml version="1.0"?>
<!DOCTYPE d [<!ENTITY x SYSTEM "http://127.0.0.1:9/x">]>
<VirtualBox><Machine name="&x;"/></VirtualBox>"""


@pytest.mark.parametrize(
    "name,data",
    [
        ("laughs.xml", BILLION_LAUGHS),
        ("ext.xml", EXTERNAL),
        ("net.vbox", EXTERNAL_NET),
        ("broken.xml", b"<domain><name>x</dom"),
        ("laughs.ovf", BILLION_LAUGHS.replace(b"domain", b"Envelope")),
    ],
)
def test_hostile_xml_is_refused(tmp_path: Path, name: str, data: bytes) -> None:
    f = tmp_path / name
    f.write_bytes(data)
    with pytest.raises(ConfigError):
        read_config(f)


def test_libvirt_huge_memory(tmp_path: Path) -> None:
    f = tmp_path / "d.xml"
    f.write_text("<domain type='kvm'><name>x</name><memory unit='TiB'>999999</memory></domain>")
    with pytest.raises(ConfigError, match="memory"):
        read_config(f)


def test_oversized_config_refused_before_parsing(tmp_path: Path) -> None:
    f = tmp_path / "big.xml"
    with f.open("wb") as fh:
        fh.write(b"<domain>")
        fh.seek(40 * 1024 * 1024)
        fh.write(b"</domain>")
    with pytest.raises(ConfigError, match="larger than"):
        read_config(f)
