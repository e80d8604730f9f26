"""The binary side of an LVM2 physical volume: label, PV header, metadata area headers.

Layout (all little-endian, learned from LVM2's ``format_text/layout.h``):

* a 512-byte label in one of the first four sectors: ``LABELONE``, its own sector number, a
  CRC of bytes 20-511, the offset of the PV header, and the type ``LVM2 001``;
* the PV header: the PV UUID (32 characters), the device size in bytes, then two lists of
  ``(offset, size)`` byte ranges, each ending with a zero pair: data areas (where extents
  start: ``pe_start``) and metadata areas;
* each metadata area begins with a 512-byte header: CRC of bytes 4-511, the magic
  ``" LVM2 x[5A%r0N*>"``, version 1, the area's own start and size, and raw locations
  ``(offset, size, checksum, flags)``; slot 0 is the committed metadata text, at ``offset``
  from the area start, wrapping to just past the header when it runs over the area's end.

Checksums use LVM's CRC-32 (the reflected 0xEDB88320 polynomial, initial value 0xf597a6cf and
no final inversion), which is zlib's CRC-32 with the pre- and post-inversion undone.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from vmferry.guest.errors import GuestLimitError
from vmferry.guest.lvm.errors import LvmMetadataError
from vmferry.guest.overlay import ReadableDisk

SECTOR = 512
LABEL_ID = b"LABELONE"
LABEL_TYPE = b"LVM2 001"
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
MDA_HEADER_SIZE = 512
INITIAL_CRC = 0xF597A6CF
RAW_LOCN_IGNORED = 0x1
#: The text of one metadata copy may not be larger (LVM's default area is 1 MiB).
MAX_METADATA = 16 << 20
#: Data/metadata area list entries read from a PV header at most (LVM writes 1 and 1-2).
MAX_AREAS = 8


def lvm_crc(data: bytes | memoryview, initial: int = INITIAL_CRC) -> int:
    """LVM2's ``calc_crc``: CRC-32 without zlib's inversions, seeded with ``initial``."""
    return zlib.crc32(data, initial ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def format_uuid(raw: str) -> str:
    """``Dmq4n5Abh3...`` (32 characters) → LVM's dashed form ``Dmq4n5-Abh3-...`` (6-4-4-4-4-4-6)."""
    parts, at = [], 0
    for n in (6, 4, 4, 4, 4, 4, 6):
        parts.append(raw[at : at + n])
        at += n
    return "-".join(parts)


@dataclass(frozen=True)
class MetadataCopy:
    """One committed metadata text found in a metadata area, its checksum verified."""

    text: str
    offset: int  # byte offset of the area on the PV
    seqno: int | None = None


@dataclass
class PvLabel:
    """What a PV says about itself before any metadata text is read."""

    uuid: str  # dashed, as the text metadata's ``id`` writes it
    label_sector: int
    device_size: int  # bytes; 0 in labels from old LVM versions
    data_areas: list[tuple[int, int]]  # (offset, size) bytes; size 0: to the device end
    metadata_areas: list[tuple[int, int]]
    metadata: list[MetadataCopy] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # damaged areas skipped

    @property
    def pe_start(self) -> int | None:
        return self.data_areas[0][0] if self.data_areas else None


def find_label(dev: ReadableDisk) -> int | None:
    """The sector (0-3) holding an LVM2 label, or None."""
    head = dev.read(0, min(dev.virtual_size, 4 * SECTOR))
    for sector in range(4):
        at = sector * SECTOR
        if head[at : at + 8] == LABEL_ID and head[at + 24 : at + 32] == LABEL_TYPE:
            return sector
    return None


