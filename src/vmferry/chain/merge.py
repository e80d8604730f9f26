"""Committing a differencing child into its parent, in place, so that a crash loses nothing.

The order is what makes it safe.  While the child's ranges are copied into the parent, the
child still covers every one of them, so the chain (child over parent) reads the same bytes at
every instant; only the parent *alone* changes, which is why a parent with other children is
refused (they would see the change) unless those siblings are first given the parent's old
bytes.  Children of the merged child are re-pointed at the parent only after the copy is
complete and synced, and the child is deleted last.  A journal beside the parent lets a killed
merge be reopened and simply run again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry.chain.discover import Node, discover
from vmferry.chain.journal import read_journal, remove_journal, write_journal
from vmferry.chain.open import open_chain, open_layer
from vmferry.chain.surgery import CHILD_SEARCH_DEPTH
from vmferry.disk import Alloc, DiskFormat, ParentInfo
from vmferry.disk.readahead import chunk_for, read_ahead_into
from vmferry.errors import UnsafeOperationError, UsageError
from vmferry.ops.progress import NoProgress, Progress

COPY_CHUNK = 8 << 20  # for a sibling's copy; the merge itself uses readahead.chunk_for
#: bytes written into the parent between requests to start writing them back to disk
WRITEBACK_EVERY = 64 << 20


@dataclass
class MergeResult:
    merged: list[str] = field(default_factory=list)  # children committed (and removed)
    into: str = ""
    repointed: list[str] = field(default_factory=list)
    preserved_siblings: list[str] = field(default_factory=list)
    bytes_copied: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _scan_dirs(*paths: Path, extra: Sequence[str | os.PathLike[str]] = ()) -> list[Path]:
    dirs = {p.parent for p in paths} | {Path(os.path.abspath(d)) for d in extra}
    return sorted(dirs)


def _node_for(forest_nodes: list[Node], path: Path) -> Node | None:
    real = os.path.realpath(path)
    return next((n for n in forest_nodes if os.path.realpath(n.path) == real), None)


def _parent_info(parent: DiskFormat, parent_path: Path, child_path: Path) -> ParentInfo:
    return ParentInfo(
        layer=parent,
        absolute_path=str(parent_path),
        relative_path=os.path.relpath(parent_path, child_path.parent),
        format=parent.name,
    )


def _copy_layer(child: DiskFormat, parent: DiskFormat, progress: Progress) -> int:
    """Write every range the child answers for into the parent; returns bytes copied.

    The child is read a few chunks ahead on a helper thread while the parent is written, and
    the parent's writeback is started as it goes: the final flush then finds little to do.
    """
    step = chunk_for(parent)
    extents = [e for e in child.extents() if e.alloc is not Alloc.UNALLOCATED]
    progress.start(sum(e.length for e in extents), "merging")
    plan: list[tuple[DiskFormat, int, int]] = []
    for ext in extents:
        if ext.alloc is Alloc.DATA:
            plan += [
                (child, pos, min(step, ext.end - pos)) for pos in range(ext.offset, ext.end, step)
            ]
    done = unflushed = 0
    chunks = read_ahead_into(plan)
    try:
        for ext in extents:
            if ext.alloc is Alloc.ZERO:
                parent.write_zeroes(ext.offset, ext.length)
                done += ext.length
                progress.advance(done)
                continue
            for pos in range(ext.offset, ext.end, step):
                data = next(chunks)
                parent.write(pos, data)
                done += len(data)
                unflushed += len(data)
                if unflushed >= WRITEBACK_EVERY:
                    parent.file.start_writeback()
                    unflushed = 0
                progress.advance(done)
    finally:
        chunks.close()
    progress.finish()
    return done


def _preserve_sibling(sibling: Path, child: DiskFormat, parent: DiskFormat) -> None:
    """Give a sibling the parent's current bytes wherever the merge will change them.

    The sibling reads the same afterwards (those bytes are what it read through the parent),
    and it no longer depends on the ranges the merge rewrites.
    """
    with open_chain(sibling, writable=True) as sib:
        for ext in child.extents():
            if ext.alloc is Alloc.UNALLOCATED:
                continue
            for own in sib.top.extents(ext.offset, ext.length):
                if own.alloc is not Alloc.UNALLOCATED:
                    continue
                pos = own.offset
                while pos < own.end:
                    n = min(COPY_CHUNK, own.end - pos)
                    sib.top.write(pos, parent.read(pos, n))
                    pos += n
        sib.flush()


def commit(
    child_path: str | os.PathLike[str],
    *,
    preserve_siblings: bool = False,
    allowed_dirs: Sequence[str | os.PathLike[str]] = (),
    progress: Progress | None = None,
) -> MergeResult:
    """Merge the child into its parent and delete it (Hyper-V's "delete checkpoint")."""
    child_p = Path(os.path.abspath(child_path))
    with open_chain(child_p, allowed_dirs=allowed_dirs) as chain:
        if len(chain.layers) < 2:
            raise UsageError("not a differencing image: nothing to merge", path=str(child_p))
        parent_p = Path(os.path.abspath(chain.layers[1].file.path))
        parent_format = chain.layers[1].name
        warnings = list(chain.warnings)
        pinned = dict(chain.top.parent_ref().identity)  # type: ignore[union-attr]
    forest = discover(
        _scan_dirs(child_p, parent_p, extra=allowed_dirs), max_depth=CHILD_SEARCH_DEPTH
    )
    parent_node = _node_for(forest.nodes, parent_p)
    child_node = _node_for(forest.nodes, child_p)
    siblings = [
        n.path for n in (parent_node.children if parent_node else []) if n is not child_node
    ]
    if siblings and not preserve_siblings:
        raise UnsafeOperationError(
            f"{parent_p.name} has other children ({', '.join(str(s) for s in siblings)}); "
            "merging would change what they read",
            path=str(child_p),
            hint="merge with --preserve-siblings to copy into them the data they depend on first",
        )
    grandchildren = [n.path for n in (child_node.children if child_node else [])]
    result = MergeResult(into=str(parent_p), warnings=warnings)
    old = read_journal(parent_p)
    if old is not None and not os.path.exists(str(old.get("child", ""))):
        remove_journal(parent_p)  # left by a merge killed after it had finished
        old = None
    if old is None or old.get("child") != str(child_p):
        write_journal(
            parent_p,
            {"parent": os.path.realpath(parent_p), "child": str(child_p), "pinned": pinned},
        )
    child = open_layer(child_p)
    try:
        if siblings:
            reader = open_layer(parent_p, parent_format)
            try:
                for sib in siblings:
                    _preserve_sibling(sib, child, reader)
                    result.preserved_siblings.append(str(sib))
            finally:
                reader.close()
        parent = open_layer(parent_p, parent_format, writable=True)
        parent.file.write_direct()  # synced before the child goes: skip the page cache's copy
    except BaseException:
        child.close()
        raise
    try:
        if child.virtual_size > parent.virtual_size:
            parent.resize(child.virtual_size)
        result.bytes_copied = _copy_layer(child, parent, progress or NoProgress())
        parent.flush()
        for dependent in [*grandchildren, *siblings]:
            layer = open_layer(dependent, writable=True)
            try:
                layer.set_parent(_parent_info(parent, parent_p, Path(dependent)))
                layer.flush()
            finally:
                layer.close()
            if dependent in grandchildren:
                result.repointed.append(str(dependent))
    finally:
        child_files = child.files()
        child.close()
        parent.close()
    for f in child_files:
        os.unlink(f)
    remove_journal(parent_p)
    result.merged.append(str(child_p))
    return result


def commit_all(
    top_path: str | os.PathLike[str],
    *,
    preserve_siblings: bool = False,
    allowed_dirs: Sequence[str | os.PathLike[str]] = (),
    progress: Progress | None = None,
) -> MergeResult:
    """Merge the whole chain into its base, one layer at a time from the bottom up."""
    with open_chain(top_path, allowed_dirs=allowed_dirs) as chain:
        paths = [Path(os.path.abspath(layer.file.path)) for layer in chain.layers]
    if len(paths) < 2:
        raise UsageError("not a differencing image: nothing to merge", path=str(top_path))
    total = MergeResult(into=str(paths[-1]))
    for layer_path in reversed(paths[:-1]):  # the layer just above the base first
        step = commit(
            layer_path,
            preserve_siblings=preserve_siblings,
            allowed_dirs=allowed_dirs,
            progress=progress,
        )
        total.merged += step.merged
        total.preserved_siblings += [
            s for s in step.preserved_siblings if s not in total.preserved_siblings
        ]
        total.bytes_copied += step.bytes_copied
        total.warnings += step.warnings
    return total
