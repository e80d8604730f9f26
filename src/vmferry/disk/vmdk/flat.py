"""FLAT / VMFS extents: a plain file (or a window of one) holding the bytes as they are."""

from __future__ import annotations

from vmferry.disk.base import Alloc
from vmferry.disk.blockfile import BlockFile
from vmferry.disk.vmdk.extent import ExtentBase, Status


class FlatExtent(ExtentBase):
    """``RW <sectors> FLAT "x-flat.vmdk" <offset>``: bytes at ``start`` in ``file``.

    Holes in the file read as zeros and are reported ZERO (a flat extent never has a parent),
    which keeps converting a thin ESXi ``-flat.vmdk`` as fast as a raw file.
    """

    def __init__(self, f: BlockFile, size: int, start: int, kind: str, writable: bool) -> None:
        self.file = f
        self.size = size
        self.start = start
        self.kind = kind
        self.writable = writable

    def status(self, offset: int, length: int, has_parent: bool) -> Status:
        f = self.file
        assert f is not None
        host = self.start + offset
        if f.is_block_device:
            return (Alloc.DATA, length, host, False)
        if host >= f.size:
            return (Alloc.ZERO, length, None, False)
        for run_off, run_len, is_data in f.data_runs(host, length):
            n = min(run_len, length)
            return (Alloc.DATA, n, run_off, False) if is_data else (Alloc.ZERO, n, None, False)
        return (Alloc.ZERO, length, None, False)

    def read(self, offset: int, length: int) -> bytes:
        assert self.file is not None
        return self.file.pread(self.start + offset, length)

    def read_into(self, offset: int, view: memoryview) -> None:
        assert self.file is not None
        self.file.pread_into(self.start + offset, view)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        assert self.file is not None
        self.file.write(self.start + offset, data)

    def write_zeroes(self, offset: int, length: int, has_parent: bool) -> None:
        f = self.file
        assert f is not None
        host = self.start + offset
        whole_file = self.start == 0 and offset + length <= self.size
        in_file = host + length <= f.size
        if not f.is_block_device and whole_file and in_file and f.punch_hole(host, length):
            return
        super().write_zeroes(offset, length, has_parent)

    def can_grow(self, new_size: int) -> str | None:
        """Bytes of the file past the extent would become disk content: they must read as
        zeros (a hole, as an interrupted resize of ours leaves them, or zeros written).  The
        driver checks that no other extent of the disk lies there."""
        f = self.file
        assert f is not None
        if not self.writable:
            return f"the extent file {f.path.name} is read-only"
        if f.is_block_device:
            return f"the extent {f.path.name} is a device, which cannot grow"
        tail, end = self.start + self.size, min(f.size, self.start + new_size)
        for run_off, run_len, is_data in f.data_runs(tail, max(0, end - tail)):
            if is_data and not _all_zero(f, run_off, run_len):
                return (
                    f"its file {f.path.name} holds data after the extent, which growing would "
                    "make part of the disk"
                )
        return None

    def grow(self, new_size: int) -> None:
        """Extend the file with a hole (reads as zeros); the descriptor is what gives the
        extent its size, so nothing here has to be published."""
        f = self.file
        assert f is not None
        if self.start + new_size > f.size:
            f.truncate(self.start + new_size)
            f.fsync()
        self.size = new_size


def _all_zero(f: BlockFile, offset: int, length: int) -> bool:
    from vmferry.ops.sparse import is_zero  # (only a resize asks: not at start-up)

    step = 1 << 20
    return all(
        is_zero(f.pread(at, min(step, offset + length - at)))
        for at in range(offset, offset + length, step)
    )