def read_pv_label(dev: ReadableDisk) -> PvLabel:
    """Read the label and PV header of ``dev`` and every metadata copy on it."""
    sector = find_label(dev)
    if sector is None:
        raise LvmMetadataError("no LVM2 label in the first four sectors")
    raw = dev.read(sector * SECTOR, SECTOR)
    own_sector, crc, offset = struct.unpack_from("<QII", raw, 8)
    if own_sector != sector:
        raise LvmMetadataError(f"LVM label in sector {sector} says it is in sector {own_sector}")
    if lvm_crc(raw[20:]) != crc:
        raise LvmMetadataError(f"LVM label checksum mismatch in sector {sector}")
    if offset < 32 or offset + 40 + 16 > SECTOR:
        raise LvmMetadataError(f"LVM PV header offset {offset} is outside the label sector")
    try:
        uuid_raw = raw[offset : offset + 32].decode("ascii")
    except UnicodeDecodeError:
        raise LvmMetadataError("LVM PV UUID is not ASCII") from None
    (device_size,) = struct.unpack_from("<Q", raw, offset + 32)
    at = offset + 40
    data, at = _area_list(raw, at, "data")
    meta, at = _area_list(raw, at, "metadata")
    label = PvLabel(format_uuid(uuid_raw), sector, device_size, data, meta)
    for area in meta:
        try:
            copy = read_metadata_area(dev, *area)
        except (LvmMetadataError, GuestLimitError) as exc:
            label.problems.append(f"metadata area at {area[0]}: {exc}")
            continue
        if copy is not None:
            label.metadata.append(copy)
    return label


def _area_list(raw: bytes, at: int, what: str) -> tuple[list[tuple[int, int]], int]:
    out: list[tuple[int, int]] = []
    while True:
        if at + 16 > len(raw):
            raise LvmMetadataError(f"LVM PV header: the {what} area list runs off the sector")
        offset, size = struct.unpack_from("<QQ", raw, at)
        at += 16
        if offset == 0 and size == 0:
            return out, at
        if len(out) >= MAX_AREAS:
            raise GuestLimitError(f"LVM PV header lists more than {MAX_AREAS} {what} areas")
        out.append((offset, size))


def read_metadata_area(dev: ReadableDisk, start: int, size: int) -> MetadataCopy | None:
    """The committed metadata text of the area at ``start`` (None: the area holds none)."""
    if size < 2 * MDA_HEADER_SIZE or start < 0 or start + size > dev.virtual_size:
        raise LvmMetadataError(
            f"metadata area {start}+{size} does not fit the {dev.virtual_size}-byte PV"
        )
    head = dev.read(start, MDA_HEADER_SIZE)
    (crc,) = struct.unpack_from("<I", head, 0)
    if head[4:20] != MDA_MAGIC:
        raise LvmMetadataError("wrong magic in the metadata area header")
    if lvm_crc(head[4:]) != crc:
        raise LvmMetadataError("metadata area header checksum mismatch")
    version, own_start, own_size = struct.unpack_from("<IQQ", head, 20)
    if version != 1:
        raise LvmMetadataError(f"metadata area header version {version} (only 1 is known)")
    if own_start != start or own_size != size:
        raise LvmMetadataError(
            f"metadata area header says {own_start}+{own_size}, the PV header {start}+{size}"
        )
    offset, length, checksum, flags = struct.unpack_from("<QQII", head, 40)  # slot 0: committed
    if flags & RAW_LOCN_IGNORED or (offset == 0 and length == 0):
        return None
    if offset < MDA_HEADER_SIZE or offset >= size:
        raise LvmMetadataError(f"metadata text offset {offset} is outside its {size}-byte area")
    if length > size - MDA_HEADER_SIZE:
        raise LvmMetadataError(f"metadata text of {length} bytes does not fit its area")
    if length > MAX_METADATA:
        raise GuestLimitError(f"metadata text of {length} bytes is over {MAX_METADATA}")
    first = min(length, size - offset)
    text = dev.read(start + offset, first)
    if first < length:  # the circular buffer wrapped: the rest follows the header
        text += dev.read(start + MDA_HEADER_SIZE, length - first)
    if lvm_crc(text) != checksum:
        raise LvmMetadataError("metadata text checksum mismatch")
    return MetadataCopy(text.decode("utf-8", "surrogateescape"), start)
