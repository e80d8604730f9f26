"""Small VM models several writer tests start from."""

from __future__ import annotations

from vmferry.vm.model import Disk, Nic, VmModel


def pvscsi_bios_vm() -> VmModel:
    """A BIOS VMware VM: two disks on pvscsi, one vmxnet3 NIC."""
    return VmModel(
        name="web",
        firmware="bios",
        cpus=2,
        memory_mb=2048,
        disks=[Disk("web.vmdk", "scsi", "pvscsi", 0, 0), Disk("data.vmdk", "scsi", "pvscsi", 0, 1)],
        nics=[Nic("00:50:56:01:02:03", "vmxnet3", "VM Network")],
        source_format="vmx",
    )
