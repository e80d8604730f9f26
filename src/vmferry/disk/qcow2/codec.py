"""Compressed cluster codecs: zlib (raw deflate) and zstd.

Decompression is bounded: a compressed cluster must inflate to exactly one cluster, and no
more than ``cluster_size + 1`` bytes are ever produced, so a hostile image cannot turn 2 KiB
of input into gigabytes of memory.  ``zstandard`` is imported only when a zstd image is met
(core vmferry stays dependency-free).
"""

from __future__ import annotations

import io
import threading
from typing import Any

from vmferry.disk.deflate import zlib
from vmferry.disk.parallel import map_all
from vmferry.disk.qcow2.layout import COMPRESSION_ZLIB, COMPRESSION_ZSTD
from vmferry.errors import CorruptImageError, UnsupportedFeatureError

#: qemu inflates with a 4 KiB window (-12), so what we write must not reference further back
_DEFLATE_WBITS = -12
_INFLATE_WBITS = -15  # accepts any window a writer may have used


def load_zstd() -> Any:
    try:
        import zstandard  # type: ignore[import-not-found]
    except ImportError as exc:
        raise UnsupportedFeatureError(
            "this qcow2 image uses zstd compression and the zstandard module is not installed",
            features=["compression type zstd"],
            hint="pip install zstandard",
        ) from exc
    return zstandard


def decompress(kind: int, data: bytes, cluster_size: int, where: str) -> bytes:
    """One cluster from its compressed bytes, or a CorruptImageError naming ``where``."""
    if kind == COMPRESSION_ZLIB:
        d = zlib.decompressobj(_INFLATE_WBITS)
        try:
            out = d.decompress(data, cluster_size + 1)
        except zlib.error as exc:
            raise CorruptImageError(f"{where}: deflate data is damaged ({exc})") from exc
    elif kind == COMPRESSION_ZSTD:
        zstd = load_zstd()
        try:
            reader = zstd.ZstdDecompressor().stream_reader(io.BytesIO(data))
            out = reader.read(cluster_size + 1)
        except zstd.ZstdError as exc:
            raise CorruptImageError(f"{where}: zstd data is damaged ({exc})") from exc
    else:  # validated at open
        raise UnsupportedFeatureError(f"compression type {kind}")
    if len(out) > cluster_size:
        raise CorruptImageError(f"{where}: inflates past one cluster ({cluster_size} bytes)")
    if len(out) != cluster_size:
        raise CorruptImageError(
            f"{where}: inflates to {len(out)} bytes instead of one {cluster_size}-byte cluster"
        )
    return out


class Compressor:
    """Compresses whole clusters for compressed output, on every core for batches (the shared
    pool of :mod:`vmferry.disk.parallel`)."""

    def __init__(self, kind: int) -> None:
        self.kind = kind
        self._zstd: Any = load_zstd() if kind == COMPRESSION_ZSTD else None
        self._local = threading.local()  # a zstd compressor must not be shared by threads

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        if self._zstd is not None:
            comp = getattr(self._local, "zstd", None)
            if comp is None:
                comp = self._local.zstd = self._zstd.ZstdCompressor(level=3)
            return bytes(comp.compress(bytes(data)))
        c = zlib.compressobj(6, zlib.DEFLATED, _DEFLATE_WBITS)
        return c.compress(data) + c.flush()

    def compress_many(self, bufs: list[bytearray]) -> list[bytes]:
        return map_all(self.compress, bufs)
