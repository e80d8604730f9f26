"""What ``vmferry info``, ``map`` and ``check`` report about an image."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from vmferry.chain import Chain, open_chain, open_layer
from vmferry.disk import CheckReport, DiskFormat
from vmferry.errors import ChainError, VmferryError


def layer_info(layer: DiskFormat) -> dict[str, Any]:
    f = layer.file
    info: dict[str, Any] = {
        "filename": str(f.path),
        "format": layer.name,
        "virtual_size": layer.virtual_size,
        "file_size": f.size,
        "allocated_bytes": f.allocated_bytes,
        "cluster_size": layer.granularity,
        "identity": dict(layer.identity()),
    }
    ref = layer.parent_ref()
    if ref is not None:
        info["parent"] = {
            "format": ref.format,
            "hints": list(ref.hints),
            "identity": dict(ref.identity),
            **({"advisory": dict(ref.advisory)} if ref.advisory else {}),
            **({"stored": dict(ref.raw)} if ref.raw else {}),
        }
    info["format_specific"] = layer.info()
    return info


def image_info(
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    chain: bool = False,
    allowed_dirs: Sequence[str | os.PathLike[str]] | None = None,
    force_share: bool = False,
) -> dict[str, Any]:
    """Info for the image; with ``chain`` the list of every layer, top first."""
    if not chain:
        layer = open_layer(path, format, force_share=force_share)
        try:
            return layer_info(layer)
        finally:
            layer.close()
    with open_chain(path, format, allowed_dirs=allowed_dirs, force_share=force_share) as c:
        out = layer_info(c.top)
        out["chain"] = [layer_info(layer) for layer in c.layers]
        if c.warnings:
            out["warnings"] = list(c.warnings)
        return out


def map_image(
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    allowed_dirs: Sequence[str | os.PathLike[str]] | None = None,
    force_share: bool = False,
) -> list[dict[str, Any]]:
    """qemu-img map --output=json records for the flattened chain."""
    with open_chain(path, format, allowed_dirs=allowed_dirs, force_share=force_share) as c:
        return chain_map_json(c)


def chain_map_json(c: Chain) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for e in c.map():
        rec: dict[str, Any] = {
            "start": e.offset,
            "length": e.length,
            "depth": e.depth,
            "present": e.data or e.zero_present,
            "zero": e.zero,
            "data": e.data,
        }
        if e.host_offset is not None:
            rec["offset"] = e.host_offset
            rec["file"] = str(c.layers[e.depth].file.path)
        out.append(rec)
    return out


def check_image(
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    allowed_dirs: Sequence[str | os.PathLike[str]] | None = None,
    force_share: bool = False,
) -> tuple[CheckReport, dict[str, Any]]:
    """Structural check of the file, then of its link to a parent (if any)."""
    layer = open_layer(path, format, force_share=force_share)
    try:
        report = layer.check()
        meta = {"filename": str(layer.file.path), "format": layer.name}
        has_parent = layer.parent_ref() is not None
    finally:
        layer.close()
    if has_parent:
        try:
            with open_chain(path, format, allowed_dirs=allowed_dirs, force_share=force_share) as c:
                meta["chain_depth"] = len(c.layers)
                report.notes.extend(c.warnings)
        except ChainError as exc:
            report.corruptions.append(f"chain: {exc}")
        except VmferryError as exc:
            report.corruptions.append(f"parent: {exc}")
    return report, meta
