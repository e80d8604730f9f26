"""The time stamped into files vmferry writes into a guest, and new inodes' generation numbers.

Reproducible outputs: migrating one guest twice must give the same bytes, so that outputs can
be compared (``qemu-img compare``) and cached.  The time honours ``SOURCE_DATE_EPOCH`` (the
reproducible-builds convention: integer seconds since 1970 UTC; a malformed value is refused
rather than ignored); without it, the wall clock.  Generation numbers (ext4 ``i_generation``,
which NFS file handles use to tell a reused inode number apart) are derived from the
filesystem's UUID and the inode number through SHA-256 instead of drawn at random: unique enough
across inodes and filesystems, and identical between two runs.
"""

from __future__ import annotations

import hashlib
import os
import time

from vmferry.errors import UsageError

ENV = "SOURCE_DATE_EPOCH"


def now_ns() -> int:
    """Nanoseconds since 1970 UTC: ``SOURCE_DATE_EPOCH`` when set, else the wall clock."""
    value = os.environ.get(ENV)
    if value is None or value == "":
        return time.time_ns()
    if not value.isascii() or not value.isdigit() or len(value) > 12:
        raise UsageError(
            f"{ENV}={value!r} is not a whole number of seconds since 1970",
            hint=f"unset {ENV} or set it to e.g. $(date +%s)",
        )
    return int(value) * 1_000_000_000


def now() -> int:
    """Whole seconds since 1970 UTC (see :func:`now_ns`)."""
    return now_ns() // 1_000_000_000


def generation(fs_uuid: bytes, ino: int) -> int:
    """A 32-bit generation number for inode ``ino`` of the filesystem ``fs_uuid``."""
    digest = hashlib.sha256(b"vmferry-generation\0" + fs_uuid + ino.to_bytes(8, "little")).digest()
    return int.from_bytes(digest[:4], "little")
