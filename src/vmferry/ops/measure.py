"""How much space converting an image would take (qemu-img measure)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from vmferry.chain import open_chain
from vmferry.disk import driver_by_name
from vmferry.errors import UsageError


def measure(
    src: str | os.PathLike[str] | None,
    out_format: str,
    *,
    size: int | None = None,
    src_format: str | None = None,
    options: Mapping[str, str] | None = None,
    allowed_dirs: Sequence[str | os.PathLike[str]] | None = None,
    force_share: bool = False,
) -> dict[str, Any]:
    driver = driver_by_name(out_format)
    opts = dict(options or {})
    if src is None:
        if size is None:
            raise UsageError("measure needs a source image or --size")
        required, full = driver.measure(size, [], opts)
        return {"required": required, "fully-allocated": full, "virtual_size": size}
    with open_chain(src, src_format, allowed_dirs=allowed_dirs, force_share=force_share) as c:
        ranges = [(e.offset, e.length) for e in c.map() if e.data]
        required, full = driver.measure(c.virtual_size, ranges, opts)
        return {
            "required": required,
            "fully-allocated": full,
            "virtual_size": c.virtual_size,
            "data_bytes": sum(n for _, n in ranges),
        }
