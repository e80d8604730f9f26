"""Re-pointing a child at a moved parent, and resizing a disk without breaking a chain."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmferry.chain.discover import discover
from vmferry.chain.open import open_chain, open_layer
from vmferry.disk import Alloc, ParentInfo
from vmferry.errors import ParentMismatchError, UnsafeOperationError, UsageError

#: folder levels below an image searched for its children (Hyper-V 2008: Snapshots/<guid>/)
CHILD_SEARCH_DEPTH = 2


def rebase(
    child_path: str | os.PathLike[str],
    new_parent: str | os.PathLike[str],
    *,
    parent_format: str | None = None,
    unsafe: bool = False,
    allowed_dirs: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Any]:
    """Point the child at ``new_parent`` (Hyper-V's Set-VHD -ParentPath).

    The new parent must be the disk the child was made from (same identity, same size), since
    only the locators change, not the data.  ``unsafe`` accepts a mismatch, as
    -IgnoreIdMismatch does, and the child then pins the new parent's identity.
    """
    child_p = Path(os.path.abspath(child_path))
    parent_p = Path(os.path.abspath(new_parent))
    warnings: list[str] = []
    child = open_layer(child_p, writable=True)
    try:
        ref = child.parent_ref()
        if ref is None:
            raise UsageError("not a differencing image: it has no parent", path=str(child_p))
        fmt = parent_format or ref.format
        with open_chain(parent_p, fmt, allowed_dirs=[parent_p.parent, *allowed_dirs]) as parent:
            have = parent.top.identity()
            diffs = [
                f"{k}: child expects {v}, {parent_p.name} has {have.get(k, '(none)')}"
                for k, v in ref.identity.items()
                if str(have.get(k, "")).lower() != str(v).lower()
            ]
            if parent.virtual_size > child.virtual_size or (
                parent.virtual_size != child.virtual_size and child.child_size_must_match
            ):
                diffs.append(f"size: child {child.virtual_size}, parent {parent.virtual_size}")
            if not ref.identity:
                warnings.append(
                    f"{child.name} records nothing that identifies its parent: vmferry cannot "
                    f"verify that {parent_p.name} is the disk this child was created on"
                )
            if diffs and not unsafe:
                raise ParentMismatchError(
                    f"{parent_p} is not the parent this child was created from: "
                    + "; ".join(diffs),
                    path=str(child_p),
                    hint="if you know its content is what the child was created on, "
                    "pass --unsafe (the child will then trust it)",
                )
            if diffs:
                warnings.append(
                    "identity mismatch ignored on request (--unsafe): "
                    + "; ".join(diffs)
                    + ". If the parent's content differs, the guest will see corrupt data."
                )
            child.set_parent(
                ParentInfo(
                    layer=parent.top,
                    absolute_path=str(parent_p),
                    relative_path=os.path.relpath(parent_p, child_p.parent),
                    format=fmt,
                )
            )
            child.flush()
    finally:
        child.close()
    return {"child": str(child_p), "parent": str(parent_p), "warnings": warnings}


def find_children(
    image: str | os.PathLike[str], scan: Sequence[str | os.PathLike[str]] = ()
) -> list[str]:
    """Images in the image's folder tree (and ``scan``) that are stacked directly on it."""
    path = Path(os.path.abspath(image))
    # children live beside their parent (or in a Snapshots/<id>/ folder below it)
    forest = discover([path.parent, *scan], max_depth=CHILD_SEARCH_DEPTH)
    real = os.path.realpath(path)
    return [
        str(n.path)
        for n in forest.nodes
        if any(
            p is not None and os.path.realpath(p.path) == real for p in (n.parent, n.claimed_parent)
        )
    ]


def resize(
    image: str | os.PathLike[str],
    new_size: int,
    *,
    shrink: bool = False,
    scan: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Any]:
    """Grow (or, with ``shrink``, cut past the last data) a disk that has no children."""
    path = Path(os.path.abspath(image))
    children = find_children(path, scan)
    if children:
        raise UnsafeOperationError(
            f"{path.name} has differencing children ({', '.join(children)}): resizing it would "
            "misalign every snapshot stacked on it and break the chain",
            path=str(path),
            hint="merge the snapshots first (vmferry merge CHILD --all), or write a resized "
            "standalone copy: vmferry merge CHILD -o NEW, then resize NEW",
        )
    layer = open_layer(path, writable=True)
    try:
        if layer.parent_ref() is not None:
            raise UnsafeOperationError(
                "a differencing disk cannot be resized apart from its parent",
                path=str(path),
                hint="merge the chain first: vmferry merge IMAGE --all",
            )
        old = layer.virtual_size
        if new_size < old and not shrink:
            raise UsageError(
                f"{new_size} is smaller than the disk ({old}); shrinking loses data past it",
                hint="pass --shrink to cut a disk whose data all lies before the new size",
            )
        if new_size < old:
            for ext in layer.extents(new_size, old - new_size):
                if ext.alloc is Alloc.DATA:
                    raise UnsafeOperationError(
                        f"the disk holds data at offset {ext.offset}, past the new size {new_size}",
                        path=str(path),
                        hint="shrink the partitions and filesystem inside the guest first",
                    )
        if new_size != old:
            layer.resize(new_size)
            layer.flush()
        return {"image": str(path), "old_size": old, "new_size": layer.virtual_size}
    finally:
        layer.close()
