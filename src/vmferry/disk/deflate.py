"""The deflate implementation of the compressed disk formats (streamOptimized VMDK grains,
zlib qcow2 clusters, gzip OVA members): zlib-ng when it is installed, else Python's zlib.

Why zlib-ng: the two make and read the same deflate streams, but zlib-ng checks adler32 and
copies stored blocks with SIMD.  Measured on this project's benchmark machine, per 64 KiB
grain: a stored (incompressible) grain inflates at 12.6 GB/s against 1.6 GB/s, a compressed
one at 646 MB/s against 368; adler32 alone 42 GB/s against 2.9.  With Debian's zlib, a
streamOptimized disk of random data spent a third of its reading time in adler32.
The fallback keeps vmferry working where no zlib-ng wheel exists; only speed changes.
"""

from __future__ import annotations

from types import ModuleType


def _pick() -> ModuleType:
    try:
        from zlib_ng import zlib_ng  # type: ignore[import-not-found]
    except ImportError:
        import zlib

        return zlib
    return zlib_ng


#: a module with the stdlib zlib API: compress, compressobj, decompressobj, adler32, error
zlib = _pick()
