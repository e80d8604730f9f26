"""Raw images: the file is the disk.  Holes in the file are zeros and stay holes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Self

from vmferry.disk.base import Alloc, DiskFormat, Extent, ParentInfo
from vmferry.disk.blockfile import BlockFile
from vmferry.errors import UsageError

_PREALLOC = ("off", "falloc", "full")


class Raw(DiskFormat):
    name = "raw"
    aliases = ("img",)
    extensions = (".raw", ".img", ".bin", ".dd")
    create_options = {"preallocation": "off (sparse, default), falloc or full"}

    def __init__(self, f: BlockFile, writable: bool) -> None:
        self.file = f
        self.writable = writable
        self.virtual_size = f.size
        self.granularity = max(f.blksize, 4096)

    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        return 1  # anything can be raw; every real format outbids it

    @classmethod
    def open(cls, f: BlockFile, *, writable: bool = False) -> Self:
        return cls(f, writable)

    @classmethod
    def create(
        cls, f: BlockFile, size: int, options: Mapping[str, str], parent: ParentInfo | None = None
    ) -> Self:
        if parent is not None:
            raise UsageError("raw images cannot have a parent")
        mode = options.get("preallocation", "off")
        if mode not in _PREALLOC:
            raise UsageError(f"preallocation must be one of {', '.join(_PREALLOC)}")
        f.truncate(size)
        if mode == "falloc" and size:
            f.preallocate(0, size)
        elif mode == "full":
            chunk = bytes(1 << 20)
            for off in range(0, size, len(chunk)):
                f.write(off, chunk[: min(len(chunk), size - off)])
        return cls(f, True)

    @classmethod
    def measure(
        cls, virtual_size: int, data_ranges: Sequence[tuple[int, int]], options: Mapping[str, str]
    ) -> tuple[int, int]:
        # On a filesystem with holes only the written 4 KiB pages take space.
        required = sum(_pages(off, length) for off, length in data_ranges) * 4096
        if options.get("preallocation", "off") != "off":
            required = virtual_size
        return required, virtual_size

    def info(self) -> dict[str, Any]:
        return {"block_device": self.file.is_block_device}

    def block_status(self, offset: int, length: int) -> Extent:
        self._check_range(offset, length)
        if self.file.is_block_device:
            return Extent(offset, length, Alloc.DATA, offset)
        for run_off, run_len, is_data in self.file.data_runs(offset, length):
            if is_data:
                return Extent(run_off, run_len, Alloc.DATA, run_off)
            return Extent(run_off, run_len, Alloc.ZERO)
        return Extent(offset, length, Alloc.ZERO)

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        return self.file.pread(offset, length)

    def read_into(self, offset: int, view: memoryview) -> None:
        self._check_range(offset, len(view))
        self.file.pread_into(offset, view)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._require_writable()
        self._check_range(offset, len(data))
        self.file.write(offset, data)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._require_writable()
        self._check_range(offset, length)
        if self.file.is_block_device or not self.file.punch_hole(offset, length):
            super().write_zeroes(offset, length)

    def resize(self, new_size: int) -> None:
        self._require_writable()
        self.file.truncate(new_size)
        self.virtual_size = new_size


def _pages(offset: int, length: int) -> int:
    return (offset + length + 4095) // 4096 - offset // 4096
