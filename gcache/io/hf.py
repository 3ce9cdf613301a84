"""Conversion between gcache's KVCache state and transformers' Cache API."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache

from gcache.core.cache import KVCache


def to_dynamic_cache(cache: KVCache) -> DynamicCache:
    """A DynamicCache holding views of the cache's per-layer keys and values (no copy).

    Autograd flows through: a loss computed from a forward on this cache reaches
    ``cache.keys`` and ``cache.values``.
    """
    return DynamicCache(ddp_cache_data=[(cache.keys[i], cache.values[i]) for i in range(cache.num_layers)])


def from_dynamic_cache(dc: DynamicCache, mask: Tensor, next_pos: Tensor) -> KVCache:
    """Stack a DynamicCache's layers into a KVCache. mask: [B, T] bool, next_pos: [B] long."""
    keys = torch.stack([layer.keys for layer in dc.layers])
    values = torch.stack([layer.values for layer in dc.layers])
    return KVCache(keys, values, mask.to(torch.bool), next_pos.to(torch.long))
