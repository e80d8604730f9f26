"""Open an image with its whole chain of parents."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from vmferry.chain.chain import Chain
from vmferry.chain.resolve import ResolveOptions, check_loop, open_parent
from vmferry.disk import BlockFile, DiskFormat, driver_by_name, probe


def open_layer(
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    writable: bool = False,
    force_share: bool = False,
) -> DiskFormat:
    """Open one image file alone (no parents): for info, check and chain surgery."""
    f = BlockFile.open(path, writable=writable, force_share=force_share)
    try:
        driver = driver_by_name(format) if format else probe(f)
        return driver.open(f, writable=writable)
    except BaseException:
        f.close()
        raise


def open_chain(
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    writable: bool = False,
    allowed_dirs: Sequence[str | os.PathLike[str]] | None = None,
    force_share: bool = False,
    ignore_identity: bool = False,
    max_depth: int | None = None,
) -> Chain:
    """Open ``path`` and every parent it names; only the top may be writable.

    Parents are looked for only in the top image's directory tree and in ``allowed_dirs``.
    """
    opts = ResolveOptions(force_share=force_share, ignore_identity=ignore_identity)
    if max_depth is not None:
        opts.max_depth = max_depth
    top_path = Path(os.path.abspath(path))
    roots = [top_path.parent] + [Path(os.path.abspath(d)) for d in allowed_dirs or ()]
    top = open_layer(top_path, format, writable=writable, force_share=force_share)
    layers: list[DiskFormat] = [top]
    try:
        seen: set[tuple[int, int]] = set()
        check_loop(seen, top, 0, opts)
        current_path, current = top_path, top
        while (ref := current.parent_ref()) is not None:
            parent_path, parent = open_parent(current_path, current, ref, roots, opts)
            layers.append(parent)
            check_loop(seen, parent, len(layers) - 1, opts)
            current_path, current = parent_path, parent
    except BaseException:
        for layer in layers:
            layer.close()
        raise
    return Chain(layers, opts.warnings)
