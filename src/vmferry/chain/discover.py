"""Finding every disk chain in a folder: bases, children, snapshot trees, orphans, broken links.

Admins meet chains as a folder of files (a Hyper-V VM folder, a VMware datastore directory),
not as one image.  Discovery opens every image's metadata (never its data, and read-only with
shared locks so it works beside running VMs), links each child to the parent it pins, and
explains every link it cannot make together with the command that would repair it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry.chain.open import open_layer
from vmferry.chain.resolve import candidate_paths, identity_mismatches
from vmferry.disk import REGISTRY, DiskFormat, ParentRef
from vmferry.errors import VmferryError

#: saved memory / device state that snapshots and suspended VMs leave beside the disks
MEMORY_EXTENSIONS = frozenset({".bin", ".vsv", ".vmrs", ".vmem", ".vmsn", ".vmss", ".sav"})
#: VM configurations that name the disks a VM uses
CONFIG_EXTENSIONS = frozenset({".vmx", ".xml", ".vmcx", ".vbox", ".ovf"})
#: files that can hold a disk layer, by extension (a Hyper-V .bin is memory, not a raw disk)
DISK_EXTENSIONS = frozenset(
    ext for drv in REGISTRY for ext in drv.extensions if ext not in MEMORY_EXTENSIONS
)
MAX_FILES = 100_000


@dataclass
class Node:
    """One image file and what is known about its place in a chain."""

    path: Path
    format: str
    virtual_size: int
    file_size: int
    allocated_bytes: int
    identity: dict[str, str]
    parent_ref: ParentRef | None
    full_size: int  # what the file would take fully allocated (worst case for a leaf)
    files: list[str] = field(default_factory=list)  # every file of the layer (VMDK extents)
    parent: Node | None = None
    claimed_parent: Node | None = None  # the file a broken link names, identity mismatched
    children: list[Node] = field(default_factory=list)
    problem: str | None = None  # "orphan" | "broken"
    reason: str | None = None
    repair: str | None = None
    used_by: list[str] = field(default_factory=list)

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": str(self.path),
            "format": self.format,
            "virtual_size": self.virtual_size,
            "file_size": self.file_size,
            "allocated_bytes": self.allocated_bytes,
            "identity": self.identity,
            "parent": str(self.parent.path) if self.parent else None,
            "children": [str(c.path) for c in self.children],
            "used_by": self.used_by,
        }
        if self.parent_ref is not None and self.parent is None:
            out["parent_hints"] = list(self.parent_ref.hints)
        if self.problem:
            out.update(problem=self.problem, reason=self.reason, repair=self.repair)
        return out


@dataclass
class Unreadable:
    path: Path
    error: str


@dataclass
class Forest:
    nodes: list[Node]
    unreadable: list[Unreadable]
    configs: dict[str, list[str]]  # config path -> disk paths it names (resolved)
    memory_files: list[Path]

    @property
    def roots(self) -> list[Node]:
        return [n for n in self.nodes if n.parent is None]

    def tree(self, root: Node) -> list[Node]:
        """``root`` and everything stacked on it, parents before children."""
        out, todo = [], [root]
        while todo:
            node = todo.pop(0)
            out.append(node)
            todo.extend(node.children)
        return out


def _walk(paths: Sequence[Path], max_depth: int | None) -> Iterable[Path]:
    count = 0
    for top in paths:
        if top.is_file():
            yield top
            continue
        base_depth = len(top.parts)
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            if max_depth is not None and len(Path(dirpath).parts) - base_depth >= max_depth:
                dirnames.clear()
            dirnames.sort()
            for name in sorted(filenames):
                count += 1
                if count > MAX_FILES:
                    raise VmferryError(f"more than {MAX_FILES} files under {top}; name a subfolder")
                yield Path(dirpath) / name


def _node(path: Path) -> Node | Unreadable | None:
    try:
        layer = open_layer(path, force_share=True)
    except VmferryError as exc:
        return Unreadable(path, str(exc))
    try:
        return _describe(path, layer)
    except VmferryError as exc:  # e.g. a qcow2 whose backing format was never recorded
        return Unreadable(path, str(exc))
    finally:
        layer.close()


def _describe(path: Path, layer: DiskFormat) -> Node:
    """A layer's place and cost; sizes add up every file of it (a VMDK's extents too)."""
    try:
        full = layer.measure(layer.virtual_size, [(0, layer.virtual_size)], {})[1]
    except VmferryError:
        full = layer.virtual_size
    files = [os.path.realpath(p) for p in layer.files()]
    stats = [os.stat(p) for p in files if os.path.exists(p)]
    apparent = sum(st.st_size for st in stats)
    return Node(
        path=path,
        format=layer.name,
        virtual_size=layer.virtual_size,
        file_size=apparent,
        allocated_bytes=sum(st.st_blocks * 512 for st in stats),
        identity=dict(layer.identity()),
        parent_ref=layer.parent_ref(),
        full_size=max(full, apparent),
        files=files,
    )


def discover(paths: Sequence[str | os.PathLike[str]], *, max_depth: int | None = None) -> Forest:
    """Scan files and folders for images and link them into chains.

    ``max_depth`` limits how many folder levels below each path are searched (None: all).
    """
    roots = [Path(os.path.abspath(p)) for p in paths]
    nodes: list[Node] = []
    unreadable: list[Unreadable] = []
    configs: dict[str, list[str]] = {}
    memory: list[Path] = []
    for path in _walk(roots, max_depth):
        suffix = path.suffix.lower()
        if suffix in MEMORY_EXTENSIONS:
            memory.append(path)
        elif suffix in CONFIG_EXTENSIONS or (suffix == ".vmsd"):
            disks = _config_disks(path)
            if disks is not None:
                configs[str(path)] = disks
        elif suffix in DISK_EXTENSIONS:
            found = _node(path)
            if isinstance(found, Node):
                nodes.append(found)
            elif isinstance(found, Unreadable):
                unreadable.append(found)
    nodes = _without_companions(nodes)
    _link(nodes)
    _mark_in_use(nodes, configs)
    return Forest(nodes, unreadable, configs, memory)


def _without_companions(nodes: list[Node]) -> list[Node]:
    """Drop files that are part of another layer (a descriptor's flat or sparse extents)."""
    companions = {f for n in nodes for f in n.files if f != os.path.realpath(n.path)}
    return [n for n in nodes if os.path.realpath(n.path) not in companions]


def _link(nodes: list[Node]) -> None:
    by_real = {os.path.realpath(n.path): n for n in nodes}
    by_identity: dict[tuple[str, str, str], list[Node]] = {}
    for n in nodes:
        for key, value in n.identity.items():
            by_identity.setdefault((n.format, key, str(value).lower()), []).append(n)
    for child in nodes:
        ref = child.parent_ref
        if ref is None:
            continue
        located = None
        for cand in candidate_paths(child.path, ref):
            located = by_real.get(os.path.realpath(cand))
            if located is not None:
                break
        if located is not None and _identity_matches(ref, located, child):
            child.parent = located
            located.children.append(child)
            continue
        matches = _by_pinned_identity(ref, by_identity, exclude=child)
        stored = ", ".join(ref.hints) or "(no path stored)"
        if located is not None:
            child.problem = "broken"
            child.claimed_parent = located
            if ref.identity:
                want = ", ".join(f"{k}={v}" for k, v in ref.identity.items())
                have = ", ".join(f"{k}={located.identity.get(k)}" for k in ref.identity)
                evidence = f"child pins {want}; the file has {have}"
            else:
                evidence = (
                    f"the parent is {located.virtual_size} bytes, larger than the "
                    f"child's {child.virtual_size}: it was resized"
                )
            child.reason = (
                f"parent {located.path} is not the disk this child was created from "
                f"({evidence}): it was modified or replaced"
            )
            child.repair = (
                f"vmferry rebase {child.path} -b {matches[0].path}"
                if matches
                else "restore the original parent from backup; only if its content is known to "
                f"be unchanged: vmferry rebase {child.path} -b {located.path} --unsafe"
            )
        else:
            child.problem = "orphan"
            child.reason = f"parent not found (the image names {stored})"
            child.repair = (
                f"vmferry rebase {child.path} -b {matches[0].path}"
                if matches
                else "find the parent file and run: vmferry rebase CHILD -b PARENT"
            )


def _identity_matches(ref: ParentRef, parent: Node, child: Node | None = None) -> bool:
    """Pinned values equal; for formats that pin nothing (qcow2), at least the size fits.

    A parent larger than its child was resized after the child was made: the child's
    ranges no longer line up with it (the seed's "never resize a VHD with snapshots").
    """
    if not ref.identity:
        return child is None or parent.virtual_size <= child.virtual_size
    return not identity_mismatches(ref, parent.identity)


def _by_pinned_identity(
    ref: ParentRef, index: dict[tuple[str, str, str], list[Node]], exclude: Node
) -> list[Node]:
    """Images elsewhere in the scan that carry the identity the child pins (a moved parent)."""
    if not ref.identity:
        return []
    sets = [
        {id(n): n for n in index.get((ref.format, k, str(v).lower()), [])}
        for k, v in ref.identity.items()
    ]
    common = set(sets[0]).intersection(*sets[1:])
    return [sets[0][i] for i in common if sets[0][i] is not exclude]


def _config_disks(path: Path) -> list[str] | None:
    """Disk paths a VM configuration names, or None if it is not a VM config vmferry reads."""
    try:
        from vmferry.vm.readers import read_config
    except ImportError:  # pragma: no cover - vm package always ships with vmferry
        return None
    try:
        vm = read_config(path)
    except VmferryError:
        return None
    out = []
    for disk in vm.disks:
        if disk.path:
            p = Path(disk.path.replace("\\", "/"))
            if not p.is_absolute():
                p = path.parent / p
            out.append(os.path.normpath(p))
    return out


def _mark_in_use(nodes: list[Node], configs: dict[str, list[str]]) -> None:
    by_real = {os.path.realpath(n.path): n for n in nodes}
    by_name: dict[str, list[Node]] = {}
    for n in nodes:
        by_name.setdefault(n.path.name.lower(), []).append(n)
    for config, disks in configs.items():
        for disk in disks:
            node = by_real.get(os.path.realpath(disk))
            if node is None:
                node = _by_name_in_vm_folder(by_name, disk, Path(config))
            if node is not None and config not in node.used_by:
                node.used_by.append(config)


def vm_folder(config: Path) -> Path:
    """The folder a VM's files belong in.  Hyper-V keeps its config in ``Virtual Machines/``
    beside ``Virtual Hard Disks/`` and ``Snapshots/``: there the VM folder is one level up."""
    return (
        config.parent.parent
        if config.parent.name.lower() == "virtual machines"
        else (config.parent)
    )


def _by_name_in_vm_folder(by_name: dict[str, list[Node]], disk: str, config: Path) -> Node | None:
    """A disk named by a path from another machine (``C:\\VMs\\web01\\...``): the one image of
    that name in the VM's folder."""
    name = disk.replace("\\", "/").rsplit("/", 1)[-1].lower()
    folder = vm_folder(config)
    same = [n for n in by_name.get(name, []) if folder in n.path.parents]
    return same[0] if len(same) == 1 else None
