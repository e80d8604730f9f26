"""Microsoft Virtual Hard Disk (VHD, Hyper-V ``.avhd``): fixed, dynamic and differencing.

Layout (big-endian throughout): a fixed disk is the raw data followed by a 512-byte footer.
Dynamic and differencing disks start with a copy of that footer, then a 1024-byte dynamic
header ("cxsparse") pointing at the block allocation table (BAT), then blocks, each a sector
bitmap (MSB first) padded to 512 bytes followed by ``block_size`` bytes of data, and end with
the footer.  Decisions where the spec or the tools disagree are written down in
``docs/formats/vhd.md``; the short version:

* virtual size: CHS product for creator apps "vpc " and "qemu" (unless the geometry is the
  maximum one), ``current_size`` for everything else (newest qemu's rule);
* dynamic disks honour the sector bitmap (a clear bit reads as zeros, per the spec); qemu
  ignores it, but every writer we know leaves zeros under clear bits, so both agree;
* differencing disks: a clear bit is UNALLOCATED (the parent answers);
* vmferry writes creator "qem2" (the marker every qemu reads as "current_size is exact").
"""

from __future__ import annotations

import datetime as _dt
import struct
import time
import uuid
from array import array
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import unquote, urlparse

from vmferry._layout import Layout, raw, u8, u16, u32, u64
from vmferry.disk.base import Alloc, CheckReport, DiskFormat, Extent, ParentInfo, ParentRef
from vmferry.disk.blockfile import MAX_METADATA_READ, BlockFile
from vmferry.errors import (
    CorruptImageError,
    NotThisFormatError,
    ResourceLimitError,
    TruncatedImageError,
    UnsupportedFeatureError,
    UsageError,
)

SECTOR = 512
FOOTER_SIZE = 512
HEADER_SIZE = 1024
COOKIE = b"conectix"
DYN_COOKIE = b"cxsparse"
FREE = 0xFFFFFFFF
NO_OFFSET = 0xFFFFFFFFFFFFFFFF

FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
_TYPE_NAMES = {FIXED: "fixed", DYNAMIC: "dynamic", DIFFERENCING: "differencing"}

#: seconds from the Unix epoch to 2000-01-01 00:00:00 UTC, the VHD epoch
VHD_EPOCH = 946684800
#: the largest geometry; an image carrying it has outgrown CHS and its size is current_size
MAX_GEOMETRY_SECTORS = 65535 * 16 * 255
#: 2040 GiB: the largest disk the VHD spec (and qemu) allow
MAX_VIRTUAL_SIZE = 0xFF000000 * SECTOR
#: creators whose images are sized by geometry (Virtual PC, qemu before force_size existed)
CHS_CREATORS = (b"vpc ", b"qemu")
#: what vmferry writes: qemu's force_size marker, read as "current_size is exact" by every
#: qemu version and ignored by Windows/Azure, which always use current_size
CREATOR_APP = b"qem2"
CREATOR_VERSION = 0x00050003
CREATOR_OS = b"Wi2k"

DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024
MIN_CREATE_BLOCK_SIZE = 512 * 1024
MAX_BLOCK_SIZE = 256 * 1024 * 1024
#: a stored path is at most 32767 UTF-16 units; anything longer is not a path
MAX_LOCATOR_BYTES = 65536 * 2
_BITMAP_CACHE = 4096
#: bitmaps changed in memory before they are written out (bounds what a crash can lose)
_DIRTY_LIMIT = 64
_MiB = 1024 * 1024
#: new blocks are placed so that their data (after the sector bitmap) starts on a 4 KiB
#: boundary, as Windows lays out the dynamic VHDs it makes (BAT entries 7 mod 8).  Why: the
#: data then goes to the file in whole pages; an O_DIRECT write takes it straight from the
#: read buffer instead of through a bounce copy, and a 4K-sector host never splits a sector.
#: The cost is the unused rest of the bitmap's page: 3.5 KiB per 2 MiB block.
DATA_ALIGN = 4096


# --- on-disk structures -----------------------------------------------------------------------


class VhdFooter(Layout, byteorder=">", size=FOOTER_SIZE):
    cookie: bytes = raw(8)
    features: int = u32(2)
    version: int = u32(0x00010000)
    data_offset: int = u64(NO_OFFSET)
    timestamp: int = u32()
    creator_app: bytes = raw(4)
    creator_version: int = u32()
    creator_os: bytes = raw(4)
    original_size: int = u64()
    current_size: int = u64()
    cylinders: int = u16()
    heads: int = u8()
    sectors_per_track: int = u8()
    disk_type: int = u32()
    checksum: int = u32()
    unique_id: bytes = raw(16)
    saved_state: int = u8()
    reserved: bytes = raw(427)


class ParentLocator(Layout, byteorder=">", size=24):
    platform: bytes = raw(4)
    data_space: int = u32()
    data_length: int = u32()
    reserved: int = u32()
    data_offset: int = u64()


class VhdDynamicHeader(Layout, byteorder=">", size=HEADER_SIZE):
    cookie: bytes = raw(8)
    data_offset: int = u64(NO_OFFSET)
    table_offset: int = u64()
    version: int = u32(0x00010000)
    max_table_entries: int = u32()
    block_size: int = u32()
    checksum: int = u32()
    parent_uuid: bytes = raw(16)
    parent_timestamp: int = u32()
    reserved1: int = u32()
    parent_name: bytes = raw(512)
    locators: bytes = raw(8 * 24)
    reserved2: bytes = raw(256)


_FOOTER_CHECKSUM_AT = 64
_HEADER_CHECKSUM_AT = 36


def vhd_checksum(buf: bytes | bytearray, checksum_at: int) -> int:
    """One's complement of the byte sum, the checksum field counted as zero."""
    total = sum(buf) - sum(buf[checksum_at : checksum_at + 4])
    return ~total & 0xFFFFFFFF


def pack_footer(footer: VhdFooter) -> bytes:
    """The footer with its checksum filled in."""
    body = footer.replace(checksum=0).pack()
    return footer.replace(checksum=vhd_checksum(body, _FOOTER_CHECKSUM_AT)).pack()


def pack_header(header: VhdDynamicHeader) -> bytes:
    body = header.replace(checksum=0).pack()
    return header.replace(checksum=vhd_checksum(body, _HEADER_CHECKSUM_AT)).pack()


def parse_footer(buf: bytes) -> tuple[VhdFooter, bool]:
    """Parse 512 (or an old 511) footer bytes: the footer and whether its checksum holds."""
    buf = bytes(buf[:FOOTER_SIZE]).ljust(FOOTER_SIZE, b"\0")
    footer = VhdFooter.unpack(buf)
    return footer, vhd_checksum(buf, _FOOTER_CHECKSUM_AT) == footer.checksum


