"""FAT directory entries: 8.3 short names, VFAT long names, DOS timestamps.

A directory is an array of 32-byte entries.  A file's long name (up to 255 UTF-16 units) is
stored in "LFN" entries placed just before its 8.3 short entry, last part first, each carrying a
checksum of the short name so a stale long name (left by a DOS tool that renamed the short entry)
is recognised and ignored.  Lookups are case-insensitive over ASCII letters, as Linux vfat with
``iocharset=utf8`` (every current distribution's default) compares names.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vmferry.guest.errors import CorruptGuestError, GuestWriteRefusedError
from vmferry.guest.fs import clock as _clock

ENTRY = 32
ATTR_READONLY = 0x01
ATTR_VOLUME = 0x08
ATTR_DIR = 0x10
ATTR_ARCHIVE = 0x20
ATTR_LFN = 0x0F  # read-only | hidden | system | volume: no DOS tool shows these
LFN_LAST = 0x40
LFN_CHARS = 13
MAX_LFN_ENTRIES = 20  # 20 x 13 = 260 >= 255 units
NTRES_LOWER_BASE = 0x08  # Windows NT/Linux: show the 8-char base in lower case
NTRES_LOWER_EXT = 0x10
FREE, END = 0xE5, 0x00
MAX_DIR_ENTRIES = 65536  # the specification's limit (2 MiB of entries)

_SHORT_OK = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'()-@^_`{}~")
_LONG_BAD = set('"*/:<>?\\|') | {chr(c) for c in range(32)}
_ASCII_FOLD = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def fold(name: str) -> str:
    """The lookup key: ASCII letters folded, everything else compared as is."""
    return name.translate(_ASCII_FOLD)


def lfn_checksum(short: bytes) -> int:
    s = 0
    for b in short:
        s = (((s & 1) << 7) + (s >> 1) + b) & 0xFF
    return s


def short_display(short: bytes, ntres: int) -> str:
    """``NAME    EXT`` → ``NAME.EXT`` (lower-cased where the NT case bits ask for it)."""
    raw = bytearray(short)
    if raw[0] == 0x05:  # a real 0xE5 first byte, escaped so it is not read as "deleted"
        raw[0] = 0xE5
    base = raw[:8].decode("cp437").rstrip(" ")
    ext = raw[8:11].decode("cp437").rstrip(" ")
    if ntres & NTRES_LOWER_BASE:
        base = base.lower() if base.isascii() else base
    if ntres & NTRES_LOWER_EXT:
        ext = ext.lower() if ext.isascii() else ext
    return f"{base}.{ext}" if ext else base


# --- timestamps (stored as UTC: Linux's default when no tz= option is given) ---------------------


def dos_datetime(t: float | None = None) -> tuple[int, int, int]:
    """(date, time, tenths-of-a-second field) for ``t`` (now by default)."""
    t = _clock.now() if t is None else t
    tm = time.gmtime(t)
    year = min(max(tm.tm_year, 1980), 2107)
    date = ((year - 1980) << 9) | (tm.tm_mon << 5) | tm.tm_mday
    clock = (tm.tm_hour << 11) | (tm.tm_min << 5) | (tm.tm_sec // 2)
    tenths = (tm.tm_sec % 2) * 100 + int((t % 1) * 100)
    return date, clock, tenths


def dos_to_unix(date: int, clock: int) -> int | None:
    """Seconds since the epoch for a DOS date/time pair, None when the date is unset or bad."""
    day, month, year = date & 0x1F, (date >> 5) & 0xF, 1980 + (date >> 9)
    sec, minute, hour = (clock & 0x1F) * 2, (clock >> 5) & 0x3F, clock >> 11
    if not (1 <= day <= 31 and 1 <= month <= 12 and hour < 24 and minute < 60 and sec < 60):
        return None
    import calendar

    return calendar.timegm((year, month, day, hour, minute, sec, 0, 0, 0))


# --- parsed entries -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dirent:
    """One file or directory of a directory listing (its short entry plus its long name)."""

    name: str  # the long name, or the short one as Linux displays it
    short: bytes  # the 11 raw short-name bytes
    attr: int
    ntres: int
    cluster: int
    size: int
    pos: int  # byte offset of the short entry in the volume: the "inode number"
    mtime: int | None

    @property
    def kind(self) -> str:
        return "dir" if self.attr & ATTR_DIR else "file"

    @property
    def short_name(self) -> str:
        return short_display(self.short, self.ntres)


def parse_short(raw: bytes | bytearray, pos: int, name: str | None, fat32: bool) -> Dirent:
    (ntres,) = struct.unpack_from("<B", raw, 12)
    hi, wtime, wdate, lo, size = struct.unpack_from("<HHHHI", raw, 20)
    short = bytes(raw[:11])
    cluster = lo | ((hi << 16) if fat32 else 0)
    return Dirent(
        name if name is not None else short_display(short, ntres),
        short,
        raw[11],
        ntres,
        cluster,
        size,
        pos,
        dos_to_unix(wdate, wtime),
    )


@dataclass
class Slots:
    """What a directory listing tells a writer: where free entries are and which names exist."""

    count: int  # entries in the directory's current allocation
    free_runs: list[tuple[int, int]]  # (first index, length) of reusable entries, in order
    end: int | None  # index of the end marker (0x00), None when the directory is full
    shorts: set[bytes]


def parse_directory(
    data: bytes | bytearray, position: Callable[[int], int], fat32: bool
) -> tuple[list[Dirent], str | None, Slots]:
    """Entries of a directory (``.``/``..`` included), its volume label, and its free slots.

    ``position(i)`` maps entry index ``i`` to its byte offset in the volume.  Reading stops at
    the end marker as the specification says; LFN runs that do not end in a matching short
    entry are ignored, as Linux ignores them.
    """
    count = len(data) // ENTRY
    if count > MAX_DIR_ENTRIES:
        raise CorruptGuestError(f"directory of {count} entries (the limit is {MAX_DIR_ENTRIES})")
    out: list[Dirent] = []
    label: str | None = None
    runs: list[tuple[int, int]] = []
    shorts: set[bytes] = set()
    parts: dict[int, bytes] = {}
    expect, checksum = 0, -1
    end: int | None = None

    def free(i: int) -> None:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))

    for i in range(count):
        e = data[i * ENTRY : (i + 1) * ENTRY]
        first, attr = e[0], e[11]
        if first == END:
            end = i
            for j in range(i, count):
                free(j)
            break
        if first == FREE:
            free(i)
            parts, expect = {}, 0
            continue
        if attr & 0x3F == ATTR_LFN:
            seq, chk = first & 0x1F, e[13]
            if first & LFN_LAST and 1 <= seq <= MAX_LFN_ENTRIES:
                parts, expect, checksum = {seq: e}, seq - 1, chk
            elif expect and seq == expect and chk == checksum and not first & LFN_LAST:
                parts[seq] = e
                expect -= 1
            else:
                parts, expect = {}, 0
            continue
        short = bytes(e[:11])
        long_name = None
        if parts and expect == 0 and lfn_checksum(short) == checksum:
            long_name = _join_lfn(parts)
        parts, expect = {}, 0
        if attr & ATTR_VOLUME:
            if label is None and not attr & ATTR_DIR:
                label = short.decode("cp437").rstrip(" ")
            continue
        shorts.add(short)
        out.append(parse_short(e, position(i), long_name, fat32))
    return out, label, Slots(count, runs, end, shorts)


def _join_lfn(parts: dict[int, bytes]) -> str | None:
    units = bytearray()
    for seq in sorted(parts):
        e = parts[seq]
        units += e[1:11] + e[14:26] + e[28:32]
    for at in range(0, len(units), 2):
        if units[at : at + 2] == b"\0\0":
            units = units[:at]
            break
    if not units:
        return None
    return units.decode("utf-16-le", "surrogatepass")


# --- names for new entries ------------------------------------------------------------------------


def check_long_name(name: str) -> bytes:
    """The UTF-16 units of a new long name; refused when Linux vfat or Windows would refuse it."""
    if name in ("", ".", ".."):
        raise GuestWriteRefusedError(f"{name!r} is not a valid FAT file name")
    bad = sorted({c for c in name if c in _LONG_BAD})
    if bad:
        raise GuestWriteRefusedError(f"{name!r}: FAT file names cannot hold {''.join(bad)!r}")
    if name[-1] in ". ":
        raise GuestWriteRefusedError(
            f"{name!r}: a FAT name ending in a dot or space would be stored without it"
        )
    units = name.encode("utf-16-le", "surrogatepass")
    if len(units) > 255 * 2:
        raise GuestWriteRefusedError(f"{name!r}: longer than 255 UTF-16 units")
    return units


def _exact_83(name: str) -> tuple[bytes, int] | None:
    """The short entry for a name that is a valid 8.3 name as it stands (upper or lower case)."""
    base, dot, ext = name.partition(".")
    if not base or len(base) > 8 or len(ext) > 3 or "." in ext or (dot and not ext):
        return None
    ntres = 0
    for part, bit in ((base, NTRES_LOWER_BASE), (ext, NTRES_LOWER_EXT)):
        if not part.isascii():
            return None
        if part != part.upper():
            if part != part.lower():
                return None  # mixed case needs a long name to keep it
            ntres |= bit
        if any(c not in _SHORT_OK for c in part.upper().encode()):
            return None
    return (base.upper().ljust(8) + ext.upper().ljust(3)).encode("ascii"), ntres


def short_name_for(name: str, taken: Iterable[bytes]) -> tuple[bytes, int, bool]:
    """(11 short-name bytes, NT case bits, needs long-name entries) for a new entry ``name``.

    A name that is already 8.3 (all upper or all lower case per part) is stored short only, as
    Linux and Windows store it.  Any other name gets long-name entries and a basis name with a
    numeric tail (``LONGNA~1.CFG``) unique among the directory's short names.
    """
    taken = set(taken)
    exact = _exact_83(name)
    if exact is not None and exact[0] not in taken:
        return exact[0], exact[1], False

    def clean(part: str) -> str:
        out = []
        for c in part.upper():
            if c in " .":
                continue
            out.append(c if c.isascii() and ord(c) in _SHORT_OK else "_")
        return "".join(out)

    stem = name.lstrip(".")
    base, dot, ext = stem.rpartition(".")
    if not dot:
        base, ext = stem, ""
    base, ext = clean(base) or "_", clean(ext)[:3]
    for n in range(1, 1_000_000):
        tail = f"~{n}"
        short = (base[: 8 - len(tail)] + tail).ljust(8) + ext.ljust(3)
        raw = short.encode("ascii")
        if raw not in taken:
            return raw, 0, True
    raise GuestWriteRefusedError(f"{name!r}: no free short name left in the directory")


def lfn_entries(units: bytes, checksum: int) -> list[bytes]:
    """The long-name entries for UTF-16 ``units``, in on-disk order (last part first)."""
    n = -(-len(units) // (2 * LFN_CHARS))
    padded = bytearray(units)
    if len(padded) < n * 2 * LFN_CHARS:
        padded += b"\0\0"
    padded += b"\xff" * (n * 2 * LFN_CHARS - len(padded))
    out = []
    for seq in range(n, 0, -1):
        chunk = padded[(seq - 1) * 26 : seq * 26]
        e = bytearray(ENTRY)
        e[0] = seq | (LFN_LAST if seq == n else 0)
        e[1:11] = chunk[0:10]
        e[11] = ATTR_LFN
        e[13] = checksum
        e[14:26] = chunk[10:22]
        e[28:32] = chunk[22:26]
        out.append(bytes(e))
    return out


def short_entry(
    short: bytes, ntres: int, attr: int, cluster: int, size: int, now: float | None = None
) -> bytes:
    """A fresh short entry with creation, modification and access times set to ``now``."""
    date, clock, tenths = dos_datetime(now)
    return struct.pack(
        "<11sBBBHHHHHHHI",
        short,
        attr,
        ntres,
        tenths,
        clock,
        date,
        date,
        cluster >> 16,
        clock,
        date,
        cluster & 0xFFFF,
        size,
    )


def updated_entry(
    raw: bytes | bytearray, cluster: int, size: int, fat32: bool, now: float | None = None
) -> bytes:
    """``raw`` with a new first cluster and size, modified now, archive bit set (as Linux does)."""
    e = bytearray(raw)
    date, clock, _ = dos_datetime(now)
    e[11] |= ATTR_ARCHIVE
    struct.pack_into("<H", e, 18, date)  # last access date
    struct.pack_into("<H", e, 20, (cluster >> 16) if fat32 else 0)
    struct.pack_into("<HHHI", e, 22, clock, date, cluster & 0xFFFF, size)
    return bytes(e)
