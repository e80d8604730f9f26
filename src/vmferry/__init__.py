"""vmferry: move virtual machines between hypervisors so that they boot.

The Python API mirrors the CLI::

    import vmferry
    with vmferry.open("disk.avhdx") as disk:        # the whole chain, read-only
        data = disk.read(0, 512)
    with vmferry.create("new.vhdx", "vhdx", 10 << 30) as disk:
        disk.write(0, data)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from vmferry.chain import Chain, open_chain
from vmferry.disk import Alloc, Extent
from vmferry.errors import VmferryError
from vmferry.ops.create import create as _create

__version__ = "0.1.0"
__all__ = ["FORMATS", "Alloc", "Chain", "Extent", "VmferryError", "create", "open"]


def open(
    path: str | os.PathLike[str],
    format: str | None = None,
    writable: bool = False,
    *,
    allowed_dirs: Sequence[str | os.PathLike[str]] | None = None,
    force_share: bool = False,
) -> Chain:
    """Open an image with all its parents.  Only the top layer is ever writable."""
    return open_chain(
        path, format, writable=writable, allowed_dirs=allowed_dirs, force_share=force_share
    )


def create(
    path: str | os.PathLike[str],
    format: str,
    size: int | None = None,
    parent: str | os.PathLike[str] | None = None,
    **options: object,
) -> Chain:
    """Create an image; extra keyword arguments are the format's ``-o`` options."""
    parent_format = options.pop("parent_format", None)
    overwrite = bool(options.pop("overwrite", False))
    return _create(
        path,
        format,
        size,
        parent,
        parent_format=str(parent_format) if parent_format else None,
        options=options,
        overwrite=overwrite,
    )
