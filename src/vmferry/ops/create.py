"""Creating images, including differencing children of an existing disk."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from vmferry.chain import Chain, open_chain
from vmferry.disk import ParentInfo, driver_by_name
from vmferry.errors import UsageError
from vmferry.ops.atomic import AtomicOutput


def create(
    path: str | os.PathLike[str],
    format: str,
    size: int | None = None,
    parent: str | os.PathLike[str] | None = None,
    *,
    parent_format: str | None = None,
    options: Mapping[str, object] | None = None,
    overwrite: bool = False,
    allowed_dirs: Sequence[str | os.PathLike[str]] | None = None,
) -> Chain:
    """Create an image (a child of ``parent`` when given) and return it opened for writing."""
    driver = driver_by_name(format)
    opts = {k: str(v) for k, v in (options or {}).items()}
    unknown = sorted(set(opts) - set(driver.create_options))
    if unknown:
        known = ", ".join(sorted(driver.create_options)) or "none"
        raise UsageError(
            f"{driver.name} does not take option(s) {', '.join(unknown)}", hint=f"it takes: {known}"
        )
    final = Path(os.path.abspath(path))
    parent_chain: Chain | None = None
    info: ParentInfo | None = None
    if parent is not None:
        if not driver.supports_parent:
            raise UsageError(f"{driver.name} images cannot have a parent")
        pfmt = parent_format or driver.parent_formats[0]
        if pfmt not in driver.parent_formats:
            raise UsageError(f"a {driver.name} child cannot have a {pfmt} parent")
        parent_abs = Path(os.path.abspath(parent))
        parent_chain = open_chain(parent_abs, pfmt, allowed_dirs=allowed_dirs)
        info = ParentInfo(
            layer=parent_chain.top,
            absolute_path=str(parent_abs),
            relative_path=os.path.relpath(parent_abs, final.parent),
            format=pfmt,
        )
        if size is None:
            size = parent_chain.virtual_size
    if size is None:
        raise UsageError("a size is needed for an image without a parent")
    if size < 0:
        raise UsageError("size cannot be negative")
    try:
        with AtomicOutput(final, overwrite=overwrite) as out:
            assert out.file is not None
            layer = driver.create(out.file, size, opts, info)
            out.discard_with(layer.files())
            layer.flush()
            out.commit()
            layer.close()
    finally:
        if parent_chain is not None:
            parent_chain.close()
    dirs = list(allowed_dirs or [final.parent])
    if parent is not None and allowed_dirs is None:
        dirs.append(Path(os.path.abspath(parent)).parent)
    return open_chain(final, driver.name, writable=True, allowed_dirs=dirs)
