"""Small durable-file helpers shared by every place that must survive a crash mid-write.

A rename is atomic, but only a synced file renamed in a synced directory is still there, whole,
after a power loss: journals, resume state and finished outputs all need exactly that order.
"""

from __future__ import annotations

import os
from pathlib import Path


def sync_dir(path: str | os.PathLike[str]) -> None:
    """Make the directory's entries (a rename, an unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``data``: a crash at any instant leaves the old or the new file."""
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    sync_dir(final.parent)
    return final
