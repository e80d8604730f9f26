"""What snapshots cost now, and what they can cost.

The user's source names the three variables: how much changed since each snapshot, whether
memory was saved with it, and where the files live.  ``du`` measures all three per chain:
bytes used now (apparent and allocated), the memory-state files, and the worst case, where
every frozen (non-leaf) member stays as it is and every leaf grows to its fully allocated
size, because a differencing disk can grow as large as its parent's whole virtual disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmferry.chain.discover import Forest, Node, vm_folder


@dataclass
class ChainUsage:
    name: str
    base: str
    files: list[dict[str, Any]] = field(default_factory=list)
    memory_files: list[dict[str, Any]] = field(default_factory=list)
    used_bytes: int = 0
    allocated_bytes: int = 0
    worst_case_bytes: int = 0
    away_from_vm: list[str] = field(default_factory=list)
    used_by: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _file_entry(node: Node) -> dict[str, Any]:
    grows_to = node.full_size if node.is_leaf else node.file_size
    return {
        "path": str(node.path),
        "format": node.format,
        "role": "leaf" if node.is_leaf else ("base" if node.parent is None else "frozen"),
        "used_bytes": node.file_size,
        "allocated_bytes": node.allocated_bytes,
        "worst_case_bytes": max(grows_to, node.file_size),
        "problem": node.problem,
    }


def _memory_entry(path: Path) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": str(path), "used_bytes": st.st_size, "allocated_bytes": st.st_blocks * 512}


def usage(forest: Forest) -> dict[str, Any]:
    """Per-chain usage plus a total; memory files go to the chain whose VM folder holds them."""
    chains: list[ChainUsage] = []
    for root in forest.roots:
        members = forest.tree(root)
        cu = ChainUsage(name=root.path.stem, base=str(root.path))
        for node in members:
            entry = _file_entry(node)
            cu.files.append(entry)
            cu.used_bytes += entry["used_bytes"]
            cu.allocated_bytes += entry["allocated_bytes"]
            cu.worst_case_bytes += entry["worst_case_bytes"]
            for cfg in node.used_by:
                if cfg not in cu.used_by:
                    cu.used_by.append(cfg)
        vm_dirs = [vm_folder(Path(c)) for c in cu.used_by]
        if vm_dirs:
            for node in members:
                if not any(d == node.path.parent or d in node.path.parents for d in vm_dirs):
                    cu.away_from_vm.append(str(node.path))
        chains.append(cu)
    _attribute_memory(forest, chains)
    total = {
        "used_bytes": sum(c.used_bytes for c in chains),
        "allocated_bytes": sum(c.allocated_bytes for c in chains),
        "worst_case_bytes": sum(c.worst_case_bytes for c in chains),
        "chains": len(chains),
        "files": sum(len(c.files) for c in chains),
    }
    attributed = {e["path"] for c in chains for e in c.memory_files}
    extra = [_memory_entry(m) for m in forest.memory_files if str(m) not in attributed]
    if extra:
        total["unattributed_memory_files"] = extra
        total["used_bytes"] += sum(e["used_bytes"] for e in extra)
        total["allocated_bytes"] += sum(e["allocated_bytes"] for e in extra)
        total["worst_case_bytes"] += sum(e["used_bytes"] for e in extra)
    return {"total": total, "chains": [c.to_json() for c in chains]}


def _attribute_memory(forest: Forest, chains: list[ChainUsage]) -> None:
    """A memory file goes to the chain whose VM config (else disk files) is nearest to it.

    Nearest = longest common folder, allowing sibling folders of one VM folder (Hyper-V keeps
    ``Snapshots/`` beside ``Virtual Hard Disks/``), never a folder further away than that.
    """
    for mem in forest.memory_files:
        best: tuple[int, ChainUsage] | None = None
        for cu in chains:
            anchors = [vm_folder(Path(c)) for c in cu.used_by]
            anchors = anchors or [Path(f["path"]).parent for f in cu.files]
            for anchor in anchors:
                common = len(Path(os.path.commonpath([anchor, mem.parent])).parts)
                if common >= len(anchor.parts) - 1 and (best is None or common > best[0]):
                    best = (common, cu)
        if best is not None:
            cu = best[1]
            entry = _memory_entry(mem)
            cu.memory_files.append(entry)
            cu.used_bytes += entry["used_bytes"]
            cu.allocated_bytes += entry["allocated_bytes"]
            cu.worst_case_bytes += entry["used_bytes"]
