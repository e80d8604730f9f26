"""The disks inside a XenServer/XCP-ng ``.xva`` export, read in place as one layer each.

xapi writes each VDI as tar members ``Ref:<id>/NNNNNNNN``: chunk N of the disk, 1 MiB each,
decimal, in order; an all-zero chunk is left out (except the last, which is always written), and
each chunk is followed by a ``.checksum`` (SHA-1, hex) or ``.xxhash`` member.  The VDI object in
``ova.xml`` gives the virtual size.  Like the OVA reader nothing is extracted: member names are
only compared, never used as paths, and every offset is checked against the archive.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Self

from vmferry.disk.base import Alloc, CheckReport, DiskFormat, Extent
from vmferry.disk.blockfile import BlockFile
from vmferry.errors import CorruptImageError, UnsupportedFeatureError

CHUNK = 1 << 20
_CHUNK_NAME = re.compile(r"^(?P<ref>Ref:[^/]+)/(?P<n>\d{8})(?P<sum>\.checksum|\.xxhash)?$")
#: an XVA holds two members per MiB of data; the tar index is bounded by the file size anyway
MAX_XVA_MEMBERS = 1 << 26


def xva_chunks(f: BlockFile) -> dict[str, dict[int, tuple[int, int, int | None]]]:
    """VDI ref → chunk number → (data offset, size, offset of its .checksum member or None)."""
    from vmferry.disk.ova import read_tar_index

    members = read_tar_index(f, max_members=min(MAX_XVA_MEMBERS, f.size // 512 + 1))
    out: dict[str, dict[int, tuple[int, int, int | None]]] = {}
    sums: dict[tuple[str, int], int] = {}
    for m in members:
        match = _CHUNK_NAME.match(m.name)
        if match is None or m.kind != "file":
            continue
        ref, n = match.group("ref"), int(match.group("n"))
        if match.group("sum") == ".checksum":
            sums[(ref, n)] = m.offset
        elif match.group("sum") is None:
            out.setdefault(ref, {})[n] = (m.offset, m.size, None)
    for (ref, n), at in sums.items():
        if ref in out and n in out[ref]:
            off, size, _ = out[ref][n]
            out[ref][n] = (off, size, at)
    return out


class XvaDisk(DiskFormat):
    """One VDI of an XVA: DATA where a chunk is present, UNALLOCATED (zeros) elsewhere."""

    name = "xva"
    writable_format = False
    granularity = CHUNK

    def __init__(
        self, f: BlockFile, size: int, chunks: dict[int, tuple[int, int, int | None]], ref: str
    ) -> None:
        self.file = f
        self.virtual_size = size
        self.chunks = chunks
        self.ref = ref
        self.writable = False
        path = str(f.path)
        count = -(-size // CHUNK)
        for n, (_off, length, _sum) in chunks.items():
            want = min(CHUNK, size - n * CHUNK)
            if n >= count:
                raise CorruptImageError(
                    f"XVA chunk {ref}/{n:08d} lies past the disk's {size} bytes", path=path
                )
            if length != want:
                raise CorruptImageError(
                    f"XVA chunk {ref}/{n:08d} holds {length} bytes, not {want}", path=path
                )

    @classmethod
    def open(cls, f: BlockFile, *, writable: bool = False) -> Self:
        raise UnsupportedFeatureError(
            "an XVA disk is opened through its VM (vmferry migrate), not alone", path=str(f.path)
        )

    @classmethod
    def open_vdi(cls, f: BlockFile, ref: str, size: int) -> Self:
        chunks = xva_chunks(f).get(ref, {})
        return cls(f, size, chunks, ref)

    def info(self) -> dict[str, Any]:
        return {"vdi": self.ref, "chunks_present": len(self.chunks)}

    def block_status(self, offset: int, length: int) -> Extent:
        self._check_range(offset, length)
        n = offset // CHUNK
        end = min(offset + length, (n + 1) * CHUNK)
        alloc = Alloc.DATA if n in self.chunks else Alloc.UNALLOCATED
        return Extent(offset, end - offset, alloc)

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        parts: list[bytes] = []
        pos, end = offset, offset + length
        while pos < end:
            n = pos // CHUNK
            stop = min(end, (n + 1) * CHUNK)
            chunk = self.chunks.get(n)
            if chunk is None:
                parts.append(bytes(stop - pos))
            else:
                parts.append(self.file.pread(chunk[0] + pos - n * CHUNK, stop - pos))
            pos = stop
        return b"".join(parts)

    def check(self) -> CheckReport:
        """SHA-1 of every chunk against its ``.checksum`` member (xapi's own integrity check)."""
        report = CheckReport()
        missing = 0
        for n, (off, length, at) in sorted(self.chunks.items()):
            if at is None:
                missing += 1
                continue
            want = self.file.pread(at, 40).decode("ascii", "replace").strip().lower()
            if hashlib.sha1(self.file.pread(off, length)).hexdigest() != want:
                report.corruptions.append(f"chunk {self.ref}/{n:08d}: SHA-1 mismatch")
        if missing:
            report.notes.append(f"{missing} chunk(s) without a .checksum member (not verified)")
        return report
