"""Read an initramfs: which kernel modules (storage, network drivers) does it carry?

Why: a guest moved from VMware boots only if its initramfs holds the driver of the target's
boot controller (virtio_blk, hv_storvsc, ata_piix, ...).  An initramfs is one or more cpio
"newc" archives laid end to end, the first often uncompressed (early microcode, or dracut's
early cpio), the rest compressed with gzip, xz, lzma, zstd, lz4 (legacy frames) or bzip2, each
padded with zeros.  We stream every archive and keep only member names, so memory stays bounded
whatever the decompressed size; every header field is checked before use.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import re
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vmferry.guest.errors import CorruptGuestError, GuestLimitError

try:
    import zstandard as _zstd
except ImportError:  # optional: reported as "unknown" without it
    _zstd = None
try:
    import lz4.block as _lz4_block
except ImportError:  # optional: reported as "unknown" without it
    _lz4_block = None

NEWC_MAGICS = (b"070701", b"070702")
HEADER = 110
MAX_NAME = 4096
MAX_MEMBERS = 1_000_000
MAX_DECOMPRESSED = 4 << 30  # bytes streamed through a decompressor before we give up
FEED = 1 << 16
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
LZ4_LEGACY_BLOCK = 8 << 20
MAX_CAPTURE = 1 << 20  # one captured member's content (conf/modules and the like)
_KINDS = {0o040000: "dir", 0o100000: "file", 0o120000: "symlink"}
#: members always captured (tiny), so one walk answers inspection and driver injection alike
_ALWAYS_CAPTURE = frozenset({"conf/modules"})
_CACHE_ENTRIES = 8  # parsed images kept (a guest has a handful of kernels)

_NONZERO = re.compile(rb"[^\0]")

_COMPRESSION_MAGICS = (
    (b"\x1f\x8b", "gzip"),
    (b"\x1f\x9e", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x89LZO", "lzo"),
)


@dataclass
class Segment:
    """One archive inside the initramfs file."""

    offset: int
    compression: str  # none | gzip | xz | lzma | zstd | lz4 | bzip2 | lzo | unknown
    status: str = "ok"  # ok | unknown (no decompressor for it: the driver list may be short)
    members: int = 0


@dataclass
class InitramfsInfo:
    segments: list[Segment] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)  # member paths of kernel modules
    early_microcode: bool = False
    #: member name (no leading ./ or /) -> dir, file, symlink or other; the last one wins, as
    #: when the kernel unpacks the archives in order
    kinds: dict[str, str] = field(default_factory=dict)
    #: contents of the members asked for with ``capture=`` (the last copy of each)
    captured: dict[str, bytes] = field(default_factory=dict)
    #: symlink member -> its target
    links: dict[str, str] = field(default_factory=dict)

    @property
    def generator(self) -> str | None:
        """Which tool built it: ``dracut``, ``initramfs-tools``, or None when unknown."""
        kinds = self.kinds
        marks = ("usr/lib/dracut", "lib/dracut", "usr/lib/dracut-lib.sh", "lib/dracut-lib.sh")
        if any(n in kinds for n in marks):
            return "dracut"
        if "scripts/functions" in kinds and "conf/initramfs.conf" in kinds:
            return "initramfs-tools"
        return None

    @property
    def drivers(self) -> list[str]:
        """Module names as lsmod prints them (dashes become underscores), sorted, unique."""
        return sorted({module_name(p) for p in self.modules})

    @property
    def complete(self) -> bool:
        """False when some archive could not be read: the driver list may then be short."""
        return all(s.status == "ok" for s in self.segments)

    def to_json(self) -> dict[str, Any]:
        return {
            "segments": [vars(s) for s in self.segments],
            "drivers": self.drivers,
            "complete": self.complete,
            "early_microcode": self.early_microcode,
        }


def module_name(path: str) -> str:
    """``kernel/drivers/block/virtio_blk.ko.xz`` → ``virtio_blk`` (dashes become underscores)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def is_module_path(name: str) -> bool:
    name = name.lstrip("./")
    return name.startswith(("lib/modules/", "usr/lib/modules/")) and name.endswith(MODULE_SUFFIXES)


