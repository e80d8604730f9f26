"""Chains of differencing disks: open, map, discover, measure, merge, rebase and resize them."""

from vmferry.chain.chain import Chain, MapExtent
from vmferry.chain.compact import compact
from vmferry.chain.discover import discover
from vmferry.chain.du import usage
from vmferry.chain.merge import commit, commit_all
from vmferry.chain.open import open_chain, open_layer
from vmferry.chain.resolve import MAX_CHAIN_DEPTH, ResolveOptions
from vmferry.chain.snapshot import snapshot
from vmferry.chain.surgery import rebase, resize

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
