"""Chains of differencing disks: open, map, discover, measure, merge, rebase and resize them."""

import importlib

from vmferry.chain.chain import Chain, MapExtent
from vmferry.chain.open import open_chain, open_layer
from vmferry.chain.resolve import MAX_CHAIN_DEPTH, ResolveOptions

__all__ = [
    "MAX_CHAIN_DEPTH",
    "Chain",
    "MapExtent",
    "ResolveOptions",
    "commit",
    "commit_all",
    "compact",
    "discover",
    "open_chain",
    "open_layer",
    "rebase",
    "resize",
    "snapshot",
    "usage",
]


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    """The chain tools load on first use: opening a disk should not import them."""
    if name == "discover":
        from vmferry.chain.discover import discover

        return discover
    if name == "usage":
        from vmferry.chain.du import usage

        return usage
    if name in ("commit", "commit_all"):
        from vmferry.chain import merge

        return getattr(merge, name)
    if name in ("snapshot", "compact"):
        module = importlib.import_module(f"vmferry.chain.{name}")
        return getattr(module, name)
    if name in ("rebase", "resize"):
        from vmferry.chain import surgery

        return getattr(surgery, name)
    raise AttributeError(name)
