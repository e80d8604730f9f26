"""Disk format drivers and the registry that names them.

``FORMATS`` is the only place that lists drivers: adding a format means one module and one line
here.  Lookup is by qemu-img's format names (and aliases) so users and oracles agree.
"""

from __future__ import annotations

from pathlib import Path

from vmferry.disk.base import Alloc, CheckReport, DiskFormat, Extent, ParentInfo, ParentRef
from vmferry.disk.blockfile import BlockFile
from vmferry.disk.raw import Raw
from vmferry.errors import UnknownFormatError, UsageError

FORMATS: tuple[type[DiskFormat], ...] = (Raw,)



def _optional_drivers() -> tuple[type[DiskFormat], ...]:
    """Drivers still being written are registered once their module exists."""
    import importlib

    found: list[type[DiskFormat]] = []
    for module, cls in (
        ("vhd", "Vhd"),
        ("vhdx", "Vhdx"),
        ("vmdk", "Vmdk"),
        ("qcow2", "Qcow2"),
        ("vdi", "Vdi"),
        ("ova", "Ova"),
    ):
        try:
            mod = importlib.import_module(f"vmferry.disk.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"vmferry.disk.{module}":
                raise
            continue
        driver = getattr(mod, cls, None)
        if driver is not None:
            found.append(driver)
    return tuple(found)


FORMATS += _optional_drivers()

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
