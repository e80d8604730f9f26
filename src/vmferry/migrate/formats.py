"""Which disk format a target gets, and how vmferry's drivers are told to write it.

The target facts (``TargetProfile.disk_formats``, default first) name formats the way an
administrator does: ``vhd-fixed`` for Azure, ``vmdk-streamOptimized`` inside an OVA for VMware.
This module turns such a name into a driver name, its create options and the file extension,
and says whether the disks end up packed into an OVA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmferry.errors import UsageError
from vmferry.vm.targets import TargetProfile

#: VMDK descriptor adapter type for the controller a disk hangs on in the target config
_VMDK_ADAPTER = {
    "ide": "ide",
    "sata": "ide",  # VMware writes ddb.adapterType = "ide" for SATA disks too
    "nvme": "ide",
    "scsi": "lsilogic",
}
_VMDK_SCSI_MODEL = {"buslogic": "buslogic", "pvscsi": "pvscsi"}


@dataclass(frozen=True)
class OutputFormat:
    name: str  # as the target facts say it: qcow2, vhd-fixed, vmdk-streamOptimized, ...
    driver: str  # vmferry driver name
    extension: str  # file name extension, without the dot
    options: dict[str, str] = field(default_factory=dict)
    ova: bool = False  # the disks are packed into one .ova with the OVF descriptor

    def options_for(self, controller_kind: str, controller_model: str | None) -> dict[str, str]:
        """Create options for one disk (VMDK records the adapter it is attached to)."""
        opts = dict(self.options)
        if self.driver == "vmdk":
            adapter = _VMDK_ADAPTER.get(controller_kind, "lsilogic")
            if controller_kind == "scsi":
                adapter = _VMDK_SCSI_MODEL.get(controller_model or "", "lsilogic")
            opts["adapter_type"] = adapter
        return opts

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "driver": self.driver, "extension": self.extension,
                "options": dict(self.options), "ova": self.ova}  # fmt: skip


def _spec(name: str, azure: bool) -> OutputFormat:
    if name == "qcow2":
        return OutputFormat("qcow2", "qcow2", "qcow2")
    if name == "raw":
        return OutputFormat("raw", "raw", "img")
    if name == "vhdx":
        return OutputFormat("vhdx", "vhdx", "vhdx")
    if name == "vhd":
        return OutputFormat("vhd", "vhd", "vhd")
    if name == "vhd-fixed":
        opts = {"subformat": "fixed"}
        if azure:
            opts["azure"] = "on"  # Azure: virtual size rounded up to a whole MiB
        return OutputFormat("vhd-fixed", "vhd", "vhd", opts)
    if name == "vmdk":
        return OutputFormat("vmdk", "vmdk", "vmdk", {"subformat": "monolithicSparse"})
    if name == "vmdk-streamOptimized":
        return OutputFormat(
            "vmdk-streamOptimized", "vmdk", "vmdk", {"subformat": "streamOptimized"}, ova=True
        )
    if name == "vdi":
        return OutputFormat("vdi", "vdi", "vdi")
    raise UsageError(f"no disk writer for format {name!r}")  # pragma: no cover - table bug


def output_format(profile: TargetProfile, requested: str | None) -> OutputFormat:
    """The target's default format, or the requested one when the target imports it."""
    if requested is None:
        return _spec(profile.default_disk_format, profile.name == "azure")
    wanted = requested.strip()
    aliases = {
        "vpc": "vhd",
        "streamoptimized": "vmdk-streamOptimized",
        "ova": "vmdk-streamOptimized",
    }
    wanted = aliases.get(wanted.lower(), wanted)
    for name in profile.disk_formats:
        if name.lower() == wanted.lower():
            return _spec(name, profile.name == "azure")
    raise UsageError(
        f"{profile.name} does not import {requested!r} disks",
        hint="one of: " + ", ".join(profile.disk_formats),
    )
