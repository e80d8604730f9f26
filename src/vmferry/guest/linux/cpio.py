"""Write cpio "newc" archives, the format the kernel unpacks an initramfs from.

Why our own: vmferry adds drivers to a guest's initramfs by appending one more archive to it
(the kernel unpacks concatenated archives in order, later members overwriting earlier ones), and
it must do so without running the guest's (or the host's) tools.  The format is small: a
110-byte ASCII header of thirteen 8-digit hex fields, the NUL-terminated name, padding to a
multiple of 4 bytes, the data, padding to 4 again; a ``TRAILER!!!`` member ends the archive.
"""

from __future__ import annotations

import gzip
import lzma
import stat as _stat
from collections.abc import Iterable
from dataclasses import dataclass

from vmferry.guest.errors import GuestLimitError

try:
    import zstandard as _zstd
except ImportError:  # optional: archives are then left uncompressed
    _zstd = None

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
MAX_FIELD = 0xFFFFFFFF


@dataclass(frozen=True)
class CpioEntry:
    """One member.  ``name`` is relative (no leading ``/``); ``target`` is a symlink's target."""

    name: str
    mode: int  # full st_mode: type bits and permissions
    data: bytes = b""
    mtime: int = 0
    uid: int = 0
    gid: int = 0

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644, mtime: int = 0) -> CpioEntry:
        return cls(name, _stat.S_IFREG | perm, data, mtime)

    @classmethod
    def directory(cls, name: str, perm: int = 0o755, mtime: int = 0) -> CpioEntry:
        return cls(name, _stat.S_IFDIR | perm, b"", mtime)

    @classmethod
    def symlink(cls, name: str, target: str, mtime: int = 0) -> CpioEntry:
        return cls(name, _stat.S_IFLNK | 0o777, target.encode("utf-8", "surrogateescape"), mtime)


def _header(ino: int, entry: CpioEntry, namesize: int, nlink: int) -> bytes:
    fields = (
        ino,
        entry.mode,
        entry.uid,
        entry.gid,
        nlink,
        entry.mtime,
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        0,  # rdevmajor
        0,  # rdevminor
        namesize,
        0,  # check (only the 070702 variant uses it)
    )
    for value in fields:
        if not 0 <= value <= MAX_FIELD:
            raise GuestLimitError(f"cpio member {entry.name!r}: a header field overflows 32 bits")
    return MAGIC + b"".join(b"%08X" % v for v in fields)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """The archive holding ``entries`` in order, then the trailer (total length a multiple of 4).

    Parent directories are not invented: give them as entries first (:func:`with_parents`).
    """
    out = bytearray()
    for ino, entry in enumerate([*entries, CpioEntry(TRAILER, 0)], 1):
        name = entry.name.lstrip("/").encode("utf-8", "surrogateescape") + b"\0"
        if len(name) == 1 or b"\0" in name[:-1]:
            raise GuestLimitError(f"cpio member name {entry.name!r} is not valid")
        nlink = 2 if _stat.S_ISDIR(entry.mode) else 1
        head = _header(ino if entry.name != TRAILER else 0, entry, len(name), nlink)
        out += head + name + _pad(len(head) + len(name))
        out += entry.data + _pad(len(entry.data))
    return bytes(out)


def with_parents(entries: Iterable[CpioEntry]) -> list[CpioEntry]:
    """``entries``, each preceded by a directory entry for every parent not emitted yet.

    The kernel creates a member only inside an existing directory; a directory member that
    already exists (as a directory) is left as it is, so emitting every parent is safe as long
    as none of them is a symlink in the archive being added to (the caller checks that).
    """
    seen: set[str] = set()
    out: list[CpioEntry] = []
    for entry in entries:
        name = entry.name.strip("/")
        parts = name.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in seen:
                seen.add(parent)
                out.append(CpioEntry.directory(parent, mtime=entry.mtime))
        if _stat.S_ISDIR(entry.mode):
            if name in seen:
                continue
            seen.add(name)
        out.append(entry)
    return out


def compress_like(kind: str, archive: bytes) -> tuple[bytes, str]:
    """``archive`` compressed as ``kind`` (the compression the image already uses, which the
    guest's kernel therefore unpacks), or left as it is (``none``) for a kind vmferry does not
    write here (lz4, lzma, bzip2, lzo; zstd without the ``zstandard`` package).

    xz uses CRC32 checks: the kernel's xz decoder does not verify CRC64 or SHA-256.
    """
    if kind == "gzip":
        return gzip.compress(archive, 6, mtime=0), kind
    if kind == "xz":
        return lzma.compress(archive, lzma.FORMAT_XZ, lzma.CHECK_CRC32), kind
    if kind == "zstd" and _zstd is not None:
        return _zstd.ZstdCompressor(level=3).compress(archive), kind
    return archive, "none"
