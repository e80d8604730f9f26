"""The four btrfs metadata checksums: crc32c, xxhash64, sha256, blake2b-256.

Every one is verified, none is skipped: crc32c through the ``crc32c`` package (already a
dependency), sha256 and blake2b through ``hashlib``, and xxhash64 in pure Python here (the
algorithm is a page of arithmetic; a metadata node is 16 KiB, so the cost is about a
millisecond per node, and nodes are cached).  Digests are stored little-endian where they are
integers, as the kernel's crypto API writes them.
"""

from __future__ import annotations

import hashlib
import struct

import crc32c as _crc32c

CSUM_SIZE = {"crc32c": 4, "xxhash64": 8, "sha256": 32, "blake2b": 32}

_M64 = (1 << 64) - 1
_P1 = 0x9E3779B185EBCA87
_P2 = 0xC2B2AE3D27D4EB4F
_P3 = 0x165667B19E3779F9
_P4 = 0x85EBCA77C2B2AE63
_P5 = 0x27D4EB2F165667C5


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M64


def _round(acc: int, lane: int) -> int:
    acc = (acc + lane * _P2) & _M64
    return (_rotl(acc, 31) * _P1) & _M64


def _merge(acc: int, val: int) -> int:
    acc ^= _round(0, val)
    return (acc * _P1 + _P4) & _M64


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 of ``data`` (the reference algorithm, seed 0 for btrfs)."""
    n = len(data)
    pos = 0
    if n >= 32:
        v1 = (seed + _P1 + _P2) & _M64
        v2 = (seed + _P2) & _M64
        v3 = seed
        v4 = (seed - _P1) & _M64
        stripes = n // 32
        lanes = struct.unpack_from(f"<{stripes * 4}Q", data)
        for i in range(0, stripes * 4, 4):
            v1 = _round(v1, lanes[i])
            v2 = _round(v2, lanes[i + 1])
            v3 = _round(v3, lanes[i + 2])
            v4 = _round(v4, lanes[i + 3])
        pos = stripes * 32
        h = (_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)) & _M64
        for v in (v1, v2, v3, v4):
            h = _merge(h, v)
    else:
        h = (seed + _P5) & _M64
    h = (h + n) & _M64
    while pos + 8 <= n:
        (k,) = struct.unpack_from("<Q", data, pos)
        h ^= _round(0, k)
        h = (_rotl(h, 27) * _P1 + _P4) & _M64
        pos += 8
    if pos + 4 <= n:
        (k,) = struct.unpack_from("<I", data, pos)
        h ^= (k * _P1) & _M64
        h = (_rotl(h, 23) * _P2 + _P3) & _M64
        pos += 4
    while pos < n:
        h ^= (data[pos] * _P5) & _M64
        h = (_rotl(h, 11) * _P1) & _M64
        pos += 1
    h ^= h >> 33
    h = (h * _P2) & _M64
    h ^= h >> 29
    h = (h * _P3) & _M64
    h ^= h >> 32
    return h


def digest(kind: str, data: bytes) -> bytes:
    """The checksum bytes btrfs stores at the start of a block for ``data`` (the rest of it)."""
    if kind == "crc32c":
        return struct.pack("<I", _crc32c.crc32c(data))
    if kind == "xxhash64":
        return struct.pack("<Q", xxh64(data))
    if kind == "sha256":
        return hashlib.sha256(data).digest()
    if kind == "blake2b":
        return hashlib.blake2b(data, digest_size=32).digest()
    raise ValueError(kind)


def name_hash(name: bytes) -> int:
    """The DIR_ITEM key offset of ``name``: crc32c seeded with ~1 and not inverted at the end."""
    return _crc32c.crc32c(name, 1) ^ 0xFFFFFFFF
