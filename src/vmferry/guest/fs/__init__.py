"""Guest filesystem readers (and writers where vmferry can keep them consistent)."""

from vmferry.guest.fs.types import DirEntry, GuestFileNotFound, GuestFS, Stat

__all__ = ["DirEntry", "GuestFS", "GuestFileNotFound", "Stat"]
