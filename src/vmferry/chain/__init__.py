"""Chains of differencing disks: open, map, discover, measure, merge, rebase and resize them.

The operations are imported when first used (module ``__getattr__``): every command opens a
chain, few merge or resize one, and start-up is part of every command's time.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vmferry.chain.chain import Chain, MapExtent
from vmferry.chain.open import open_chain, open_layer
from vmferry.chain.resolve import MAX_CHAIN_DEPTH, ResolveOptions

if TYPE_CHECKING:
    from vmferry.chain.compact import compact
    from vmferry.chain.discover import discover
    from vmferry.chain.du import usage
    from vmferry.chain.merge import commit, commit_all
    from vmferry.chain.snapshot import snapshot
    from vmferry.chain.surgery import rebase, resize

_LAZY = {
    "compact": "compact",
    "discover": "discover",
    "usage": "du",
    "commit": "merge",
    "commit_all": "merge",
    "snapshot": "snapshot",
    "rebase": "surgery",
    "resize": "surgery",
}

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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"vmferry.chain.{module}"), name)
    globals()[name] = value
    return value
