"""LVM2 inside guest images: PV labels, text metadata, and linear/striped LVs as disks.

``scan_lvm([(device, partition_number), ...])`` reads what the image's PVs say and returns an
:class:`LvmScan` whose ``open_lv(vg, lv)`` gives a :class:`LogicalVolumeDisk` to probe and read
filesystems on.  Nothing is activated: the mapping device-mapper would set up is done here.
"""

from vmferry.guest.lvm.errors import (
    LvmMetadataError,
    MissingPhysicalVolumeError,
    UnsupportedSegmentError,
)
from vmferry.guest.lvm.metadata import LogicalVolume, PhysicalVolume, Segment, VolumeGroup
from vmferry.guest.lvm.scan import FoundPv, LvmScan, scan_lvm
from vmferry.guest.lvm.volume import LogicalVolumeDisk

__all__ = [
    "FoundPv",
    "LogicalVolume",
    "LogicalVolumeDisk",
    "LvmMetadataError",
    "LvmScan",
    "MissingPhysicalVolumeError",
    "PhysicalVolume",
    "Segment",
    "UnsupportedSegmentError",
    "VolumeGroup",
    "scan_lvm",
]
