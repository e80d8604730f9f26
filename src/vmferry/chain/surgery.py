"""Re-pointing a child at a moved parent, and resizing a disk without breaking a chain."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmferry.chain.discover import discover
from vmferry.chain.open import open_chain, open_layer
from vmferry.chain.resolve import identity_mismatches
from vmferry.disk import Alloc, DiskFormat, ParentInfo
from vmferry.errors import ParentMismatchError, UnsafeOperationError, UsageError
from vmferry.fsutil import sync_dir

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
            diffs = identity_mismatches(ref, parent.top.identity(), parent_p.name)
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
    chain: bool = False,
    allowed_dirs: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Any]:
    """Grow (or, with ``shrink``, cut past the last data) a disk that has no children.

    ``chain``: grow the whole chain ``image`` belongs to instead (see ``resize_chain``).
    """
    if chain:
        if shrink:
            raise UsageError(
                "--chain only grows: shrinking a chain would cut data out of its snapshots",
                hint="merge the chain first (vmferry merge LEAF --all), then resize --shrink",
            )
        return resize_chain(image, new_size, scan=scan, allowed_dirs=allowed_dirs)
    path = Path(os.path.abspath(image))
    children = find_children(path, scan)
    if children:
        raise UnsafeOperationError(
            f"{path.name} has differencing children ({', '.join(children)}): resizing it would "
            "misalign every snapshot stacked on it and break the chain",
            path=str(path),
            hint="grow every member together: vmferry resize IMAGE SIZE --chain; or merge the "
            "snapshots first (vmferry merge CHILD --all), or write a resized standalone copy: "
            "vmferry merge CHILD -o NEW, then resize NEW",
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


# --- growing a whole chain ---------------------------------------------------------------------


def _note_path(image: Path) -> Path:
    return image.with_name(f".{image.name}.vmferry-resize")


def _write_note(image: Path, record: dict[str, Any]) -> None:
    """Record, durably, the identity ``image``'s children pinned before it is resized."""
    note = _note_path(image)
    tmp = note.with_name(note.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, note)
    sync_dir(note.parent)