def parse_header(buf: bytes) -> tuple[VhdDynamicHeader, bool]:
    header = VhdDynamicHeader.unpack(buf)
    return header, vhd_checksum(buf, _HEADER_CHECKSUM_AT) == header.checksum


def parse_locators(header: VhdDynamicHeader) -> list[ParentLocator]:
    return [ParentLocator.unpack(header.locators, i * 24) for i in range(8)]


def decode_parent_name(raw_name: bytes) -> str:
    """The header's parent name: UTF-16BE (per spec), NUL-terminated."""
    for i in range(0, len(raw_name) - 1, 2):
        if raw_name[i] == 0 and raw_name[i + 1] == 0:
            raw_name = raw_name[:i]
            break
    return raw_name.decode("utf-16-be", errors="replace")


def chs_geometry(total_sectors: int) -> tuple[int, int, int]:
    """Cylinders, heads, sectors per track by the VHD specification's appendix algorithm.

    The product may be below ``total_sectors`` (geometry rounds down); that is why vmferry
    marks its images as sized by ``current_size``.
    """
    total = min(total_sectors, MAX_GEOMETRY_SECTORS)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def vhd_time(ts: int) -> str:
    """A VHD timestamp (seconds since 2000-01-01 UTC) as ISO 8601."""
    moment = _dt.datetime.fromtimestamp(VHD_EPOCH + ts, tz=_dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def now_vhd_time() -> int:
    return max(0, min(0xFFFFFFFF, int(time.time()) - VHD_EPOCH))


def _round_up(value: int, to: int) -> int:
    return -(-value // to) * to


def _parse_size(text: str, what: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = 1
    if t and t[-1] in units:
        mult = units[t[-1]]
        t = t[:-1]
    try:
        return int(t) * mult
    except ValueError:
        raise UsageError(f"{what} must be a size like 2M or 2097152, not {text!r}") from None


def _bool_option(options: Mapping[str, str], name: str) -> bool:
    value = options.get(name, "off").strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0", ""):
        return False
    raise UsageError(f"{name} must be on or off, not {value!r}")


# --- locator decoding -------------------------------------------------------------------------


def _windows_to_hint(path: str) -> str:
    """A stored Windows path as a resolver hint.

    Relative (``.\\sub\\x.vhd``) becomes POSIX (``sub/x.vhd``); drive-letter and UNC paths stay
    as they are (the resolver knows them); a rooted path without a drive (``\\home\\x.vhd``,
    what vmferry writes on POSIX hosts) becomes the POSIX absolute path.
    """
    if (len(path) >= 2 and path[1] == ":") or path.startswith("\\\\"):
        return path
    posix = path.replace("\\", "/")
    while posix.startswith("./"):
        posix = posix[2:]
    return posix


def _macx_to_path(text: str) -> str:
    parsed = urlparse(text)
    if parsed.scheme and parsed.scheme != "file":
        return ""
    return unquote(parsed.path if parsed.scheme else text)


# --- the driver -------------------------------------------------------------------------------


class Vhd(DiskFormat):
    """One VHD file: fixed, dynamic or differencing."""

    name = "vhd"
    aliases = ("vpc",)
    extensions = (".vhd", ".avhd")
    supports_parent = True
    parent_formats = ("vhd",)
    child_size_must_match = True
    create_options = {
        "subformat": "dynamic (default) or fixed",
        "block_size": "dynamic/differencing block size, a power of two from 512K to 256M (2M)",
        "azure": "on: a fixed VHD whose size is rounded up to a whole MiB, as Azure requires",
    }

    def __init__(self, f: BlockFile, writable: bool) -> None:
        self.file = f
        self.writable = writable
        self.footer = VhdFooter()
        self._footer_bytes: tuple[VhdFooter, bytes] | None = None
        self.footer_at = 0  # where the authoritative footer was read
        self.tail_footer_at: int | None = None  # the copy at the end of the file, if valid
        self.disk_type = FIXED
        self.header: VhdDynamicHeader | None = None
        self.block_size = 0
        self.bitmap_size = 0
        self.bat: array[int] = array("I")
        self.locators: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.problems: list[str] = []
        self._metadata: list[tuple[int, int, str]] = []  # (start, end, what) for check
        self._append_at = 0
        self._bits: dict[int, str] = {}
        self._raw_bitmaps: dict[int, bytearray] = {}
        self._dirty: set[int] = set()  # bitmaps changed in memory, not yet on disk
        self._full_bm: bytes | None = None
        #: the footer after the last appended block is not written yet (see ``_allocate``)
        self._footer_due = False
        self.virtual_size = 0

    # --- probing and opening ------------------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, tail: bytes, file_size: int) -> int:
        if head[:8] == COOKIE:
            return 100
        if tail[-FOOTER_SIZE:][:8] == COOKIE or tail[-(FOOTER_SIZE - 1) :][:8] == COOKIE:
            return 100
        return 0

    @classmethod
    def open(cls, f: BlockFile, *, writable: bool = False) -> Self:
        self = cls(f, writable)
        self._read_footers()
        self._size_from_footer()
        if self.disk_type == FIXED:
            self._open_fixed()
        else:
            self._open_dynamic()
        return self

    def _read_footers(self) -> None:
        f = self.file
        if f.size < FOOTER_SIZE - 1:
            raise NotThisFormatError(
                f"file is {f.size} bytes, too small to hold a VHD footer", path=str(f.path)
            )
        tail: tuple[VhdFooter, bool, int] | None = None
        for length in (FOOTER_SIZE, FOOTER_SIZE - 1):  # very old images: 511-byte footer
            if f.size < length:
                continue
            buf = f.read_exact(f.size - length, length, "VHD footer")
            if buf[:8] == COOKIE:
                footer, ok = parse_footer(buf)
                tail = (footer, ok, f.size - length)
                if length != FOOTER_SIZE:
                    self.notes.append("the footer is the old 511-byte form")
                break
        head: tuple[VhdFooter, bool] | None = None
        if f.size >= FOOTER_SIZE:
            buf = f.read_exact(0, FOOTER_SIZE, "VHD footer copy")
            if buf[:8] == COOKIE:
                head = parse_footer(buf)
        if tail is not None and tail[1] and tail[0].disk_type == FIXED:
            # the tail decides for a fixed disk, even when its data starts with another VHD
            self.footer, self.footer_at, self.tail_footer_at = tail[0], tail[2], tail[2]
        elif head is not None and head[1]:
            self.footer, self.footer_at = head[0], 0
            if tail is not None and tail[1]:
                self.tail_footer_at = tail[2]
                if pack_footer(tail[0]) != pack_footer(head[0]):
                    self.problems.append("the footer at the end differs from the copy at 0")
            elif tail is not None:
                self.problems.append("the footer at the end of the file has a bad checksum")
            else:
                self.problems.append("the footer at the end of the file is missing")
        elif tail is not None and tail[1]:
            self.footer, self.footer_at, self.tail_footer_at = tail[0], tail[2], tail[2]
            if head is not None:
                self.problems.append(
                    "the footer copy at offset 0 has a bad checksum; the copy at the end was used"
                )
            elif tail[0].disk_type != FIXED:
                self.problems.append("the footer copy at offset 0 is missing")
        elif head is not None or tail is not None:
            raise CorruptImageError(
                "VHD footer checksum mismatch (and no valid second copy)",
                path=str(f.path),
                hint="the image is damaged; vmferry check says where",
            )
        else:
            raise NotThisFormatError('no VHD footer ("conectix") found', path=str(f.path))
        self.disk_type = self.footer.disk_type
        if self.disk_type not in _TYPE_NAMES:
            raise UnsupportedFeatureError(
                f"VHD disk type {self.disk_type} is not fixed (2), dynamic (3) or differencing (4)",
                path=str(f.path),
                features=[f"disk type {self.disk_type}"],
            )

    def _size_from_footer(self) -> None:
        ft = self.footer
        if _sized_by_chs(ft):
            size = ft.cylinders * ft.heads * ft.sectors_per_track * SECTOR
        else:
            size = ft.current_size // SECTOR * SECTOR
        if size > MAX_VIRTUAL_SIZE and self.disk_type != FIXED:
            raise CorruptImageError(
                f"virtual size {size} is larger than the VHD maximum ({MAX_VIRTUAL_SIZE})",
                path=str(self.file.path),
            )
        self.virtual_size = size

    def _open_fixed(self) -> None:
        self.granularity = SECTOR
        if self.footer_at < self.virtual_size:
            raise TruncatedImageError(
                f"fixed VHD data ({self.virtual_size} bytes) is longer than the file allows "
                f"({self.footer_at} bytes before the footer)",
                path=str(self.file.path),
            )
        if self.footer_at > self.virtual_size:
            self.notes.append(
                f"{self.footer_at - self.virtual_size} bytes between the data and the footer"
            )

    def _open_dynamic(self) -> None:
        f = self.file
        path = str(f.path)
        data_offset = self.footer.data_offset
        if data_offset == NO_OFFSET or data_offset >= f.size:
            raise TruncatedImageError(
                f"the dynamic header offset ({data_offset:#x}) points outside the file "
                f"({f.size} bytes)",
                path=path,
            )
        # Validate the sizes before insisting on the whole header: a fuzzed file then gets
        # the message about its real problem (e.g. an absurd Max Table Entries).
        avail = min(HEADER_SIZE, f.size - data_offset)
        buf = f.read_exact(data_offset, avail, "VHD dynamic header").ljust(HEADER_SIZE, b"\0")
        if buf[:8] != DYN_COOKIE:
            raise CorruptImageError(
                'dynamic header has no "cxsparse" cookie', path=path, offset=data_offset
            )
        header, ok = parse_header(buf)
        bs = header.block_size
        if bs < SECTOR or bs & (bs - 1):
            raise CorruptImageError(f"block size {bs} is not a power of two >= 512", path=path)
        if bs > MAX_BLOCK_SIZE:
            raise ResourceLimitError(f"block size {bs} is above {MAX_BLOCK_SIZE}", path=path)
        self._check_table_entries(header.max_table_entries, bs)
        if avail < HEADER_SIZE:
            raise TruncatedImageError(
                f"the dynamic header ({HEADER_SIZE} bytes at {data_offset:#x}) extends past the "
                f"end of the file ({f.size} bytes)",
                path=path,
            )
        if not ok:
            raise CorruptImageError(
                "dynamic header checksum mismatch", path=path, offset=data_offset
            )
        self.header = header
        self.block_size = bs
        self.bitmap_size = _round_up(_round_up(bs // SECTOR, 8) // 8, SECTOR)
        self.granularity = SECTOR if self.disk_type == DIFFERENCING else bs
        # a differencing layer cannot read its parent: Chain.write completes partial sectors
        self.write_alignment = SECTOR if self.disk_type == DIFFERENCING else 1
        mte = header.max_table_entries
        table = header.table_offset
        if table + 4 * mte > f.size:
            raise TruncatedImageError(
                f"the BAT (Max Table Entries {mte}, {4 * mte} bytes at {table:#x}) extends past "
                f"the end of the file ({f.size} bytes)",
                path=path,
            )
        bat = array("I")
        bat.frombytes(f.read_exact(table, 4 * mte, "block allocation table"))
        if bat.itemsize != 4:  # pragma: no cover - every platform we run on
            raise RuntimeError("array('I') is not 32-bit here")
        if struct.pack("=I", 1) != struct.pack(">I", 1):
            bat.byteswap()
        self.bat = bat
        self._metadata = [
            (0, FOOTER_SIZE, "footer copy"),
            (data_offset, data_offset + HEADER_SIZE, "dynamic header"),
            (table, table + 4 * mte, "BAT"),
        ]
        self._read_locators(header)
        self._validate_blocks()

    def _check_table_entries(self, mte: int, bs: int) -> None:
        path = str(self.file.path)
        needed = -(-self.virtual_size // bs)
        if mte < needed:
            raise CorruptImageError(
                f"Max Table Entries ({mte}) too small for the disk size ({needed} blocks needed)",
                path=path,
            )
        if 4 * mte > MAX_METADATA_READ or mte > max(needed, -(-MAX_VIRTUAL_SIZE // bs)):
            raise ResourceLimitError(
                f"Max Table Entries too large ({mte}) for a {self.virtual_size}-byte disk "
                f"with {bs}-byte blocks ({needed} needed)",
                path=path,
            )

    def _validate_blocks(self) -> None:
        f = self.file
        span = self.bitmap_size + self.block_size
        used = [e for e in self.bat if e != FREE]
        end_used = max(end for _, end, _ in self._metadata)
        if used:
            last = max(used) * SECTOR + span
            if last > f.size:
                index = list(self.bat).index(max(used))
                raise TruncatedImageError(
                    f"block {index} (at {max(used) * SECTOR:#x}) extends past the end of the "
                    f"file ({f.size} bytes): the image has been truncated",
                    path=str(f.path),
                )
            end_used = max(end_used, last)
        self._used_end = end_used
        tail = self.tail_footer_at
        if tail is not None and tail + FOOTER_SIZE >= f.size:
            base = max(end_used, tail)
        else:
            base = max(end_used, f.size)
        self._append_at = _round_up(base, SECTOR)
        if self.writable:  # writing through a crossed BAT would destroy other data
            overlaps = self._overlaps(self._regions())
            if overlaps:
                raise CorruptImageError(
                    f"cannot write: {overlaps[0]}",
                    path=str(f.path),
                    hint="open it read-only, or run vmferry check for the full list",
                )

    def _read_locators(self, header: VhdDynamicHeader) -> None:
        f = self.file
        for i, loc in enumerate(parse_locators(header)):
            code = loc.platform
            if code == b"\0\0\0\0":
                continue
            label = code.decode("latin-1")
            entry: dict[str, Any] = {
                "platform": label,
                "offset": loc.data_offset,
                "length": loc.data_length,
                "space": loc.data_space,
            }
            self.locators.append(entry)
            if loc.data_length > MAX_LOCATOR_BYTES:
                self.problems.append(f"parent locator {i} ({label}) claims {loc.data_length} bytes")
                continue
            if loc.data_offset + loc.data_length > f.size:
                self.problems.append(f"parent locator {i} ({label}) points past the end of file")
                continue
            data = f.read_exact(loc.data_offset, loc.data_length, f"parent locator {label}")
            # Windows stores data_space in bytes, the spec says sectors: cover the larger reading
            space = max(loc.data_space, loc.data_length)
            if loc.data_space < SECTOR and loc.data_space * SECTOR >= loc.data_length:
                space = loc.data_space * SECTOR
            self._metadata.append(
                (loc.data_offset, loc.data_offset + _round_up(space, SECTOR), f"locator {label}")
            )
            try:
                if code in (b"W2ku", b"W2ru"):
                    text = data.decode("utf-16-le")
                elif code == b"MacX":
                    text = _macx_to_path(data.decode("utf-8"))
                elif code in (b"Wi2k", b"Wi2r"):
                    text = data.decode("latin-1")
                else:
                    continue
            except UnicodeDecodeError:
                self.problems.append(f"parent locator {i} ({label}) is not valid text")
                continue
            entry["path"] = text.split("\0", 1)[0]

    # --- identity and parent ------------------------------------------------------------------

    @property
    def uuid(self) -> uuid.UUID:
        return uuid.UUID(bytes=self.footer.unique_id)

    def identity(self) -> Mapping[str, str]:
        return {"uuid": str(self.uuid), "timestamp": vhd_time(self.footer.timestamp)}

    def parent_ref(self) -> ParentRef | None:
        if self.disk_type != DIFFERENCING or self.header is None:
            return None
        relative: list[str] = []
        absolute: list[str] = []
        for loc in self.locators:
            text = loc.get("path")
            if not text:
                continue
            if loc["platform"] in ("W2ru", "Wi2r"):
                relative.append(_windows_to_hint(text))
            elif loc["platform"] == "MacX":
                absolute.append(text)
            else:
                absolute.append(_windows_to_hint(text))
        name = decode_parent_name(self.header.parent_name)
        hints = relative + absolute + ([_windows_to_hint(name)] if name else [])
        advisory = {}
        if self.header.parent_timestamp:  # Windows 10 writes 0: nothing to compare
            advisory["timestamp"] = vhd_time(self.header.parent_timestamp)
        return ParentRef(
            format="vhd",
            hints=tuple(dict.fromkeys(hints)),
            identity={"uuid": str(uuid.UUID(bytes=self.header.parent_uuid))},
            advisory=advisory,
            raw={"parent_name": name, "locators": [dict(x) for x in self.locators]},
        )

    def info(self) -> dict[str, Any]:
        ft = self.footer
        out: dict[str, Any] = {
            "subformat": _TYPE_NAMES[self.disk_type],
            "disk_type": self.disk_type,
            "creator_app": ft.creator_app.decode("latin-1"),
            "creator_version": f"{ft.creator_version >> 16}.{ft.creator_version & 0xFFFF}",
            "creator_os": ft.creator_os.decode("latin-1"),
            "uuid": str(self.uuid),
            "timestamp": vhd_time(ft.timestamp),
            "geometry": {
                "cylinders": ft.cylinders,
                "heads": ft.heads,
                "sectors_per_track": ft.sectors_per_track,
            },
            "current_size": ft.current_size,
            "original_size": ft.original_size,
            "size_from": "chs" if _sized_by_chs(ft) else "current_size",
            "saved_state": bool(ft.saved_state),
            "azure_compatible": self.disk_type == FIXED and self.virtual_size % _MiB == 0,
        }
        if self.block_size:
            out["block_size"] = self.block_size
            out["max_table_entries"] = len(self.bat)
            out["allocated_blocks"] = sum(1 for e in self.bat if e != FREE)
        if self.disk_type == DIFFERENCING and self.header is not None:
            out["parent_uuid"] = str(uuid.UUID(bytes=self.header.parent_uuid))
            out["parent_timestamp"] = (
                vhd_time(self.header.parent_timestamp) if self.header.parent_timestamp else None
            )
            out["parent_name"] = decode_parent_name(self.header.parent_name)
            out["parent_locators"] = [dict(x) for x in self.locators]
        if self.notes:
            out["notes"] = list(self.notes)
        return out

    # --- block bookkeeping --------------------------------------------------------------------

    def _bits_of(self, index: int) -> str:
        """The block's sector bitmap as a '0'/'1' string, one character per sector."""
        bits = self._bits.get(index)
        if bits is None:
            raw_bm = self._raw_bitmap(index)
            spb = self.block_size // SECTOR
            nbytes = _round_up(spb, 8) // 8
            value = int.from_bytes(raw_bm[:nbytes], "big")
            bits = format(value, f"0{nbytes * 8}b")[:spb]
            if len(self._bits) >= _BITMAP_CACHE:
                self._bits.clear()
            self._bits[index] = bits
        return bits

    def _raw_bitmap(self, index: int) -> bytearray:
        bm = self._raw_bitmaps.get(index)
        if bm is None:
            at = self.bat[index] * SECTOR
            bm = bytearray(self.file.read_exact(at, self.bitmap_size, f"sector bitmap {index}"))
            if len(self._raw_bitmaps) >= _BITMAP_CACHE:
                self._flush_bitmaps()
                self._raw_bitmaps.clear()
            self._raw_bitmaps[index] = bm
        return bm

    def _absent(self) -> Alloc:
        return Alloc.UNALLOCATED if self.disk_type == DIFFERENCING else Alloc.ZERO

    # --- reading ------------------------------------------------------------------------------

    def block_status(self, offset: int, length: int) -> Extent:
        self._check_range(offset, length)
        if length == 0:
            raise UsageError("block_status needs a non-empty range", path=str(self.file.path))
        if self.disk_type == FIXED:
            for run_off, run_len, is_data in self.file.data_runs(offset, length):
                if is_data:
                    return Extent(run_off, run_len, Alloc.DATA, run_off)
                return Extent(run_off, run_len, Alloc.ZERO)
            return Extent(offset, length, Alloc.ZERO)
        bs = self.block_size
        end = offset + length
        index = offset // bs
        entry = self.bat[index]
        if entry == FREE:
            last = index + 1
            stop = -(-end // bs)
            while last < stop and self.bat[last] == FREE:
                last += 1
            return Extent(offset, min(end, last * bs) - offset, self._absent())
        in_block = offset - index * bs
        bits = self._bits_of(index)
        sector = in_block // SECTOR
        bit = bits[sector]
        nxt = bits.find("0" if bit == "1" else "1", sector)
        run_end = index * bs + (len(bits) if nxt < 0 else nxt) * SECTOR
        run_end = min(run_end, end, (index + 1) * bs)
        if bit == "1":
            host = entry * SECTOR + self.bitmap_size + in_block
            return Extent(offset, run_end - offset, Alloc.DATA, host)
        return Extent(offset, run_end - offset, self._absent())

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        if self.disk_type == FIXED:
            return self.file.pread(offset, length)
        parts: list[bytes] = []
        pos, end = offset, offset + length
        while pos < end:
            ext = self.block_status(pos, end - pos)
            if ext.alloc is Alloc.DATA and ext.host_offset is not None:
                parts.append(self.file.pread(ext.host_offset, ext.length))
            else:
                parts.append(bytes(ext.length))
            pos = ext.end
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_into(self, offset: int, view: memoryview) -> None:
        self._read_into_mapped(offset, view, self.file.pread_into)

    # --- writing ------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._require_writable()
        self._check_range(offset, len(data))
        if self.disk_type == FIXED:
            self.file.write(offset, data)
            return
        self._check_partial_sectors(offset, len(data))
        view = memoryview(data)
        pos = offset
        fresh: list[_Fresh] = []  # consecutive unallocated blocks, appended together
        while len(view):
            index, in_block = divmod(pos, self.block_size)
            n = min(len(view), self.block_size - in_block)
            if self.bat[index] != FREE:
                self._write_in_block(index, in_block, view[:n])
            else:
                if fresh and fresh[-1].index != index - 1:
                    self._allocate(fresh)
                    fresh = []
                fresh.append(self._sectors(index, in_block, view[:n]))
            view = view[n:]
            pos += n
        if fresh:
            self._allocate(fresh)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._require_writable()
        self._check_range(offset, length)
        if self.disk_type == FIXED:
            if not self.file.punch_hole(offset, length):
                super().write_zeroes(offset, length)
            return
        self._check_partial_sectors(offset, length)
        bs = self.block_size
        pos, end = offset, offset + length
        while pos < end:
            index, in_block = divmod(pos, bs)
            n = min(end - pos, bs - in_block)
            if self.bat[index] != FREE or self.disk_type == DIFFERENCING:
                self._write_in_block(index, in_block, None, n)
            pos += n

    def _check_partial_sectors(self, offset: int, length: int) -> None:
        """Refuse up front (before any byte changes) a partial sector only the parent knows."""
        if self.disk_type != DIFFERENCING:
            return
        for edge in {offset, offset + length}:
            if edge % SECTOR and edge < self.virtual_size:
                index, in_block = divmod(edge, self.block_size)
                self._own_sector(index, in_block // SECTOR, probe=True)

    def _own_sector(self, index: int, sector: int, *, probe: bool = False) -> bytes:
        """This layer's current content of one sector, for a read-modify-write."""
        entry = self.bat[index]
        if entry != FREE and self._bits_of(index)[sector] == "1":
            if probe:
                return b""
            at = entry * SECTOR + self.bitmap_size + sector * SECTOR
            return self.file.pread(at, SECTOR)
        if self.disk_type == DIFFERENCING:
            lba = index * self.block_size // SECTOR + sector
            raise UsageError(
                f"a write that covers only part of sector {lba}"
                " of a differencing VHD needs the parent's bytes for the rest of the sector",
                path=str(self.file.path),
                hint="write whole 512-byte sectors to a differencing layer (the chain does this)",
            )
        return bytes(SECTOR)

    def _sectors(
        self, index: int, in_block: int, chunk: memoryview | None, zero_len: int = 0
    ) -> _Fresh:
        """The whole sectors of block ``index`` that a write of ``chunk`` (or of ``zero_len``
        zeros when chunk is None) covers, completed from this layer where it covers part of one."""
        length = len(chunk) if chunk is not None else zero_len
        s0 = in_block // SECTOR
        s1 = -(-(in_block + length) // SECTOR)
        head = in_block - s0 * SECTOR
        if head == 0 and (in_block + length) % SECTOR == 0:
            return _Fresh(index, s0, s1, chunk)
        buf = bytearray((s1 - s0) * SECTOR)
        if head or s1 - s0 == 1:
            buf[:SECTOR] = self._own_sector(index, s0)
        if (in_block + length) % SECTOR and s1 - 1 > s0:
            buf[-SECTOR:] = self._own_sector(index, s1 - 1)
        buf[head : head + length] = chunk if chunk is not None else bytes(length)
        return _Fresh(index, s0, s1, buf)

    def _write_in_block(
        self, index: int, in_block: int, chunk: memoryview | None, zero_len: int = 0
    ) -> None:
        """Write ``chunk`` (or ``zero_len`` zeros when chunk is None) inside one block."""
        span = self._sectors(index, in_block, chunk, zero_len)
        if self.bat[index] == FREE:
            self._allocate([span])
            return
        s0, s1, buf = span.s0, span.s1, span.data
        data_at = self.bat[index] * SECTOR + self.bitmap_size
        if buf is None:
            lo, hi = data_at + s0 * SECTOR, data_at + s1 * SECTOR
            if not self.file.punch_hole(lo, hi - lo):
                self.file.write(lo, bytes(hi - lo))
        else:
            self.file.write(data_at + s0 * SECTOR, buf)
        self._set_bits(index, s0, s1)

    def _set_bits(self, index: int, s0: int, s1: int) -> None:
        """Mark sectors present, in memory first; the bitmap reaches the disk in
        ``_flush_bitmaps`` only after an fsync has made the data it points at durable.

        Deferring (like a disk's write cache) costs one fsync per batch instead of one per
        write; a crash before the flush loses those writes whole (the sectors read as before),
        never exposes garbage.
        """
        bm = self._raw_bitmap(index)
        if _bitmap_range_set(bm, s0, s1):
            return
        _set_bitmap_range(bm, s0, s1)
        self._bits.pop(index, None)
        self._dirty.add(index)
        if len(self._dirty) >= _DIRTY_LIMIT:
            self._flush_bitmaps()

    def _flush_bitmaps(self) -> None:
        if not self._dirty:
            return
        self.file.fsync()  # the data first
        for index in sorted(self._dirty):
            self.file.write(self.bat[index] * SECTOR, self._raw_bitmaps[index])
        self._dirty.clear()

    def flush(self) -> None:
        if self.writable:
            self._flush_bitmaps()
            if self._footer_due and self.tail_footer_at is not None:
                self.file.write(self.tail_footer_at, self._packed_footer())
                self._footer_due = False
        self.file.fsync()

    def close(self) -> None:
        if self.writable and self.file.fd >= 0:
            self.flush()
        self.file.close()

    def _allocate(self, blocks: list[_Fresh]) -> None:
        """Append consecutive new blocks at the end (over the old footer), then publish their
        BAT entries.

        Order: bitmaps + data + new footer, fsync, BAT entries, fsync.  A crash before the BAT
        write leaves leaked blocks and a valid footer copy at offset 0; never garbage.  Blocks
        written whole are laid out (zeros to the page,) bitmap, data, zeros, bitmap, data...
        and go to the file as one gathered write (``write_pieces``), so a long copy makes
        large requests.  A new output (``cache_unsafe``: no ordering, synced whole at the end)
        gets its tail footer once, at ``flush``, instead of after every append.
        """
        end = self._append_at
        bm_size = self.bitmap_size
        at, stride, gap = _block_layout(end, bm_size, self.block_size)
        if (at + stride * (len(blocks) - 1)) // SECTOR >= FREE:
            raise ResourceLimitError(
                "the image file has reached the 2 TiB a VHD BAT can address",
                path=str(self.file.path),
            )
        placed: list[tuple[int, bytes | bytearray | memoryview]] = []
        bitmaps: list[bytearray] = []
        for n, block in enumerate(blocks):
            start = at + n * stride
            if block.whole(self):
                bm = self._full_bitmap()
            else:
                bm = bytearray(self.bitmap_size)
                _set_bitmap_range(bm, block.s0, block.s1)
            bitmaps.append(bm)
            lead = start - end if n == 0 else gap  # the old footer and the alignment gap
            placed.append((start - lead, bytes(lead) + bm if lead else bm))
            if block.data is not None:
                placed.append((start + bm_size + block.s0 * SECTOR, block.data))
        for run_at, pieces in _back_to_back(placed):
            self.file.write_pieces(run_at, pieces)
        footer_at = at + stride * len(blocks) - gap
        self._footer_due = self.file.cache_unsafe
        if not self._footer_due:
            self.file.write(footer_at, self._packed_footer())
        self.file.fsync()
        first = blocks[0].index
        entries = [(at + n * stride) // SECTOR for n in range(len(blocks))]
        self.file.write(
            self.header_table_offset + 4 * first, struct.pack(f">{len(entries)}I", *entries)
        )
        self.file.fsync()
        for block, entry, bm in zip(blocks, entries, bitmaps, strict=True):
            self.bat[block.index] = entry
            self._raw_bitmaps[block.index] = bm
            self._bits.pop(block.index, None)
        self.tail_footer_at = footer_at
        self._append_at = footer_at
        self._used_end = footer_at

    def _packed_footer(self) -> bytes:
        """``pack_footer(self.footer)``, packed once per footer: every append (and every BAT
        growth) writes it, and packing (a checksum over a dataclass) cost 0.14 s per 1,024
        blocks."""
        cached = self._footer_bytes
        if cached is None or cached[0] is not self.footer:
            cached = self._footer_bytes = (self.footer, pack_footer(self.footer))
        return cached[1]

    def _full_bitmap(self) -> bytearray:
        """The sector bitmap of a block written whole (a fresh copy: bitmaps are mutable)."""
        if self._full_bm is None:
            bm = bytearray(self.bitmap_size)
            _set_bitmap_range(bm, 0, self.block_size // SECTOR)
            self._full_bm = bytes(bm)
        return bytearray(self._full_bm)

    @property
    def header_table_offset(self) -> int:
        assert self.header is not None
        return self.header.table_offset

    # --- creating -----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        f: BlockFile,
        size: int,
        options: Mapping[str, str],
        parent: ParentInfo | None = None,
    ) -> Self:
        azure = _bool_option(options, "azure")
        subformat = options.get("subformat", "fixed" if azure else "dynamic").strip().lower()
        if subformat not in ("dynamic", "fixed"):
            raise UsageError(f"subformat must be dynamic or fixed, not {subformat!r}")
        if azure and subformat != "fixed":
            raise UsageError("azure=on makes a fixed VHD; it cannot be combined with dynamic")
        if parent is not None and subformat == "fixed":
            raise UsageError("a differencing VHD is dynamic; subformat=fixed cannot have a parent")
        block_size = _parse_size(options.get("block_size", str(DEFAULT_BLOCK_SIZE)), "block_size")
        if (
            block_size < MIN_CREATE_BLOCK_SIZE
            or block_size > MAX_BLOCK_SIZE
            or block_size & (block_size - 1)
        ):
            raise UsageError(
                f"block_size must be a power of two from 512K to 256M, not {block_size}"
            )
        size = _round_up(size, _MiB if azure else SECTOR)
        if size > MAX_VIRTUAL_SIZE:
            raise UsageError(f"a VHD holds at most 2040 GiB ({MAX_VIRTUAL_SIZE} bytes)")
        cyl, heads, spt = chs_geometry(size // SECTOR)
        footer = VhdFooter(
            cookie=COOKIE,
            timestamp=now_vhd_time(),
            creator_app=CREATOR_APP,
            creator_version=CREATOR_VERSION,
            creator_os=CREATOR_OS,
            original_size=size,
            current_size=size,
            cylinders=cyl,
            heads=heads,
            sectors_per_track=spt,
            disk_type=FIXED if subformat == "fixed" else DYNAMIC,
            unique_id=uuid.uuid4().bytes,
        )
        if subformat == "fixed":
            f.truncate(size)  # sparse: the data area is a hole
            f.write(size, pack_footer(footer))
            return cls.open(f, writable=True)
        return cls._create_dynamic(f, size, footer, block_size, parent)

    @classmethod
    def measure(
        cls, virtual_size: int, data_ranges: Sequence[tuple[int, int]], options: Mapping[str, str]
    ) -> tuple[int, int]:
        """The file sizes ``create`` + writes of ``data_ranges`` produce (layout of create)."""
        azure = _bool_option(options, "azure")
        subformat = options.get("subformat", "fixed" if azure else "dynamic").strip().lower()
        size = _round_up(virtual_size, _MiB if azure else SECTOR)
        if subformat == "fixed":
            return size + FOOTER_SIZE, size + FOOTER_SIZE
        bs = _parse_size(options.get("block_size", str(DEFAULT_BLOCK_SIZE)), "block_size")
        bm_size = _round_up(_round_up(bs // SECTOR, 8) // 8, SECTOR)
        blocks = -(-size // bs)
        end = FOOTER_SIZE + HEADER_SIZE + _round_up(4 * blocks, SECTOR)
        first, stride, gap = _block_layout(end, bm_size, bs)

        def file_size(n: int) -> int:
            return (first + n * stride - gap if n else end) + FOOTER_SIZE

        touched = {b for off, n in data_ranges for b in range(off // bs, -(-(off + n) // bs))}
        return file_size(len(touched)), file_size(blocks)

    @classmethod
    def _create_dynamic(
        cls,
        f: BlockFile,
        size: int,
        footer: VhdFooter,
        block_size: int,
        parent: ParentInfo | None,
    ) -> Self:
        mte = -(-size // block_size)
        table_at = FOOTER_SIZE + HEADER_SIZE
        end = table_at + _round_up(4 * mte, SECTOR)
        header = VhdDynamicHeader(
            cookie=DYN_COOKIE, table_offset=table_at, max_table_entries=mte, block_size=block_size
        )
        if parent is not None:
            footer = footer.replace(disk_type=DIFFERENCING)
            header, blobs = _parent_fields(header, parent, end)
            for at, blob in blobs:
                f.write(at, blob)
                end = at + len(blob)
        footer = footer.replace(data_offset=FOOTER_SIZE)
        f.write(table_at, b"\xff" * (4 * mte))
        f.write(end, pack_footer(footer))
        f.write(FOOTER_SIZE, pack_header(header))
        f.write(0, pack_footer(footer))
        return cls.open(f, writable=True)

    # --- metadata changes ---------------------------------------------------------------------

    def set_parent(self, parent: ParentInfo | None) -> None:
        """Point this differencing disk at ``parent``: new locator data, then the header.

        The locator data is appended where the next block would go (like a block), the footer
        moved after it, fsync; then the one-sector header is rewritten, fsync.  A crash before
        the header write leaves the old parent in place and some leaked bytes.
        """
        self._require_writable()
        if self.disk_type != DIFFERENCING or self.header is None:
            raise UnsupportedFeatureError(
                f"a {_TYPE_NAMES[self.disk_type]} VHD has no parent to change",
                path=str(self.file.path),
            )
        if parent is None:
            raise UnsupportedFeatureError(
                "removing the parent of a differencing VHD needs a full copy (convert), not "
                "a metadata change",
                path=str(self.file.path),
            )
        at = self._append_at
        header, blobs = _parent_fields(self.header, parent, at)
        end = at
        for blob_at, blob in blobs:
            self.file.write(blob_at, blob)
            end = blob_at + len(blob)
        self.file.write(end, self._packed_footer())
        self.file.fsync()
        self.file.write(self.footer.data_offset, pack_header(header))
        self.file.fsync()
        self.header = header
        self.tail_footer_at = end
        self._append_at = end
        self.locators = []
        self._metadata = [m for m in self._metadata if not m[2].startswith("locator")]
        self._read_locators(header)

    def resize(self, new_size: int) -> None:
        """Grow a fixed or dynamic disk (shrinking would drop data; refused)."""
        self._require_writable()
        new_size = _round_up(new_size, SECTOR)
        path = str(self.file.path)
        if new_size < self.virtual_size:
            raise UnsupportedFeatureError("shrinking a VHD is not supported", path=path)
        if new_size > MAX_VIRTUAL_SIZE:
            raise UsageError(f"a VHD holds at most {MAX_VIRTUAL_SIZE} bytes", path=path)
        if new_size == self.virtual_size:
            return
        cyl, heads, spt = chs_geometry(new_size // SECTOR)
        footer = self.footer.replace(
            current_size=new_size,
            cylinders=cyl,
            heads=heads,
            sectors_per_track=spt,
            creator_app=CREATOR_APP
            if self.footer.creator_app in CHS_CREATORS
            else self.footer.creator_app,
        )
        if self.disk_type == FIXED:
            old = self.footer_at
            self.file.write(new_size, pack_footer(footer))
            self.file.fsync()
            if old < new_size:
                self.file.write(old, bytes(min(FOOTER_SIZE, new_size - old)))
            self.file.truncate(new_size + FOOTER_SIZE)
            self.file.fsync()
            self.footer, self.footer_at, self.tail_footer_at = footer, new_size, new_size
        else:
            if new_size > len(self.bat) * self.block_size:
                self._relocate_bat(-(-new_size // self.block_size))
            self.file.write(self._append_at, pack_footer(footer))
            self.file.fsync()
            self.file.write(0, pack_footer(footer))
            self.file.fsync()
            self.footer, self.tail_footer_at = footer, self._append_at
        self.virtual_size = new_size

    def _relocate_bat(self, entries: int) -> None:
        """Give the BAT room for ``entries`` blocks by writing a larger copy at the end.

        Order: the new table and a footer after it, fsync; then the one-sector header is
        pointed at the new table, fsync.  A crash before the header write leaves the old
        table in force (and a leak); after it, the new table (still at the old size).
        """
        at = self._append_at
        table_bytes = _round_up(4 * entries, SECTOR)
        table = array("I", self.bat)
        table.extend([FREE] * (table_bytes // 4 - len(table)))
        if struct.pack("=I", 1) != struct.pack(">I", 1):
            table.byteswap()
        self.file.write(at, table.tobytes())
        footer_at = at + table_bytes
        self.file.write(footer_at, self._packed_footer())
        self.file.fsync()
        assert self.header is not None
        header = self.header.replace(table_offset=at, max_table_entries=entries)
        self.file.write(self.footer.data_offset, pack_header(header))
        self.file.fsync()
        self.header = header
        self.bat.extend([FREE] * (entries - len(self.bat)))
        self._metadata = [m for m in self._metadata if m[2] != "BAT"]
        self._metadata.append((at, at + 4 * entries, "BAT"))
        self.tail_footer_at = self._append_at = self._used_end = footer_at

    # --- checking -----------------------------------------------------------------------------

    def _regions(self) -> list[tuple[int, int, str]]:
        """Every used byte range of the file: metadata and blocks, sorted."""
        span = self.bitmap_size + self.block_size
        regions = list(self._metadata)
        regions.extend(
            (e * SECTOR, e * SECTOR + span, f"block {i}")
            for i, e in enumerate(self.bat)
            if e != FREE
        )
        regions.sort()
        return regions

    @staticmethod
    def _overlaps(regions: list[tuple[int, int, str]]) -> list[str]:
        found: list[str] = []
        reach, reach_name = 0, ""
        for start, stop, what in regions:
            if start < reach:
                found.append(f"{what} (at {start:#x}) overlaps {reach_name} (ends {reach:#x})")
            if stop > reach:
                reach, reach_name = stop, what
        return found

    def check(self) -> CheckReport:
        report = CheckReport()
        report.corruptions.extend(self.problems)
        report.notes.extend(self.notes)
        if self.disk_type == FIXED:
            return report
        f = self.file
        span = self.bitmap_size + self.block_size
        regions = self._regions()
        report.corruptions.extend(self._overlaps(regions))
        for i in range(-(-self.virtual_size // self.block_size), len(self.bat)):
            if self.bat[i] != FREE:
                report.notes.append(f"BAT entry {i} is beyond the virtual size")
        tail = self.tail_footer_at
        used_end = max((end for _, end, _ in regions), default=0)
        if tail is not None and tail < used_end:
            report.corruptions.append(f"the footer at {tail:#x} lies inside used space")
        elif tail is not None and tail - used_end >= span:
            report.leaks.append(
                f"{tail - used_end} bytes between the last block and the footer are unused"
            )
            report.leaked_bytes += tail - used_end
        if tail is not None and tail + FOOTER_SIZE < f.size:
            extra = f.size - tail - FOOTER_SIZE
            report.leaks.append(f"{extra} bytes after the footer are unused")
            report.leaked_bytes += extra
        return report


@dataclass(frozen=True, slots=True)
class _Fresh:
    """Whole sectors [s0, s1) of block ``index`` to write (``data`` None: they read as zeros)."""

    index: int
    s0: int
    s1: int
    data: bytes | bytearray | memoryview | None

    def whole(self, vhd: Vhd) -> bool:
        return self.s0 == 0 and self.s1 * SECTOR == vhd.block_size


def _block_layout(end: int, bitmap_size: int, block_size: int) -> tuple[int, int, int]:
    """(where the first block appended after ``end`` starts, the distance from one appended
    block to the next, the zeros between one's data and the next one's bitmap): each block's
    data on a DATA_ALIGN boundary."""
    first = _round_up(end + bitmap_size, DATA_ALIGN) - bitmap_size
    stride = _round_up(bitmap_size + block_size, DATA_ALIGN)
    return first, stride, stride - bitmap_size - block_size


def _back_to_back(
    placed: list[tuple[int, bytes | bytearray | memoryview]],
) -> Iterator[tuple[int, list[bytes | bytearray | memoryview]]]:
    """Group (offset, bytes) placements, in file order, into runs with no gap between them."""
    run_at, run, end = 0, [], -1
    for at, piece in placed:
        if at != end and run:
            yield run_at, run
            run = []
        if not run:
            run_at = at
        run.append(piece)
        end = at + len(piece)
    if run:
        yield run_at, run


def _sized_by_chs(ft: VhdFooter) -> bool:
    """qemu's rule: Virtual PC and old qemu size by geometry, unless it is the maximum one."""
    chs = ft.cylinders * ft.heads * ft.sectors_per_track
    return ft.creator_app in CHS_CREATORS and chs != MAX_GEOMETRY_SECTORS


def _bitmap_range_set(bm: bytes | bytearray, s0: int, s1: int) -> bool:
    """Whether bits [s0, s1) of an MSB-first sector bitmap are all set (whole bytes compared
    at C speed: a copy's second half of every block asks this)."""
    s = s0
    while s < s1 and s % 8:
        if not bm[s // 8] & (0x80 >> (s % 8)):
            return False
        s += 1
    full_end = max(s, s1 // 8 * 8)
    if bm[s // 8 : full_end // 8].count(0xFF) != (full_end - s) // 8:
        return False
    return all(bm[t // 8] & (0x80 >> (t % 8)) for t in range(full_end, s1))


def _set_bitmap_range(bm: bytearray, s0: int, s1: int) -> None:
    """Set bits [s0, s1) of an MSB-first sector bitmap."""
    s = s0
    while s < s1 and s % 8:
        bm[s // 8] |= 0x80 >> (s % 8)
        s += 1
    full_end = s1 // 8 * 8
    if s < full_end:
        bm[s // 8 : full_end // 8] = b"\xff" * ((full_end - s) // 8)
        s = full_end
    while s < s1:
        bm[s // 8] |= 0x80 >> (s % 8)
        s += 1


def _locator_blob(text: str, platform: bytes, at: int) -> tuple[ParentLocator, bytes]:
    data = text.encode("utf-16-le")
    space = _round_up(max(len(data), 1), SECTOR)
    loc = ParentLocator(platform=platform, data_space=space, data_length=len(data), data_offset=at)
    return loc, data.ljust(space, b"\0")


def _posix_to_w2ku(path: str) -> str:
    """An absolute POSIX path in Windows notation: ``/srv/a.vhd`` -> ``\\srv\\a.vhd``.

    A rooted path without drive letter: Windows resolves it on the current drive, and vmferry
    reads it back as the POSIX path it came from.
    """
    return path.replace("/", "\\")


def _parent_fields(
    header: VhdDynamicHeader, parent: ParentInfo, at: int
) -> tuple[VhdDynamicHeader, list[tuple[int, bytes]]]:
    """Header fields and locator data (placed from ``at``) naming ``parent``."""
    ident = parent.layer.identity()
    try:
        parent_uuid = uuid.UUID(str(ident["uuid"]))
    except (KeyError, ValueError):
        raise UsageError(
            f"the parent ({parent.format}) has no UUID a VHD child could pin"
        ) from None
    stamp = parent.layer.footer.timestamp if isinstance(parent.layer, Vhd) else now_vhd_time()
    rel = parent.relative_path.replace("/", "\\")
    if not rel.startswith(("..\\", ".\\")):
        rel = ".\\" + rel
    at = _round_up(at, SECTOR)
    blobs: list[tuple[int, bytes]] = []
    locs: list[ParentLocator] = []
    for platform, text in ((b"W2ku", _posix_to_w2ku(parent.absolute_path)), (b"W2ru", rel)):
        loc, blob = _locator_blob(text, platform, at)
        locs.append(loc)
        blobs.append((at, blob))
        at += len(blob)
    name = parent.absolute_path.rsplit("/", 1)[-1].encode("utf-16-be")
    if len(name) > 510:
        name = name[:510]
    packed = b"".join(loc.pack() for loc in locs).ljust(8 * 24, b"\0")
    new = header.replace(
        parent_uuid=parent_uuid.bytes,
        parent_timestamp=stamp,
        parent_name=name.ljust(512, b"\0"),
        locators=packed,
    )
    return new, blobs
