"""Disk format drivers and the registry that names them.

``FORMATS`` is the only place that lists drivers: adding a format means one module and one line
here.  Lookup is by qemu-img's format names (and aliases) so users and oracles agree.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmferry.disk.base import Alloc, CheckReport, DiskFormat, Extent, ParentInfo, ParentRef
from vmferry.disk.blockfile import BlockFile
from vmferry.errors import UnknownFormatError, UsageError


@dataclass(frozen=True)
class _Entry:
    """A driver as the registry knows it before importing it (startup time is user time)."""

    name: str
    aliases: tuple[str, ...]
    extensions: tuple[str, ...]
    module: str
    cls: str
    #: a cheap test of (head, tail, file size) that is true for every file the driver's
    #: ``probe`` scores above 0, so probing imports only the drivers that may match
    #: (None: always a candidate).  tests/disk/test_registry.py holds the two to each other.
    maybe: Callable[[bytes, bytes, int], bool] | None = None

    def load(self) -> type[DiskFormat]:
        driver: type[DiskFormat] = getattr(importlib.import_module(self.module), self.cls)
        return driver


def _vhd_magic(head: bytes, tail: bytes, size: int) -> bool:
    return b"conectix" in (head[:8], tail[-512:][:8], tail[-511:][:8])


def _vmdk_magic(head: bytes, tail: bytes, size: int) -> bool:
    # sparse and COWD headers, SESparse, or a text descriptor (its magic line or, first
    # after comments, qemu's "version=N")
    if head[:4] in (b"KDMV", b"COWD") or head[:8] == _SESPARSE:
        return True
    text = head[:4096]
    return size <= 1 << 20 and (b"Disk DescriptorFile" in text or b"version=" in text)


_SESPARSE = (0xCAFEBABE).to_bytes(8, "little")


def _vdi_magic(head: bytes, tail: bytes, size: int) -> bool:
    return head[64:68] == (0xBEDA107F).to_bytes(4, "little")


#: every driver, in probe-tie order; tests check each entry against its class's attributes
REGISTRY: tuple[_Entry, ...] = (
    _Entry("raw", ("img",), (".raw", ".img", ".bin", ".dd"), "vmferry.disk.raw", "Raw"),
    _Entry("vhd", ("vpc",), (".vhd", ".avhd"), "vmferry.disk.vhd", "Vhd", _vhd_magic),
    _Entry(
        "vhdx",
        (),
        (".vhdx", ".avhdx"),
        "vmferry.disk.vhdx",
        "Vhdx",
        lambda head, tail, size: head[:8] == b"vhdxfile",
    ),
    _Entry("vmdk", (), (".vmdk",), "vmferry.disk.vmdk", "Vmdk", _vmdk_magic),
    _Entry(
        "qcow2",
        (),
        (".qcow2", ".qcow"),
        "vmferry.disk.qcow2",
        "Qcow2",
        lambda head, tail, size: head[:4] == b"QFI\xfb",
    ),
    _Entry("vdi", (), (".vdi",), "vmferry.disk.vdi", "Vdi", _vdi_magic),
    _Entry(
        "ova",
        (),
        (".ova",),
        "vmferry.disk.ova",
        "Ova",
        lambda head, tail, size: head[257:262] == b"ustar",
    ),
)
_loaded: tuple[type[DiskFormat], ...] | None = None


def all_formats() -> tuple[type[DiskFormat], ...]:
    """Every driver class (imports them all: for probing and listings, not for one open)."""
    global _loaded
    if _loaded is None:
        _loaded = tuple(e.load() for e in REGISTRY)
    return _loaded


def __getattr__(name: str) -> object:
    if name == "FORMATS":
        return all_formats()
    raise AttributeError(name)


__all__ = [
    "FORMATS",
    "REGISTRY",
    "Alloc",
    "BlockFile",
    "CheckReport",
    "DiskFormat",
    "Extent",
    "ParentInfo",
    "ParentRef",
    "all_formats",
    "driver_by_name",
    "driver_for_extension",
    "probe",
]

_PROBE_HEAD = 64 * 1024
_PROBE_TAIL = 1024


def driver_by_name(name: str) -> type[DiskFormat]:
    wanted = name.lower()
    for entry in REGISTRY:
        if wanted == entry.name or wanted in entry.aliases:
            return entry.load()
    known = ", ".join(sorted(e.name for e in REGISTRY))
    raise UsageError(f"unknown format {name!r}", hint=f"known formats: {known}")


def driver_for_extension(path: str | Path) -> type[DiskFormat] | None:
    suffix = Path(path).suffix.lower()
    for entry in REGISTRY:
        if suffix in entry.extensions:
            return entry.load()
    return None


def probe(f: BlockFile) -> type[DiskFormat]:
    """Pick the driver for a *top* image from its content.  Never used for parents.

    Only drivers whose magic may match are imported: start-up is part of every command.
    """
    head = f.pread(0, min(_PROBE_HEAD, f.size))
    tail_len = min(_PROBE_TAIL, f.size)
    tail = f.pread(f.size - tail_len, tail_len) if tail_len else b""
    best: tuple[int, type[DiskFormat]] | None = None
    for entry in REGISTRY:
        if entry.maybe is not None and not entry.maybe(head, tail, f.size):
            continue
        drv = entry.load()
        score = drv.probe(head, tail, f.size)
        if score > 0 and (best is None or score > best[0]):
            best = (score, drv)
    if best is None:
        raise UnknownFormatError("cannot tell the format of this file", path=str(f.path))
    return best[1]
