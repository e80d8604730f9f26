"""Named failures of guest inspection and repair (all under :class:`vmferry.errors.GuestError`).

They live here rather than in ``vmferry.errors`` so the guest package can grow its own cases
without touching the shared module; each subclasses the shared class a caller would catch.
"""

from __future__ import annotations

from vmferry.errors import GuestError, InspectionError


class CorruptGuestError(InspectionError):
    """A structure inside the guest (partition table, superblock, inode, cpio header) is bad."""


class GuestLimitError(InspectionError):
    """A guest structure asks for more memory, depth or hops than any sane one needs."""


class UnsupportedGuestFeatureError(InspectionError):
    """The guest uses a feature vmferry does not implement; refusing beats guessing."""

    def __init__(self, message: str, *, features: list[str] | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.features = features or []


class GuestWriteRefusedError(GuestError):
    """vmferry will not write this filesystem or file: it would risk a half-edited guest."""


class NotADirectoryInGuestError(GuestError):
    """A path component that must be a directory is something else."""
