"""What every VMDK extent kind (sparse, COWD, SEsparse, flat, zero) offers the driver.

A VMDK disk is a concatenation of extents; the driver maps a disk offset to (extent, offset in
extent) and asks the extent.  Extents know nothing of parents: ``has_parent`` only decides
whether a hole is "ask the parent" (UNALLOCATED) or zeros (ZERO).
"""

from __future__ import annotations

from typing import Any

from vmferry.disk.base import Alloc, CheckReport
from vmferry.disk.blockfile import BlockFile
from vmferry.errors import UnsupportedFeatureError

SECTOR = 512

#: (status, run length, host offset or None, compressed)
Status = tuple[Alloc, int, int | None, bool]


class ExtentBase:
    """A piece of the disk ``size`` bytes long, usually backed by one file."""

    kind: str = "?"
    file: BlockFile | None = None
    size: int = 0
    grain: int = 0  # bytes per allocation unit; 0 for extents that do not allocate
    compressed: bool = False
    writable: bool = False
    #: the file is the descriptor's own file (monolithic images): closed by the driver
    shares_main_file: bool = False

    def status(self, offset: int, length: int, has_parent: bool) -> Status:
        raise NotImplementedError

    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def read_into(self, offset: int, view: memoryview) -> None:
        """``read`` into the caller's buffer; extents that can fill it without a copy do."""
        view[:] = self.read(offset, len(view))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise UnsupportedFeatureError(f"vmferry cannot write {self.kind} VMDK extents")

    def check_write(self, offset: int) -> None:
        """Raise if a write at ``offset`` cannot be done (before anything is changed)."""

    def write_with_parent(
        self, offset: int, data: bytes | bytearray | memoryview, has_parent: bool
    ) -> None:
        """Sparse extents need to know whether a hole may be left for the parent."""
        self.write(offset, data)

    def write_zeroes(self, offset: int, length: int, has_parent: bool) -> None:
        chunk = bytes(min(length, 1 << 20))
        end = offset + length
        while offset < end:
            n = min(len(chunk), end - offset)
            self.write(offset, memoryview(chunk)[:n])
            offset += n

    # --- growing (``Vmdk.resize``): two phases, so the driver can order them across files ---

    def can_grow(self, new_size: int) -> str | None:
        """None when ``grow(new_size)`` works on this extent, else why not (before any change)."""
        return f"{self.kind} extents cannot grow"

    def grow(self, new_size: int) -> None:
        """Phase one: make room for ``new_size`` bytes where no reader looks yet, synced.
        Readers still see the old extent afterwards; ``publish_size`` makes it the new one."""
        raise UnsupportedFeatureError(f"{self.kind} extents cannot grow")

    def publish_size(self) -> None:
        """Phase two: the extent's own record of its size (if it has one) says the new size."""

    def flush(self) -> None:
        if self.file is not None and self.writable:
            self.file.fsync()

    def close(self) -> None:
        if self.file is not None and not self.shares_main_file:
            self.file.close()

    def check(self, report: CheckReport) -> None:
        """Add this extent's structural problems to ``report``."""

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind, "size": self.size}
        if self.file is not None:
            out["file"] = str(self.file.path)
        if self.grain:
            out["grain_size"] = self.grain
        if self.compressed:
            out["compressed"] = True
        return out


class ZeroExtent(ExtentBase):
    """A ``ZERO`` extent line: reads as zeros, stores nothing."""

    kind = "ZERO"

    def __init__(self, size: int) -> None:
        self.size = size

    def status(self, offset: int, length: int, has_parent: bool) -> Status:
        return (Alloc.ZERO, length, None, False)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)