def _read_note(image: Path) -> dict[str, str]:
    try:
        record = json.loads(_note_path(image).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or record.get("image") != os.path.realpath(image):
        return {}
    before = record.get("identity_before")
    return {str(k): str(v).lower() for k, v in before.items()} if isinstance(before, dict) else {}


def _remove_note(image: Path) -> None:
    try:
        os.unlink(_note_path(image))
    except FileNotFoundError:
        return
    sync_dir(image.parent)


def _pin_state(child: DiskFormat, parent: DiskFormat, note: dict[str, str]) -> str:
    """ "ok" (the child pins the parent as it is), "ours" (it pins the identity the parent had
    before a resize of ours that was interrupted), or "broken" (anything else)."""
    ref = child.parent_ref()
    if ref is None:
        return "broken"
    have = {k: str(v).lower() for k, v in parent.identity().items()}
    pinned = {k: str(v).lower() for k, v in ref.identity.items()}
    advisory = {k: str(v).lower() for k, v in ref.advisory.items()}
    if all(have.get(k) == v for k, v in pinned.items()) and all(
        have.get(k, v) == v for k, v in advisory.items()
    ):
        return "ok"
    if note and all(note.get(k) == v for k, v in pinned.items()):
        return "ours"
    if all(have.get(k) == v for k, v in pinned.items()):
        return "ok"  # only an advisory value differs: re-pinning is harmless either way
    return "broken"


def _chain_tree(
    base: Path, scan: Sequence[str | os.PathLike[str]]
) -> list[tuple[Path, Path | None]]:
    """(image, its parent) for the base and everything stacked on it, parents before children."""
    order: list[tuple[Path, Path | None]] = [(base, None)]
    seen = {os.path.realpath(base)}
    i = 0
    while i < len(order):
        node = order[i][0]
        for child in find_children(node, scan):
            real = os.path.realpath(child)
            if real in seen:
                raise UnsafeOperationError("the chain loops back on itself", path=child)
            seen.add(real)
            order.append((Path(child), node))
        i += 1
    return order


def resize_chain(
    image: str | os.PathLike[str],
    new_size: int,
    *,
    scan: Sequence[str | os.PathLike[str]] = (),
    allowed_dirs: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Any]:
    """Grow the chain ``image`` belongs to: its base and every image stacked on it, recursively.

    Order, parents first: the base grows, then each child is re-pinned to its parent's new
    identity (when resizing changed it, as a VHDX DataWriteGuid changes) and grows, and so on
    down every branch.  Why this order: a child smaller than its parent reads exactly what it
    read before (it never asks the parent past its own end), so every leaf shows its old
    content at its old size until it grows itself, then its old content plus zeros.  Children
    first would need a child larger than its parent, which qcow2 reads as zeros past the
    parent's end but VHD/VHDX tools refuse, and would re-pin every child twice.  Sizes follow
    the base after it grew (drivers round, e.g. to whole sectors), so children that must equal
    their parent (``child_size_must_match``) do.

    Crash safety: growing appends zeros and never moves data, so every file reads its old
    content at every instant.  The one window is between a parent's resize and the re-pinning
    of its children, when formats whose identity changes on resize make those children refuse
    the parent.  A note beside the parent (``.NAME.vmferry-resize``, written and synced first)
    records the identity the children pinned; running the same command again recognises
    exactly that mismatch, re-pins and finishes.  Any other mismatch is a broken link and is
    refused before anything changes.
    """
    start = Path(os.path.abspath(image))
    # identity is not checked here: an interrupted run leaves a mismatch the preflight judges
    with open_chain(
        start, allowed_dirs=allowed_dirs, force_share=True, ignore_identity=True
    ) as chain:
        base = Path(os.path.abspath(chain.layers[-1].file.path))
    tree = _chain_tree(base, [*scan, *allowed_dirs])
    # preflight: refuse everything that would stop us half-way before a byte changes
    for path, parent_path in tree:
        layer = open_layer(path, writable=True)
        try:
            why = layer.cannot_resize(max(new_size, layer.virtual_size))
            if why is not None:
                raise UnsafeOperationError(
                    f"{why}, so the chain cannot grow consistently; nothing was changed",
                    path=str(path),
                    hint="merge the chain (vmferry merge LEAF --all) or convert it first",
                )
            if layer.virtual_size > new_size and parent_path is None:
                raise UsageError(
                    f"{new_size} is smaller than the disk ({layer.virtual_size}); --chain only "
                    "grows",
                    path=str(path),
                )
            if parent_path is not None:
                parent = open_layer(parent_path, force_share=True)
                try:
                    state = _pin_state(layer, parent, _read_note(parent_path))
                finally:
                    parent.close()
                if state == "broken":
                    raise UnsafeOperationError(
                        f"{path.name} does not match its parent {parent_path.name} (a broken "
                        "link); nothing was changed",
                        path=str(path),
                        hint=f"repair it first: vmferry rebase {path} -b {parent_path}",
                    )
        finally:
            layer.close()
    target = new_size
    grown: list[dict[str, Any]] = []
    repointed: list[str] = []
    for path, parent_path in tree:
        layer = open_layer(path, writable=True)
        try:
            if parent_path is not None:
                parent = open_layer(parent_path, force_share=True)
                try:
                    if _pin_state(layer, parent, _read_note(parent_path)) != "ok":
                        layer.set_parent(
                            ParentInfo(
                                layer=parent,
                                absolute_path=str(parent_path),
                                relative_path=os.path.relpath(parent_path, path.parent),
                                format=parent.name,
                            )
                        )
                        layer.flush()
                        repointed.append(str(path))
                finally:
                    parent.close()
            old = layer.virtual_size
            if old < target:
                ident = dict(layer.identity())
                _write_note(path, {"image": os.path.realpath(path), "identity_before": ident})
                layer.resize(target)
                layer.flush()
            if parent_path is None:
                target = layer.virtual_size  # the base's rounded size is everyone's
            grown.append({"image": str(path), "old_size": old, "new_size": layer.virtual_size})
        finally:
            layer.close()
    for path, _ in tree:  # every child now pins its parent as it is: the notes are done
        _remove_note(path)
    return {
        "image": str(start),
        "base": str(base),
        "old_size": grown[0]["old_size"],
        "new_size": grown[0]["new_size"],
        "members": grown,
        "repointed": repointed,
    }