def member_name(name: str) -> str:
    """A member name as the kernel resolves it: relative, without ``./``."""
    while name.startswith(("./", "/")):
        name = name[1:] if name.startswith("/") else name[2:]
    return name.rstrip("/")


class _ParseCache:
    """Parsed images by content (SHA-256 of the whole blob), most recent last.

    Why: one migration asks about the same initramfs several times (inspection, the
    ``initramfs`` rule, driver injection), and each walk decompresses the whole image (tens
    of MB through gzip/xz/zstd), which costs far more than hashing it.  Keyed by content,
    an entry can never answer for other bytes; callers get copies, so nothing they change
    leaks into the cache.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[bytes, tuple[frozenset[str], InitramfsInfo]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: bytes, capture: frozenset[str]) -> InitramfsInfo | None:
        with self.lock:
            hit = self.entries.get(key)
            if hit is None or not capture <= hit[0]:
                return None
            self.entries.move_to_end(key)
            return _copy(hit[1], capture)

    def put(self, key: bytes, capture: frozenset[str], info: InitramfsInfo) -> None:
        with self.lock:
            self.entries[key] = (capture, _copy(info, capture))
            self.entries.move_to_end(key)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


def _copy(info: InitramfsInfo, capture: frozenset[str]) -> InitramfsInfo:
    """An independent copy holding only the ``captured`` members asked for."""
    return InitramfsInfo(
        segments=[Segment(s.offset, s.compression, s.status, s.members) for s in info.segments],
        modules=list(info.modules),
        early_microcode=info.early_microcode,
        kinds=dict(info.kinds),
        captured={k: v for k, v in info.captured.items() if k in capture},
        links=dict(info.links),
    )


_CACHE = _ParseCache(_CACHE_ENTRIES)


def read_initramfs(blob: bytes, capture: frozenset[str] = frozenset()) -> InitramfsInfo:
    """Walk every archive of an initramfs image held in ``blob``.

    ``capture``: member names (as :func:`member_name` spells them) whose content to keep, up
    to 1 MiB each, in ``captured``.

    A damaged archive raises :class:`CorruptGuestError` (or :class:`GuestLimitError`); an
    archive compressed with something we cannot decompress ends the walk with status
    ``unknown`` on its segment (nothing after it can be located).  Results are cached by
    content (:class:`_ParseCache`); errors are not.
    """
    key = hashlib.sha256(blob).digest()
    found = _CACHE.get(key, capture)
    if found is not None:
        return found
    wanted = capture | _ALWAYS_CAPTURE
    info = _walk(blob, wanted)
    _CACHE.put(key, wanted, info)
    return _copy(info, capture)


def _walk(blob: bytes, capture: frozenset[str]) -> InitramfsInfo:
    info = InitramfsInfo()
    pos = 0
    while pos < len(blob):
        pos = _skip_zeros(blob, pos)
        if pos >= len(blob):
            break
        if blob[pos : pos + 6] in NEWC_MAGICS:
            seg = Segment(pos, "none")
            info.segments.append(seg)
            src = _BytesSource(blob, pos)
            _parse_cpio(src, seg, info, capture)
            pos = src.pos
            continue
        kind = next((k for m, k in _COMPRESSION_MAGICS if blob.startswith(m, pos)), "unknown")
        seg = Segment(pos, kind)
        info.segments.append(seg)
        chunks = _decompressor(kind, blob, pos)
        if chunks is None:
            seg.status = "unknown"
            break
        stream = _ChunkSource(chunks)
        try:
            while stream.skip_zeros():
                _parse_cpio(stream, seg, info, capture)
            end = stream.end_offset()
        except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as exc:
            raise CorruptGuestError(
                f"{kind} archive at offset {pos} of the initramfs is damaged: {exc}"
            ) from None
        if end is None or end <= pos:
            break
        pos = end
    return info


def _skip_zeros(blob: bytes, pos: int) -> int:
    m = _NONZERO.search(blob, pos)
    return m.start() if m else len(blob)


# --- cpio -------------------------------------------------------------------------------------


class _BytesSource:
    """Sequential reads from an in-memory archive."""

    def __init__(self, blob: bytes, pos: int) -> None:
        self.blob = blob
        self.pos = pos

    def read(self, n: int) -> bytes:
        data = self.blob[self.pos : self.pos + n]
        self.pos += len(data)
        return data

    def skip(self, n: int) -> int:
        n = min(n, len(self.blob) - self.pos)
        self.pos += n
        return n


class _ChunkSource:
    """Sequential reads from a generator of decompressed chunks, with a running total cap."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.buf = b""
        self.total = 0
        self.done = False
        self.end: int | None = None

    def _fill(self, n: int) -> None:
        while len(self.buf) < n and not self.done:
            try:
                chunk = next(self.chunks)
            except StopIteration as stop:
                self.done = True
                self.end = stop.value
                break
            self.total += len(chunk)
            if self.total > MAX_DECOMPRESSED:
                raise GuestLimitError(f"initramfs archive decompresses past {MAX_DECOMPRESSED}")
            self.buf = self.buf + chunk if self.buf else chunk

    def read(self, n: int) -> bytes:
        self._fill(n)
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def skip(self, n: int) -> int:
        skipped = 0
        while skipped < n:
            self._fill(1)
            if not self.buf:
                break
            take = min(n - skipped, len(self.buf))
            self.buf = self.buf[take:]
            skipped += take
        return skipped

    def skip_zeros(self) -> bool:
        """Drop padding between archives; False at the end of the stream."""
        while True:
            self._fill(1)
            if not self.buf:
                return False
            stripped = self.buf.lstrip(b"\0")
            if stripped:
                self.buf = stripped
                return True
            self.buf = b""

    def end_offset(self) -> int | None:
        while not self.done:
            self.skip(1 << 20)
        return self.end


