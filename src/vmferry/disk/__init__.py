"""Disk format drivers and the registry that names them.

``FORMATS`` is the only place that lists drivers: adding a format means one module and one line
here.  Lookup is by qemu-img's format names (and aliases) so users and oracles agree.
"""

from __future__ import annotations

from pathlib import Path

from vmferry.disk.base import Alloc, CheckReport, DiskFormat, Extent, ParentInfo, ParentRef
from vmferry.disk.blockfile import BlockFile
from vmferry.disk.ova import Ova
from vmferry.disk.qcow2 import Qcow2
from vmferry.disk.raw import Raw
from vmferry.disk.vdi import Vdi
from vmferry.disk.vhd import Vhd
from vmferry.disk.vhdx import Vhdx
from vmferry.disk.vmdk import Vmdk
from vmferry.errors import UnknownFormatError, UsageError

FORMATS: tuple[type[DiskFormat], ...] = (Raw, Vhd, Vhdx, Vmdk, Qcow2, Vdi, Ova)


__all__ = [
    "FORMATS",
    "Alloc",
    "BlockFile",
    "CheckReport",
    "DiskFormat",
    "Extent",
    "ParentInfo",
    "ParentRef",
    "driver_by_name",
    "driver_for_extension",
    "probe",
]

_PROBE_HEAD = 64 * 1024
_PROBE_TAIL = 1024


def driver_by_name(name: str) -> type[DiskFormat]:
    wanted = name.lower()
    for drv in FORMATS:
        if wanted == drv.name or wanted in drv.aliases:
            return drv
    known = ", ".join(sorted(d.name for d in FORMATS))
    raise UsageError(f"unknown format {name!r}", hint=f"known formats: {known}")


def driver_for_extension(path: str | Path) -> type[DiskFormat] | None:
    suffix = Path(path).suffix.lower()
    for drv in FORMATS:
        if suffix in drv.extensions:
            return drv
    return None


def probe(f: BlockFile) -> type[DiskFormat]:
    """Pick the driver for a *top* image from its content.  Never used for parents."""
    head = f.pread(0, min(_PROBE_HEAD, f.size))
    tail_len = min(_PROBE_TAIL, f.size)
    tail = f.pread(f.size - tail_len, tail_len) if tail_len else b""
    best: tuple[int, type[DiskFormat]] | None = None
    for drv in FORMATS:
        score = drv.probe(head, tail, f.size)
        if score > 0 and (best is None or score > best[0]):
            best = (score, drv)
    if best is None:
        raise UnknownFormatError("cannot tell the format of this file", path=str(f.path))
    return best[1]
