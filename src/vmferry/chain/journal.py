"""The note an in-place merge leaves beside the parent while it works.

Writing into a parent changes its identity (a VHDX bumps its DataWriteGuid, a VMDK its CID),
so a child that pinned the old identity would be refused if the merge were killed half-way,
although its content is intact (it still covers every range written so far).  The journal
records which parent is being merged into and the identity its children pinned; the resolver
accepts exactly that mismatch, with a warning to finish the merge, and nothing else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vmferry.fsutil import sync_dir, write_file_atomic

_MAX_JOURNAL = 1 << 20


def journal_path(parent: str | os.PathLike[str]) -> Path:
    p = Path(os.path.realpath(parent))
    return p.with_name(f".{p.name}.vmferry-merge")


def write_journal(parent: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    path = journal_path(parent)
    return write_file_atomic(path, json.dumps(record, indent=1).encode())


def read_journal(parent: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = journal_path(parent)
    try:
        if path.stat().st_size > _MAX_JOURNAL:
            return None
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def remove_journal(parent: str | os.PathLike[str]) -> None:
    try:
        os.unlink(journal_path(parent))
    except FileNotFoundError:
        return
    sync_dir(journal_path(parent).parent)


def tolerated_mismatch(
    parent: str | os.PathLike[str], pinned: dict[str, str]
) -> dict[str, Any] | None:
    """The journal that explains a child pinning ``pinned`` of ``parent``, if there is one."""
    record = read_journal(parent)
    if not record or os.path.realpath(parent) != record.get("parent"):
        return None
    if not os.path.exists(str(record.get("child", ""))):
        return None  # the merge finished but was killed before removing this note
    before = {k: str(v).lower() for k, v in (record.get("pinned") or {}).items()}
    if before and before == {k: str(v).lower() for k, v in pinned.items()}:
        return record
    return None
