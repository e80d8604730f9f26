"""A digest of a disk's virtual content that does not depend on the image format.

Why not hash the output file: the same guest content is a different file in every format (and
streamOptimized VMDK compresses it), so a file hash proves nothing about the guest.  Instead the
virtual disk is cut into 1 MiB blocks, each block's SHA-256 is taken, and the digest is the
SHA-256 of those block digests in order.  The value depends only on the bytes the guest sees.

Speed: a block that is not covered by any data (a hole, an unallocated or zero run of the chain
map) is never read nor hashed; its digest is a constant computed once.  So the cost follows the
allocated data, like the copy itself, and the output can be re-read the same way to verify.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

BLOCK = 1 << 20
ALGORITHM = "sha256-1m-tree"  # how the digest is made; stored with it


def _zeros(length: int) -> bytes:
    from vmferry.ops.sparse import zeros

    return zeros(length)


def _zero_digest(length: int, cache: dict[int, bytes] = {}) -> bytes:  # noqa: B006 - a cache
    d = cache.get(length)
    if d is None:
        d = cache[length] = hashlib.sha256(bytes(length)).digest()
    return d


def _flat(data: bytes | bytearray | memoryview) -> bytes | bytearray:
    """``data`` as bytes: their ``startswith`` compares at memcmp speed, while comparing a
    memoryview walks it item by item (~16 ms per MiB)."""
    return data if isinstance(data, bytes | bytearray) else memoryview(data).cast("B").tobytes()


def _block_digest(buf: bytes | bytearray, start: int, length: int) -> bytes:
    """SHA-256 of ``buf[start:start+length]``; an all-zero block costs a memcmp, not a hash."""
    if buf.startswith(_zeros(min(4096, length)), start) and buf.startswith(_zeros(length), start):
        return _zero_digest(length)
    return hashlib.sha256(memoryview(buf)[start : start + length]).digest()


class BlockDigest:
    """Feed the disk's data runs in increasing offset order; gaps read as zeros."""

    def __init__(self, virtual_size: int) -> None:
        self.virtual_size = virtual_size
        self._outer = hashlib.sha256()
        self._block = 0  # index of the next block not yet finished
        self._partial: hashlib._Hash | None = None  # hasher of block ``_block`` when started
        self._filled = 0  # bytes of block ``_block`` fed to ``_partial``

    def _block_len(self, index: int) -> int:
        return min(BLOCK, self.virtual_size - index * BLOCK)

    def _finish_block(self) -> None:
        """Close block ``_block`` (padding it with zeros) and move to the next one."""
        length = self._block_len(self._block)
        if self._partial is None:
            self._outer.update(_zero_digest(length))
        else:
            if self._filled < length:
                self._partial.update(_zeros(length - self._filled))
            self._outer.update(self._partial.digest())
        self._block += 1
        self._partial, self._filled = None, 0

    def _skip_to(self, offset: int) -> None:
        """Everything before ``offset`` not fed so far reads as zeros."""
        target = offset // BLOCK
        if self._block < target and (self._partial is not None):
            self._finish_block()
        while self._block < target:
            self._outer.update(_zero_digest(self._block_len(self._block)))
            self._block += 1
        inside = offset - target * BLOCK
        if inside > self._filled:
            if self._partial is None:
                self._partial = hashlib.sha256()
            self._partial.update(_zeros(inside - self._filled))
            self._filled = inside
        elif inside < self._filled:
            raise ValueError("BlockDigest fed out of order")

    def hash_blocks(self, offset: int, data: bytes | bytearray | memoryview) -> dict[int, bytes]:
        """Digests of the whole blocks inside ``data`` (block index → digest), for ``update``.

        Thread-safe (reads nothing mutable): the pipeline calls it on its reader thread, where
        hashing overlaps the writes of the previous chunk (hashlib releases the GIL).
        """
        buf = _flat(data)
        out: dict[int, bytes] = {}
        first = -(-offset // BLOCK)
        end = offset + len(buf)
        index = first
        while True:
            start = index * BLOCK
            length = self._block_len(index)
            if length <= 0 or start + length > end:
                break
            out[index] = _block_digest(buf, start - offset, length)
            index += 1
        return out

    def update(
        self,
        offset: int,
        data: bytes | bytearray | memoryview,
        hashes: dict[int, bytes] | None = None,
    ) -> None:
        """Feed ``data`` at ``offset``; ``hashes`` from :meth:`hash_blocks` saves rehashing."""
        buf = _flat(data)
        if offset < self._block * BLOCK + self._filled:
            raise ValueError("BlockDigest fed out of order")
        if offset + len(buf) > self.virtual_size:
            raise ValueError("BlockDigest fed past the end of the disk")
        mv = memoryview(buf)
        self._skip_to(offset)
        pos = 0
        while pos < len(mv):
            length = self._block_len(self._block)
            room = length - self._filled
            take = min(room, len(mv) - pos)
            if self._filled == 0 and take == length:  # a whole block: one digest
                known = hashes.get(self._block) if hashes else None
                self._outer.update(known or _block_digest(buf, pos, take))
                self._block += 1
            else:
                if self._partial is None:
                    self._partial = hashlib.sha256()
                self._partial.update(mv[pos : pos + take])
                self._filled += take
                if self._filled == length:
                    self._finish_block()
            pos += take

    def hexdigest(self) -> str:
        """Finish (the rest reads as zeros) and return the digest; call once."""
        if self._partial is not None:
            self._finish_block()
        total = -(-self.virtual_size // BLOCK)
        while self._block < total:
            self._outer.update(_zero_digest(self._block_len(self._block)))
            self._block += 1
        return self._outer.hexdigest()


def block_windows(runs: Iterable[tuple[int, int]], size: int, step: int) -> list[tuple[int, int]]:
    """(offset, length) reads covering every BLOCK that ``runs`` (sorted (offset, end) data
    runs) touch, each aligned to BLOCK and no longer than ``step`` (a multiple of BLOCK).

    Why: fed whole blocks, :meth:`BlockDigest.hash_blocks` hashes everything on the threads
    that read, and :meth:`BlockDigest.update` only combines digests; a data run that starts or
    ends inside a block would otherwise be hashed piecemeal by the one thread that combines.
    Holes inside a touched block read as zeros (cheap), the output's untouched blocks are
    never read.
    """
    spans: list[list[int]] = []
    for start, end in runs:
        if end <= start:
            continue
        a, b = start // BLOCK * BLOCK, min(-(-end // BLOCK) * BLOCK, size)
        if spans and a <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])
    out: list[tuple[int, int]] = []
    for a, b in spans:
        for pos in range(a, b, step):
            out.append((pos, min(step, b - pos)))
    return out


def digest_of(disk: object) -> str:
    """Digest of any chain (``map`` + layers) by reading only its data runs."""
    from vmferry.chain import Chain

    assert isinstance(disk, Chain)
    d = BlockDigest(disk.virtual_size)
    step = 8 << 20
    for ext in disk.map():
        if not ext.data:
            continue
        layer = disk.layers[ext.depth]
        pos = ext.offset
        while pos < ext.end:
            n = min(step, ext.end - pos)
            d.update(pos, layer.read(pos, n))
            pos += n
    return d.hexdigest()
