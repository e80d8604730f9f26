"""What every guest filesystem reader offers inspection and the fix rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from vmferry.errors import GuestFileNotFoundError


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
