"""Resume state: ``OUTDIR/.vmferry-migrate.json``, rewritten atomically after every step.

It records what the migration is (source fingerprint, target, format) and, per disk, the
finished output (name, digest, file size and mtime).  ``--resume`` redoes nothing that the state
says is finished and that still looks the same on disk; anything else is redone from scratch
(a half-written output only ever exists under a hidden temporary name, which resume removes).
The source fingerprint (config digest, each chain layer's path, size and mtime) makes resume
refuse when the source changed in between: mixing disks from two states of a VM is corruption.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from vmferry.errors import UsageError
from vmferry.fsutil import write_file_atomic

STATE_NAME = ".vmferry-migrate.json"
VERSION = 1
_TEMP = re.compile(r"^\.(?P<name>.+)\.vmferry-[0-9a-f]{8}$")
MAX_STATE_BYTES = 4 << 20


def fingerprint(config: Path | None, layer_paths: list[list[str]]) -> dict[str, Any]:
    """What the source is made of, cheaply: a changed file changes this."""
    files: list[dict[str, Any]] = []
    if config is not None and config.is_file():
        h = hashlib.sha256()
        with open(config, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        files.append({"path": str(config), "sha256": h.hexdigest()})
    for layers in layer_paths:
        for p in layers:
            st = os.stat(p)
            files.append({"path": p, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"files": files}


def load(outdir: Path) -> dict[str, Any] | None:
    path = outdir / STATE_NAME
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_STATE_BYTES:
        raise UsageError("resume state file is too large to be vmferry's", path=str(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, ValueError) as exc:
        raise UsageError(
            f"resume state is unreadable: {exc}",
            path=str(path),
            hint="remove OUTDIR (or the state file) and migrate again without --resume",
        ) from None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise UsageError("resume state has an unknown version", path=str(path))
    return data


def save(outdir: Path, state: dict[str, Any]) -> None:
    """Write the state under a temporary name, sync, rename: a kill leaves the old or new one."""
    state["version"] = VERSION
    write_file_atomic(outdir / STATE_NAME, json.dumps(state, indent=2, sort_keys=True).encode())


def file_stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def finished(entry: dict[str, Any] | None, path: Path) -> bool:
    """The state says this output is done and the file is still the one that was verified."""
    if not entry or entry.get("status") != "done" or not path.is_file():
        return False
    return entry.get("stamp") == file_stamp(path)


def remove_leftovers(outdir: Path, names: set[str]) -> list[str]:
    """Delete hidden temporary outputs of an interrupted run (only for names it writes)."""
    removed: list[str] = []
    lowered = {n.lower() for n in names}
    for entry in os.scandir(outdir):
        m = _TEMP.match(entry.name)
        if m and m.group("name").lower() in lowered and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed.append(entry.name)
        elif entry.name.startswith(".vmferry-ova-") and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.name)
    tmp = outdir / f"{STATE_NAME}.tmp"
    if tmp.exists():
        tmp.unlink()
    return removed
