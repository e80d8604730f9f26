"""Disk format drivers and the registry that names them.

``FORMATS`` is the only place that lists drivers: adding a format means one module and one line
here.  Lookup is by qemu-img's format names (and aliases) so users and oracles agree.
"""

from __future__ import annotations

import importlib
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

    def load(self) -> type[DiskFormat]:
        driver: type[DiskFormat] = getattr(importlib.import_module(self.module), self.cls)
        return driver


#: every driver, in probe-tie order; tests check each entry against its class's attributes
REGISTRY: tuple[_Entry, ...] = (
    _Entry("raw", ("img",), (".raw", ".img", ".bin", ".dd"), "vmferry.disk.raw", "Raw"),
    _Entry("vhd", ("vpc",), (".vhd", ".avhd"), "vmferry.disk.vhd", "Vhd"),
    _Entry("vhdx", (), (".vhdx", ".avhdx"), "vmferry.disk.vhdx", "Vhdx"),
    _Entry("vmdk", (), (".vmdk",), "vmferry.disk.vmdk", "Vmdk"),
    _Entry("qcow2", (), (".qcow2", ".qcow"), "vmferry.disk.qcow2", "Qcow2"),
    _Entry("vdi", (), (".vdi",), "vmferry.disk.vdi", "Vdi"),
    _Entry("ova", (), (".ova",), "vmferry.disk.ova", "Ova"),
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
    """Pick the driver for a *top* image from its content.  Never used for parents."""
    head = f.pread(0, min(_PROBE_HEAD, f.size))
    tail_len = min(_PROBE_TAIL, f.size)
    tail = f.pread(f.size - tail_len, tail_len) if tail_len else b""
    best: tuple[int, type[DiskFormat]] | None = None
    for drv in all_formats():
        score = drv.probe(head, tail, f.size)
        if score > 0 and (best is None or score > best[0]):
            best = (score, drv)
    if best is None:
        raise UnknownFormatError("cannot tell the format of this file", path=str(f.path))
    return best[1]
