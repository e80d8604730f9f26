"""Chains of differencing disks: opening, mapping and (later) merging them."""

from vmferry.chain.chain import Chain, MapExtent
from vmferry.chain.open import open_chain, open_layer
from vmferry.chain.resolve import MAX_CHAIN_DEPTH, ResolveOptions

__all__ = ["MAX_CHAIN_DEPTH", "Chain", "MapExtent", "ResolveOptions", "open_chain", "open_layer"]
