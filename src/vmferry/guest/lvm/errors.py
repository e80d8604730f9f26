"""Named LVM failures, each under the guest error a caller already catches.

Damaged metadata is corruption; a VG whose PV lives on another disk is not, and neither is a
segment type vmferry does not map (thin, RAID, ...): those get their own classes so inspection
can report them per logical volume instead of giving up on the whole guest.
"""

from __future__ import annotations

from vmferry.errors import InspectionError
from vmferry.guest.errors import CorruptGuestError, UnsupportedGuestFeatureError


class LvmMetadataError(CorruptGuestError):
    """A PV label, metadata area header or text metadata copy is damaged or inconsistent."""


class MissingPhysicalVolumeError(InspectionError):
    """A logical volume needs a physical volume that is not on this image."""

    def __init__(self, message: str, *, pv_uuid: str, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.pv_uuid = pv_uuid


class UnsupportedSegmentError(UnsupportedGuestFeatureError):
    """A logical volume uses a segment type (thin, RAID, mirror, cache, ...) vmferry cannot map."""
