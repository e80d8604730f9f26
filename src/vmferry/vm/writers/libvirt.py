"""libvirt domain XML for KVM/QEMU.

q35 is used unless a device needs IDE (q35 has no IDE bus); secure boot needs q35 with SMM and
the firmware feature list, which is how libvirt's firmware auto-selection picks a signed OVMF.
"""

from __future__ import annotations

import posixpath
import xml.etree.ElementTree as ET

from vmferry.vm.model import Disk, VmModel

_SCSI_MODELS = {
    "virtio-scsi": "virtio-scsi",
    "pvscsi": "vmpvscsi",
    "lsi53c895a": "lsilogic",
    "megasas": "megasas",
    "lsilogic": "lsilogic",
    "lsisas1068": "lsisas1068",
    "buslogic": "buslogic",
}
_NIC_MODELS = {
    "virtio": "virtio",
    "e1000": "e1000",
    "e1000e": "e1000e",
    "rtl8139": "rtl8139",
    "vmxnet3": "vmxnet3",
    "pcnet": "pcnet",
}


def _letters(index: int) -> str:
    out = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        out = chr(ord("a") + rem) + out
    return out


DEFAULT_DISK_DIR = "/var/lib/libvirt/images"


def write_libvirt(vm: VmModel, disk_dir: str = DEFAULT_DISK_DIR) -> dict[str, str]:
    """``{"<name>.xml": text}``; relative disk paths are placed in ``disk_dir``.

    libvirt's schema only accepts absolute source paths, so the caller says where the converted
    disks will live (``vmferry vm convert -o DIR`` passes DIR).
    """
    uses_ide = any(d.controller == "ide" for d in vm.disks + vm.cdroms)
    dom = ET.Element("domain", type="kvm")
    ET.SubElement(dom, "name").text = vm.name
    if vm.uuid:
        ET.SubElement(dom, "uuid").text = vm.uuid
    ET.SubElement(dom, "memory", unit="MiB").text = str(vm.memory_mb)
    ET.SubElement(dom, "vcpu").text = str(vm.cpus)
    os_el = ET.SubElement(dom, "os")
    if vm.firmware == "uefi":
        os_el.set("firmware", "efi")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc" if uses_ide else "q35").text = "hvm"
    if vm.firmware == "uefi":
        fw = ET.SubElement(os_el, "firmware")
        ET.SubElement(
            fw, "feature", enabled="yes" if vm.secure_boot else "no", name="enrolled-keys"
        )
        ET.SubElement(fw, "feature", enabled="yes" if vm.secure_boot else "no", name="secure-boot")
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    if vm.secure_boot:
        ET.SubElement(features, "smm", state="on")
    if vm.cores_per_socket:
        cpu = ET.SubElement(dom, "cpu")
        ET.SubElement(
            cpu,
            "topology",
            sockets=str(vm.cpus // vm.cores_per_socket),
            dies="1",
            cores=str(vm.cores_per_socket),
            threads="1",
        )
    ET.SubElement(dom, "clock", offset="utc")
    devices = ET.SubElement(dom, "devices")
    sd_index = 0
    scsi_ctrls: dict[int, str] = {}
    for d in vm.disks + vm.cdroms:
        sd_index = _disk(devices, d, sd_index, scsi_ctrls, disk_dir)
    for idx, model in sorted(scsi_ctrls.items()):
        ET.SubElement(devices, "controller", type="scsi", index=str(idx), model=_SCSI_MODELS[model])
    for nic in vm.nics:
        iface = ET.SubElement(devices, "interface", type="bridge" if nic.network else "network")
        if nic.mac:
            ET.SubElement(iface, "mac", address=nic.mac)
        if nic.network:
            ET.SubElement(iface, "source", bridge=nic.network)
        else:
            ET.SubElement(iface, "source", network="default")
        if nic.model in _NIC_MODELS:
            ET.SubElement(iface, "model", type=_NIC_MODELS[nic.model])
    for port in vm.serial_ports:
        serial = ET.SubElement(devices, "serial", type="pty")
        ET.SubElement(serial, "target", port=str(port.index))
    if vm.serial_ports:
        ET.SubElement(
            ET.SubElement(devices, "console", type="pty"), "target", type="serial", port="0"
        )
    ET.SubElement(devices, "input", type="tablet", bus="usb")
    ET.SubElement(devices, "graphics", type="vnc", autoport="yes")
    ET.SubElement(
        ET.SubElement(devices, "video"), "model", type="virtio" if not uses_ide else "vga"
    )
    ET.indent(dom)
    return {f"{vm.name}.xml": ET.tostring(dom, encoding="unicode") + "\n"}


def _disk(
    devices: ET.Element, d: Disk, sd_index: int, scsi_ctrls: dict[int, str], disk_dir: str
) -> int:
    el = ET.SubElement(devices, "disk", type="file", device=d.device)
    driver = ET.SubElement(el, "driver", name="qemu")
    driver.set("type", "raw" if d.device == "cdrom" or d.format in (None, "raw") else d.format)
    if d.path:
        path = (
            d.path if d.path.startswith("/") else posixpath.join(disk_dir, d.path.split("] ")[-1])
        )
        ET.SubElement(el, "source", file=path)
    if d.controller == "virtio":
        dev, bus, addr = f"vd{_letters(d.unit)}", "virtio", None
    elif d.controller == "ide":
        dev, bus = f"hd{_letters(d.bus * 2 + d.unit)}", "ide"
        addr = {"controller": "0", "bus": str(d.bus), "target": "0", "unit": str(d.unit)}
    else:
        dev, bus = f"sd{_letters(sd_index)}", d.controller
        sd_index += 1
        addr = {"controller": str(d.bus), "bus": "0", "target": "0", "unit": str(d.unit)}
        if d.controller == "scsi" and d.controller_model:
            scsi_ctrls.setdefault(d.bus, d.controller_model)
    ET.SubElement(el, "target", dev=dev, bus=bus)
    if d.boot_order is not None:
        ET.SubElement(el, "boot", order=str(d.boot_order))
    if d.device == "cdrom":
        ET.SubElement(el, "readonly")
    if addr:
        ET.SubElement(el, "address", type="drive", **addr)
    return sd_index
