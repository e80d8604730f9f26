"""Decompressing btrfs extents: zlib, zstd and lzo, each bounded by the extent's stated size.

zlib comes with Python; zstd uses the ``zstandard`` package (refused by name when it is not
installed); lzo has no well-kept pure-Python package, and LZO1X decoding is small, so it is
done here, with every read and back-reference bounds-checked.  btrfs wraps LZO1X in its own
segmented container: a 4-byte total length, then segments, each a 4-byte length and one LZO1X
stream that inflates to at most a sector; a segment header never straddles a sector boundary
(the compressor pads to the next sector instead).
"""

from __future__ import annotations

import io
import struct
import zlib

from vmferry.guest.errors import CorruptGuestError, UnsupportedGuestFeatureError

MAX_EXTENT_RAM = 128 << 10  # btrfs never compresses more than 128 KiB into one extent


def decompress(kind: int, data: bytes, ram_bytes: int, sectorsize: int, where: str) -> bytes:
    """The ``ram_bytes`` bytes a compressed extent holds (``kind`` is btrfs's number)."""
    if ram_bytes > MAX_EXTENT_RAM + sectorsize:
        raise CorruptGuestError(f"btrfs {where}: compressed extent claims {ram_bytes} bytes")
    if kind == 1:
        out = _zlib(data, ram_bytes, where)
    elif kind == 3:
        out = _zstd(data, ram_bytes, where)
    elif kind == 2:
        out = _lzo_segments(data, ram_bytes, sectorsize, where)
    else:
        raise UnsupportedGuestFeatureError(
            f"btrfs {where}: compression type {kind} is unknown", features=[f"compression {kind}"]
        )
    # a stream may legitimately stop short of ram_bytes only when the tail was zeros
    return out.ljust(ram_bytes, b"\0")


def _zlib(data: bytes, ram_bytes: int, where: str) -> bytes:
    try:
        return zlib.decompressobj().decompress(data, ram_bytes)
    except zlib.error as e:
        raise CorruptGuestError(f"btrfs {where}: bad zlib data ({e})") from None


def _zstd(data: bytes, ram_bytes: int, where: str) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise UnsupportedGuestFeatureError(
            f"btrfs {where}: zstd-compressed, and the zstandard package is not installed",
            features=["compress_zstd"],
        ) from None
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data))
        return reader.read(ram_bytes)
    except zstandard.ZstdError as e:
        raise CorruptGuestError(f"btrfs {where}: bad zstd data ({e})") from None


def _lzo_segments(data: bytes, ram_bytes: int, sectorsize: int, where: str) -> bytes:
    if len(data) < 4:
        raise CorruptGuestError(f"btrfs {where}: lzo extent too short")
    total = struct.unpack_from("<I", data)[0]
    if total > len(data) or total < 4:
        raise CorruptGuestError(f"btrfs {where}: lzo total length {total} is impossible")
    out = bytearray()
    pos = 4
    while pos < total and len(out) < ram_bytes:
        left_in_sector = sectorsize - pos % sectorsize
        if left_in_sector < 4:
            pos += left_in_sector  # padding: a segment header never crosses a sector
            continue
        if pos + 4 > total:
            raise CorruptGuestError(f"btrfs {where}: lzo segment header overruns")
        seg = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if seg == 0 or pos + seg > total:
            raise CorruptGuestError(f"btrfs {where}: lzo segment length {seg} is impossible")
        out += lzo1x_decompress(data[pos : pos + seg], min(sectorsize, ram_bytes - len(out)))
        pos += seg
    return bytes(out)


def lzo1x_decompress(src: bytes, limit: int) -> bytes:
    """One LZO1X stream (the Linux kernel's format, version 0), at most ``limit`` bytes out."""
    out = bytearray()
    n = len(src)
    ip = 0

    def need(k: int) -> None:
        if ip + k > n:
            raise CorruptGuestError("lzo stream ends inside an instruction")

    def length(base: int, mask_bits: int) -> int:
        """A variable-length count: ``base`` bits, zero means 'mask + 255*zeros + next'."""
        nonlocal ip
        if base:
            return base
        total = (1 << mask_bits) - 1
        while True:
            need(1)
            b = src[ip]
            ip += 1
            if b:
                return total + b
            total += 255
            if total > limit + 255:
                raise CorruptGuestError("lzo length runs past the output size")

    def literals(count: int) -> None:
        nonlocal ip
        need(count)
        if len(out) + count > limit:
            raise CorruptGuestError("lzo literals run past the output size")
        out.extend(src[ip : ip + count])
        ip += count

    def match(dist: int, count: int) -> None:
        start = len(out) - dist
        if dist <= 0 or start < 0:
            raise CorruptGuestError("lzo back-reference points before the output")
        if len(out) + count > limit:
            raise CorruptGuestError("lzo match runs past the output size")
        if dist >= count:
            out.extend(out[start : start + count])
        else:
            for i in range(count):
                out.append(out[start + i])

    need(1)
    state = 0
    first = src[0]
    if first == 17:
        raise CorruptGuestError("lzo stream uses a bitstream version marker (lzo-rle)")
    if first > 17:
        ip = 1
        t = first - 17
        literals(t)
        state = t if t < 4 else 4
    while True:
        need(1)
        op = src[ip]
        ip += 1
        if op < 16:
            if state == 0:
                literals(length(op & 15, 4) + 3)
                state = 4
                continue
            need(1)
            h = src[ip]
            ip += 1
            if state < 4:
                match((h << 2) + ((op >> 2) & 3) + 1, 2)
            else:
                match((h << 2) + ((op >> 2) & 3) + 2049, 3)
            s = op & 3
        elif op < 32:
            count = length(op & 7, 3) + 2
            need(2)
            v = src[ip] | src[ip + 1] << 8
            ip += 2
            dist = 16384 + ((op & 8) << 11) + (v >> 2)
            if dist == 16384:
                if count != 3:
                    raise CorruptGuestError("lzo end marker is malformed")
                return bytes(out)
            match(dist, count)
            s = v & 3
        elif op < 64:
            count = length(op & 31, 5) + 2
            need(2)
            v = src[ip] | src[ip + 1] << 8
            ip += 2
            match((v >> 2) + 1, count)
            s = v & 3
        else:
            need(1)
            h = src[ip]
            ip += 1
            count = 3 + ((op >> 5) & 1) if op < 128 else 5 + ((op >> 5) & 3)
            match((h << 3) + ((op >> 2) & 7) + 1, count)
            s = op & 3
        literals(s)
        state = s
