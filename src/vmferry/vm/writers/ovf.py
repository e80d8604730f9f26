"""OVF 1.0 descriptor (VMware import, XenServer/XCP-ng import).

Packaging the OVA (tar of descriptor + manifest + streamOptimized disks) is the disk engine's
job; this writes the descriptor whose References name the converted disk files.  XenServer has
no controller model in OVF terms: its disks are written on IDE (as its emulated boot devices
are) and, past the four IDE slots, on an LSI Logic SCSI controller.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from vmferry.vm.model import Disk, VmModel

OVF = "http://schemas.dmtf.org/ovf/envelope/1"
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
VMW = "http://www.vmware.com/schema/ovf"
_FORMAT_URI = {
    "vmdk-streamOptimized": "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized",
    "vmdk": "http://www.vmware.com/interfaces/specifications/vmdk.html#monolithicSparse",
    "vhd": "http://technet.microsoft.com/en-us/virtualserver/bb676673.aspx",
}
_SCSI_SUBTYPE = {
    "lsilogic": "lsilogic",
    "lsisas1068": "lsilogicsas",
    "pvscsi": "VirtualSCSI",
    "buslogic": "buslogic",
}
_NIC_SUBTYPE = {
    "e1000": "E1000",
    "e1000e": "E1000e",
    "vmxnet3": "VmxNet3",
    "pcnet": "PCNet32",
    "rtl8139": "rtl8139",
    "xen-netfront": "E1000",
}

for _prefix, _uri in (("ovf", OVF), ("rasd", RASD), ("vssd", VSSD), ("vmw", VMW)):
    ET.register_namespace(_prefix, _uri)


def _o(name: str) -> str:
    return f"{{{OVF}}}{name}"


class _Items:
    def __init__(self, section: ET.Element) -> None:
        self.section = section
        self.next_id = 1

    def add(self, rtype: int, name: str, **fields: str) -> str:
        item = ET.SubElement(self.section, _o("Item"))
        iid = str(self.next_id)
        self.next_id += 1
        values = {"ElementName": name, "InstanceID": iid, "ResourceType": str(rtype), **fields}
        for key in sorted(values):  # rasd elements in schema (alphabetical) order
            ET.SubElement(item, f"{{{RASD}}}{key}").text = values[key]
        return iid


def _placement(vm: VmModel) -> list[tuple[Disk, str, str, int, int]]:
    """(disk, kind, model, bus, unit) with Xen disks laid onto IDE, then SCSI."""
    out = []
    ide_used = {(d.bus, d.unit) for d in vm.cdroms if d.controller == "ide"}
    scsi_unit = 0
    for d in vm.disks + vm.cdroms:
        if d.controller != "xen":
            out.append((d, d.controller, d.controller_model or "", d.bus, d.unit))
            continue
        free = next(((b, u) for b in range(2) for u in range(2) if (b, u) not in ide_used), None)
        if free is not None:
            ide_used.add(free)
            out.append((d, "ide", "piix4", *free))
        else:
            out.append((d, "scsi", "lsilogic", 0, scsi_unit))
            scsi_unit += 1 if scsi_unit != 6 else 2
    return out


def write_ovf(vm: VmModel, system_type: str = "vmx-14") -> dict[str, str]:
    env = ET.Element(_o("Envelope"), {f"{{{VMW}}}buildId": "vmferry"})
    refs = ET.SubElement(env, _o("References"))
    disk_section = ET.SubElement(env, _o("DiskSection"))
    ET.SubElement(disk_section, _o("Info")).text = "Virtual disk information"
    net_section = ET.SubElement(env, _o("NetworkSection"))
    ET.SubElement(net_section, _o("Info")).text = "The list of logical networks"
    for network in sorted({n.network or "VM Network" for n in vm.nics}):
        ET.SubElement(net_section, _o("Network"), {_o("name"): network})
    system = ET.SubElement(env, _o("VirtualSystem"), {_o("id"): vm.name})
    ET.SubElement(system, _o("Info")).text = "A virtual machine"
    ET.SubElement(system, _o("Name")).text = vm.name
    os_section = ET.SubElement(system, _o("OperatingSystemSection"), {_o("id"): "1"})
    if vm.guest_os:
        os_section.set(f"{{{VMW}}}osType", vm.guest_os)
    ET.SubElement(os_section, _o("Info")).text = "The guest operating system"
    hw = ET.SubElement(system, _o("VirtualHardwareSection"))
    ET.SubElement(hw, _o("Info")).text = "Virtual hardware requirements"
    sysinfo = ET.SubElement(hw, _o("System"))
    for key, value in (
        ("ElementName", "Virtual Hardware Family"),
        ("InstanceID", "0"),
        ("VirtualSystemIdentifier", vm.name),
        ("VirtualSystemType", system_type),
    ):
        ET.SubElement(sysinfo, f"{{{VSSD}}}{key}").text = value
    items = _Items(hw)
    items.add(
        3, f"{vm.cpus} virtual CPU(s)", AllocationUnits="hertz * 10^6", VirtualQuantity=str(vm.cpus)
    )
    if vm.cores_per_socket:
        cpu_item = hw.findall(_o("Item"))[-1]
        ET.SubElement(cpu_item, f"{{{VMW}}}CoresPerSocket", {_o("required"): "false"}).text = str(
            vm.cores_per_socket
        )
    items.add(
        4,
        f"{vm.memory_mb}MB of memory",
        AllocationUnits="byte * 2^20",
        VirtualQuantity=str(vm.memory_mb),
    )
    controllers: dict[tuple[str, int], str] = {}
    placed = _placement(vm)
    for _d, kind, model, bus, _unit in placed:
        key = (kind, bus)
        if key in controllers:
            continue
        if kind == "ide":
            controllers[key] = items.add(5, f"IDE {bus}", Address=str(bus))
        elif kind == "scsi":
            controllers[key] = items.add(
                6,
                f"SCSI controller {bus}",
                Address=str(bus),
                ResourceSubType=_SCSI_SUBTYPE.get(model, "lsilogic"),
            )
        elif kind == "sata":
            controllers[key] = items.add(
                20, f"SATA controller {bus}", Address=str(bus), ResourceSubType="vmware.sata.ahci"
            )
        elif kind == "nvme":
            controllers[key] = items.add(
                20,
                f"NVMe controller {bus}",
                Address=str(bus),
                ResourceSubType="vmware.nvme.controller",
            )
    disk_no = 0
    for d, kind, _model, bus, unit in placed:
        parent = controllers[(kind, bus)]
        if d.device == "cdrom":
            items.add(
                15,
                "CD/DVD drive",
                AddressOnParent=str(unit),
                AutomaticAllocation="false",
                Parent=parent,
            )
            continue
        disk_no += 1
        file_id, disk_id = f"file{disk_no}", f"vmdisk{disk_no}"
        if d.path:
            ET.SubElement(refs, _o("File"), {_o("href"): d.path, _o("id"): file_id})
        attrs = {
            _o("diskId"): disk_id,
            _o("capacity"): str(d.size_bytes or 0),
            _o("capacityAllocationUnits"): "byte",
            _o("format"): _FORMAT_URI.get(d.format or "", _FORMAT_URI["vmdk-streamOptimized"]),
        }
        if d.path:
            attrs[_o("fileRef")] = file_id
        ET.SubElement(disk_section, _o("Disk"), attrs)
        items.add(
            17,
            f"Hard disk {disk_no}",
            AddressOnParent=str(unit),
            HostResource=f"ovf:/disk/{disk_id}",
            Parent=parent,
        )
    for i, nic in enumerate(vm.nics):
        fields = {
            "AutomaticAllocation": "true",
            "Connection": nic.network or "VM Network",
            "ResourceSubType": _NIC_SUBTYPE.get(nic.model or "", "E1000"),
        }
        if nic.mac:
            fields["Address"] = nic.mac
        items.add(10, f"Network adapter {i + 1}", **fields)
    for port in vm.serial_ports:
        items.add(21, f"Serial port {port.index + 1}", ResourceSubType="vmware.serialport.device")
    ET.SubElement(
        hw,
        f"{{{VMW}}}Config",
        {
            _o("required"): "false",
            f"{{{VMW}}}key": "firmware",
            f"{{{VMW}}}value": "efi" if vm.firmware == "uefi" else "bios",
        },
    )
    if vm.firmware == "uefi":
        ET.SubElement(
            hw,
            f"{{{VMW}}}Config",
            {
                _o("required"): "false",
                f"{{{VMW}}}key": "bootOptions.efiSecureBootEnabled",
                f"{{{VMW}}}value": "true" if vm.secure_boot else "false",
            },
        )
    ET.indent(env)
    text = '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(env, encoding="unicode") + "\n"
    return {f"{vm.name}.ovf": text}