def _parse_cpio(
    src: _BytesSource | _ChunkSource,
    seg: Segment,
    info: InitramfsInfo,
    capture: frozenset[str] = frozenset(),
) -> None:
    """Read members up to the TRAILER!!! entry, recording kernel-module paths."""
    consumed = 0
    while True:
        hdr = src.read(HEADER)
        if len(hdr) < HEADER:
            raise CorruptGuestError(f"cpio archive at {seg.offset} ends inside a header")
        if hdr[:6] not in NEWC_MAGICS:
            raise CorruptGuestError(f"cpio member at {seg.offset}+{consumed} has no newc magic")
        try:
            fields = [int(hdr[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise CorruptGuestError("cpio header holds non-hex digits") from None
        filesize, namesize = fields[6], fields[11]
        if not 1 <= namesize <= MAX_NAME:
            raise CorruptGuestError(f"cpio member name size {namesize} is absurd")
        name_raw = src.read(namesize)
        if len(name_raw) < namesize:
            raise CorruptGuestError("cpio archive ends inside a member name")
        src.skip(-(HEADER + namesize) % 4)
        name = name_raw.rstrip(b"\0").decode("utf-8", "surrogateescape")
        if name == "TRAILER!!!":
            return
        seg.members += 1
        if seg.members > MAX_MEMBERS:
            raise GuestLimitError(f"more than {MAX_MEMBERS} members in one cpio archive")
        if is_module_path(name):
            info.modules.append(name)
        if name.startswith("kernel/x86/microcode/") and seg.compression == "none":
            info.early_microcode = True
        clean = member_name(name)
        if clean:
            info.kinds[clean] = _KINDS.get(fields[1] & 0o170000, "other")
        padded = filesize + (-filesize % 4)
        is_link = fields[1] & 0o170000 == 0o120000 and filesize <= MAX_NAME
        if (clean in capture or is_link) and filesize <= MAX_CAPTURE:
            data = src.read(filesize)
            if len(data) < filesize or src.skip(padded - filesize) < padded - filesize:
                raise CorruptGuestError(f"cpio member {name!r} runs past the end of the archive")
            if is_link:
                info.links[clean] = data.decode("utf-8", "surrogateescape")
            if clean in capture:
                info.captured[clean] = data
        elif src.skip(padded) < padded:
            raise CorruptGuestError(f"cpio member {name!r} runs past the end of the archive")
        consumed += HEADER + namesize + padded


# --- decompression ----------------------------------------------------------------------------


def _decompressor(kind: str, blob: bytes, pos: int) -> Iterator[bytes] | None:
    """A generator of decompressed chunks that returns the input offset where the stream ended."""
    if kind == "gzip":
        return _stdlib_stream(zlib.decompressobj(16 + zlib.MAX_WBITS), blob, pos)
    if kind == "xz":
        return _stdlib_stream(lzma.LZMADecompressor(lzma.FORMAT_XZ), blob, pos)
    if kind == "lzma":
        return _stdlib_stream(lzma.LZMADecompressor(lzma.FORMAT_ALONE), blob, pos)
    if kind == "bzip2":
        return _stdlib_stream(bz2.BZ2Decompressor(), blob, pos)
    if kind == "zstd" and _zstd is not None:
        return _zstd_stream(blob, pos)
    if kind == "lz4" and _lz4_block is not None:
        return _lz4_legacy_stream(blob, pos)
    return None


def _stdlib_stream(dec: Any, blob: bytes, pos: int) -> Iterator[bytes]:
    """zlib/lzma/bz2 with bounded output per step; returns where the compressed data ended."""
    fed = pos
    is_zlib = hasattr(dec, "unconsumed_tail")
    while not dec.eof:
        if is_zlib:
            data = dec.unconsumed_tail
            if not data:
                data = blob[fed : fed + FEED]
                fed += len(data)
                if not data:
                    return fed
        elif dec.needs_input:
            data = blob[fed : fed + FEED]
            fed += len(data)
            if not data:
                return fed
        else:
            data = b""
        out = dec.decompress(data, FEED * 16)
        if out:
            yield out
    return fed - len(dec.unused_data)


def _zstd_stream(blob: bytes, pos: int) -> Iterator[bytes]:
    assert _zstd is not None
    dec = _zstd.ZstdDecompressor().decompressobj()
    fed = pos
    while True:
        data = blob[fed : fed + FEED // 4]
        if not data:
            return fed
        fed += len(data)
        try:
            out = dec.decompress(data)
        except _zstd.ZstdError as exc:
            raise ValueError(str(exc)) from None
        if out:
            yield out
        if dec.eof:
            return fed - len(dec.unused_data)


def _lz4_legacy_stream(blob: bytes, pos: int) -> Iterator[bytes]:
    """The kernel's lz4 "legacy" framing: magic, then [le32 size][block] until a non-block."""
    assert _lz4_block is not None
    at = pos + 4
    while at + 4 <= len(blob):
        size = int.from_bytes(blob[at : at + 4], "little")
        if size == 0x184C2102:  # a new legacy stream glued on: keep going
            at += 4
            continue
        if size == 0 or size > LZ4_LEGACY_BLOCK + (LZ4_LEGACY_BLOCK >> 7) + 64:
            return at  # end of the stream (next archive or padding)
        if at + 4 + size > len(blob):
            raise CorruptGuestError("lz4 block runs past the end of the initramfs")
        try:
            out = _lz4_block.decompress(
                blob[at + 4 : at + 4 + size], uncompressed_size=LZ4_LEGACY_BLOCK
            )
        except _lz4_block.LZ4BlockError as exc:
            raise ValueError(str(exc)) from None
        at += 4 + size
        yield out
    return at
