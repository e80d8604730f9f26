"""Taking a snapshot: the next differencing child of an image, named as its hypervisor names it.

Admins find snapshot files by name (``web01_<GUID>.avhdx`` is a Hyper-V checkpoint,
``web01-000002.vmdk`` a VMware snapshot), and the hypervisors' own tools expect those names, so
the child gets the format's naming convention.  The conventions are data (``NAMING``, keyed
by format name), not branches in the operation; a format without an entry still gets a
predictable ``<stem>-snapN<ext>`` name.  Chosen conventions:

* ``vhdx``/``vhd``: Hyper-V, ``<base>_<GUID>.avhdx`` / ``.avhd``, GUID upper-case without
  braces, ``<base>`` being the name with any earlier ``_<GUID>`` suffix removed (Hyper-V names
  every checkpoint of ``web01.vhdx`` ``web01_<GUID>.avhdx``).
* ``vmdk``: VMware, ``<base>-00000N.vmdk`` with the next free N, ``<base>`` without an earlier
  ``-00000N`` suffix.
* ``qcow2``: ``<base>-snapN.qcow2`` with the next free N.  libvirt's external snapshots use
  ``<base>.<unix time>`` with no extension, which nothing (vmferry's discovery included)
  recognises as a disk by name, so the numbered form wins.
* ``vdi``: VirtualBox, ``{<uuid>}.vdi`` (lower-case, in braces).  VirtualBox puts them in the
  VM's ``Snapshots/`` folder; vmferry keeps the child beside its parent so that the chain opens
  without ``--allow-dir`` (a parent is only looked for inside the child's own directory tree).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmferry.chain.open import open_layer
from vmferry.chain.surgery import find_children
from vmferry.errors import UnsafeOperationError, UnsupportedFeatureError, UsageError

#: highest sequence number tried before giving up (VMware itself stops at 999999)
MAX_SEQUENCE = 999_999

_GUID = r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"


@dataclass(frozen=True)
class Naming:
    """How a format names a snapshot child.

    ``strip`` removes an earlier snapshot's suffix from the parent's stem so that the child of a
    child is named after the base disk, as the hypervisor does; ``make`` builds a candidate from
    (base stem, sequence number); ``extension`` is the child's file extension.
    """

    extension: str
    strip: str
    make: Callable[[str, int], str]
    numbered: bool = True  # False: the name is unique by itself (a fresh GUID)


def _hyperv(stem: str, _n: int) -> str:
    return f"{stem}_{str(uuid.uuid4()).upper()}"


def _virtualbox(_stem: str, _n: int) -> str:
    return f"{{{uuid.uuid4()}}}"


#: format name -> its snapshot naming convention (data, not code paths: see the module doc)
NAMING: dict[str, Naming] = {
    "vhdx": Naming(".avhdx", rf"_{_GUID}$", _hyperv, numbered=False),
    "vhd": Naming(".avhd", rf"_{_GUID}$", _hyperv, numbered=False),
    "vmdk": Naming(".vmdk", r"-\d{6}$", lambda stem, n: f"{stem}-{n:06d}"),
    "qcow2": Naming(".qcow2", r"-snap\d+$", lambda stem, n: f"{stem}-snap{n}"),
    "vdi": Naming(".vdi", r"^\{" + _GUID + r"\}$", _virtualbox, numbered=False),
}


def _generic(extension: str) -> Naming:
    return Naming(extension, r"-snap\d+$", lambda stem, n: f"{stem}-snap{n}")


def child_name(parent_path: str | os.PathLike[str], fmt: str, existing: Collection[str]) -> str:
    """The file name of the next snapshot child of ``parent_path`` (``existing``: names taken).

    Case-insensitive against ``existing`` because Windows and macOS file systems are, and a
    folder copied there must not end up with two snapshots that differ only in case.
    """
    parent = Path(parent_path)
    naming = NAMING.get(fmt) or _generic(parent.suffix or f".{fmt}")
    stem = re.sub(naming.strip, "", parent.stem) or parent.stem
    taken = {name.lower() for name in existing}
    for n in range(1, MAX_SEQUENCE + 1):
        name = naming.make(stem, n) + naming.extension
        if name.lower() not in taken:
            return name
        if not naming.numbered and n > 16:  # sixteen GUID collisions: something is wrong
            break
    raise UsageError(f"no free snapshot name for {parent.name} in {parent.parent}")


def snapshot(
    image: str | os.PathLike[str],
    *,
    branch: bool = False,
    scan: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Any]:
    """Create the next differencing child of ``image`` beside it and return its description.

    ``image`` becomes read-only in effect (writing it would change what the child reads), so
    the VM must be pointed at the child afterwards; the result says so.  An image that already
    has children is refused unless ``branch``: the running VM normally sits on the newest leaf,
    and snapshotting an inner image starts a second branch from an older state (a snapshot
    tree), which is almost always a mistake made by picking the wrong file.
    """
    import vmferry

    path = Path(os.path.abspath(image))
    layer = open_layer(path, force_share=True)
    try:
        driver = type(layer)
        fmt = layer.name
        size = layer.virtual_size
    finally:
        layer.close()
    if not driver.supports_parent or not driver.writable_format:
        raise UnsupportedFeatureError(
            f"{fmt} images cannot have differencing children",
            path=str(path),
            hint="convert it to a format with snapshots first, e.g. "
            f"vmferry convert -O qcow2 {path.name} {path.stem}.qcow2",
        )
    if fmt not in driver.parent_formats and driver.parent_formats:
        raise UnsupportedFeatureError(
            f"a {fmt} child cannot be stacked on a {fmt} parent", path=str(path)
        )
    children = find_children(path, scan)
    if children and not branch:
        raise UnsafeOperationError(
            f"{path.name} already has differencing children ({', '.join(children)}): it is a "
            "frozen snapshot, not the disk the VM writes to; a new child of it would start a "
            "second branch from that older state (a snapshot tree)",
            path=str(path),
            hint="snapshot the newest leaf instead (vmferry chain shows it), or pass --branch "
            "if a snapshot tree is what you want",
        )
    name = child_name(path, fmt, os.listdir(path.parent))
    child = path.parent / name
    disk = vmferry.create(child, fmt, parent=path, parent_format=fmt)
    disk.close()
    return {
        "image": str(child),
        "parent": str(path),
        "format": fmt,
        "virtual_size": size,
        "branch": bool(children),
        "siblings": children,
    }
