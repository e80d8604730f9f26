"""The directory-index (htree) name hash of ext3/ext4.

An indexed directory sorts its leaf blocks by a 32-bit hash of each name, so a new entry must
go into the leaf whose hash range holds its name's hash.  The hash is the kernel's
``ext4fs_dirhash`` (fs/ext4/hash.c): legacy, half-MD4 or TEA over the name, seeded from the
superblock, each in a signed or unsigned flavour (how the name's bytes above 0x7f were widened
on the machine that made the filesystem: the superblock's flags say which).  Checked against
e2fsprogs' own implementation (``debugfs -R "dx_hash -h ALG -s SEED NAME"``) in the tests.
"""

from __future__ import annotations

import struct

from vmferry.guest.errors import GuestWriteRefusedError

LEGACY, HALF_MD4, TEA = 0, 1, 2
LEGACY_UNSIGNED, HALF_MD4_UNSIGNED, TEA_UNSIGNED = 3, 4, 5
#: superblock s_flags: names were hashed with unsigned (or signed) chars
FLAGS_SIGNED_HASH = 0x1
FLAGS_UNSIGNED_HASH = 0x2

_M = 0xFFFFFFFF
_DEFAULT_SEED = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_EOF_32 = 0x7FFFFFFF
_K2 = 0o13240474631
_K3 = 0o15666365641
_TEA_DELTA = 0x9E3779B9


def effective_version(dir_version: int, sb_flags: int) -> int:
    """The hash a directory really uses: its root's version, made unsigned when the
    superblock says names were hashed with unsigned chars (as the kernel does)."""
    if dir_version <= TEA and sb_flags & FLAGS_UNSIGNED_HASH:
        return dir_version + 3
    return dir_version


def name_hash(name: bytes, version: int, seed: bytes) -> int:
    """The major hash (low bit clear) of ``name`` under ``version`` and the superblock's
    16-byte ``s_hash_seed``; an unknown version is refused."""
    words = struct.unpack("<4I", seed)
    buf = list(words) if any(words) else list(_DEFAULT_SEED)
    signed = version in (LEGACY, HALF_MD4, TEA)
    if version in (LEGACY, LEGACY_UNSIGNED):
        h = _legacy(name, signed)
    elif version in (HALF_MD4, HALF_MD4_UNSIGNED):
        for pos in range(0, len(name), 32):
            _half_md4(buf, _to_words(name[pos:], 8, signed))
        h = buf[1]
    elif version in (TEA, TEA_UNSIGNED):
        for pos in range(0, len(name), 16):
            _tea(buf, _to_words(name[pos:], 4, signed))
        h = buf[0]
    else:
        raise GuestWriteRefusedError(f"directory hash version {version} is not known to vmferry")
    h &= ~1 & _M
    if h == _EOF_32 << 1:
        h = (_EOF_32 - 1) << 1
    return h


def _char(b: int, signed: bool) -> int:
    return b - 256 if signed and b > 0x7F else b


def _to_words(msg: bytes, num: int, signed: bool) -> list[int]:
    """``num`` 32-bit words from the start of ``msg``: four bytes to a word, big end first,
    each word started from the padding (the whole name's length in every byte)."""
    length = len(msg)
    pad = (length | (length << 8)) & _M
    pad = (pad | (pad << 16)) & _M
    out: list[int] = []
    val = pad
    for i, b in enumerate(msg[: num * 4]):
        val = (_char(b, signed) + (val << 8)) & _M
        if i % 4 == 3:
            out.append(val)
            val = pad
    if len(out) < num and len(msg[: num * 4]) % 4:
        out.append(val)
    while len(out) < num:
        out.append(pad)
    return out


def _rol(x: int, s: int) -> int:
    return ((x << s) | (x >> (32 - s))) & _M


def _half_md4(buf: list[int], w: list[int]) -> None:
    a, b, c, d = buf

    def f(x: int, y: int, z: int) -> int:
        return z ^ (x & (y ^ z))

    def g(x: int, y: int, z: int) -> int:
        return ((x & y) + ((x ^ y) & z)) & _M

    def h(x: int, y: int, z: int) -> int:
        return x ^ y ^ z

    for fn, k, order, shifts in (
        (f, 0, (0, 1, 2, 3, 4, 5, 6, 7), (3, 7, 11, 19)),
        (g, _K2, (1, 3, 5, 7, 0, 2, 4, 6), (3, 5, 9, 13)),
        (h, _K3, (3, 7, 2, 6, 1, 5, 0, 4), (3, 9, 11, 15)),
    ):
        for step, idx in enumerate(order):
            x, s = (w[idx] + k) & _M, shifts[step % 4]
            if step % 4 == 0:
                a = _rol((a + fn(b, c, d) + x) & _M, s)
            elif step % 4 == 1:
                d = _rol((d + fn(a, b, c) + x) & _M, s)
            elif step % 4 == 2:
                c = _rol((c + fn(d, a, b) + x) & _M, s)
            else:
                b = _rol((b + fn(c, d, a) + x) & _M, s)
    buf[0] = (buf[0] + a) & _M
    buf[1] = (buf[1] + b) & _M
    buf[2] = (buf[2] + c) & _M
    buf[3] = (buf[3] + d) & _M


def _tea(buf: list[int], w: list[int]) -> None:
    b0, b1 = buf[0], buf[1]
    a, b, c, d = w
    total = 0
    for _ in range(16):
        total = (total + _TEA_DELTA) & _M
        b0 = (b0 + ((((b1 << 4) + a) & _M) ^ ((b1 + total) & _M) ^ (((b1 >> 5) + b) & _M))) & _M
        b1 = (b1 + ((((b0 << 4) + c) & _M) ^ ((b0 + total) & _M) ^ (((b0 >> 5) + d) & _M))) & _M
    buf[0] = (buf[0] + b0) & _M
    buf[1] = (buf[1] + b1) & _M


def _legacy(name: bytes, signed: bool) -> int:
    h0, h1 = 0x12A3FE2D, 0x37ABE8F9
    for b in name:
        h = (h1 + (h0 ^ ((_char(b, signed) * 7152373) & _M))) & _M
        if h & 0x80000000:
            h = (h - 0x7FFFFFFF) & _M
        h1, h0 = h0, h
    return (h0 << 1) & _M
