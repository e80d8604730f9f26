"""Convert any image (flattening its chain) into a new image of any writable format.

One loop for every pair of formats: walk the source chain's map, skip what reads as zeros,
read data runs from the layer that holds them, drop 4 KiB zero runs inside them, and write
the rest.  The target is a fresh image (reads as zeros everywhere), so nothing else needs
writing, and time follows the allocated data rather than the virtual size.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vmferry.chain import Chain, open_chain
from vmferry.disk import DiskFormat, driver_by_name, driver_for_extension
from vmferry.disk.readahead import chunk_for, read_ahead_into
from vmferry.errors import UsageError
from vmferry.ops.atomic import AtomicOutput
from vmferry.ops.progress import NoProgress, Progress
from vmferry.ops.sparse import nonzero_runs

#: bytes written between requests to start writing them back to disk: a few MiB, so the
#: device is fed steadily (every 64 MiB, 2 GiB synced took 1.9-2.1 s; every 4 MiB, 1.5-1.8 s)
WRITEBACK_EVERY = 4 << 20


@dataclass
class ConvertResult:
    source: str
    destination: str
    source_format: str
    destination_format: str
    virtual_size: int
    data_bytes_read: int
    bytes_written: int
    seconds: float
    warnings: list[str]

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


def output_driver(dst: str | os.PathLike[str], dst_format: str | None) -> type[DiskFormat]:
    if dst_format:
        return driver_by_name(dst_format)
    drv = driver_for_extension(dst)
    if drv is None:
        raise UsageError(
            f"cannot tell the output format from {Path(dst).name!r}",
            hint="name it with -O FORMAT (raw, vhd, vhdx, ...)",
        )
    return drv


def check_create_options(driver: type[DiskFormat], options: Mapping[str, str]) -> None:
    """Refuse options ``driver`` does not take, before any file is made."""
    unknown = sorted(set(options) - set(driver.create_options))
    if unknown:
        raise UsageError(
            f"{driver.name} does not take option(s) {', '.join(unknown)}",
            hint="it takes: " + (", ".join(sorted(driver.create_options)) or "none"),
        )


@contextmanager
def new_image(
    path: str | os.PathLike[str],
    driver: type[DiskFormat],
    size: int,
    options: Mapping[str, str],
    *,
    overwrite: bool = False,
    durable: bool = True,
) -> Iterator[DiskFormat]:
    """A fresh ``driver`` image at ``path`` for the caller to fill: written under a temporary
    name (:class:`~vmferry.ops.atomic.AtomicOutput`) with the drivers' ordering fsyncs skipped,
    because nothing can see it until it is whole; on a clean exit flushed, synced once (unless
    not ``durable``) and renamed into place; closed either way, its extent files removed on a
    failure."""
    with AtomicOutput(path, overwrite=overwrite, durable=durable) as out:
        assert out.file is not None
        out.file.cache_unsafe = True  # synced once, whole, before the rename
        layer = driver.create(out.file, size, dict(options), None)
        out.discard_with(layer.files())
        try:
            yield layer
            layer.flush()
            out.commit()
        finally:
            layer.close()


def _read_plan(src: Chain, chunk: int) -> tuple[list[tuple[DiskFormat, int, int]], int]:
    """Chunk-sized reads of every data run, in disk order, each from the layer that holds it."""
    plan: list[tuple[DiskFormat, int, int]] = []
    for ext in src.map():
        if not ext.data:
            continue
        layer = src.layers[ext.depth]
        pos = ext.offset
        while pos < ext.end:
            n = min(chunk - (pos % chunk), ext.end - pos)
            plan.append((layer, pos, n))
            pos += n
    return plan, sum(n for _, _, n in plan)


def copy_chain(
    src: Chain, dst: DiskFormat, progress: Progress, *, writeback: bool = True
) -> tuple[int, int]:
    """Copy the flattened content of ``src`` into the fresh layer ``dst``.

    The next chunks are read on a helper thread, into a few reused buffers, while this one is
    written (``read_ahead_into``).
    ``writeback`` starts writing finished data to disk as it goes, for an output that will be
    synced at the end (``False`` when it will not be).  Returns (bytes read, bytes written).
    """
    plan, total = _read_plan(src, chunk_for(dst))
    progress.start(total, "converting")
    chunks = read_ahead_into(plan)
    try:
        written = write_nonzero(
            [(pos, n) for _, pos, n in plan], chunks, dst, progress, writeback=writeback
        )
    finally:
        chunks.close()
    progress.finish()
    return total, written


def write_nonzero(
    spans: Sequence[tuple[int, int]],
    chunks: Iterable[bytes],
    dst: DiskFormat,
    progress: Progress,
    *,
    writeback: bool,
    after_chunk: Callable[[], None] | None = None,
) -> int:
    """Write each chunk (read at its ``(offset, length)`` span) into the fresh layer ``dst``,
    leaving out its 4 KiB zero runs (a fresh layer reads as zeros there); returns the bytes
    written.  ``writeback``: start writing finished data to disk every WRITEBACK_EVERY bytes,
    for an output synced at the end, so that sync finds little left to do."""
    done = written = flushed = 0
    for (pos, n), buf in zip(spans, chunks, strict=True):
        view = memoryview(buf)  # pieces of the chunk are written without copies
        for run_off, run_len in nonzero_runs(buf, pos):
            rel = run_off - pos
            dst.write(run_off, view[rel : rel + run_len] if run_len != n else buf)
            written += run_len
        if writeback and written - flushed >= WRITEBACK_EVERY:
            dst.file.start_writeback()
            flushed = written
        done += n
        progress.advance(done)
        if after_chunk is not None:
            after_chunk()
    return written


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    src_format: str | None = None,
    dst_format: str | None = None,
    options: Mapping[str, str] | None = None,
    allowed_dirs: Sequence[str | os.PathLike[str]] | None = None,
    force_share: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    sync: bool = True,
) -> ConvertResult:
    """Write the guest-visible content of ``src`` (whole chain) into a new image ``dst``.

    ``sync=False`` renames the finished output into place without waiting for the disk, as
    ``qemu-img convert`` does by default (its cache=unsafe): safe against a killed process,
    not against a power loss in the seconds after.
    """
    driver = output_driver(dst, dst_format)
    opts = dict(options or {})
    check_create_options(driver, opts)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise UsageError("source and destination are the same file")
    started = time.monotonic()
    with open_chain(src, src_format, allowed_dirs=allowed_dirs, force_share=force_share) as chain:
        with new_image(
            dst, driver, chain.virtual_size, opts, overwrite=overwrite, durable=sync
        ) as layer:
            read_bytes, written = copy_chain(chain, layer, progress or NoProgress(), writeback=sync)
        return ConvertResult(
            source=str(src),
            destination=str(dst),
            source_format=chain.format,
            destination_format=driver.name,
            virtual_size=chain.virtual_size,
            data_bytes_read=read_bytes,
            bytes_written=written,
            seconds=round(time.monotonic() - started, 3),
            warnings=list(chain.warnings),
        )
