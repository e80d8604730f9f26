"""What every guest filesystem reader offers inspection and the fix rules."""

from __future__ import annotations

import stat as _stat
from dataclasses import dataclass
from typing import Protocol

from vmferry.errors import GuestFileNotFoundError

#: POSIX file-type bits of an inode mode → the ``kind`` names of DirEntry and Stat
_KIND_BY_TYPE = {
    _stat.S_IFREG: "file",
    _stat.S_IFDIR: "dir",
    _stat.S_IFLNK: "symlink",
    _stat.S_IFCHR: "chr",
    _stat.S_IFBLK: "blk",
    _stat.S_IFIFO: "fifo",
    _stat.S_IFSOCK: "sock",
}


def kind_of_mode(mode: int) -> str:
    """The kind of file an inode ``mode`` says it is (ext, XFS and btrfs share the encoding)."""
    return _KIND_BY_TYPE.get(mode & 0o170000, "unknown")


class GuestFileNotFound(GuestFileNotFoundError):
    """A path is missing inside the guest (also a ``FileNotFoundError``)."""


@dataclass(frozen=True)
class DirEntry:
    name: str
    inode: int
    kind: str  # file | dir | symlink | chr | blk | fifo | sock | unknown


@dataclass(frozen=True)
class Stat:
    inode: int
    kind: str
    size: int
    perm: int


class GuestFS(Protocol):
    """Read access by path; paths are absolute inside the filesystem, symlinks stay inside."""

    type: str

    @property
    def uuid(self) -> str: ...

    @property
    def label(self) -> str: ...

    def read_file(self, path: str, limit: int = ...) -> bytes: ...

    def read_head(self, path: str, length: int) -> bytes: ...

    def listdir(self, path: str) -> list[DirEntry]: ...

    def stat(self, path: str, *, follow: bool = True) -> Stat: ...

    def exists(self, path: str) -> bool: ...

    def readlink(self, path: str) -> str: ...
