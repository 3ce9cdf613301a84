"""Batching caches of different lengths: left padding, as the latent core batches prompts.

Rows of a batch may carry caches of different lengths (agents receive different
predecessors). Padding goes on the left, masked out, so every row's real
positions end at the right edge and its next token sits at its own ``next_pos``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from gcache.core.cache import KVCache, check_compatible


def pad_left(cache: KVCache, length: int) -> KVCache:
    """The cache left-padded with masked zero positions to ``length``.

    Raises ValueError when ``length`` is shorter than the cache.
    """
    extra = length - cache.seq_len
    if extra < 0:
        raise ValueError(f"length: expected at least the cache's length {cache.seq_len}, got {length}")
    if extra == 0:
        return cache
    # F.pad pads dimensions from the last: (D_left, D_right, T_left, T_right)
    return KVCache(
        F.pad(cache.keys, (0, 0, extra, 0)),
        F.pad(cache.values, (0, 0, extra, 0)),
        F.pad(cache.mask, (extra, 0), value=False),
        cache.next_pos,
    )


def stack_rows(caches: Sequence[KVCache]) -> KVCache:
    """One batch from caches of any lengths: left-pad each to the longest, then stack their rows.

    Raises ValueError on an empty list or caches that differ in layers, heads, head dim, dtype or device.
    """
    caches = list(caches)
    if not caches:
        raise ValueError("caches: expected at least one cache to stack, got an empty list")
    first = caches[0]
    for i, c in enumerate(caches[1:], start=1):
        check_compatible(first, c, ("caches[0]", f"caches[{i}]"), rows=False)
    if len(caches) == 1:
        return first
    length = max(c.seq_len for c in caches)
    padded = [pad_left(c, length) for c in caches]
    return KVCache(
        torch.cat([c.keys for c in padded], dim=1),
        torch.cat([c.values for c in padded], dim=1),
        torch.cat([c.mask for c in padded], dim=0),
        torch.cat([c.next_pos for c in padded], dim=0),
    )

