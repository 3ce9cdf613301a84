"""KV-cache as explicit state, and the pure transforms on it.

A cache holds every layer's keys and values stacked in one tensor, so that a
transform is one tensor operation instead of a loop over layers:

    keys, values: [L, B, H, T, D]   layers, batch rows, KV heads, positions, head dim
    mask:         [B, T] bool       True where a position is real (False: left padding)
    next_pos:     [B] long          the RoPE position the next token of each row takes

RoPE is already applied to cached keys, so positions are part of the state: a
row's next token must be placed at ``next_pos`` whatever the cache's length.
Transforms never mutate their inputs; they return new caches.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor


class KVCache(NamedTuple):
    """Keys and values of every layer, with the attention mask and next positions."""

    keys: Tensor  # [L, B, H, T, D]
    values: Tensor  # [L, B, H, T, D]
    mask: Tensor  # [B, T] bool
    next_pos: Tensor  # [B] long

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def num_heads(self) -> int:
        return self.keys.shape[2]

    @property
    def seq_len(self) -> int:
        return self.keys.shape[3]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[4]


def validate(cache: KVCache, name: str = "cache") -> KVCache:
    """Check the shapes and dtypes of a cache; returns it unchanged. Raises ValueError/TypeError."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"{name}: expected a KVCache, got {type(cache).__name__}")
    k, v, m, p = cache
    if k.dim() != 5:
        raise ValueError(f"{name}.keys: expected shape [L, B, H, T, D], got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"{name}: keys {tuple(k.shape)} and values {tuple(v.shape)} differ in shape")
    if v.dtype != k.dtype:
        raise ValueError(f"{name}: keys dtype {k.dtype} and values dtype {v.dtype} differ")
    if m.shape != (k.shape[1], k.shape[3]):
        raise ValueError(f"{name}.mask: expected shape [B, T] = {(k.shape[1], k.shape[3])}, got {tuple(m.shape)}")
    if m.dtype != torch.bool:
        raise TypeError(f"{name}.mask: expected dtype torch.bool, got {m.dtype}")
    if p.shape != (k.shape[1],):
        raise ValueError(f"{name}.next_pos: expected shape [B] = {(k.shape[1],)}, got {tuple(p.shape)}")
    if p.dtype != torch.long:
        raise TypeError(f"{name}.next_pos: expected dtype torch.long, got {p.dtype}")
    return cache


def empty(
    num_layers: int,
    batch_size: int,
    num_heads: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> KVCache:
    """A cache with no positions (T = 0); its rows' next position is 0."""
    kv = torch.zeros(num_layers, batch_size, num_heads, 0, head_dim, dtype=dtype, device=device)
    return KVCache(
        kv,
        kv.clone(),
        torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
        torch.zeros(batch_size, dtype=torch.long, device=device),
    )


_DIMS = (("layers", 0), ("batch rows", 1), ("KV heads", 2), ("positions", 3), ("head dim", 4))


def check_compatible(
    a: KVCache, b: KVCache, names: tuple[str, str] = ("a", "b"), *, rows: bool = True, time: bool = False
) -> None:
    """Raise ValueError unless a and b agree in layers, KV heads, head dim, dtype and device, and
    in batch rows (unless ``rows`` is False: caches whose rows are stacked) and length (when
    ``time`` is set). The one compatibility check of caches that are joined, fused or stacked."""
    na, nb = names
    sa, sb = tuple(a.keys.shape), tuple(b.keys.shape)
    for what, d in _DIMS:
        if sa[d] != sb[d] and (rows or d != 1) and (time or d != 3):
            raise ValueError(
                f"{na} and {nb} differ in shape: {nb} has {sb[d]} {what} but {na} has {sa[d]} "
                f"([L, B, H, T, D] {sa} vs {sb}; caches from different models cannot be joined)"
            )
    if a.keys.dtype != b.keys.dtype:
        raise ValueError(f"{na} and {nb} differ in dtype: {nb} has {b.keys.dtype} but {na} has {a.keys.dtype}")
    if a.keys.device != b.keys.device:
        raise ValueError(f"{na} and {nb} are on different devices: {nb} is on {b.keys.device} but {na} on {a.keys.device}")


def keep_last(cache: KVCache, n: int) -> KVCache:
    """The last ``n`` positions of every row (all of them when n >= T). Next positions are kept.

    This is how a latent-only cache is cut from a rollout: the latent positions are the last ones.
    Raises ValueError when n < 0.
    """
    if n < 0:
        raise ValueError(f"n: expected a non-negative number of positions, got {n}")
    start = max(cache.seq_len - n, 0)
    return KVCache(
        cache.keys[:, :, :, start:],
        cache.values[:, :, :, start:],
        cache.mask[:, start:],
        cache.next_pos,
    )


def keep_first(cache: KVCache, n: int) -> KVCache:
    """The first ``n`` positions of every row (all of them when n >= T). Next positions are kept.

    Raises ValueError when n < 0.
    """
    if n < 0:
        raise ValueError(f"n: expected a non-negative number of positions, got {n}")
    return KVCache(cache.keys[:, :, :, :n], cache.values[:, :, :, :n], cache.mask[:, :n], cache.next_pos)


def latent_part(cache: KVCache, latent_steps: int, sink_positions: int = 0) -> KVCache:
    """What a latent-only agent passes on: its first ``sink_positions`` positions and its last
    ``latent_steps`` positions (the whole cache when they overlap).

    The first positions are the attention sink: models park attention on the first tokens of
    a sequence, and a receiver whose context starts with bare latent vectors degenerates
    (measured on SmolLM2-135M: concatenated latent-only caches decode to gibberish, the same
    with 4 sink positions decode to sentences). Agents share the chat template's first
    tokens, so their sink positions hold the same keys and values and fuse consistently.
    Raises ValueError on a negative count.
    """
    if latent_steps < 0 or sink_positions < 0:
        raise ValueError(
            f"latent_steps, sink_positions: expected non-negative counts, got {latent_steps}, {sink_positions}"
        )
    if sink_positions + latent_steps >= cache.seq_len:
        return cache
    if sink_positions == 0:
        return keep_last(cache, latent_steps)
    return concat([keep_first(cache, sink_positions), keep_last(cache, latent_steps)])


def concat(caches: Sequence[KVCache]) -> KVCache:
    """Concatenate caches along time, in the given order.

    The result's next position is the largest of the parts', so a token appended
    after it comes after everything it attends to. Raises ValueError on an empty
    list or on parts that differ in layers, batch, heads, head dim, dtype or device.
    """
    caches = list(caches)
    if not caches:
        raise ValueError("caches: expected at least one cache to concatenate, got an empty list")
    for i, c in enumerate(caches[1:], start=1):
        check_compatible(caches[0], c, ("caches[0]", f"caches[{i}]"))
    if len(caches) == 1:
        return caches[0]
    return KVCache(
        torch.cat([c.keys for c in caches], dim=3),
        torch.cat([c.values for c in caches], dim=3),
        torch.cat([c.mask for c in caches], dim=1),
        torch.stack([c.next_pos for c in caches]).amax(dim=0),
    )


def select_rows(cache: KVCache, rows: Tensor | Sequence[int]) -> KVCache:
    """The cache of the given batch rows, in that order. Raises IndexError on a row out of range."""
    idx = torch.as_tensor(rows, dtype=torch.long, device=cache.keys.device)
    if idx.numel() and (idx.min() < -cache.batch_size or idx.max() >= cache.batch_size):
        raise IndexError(f"rows: expected indices in [0, {cache.batch_size}), got {idx.tolist()}")
    return KVCache(cache.keys[:, idx], cache.values[:, idx], cache.mask[idx], cache.next_pos[idx])


def trim_padding(cache: KVCache) -> KVCache:
    """Drop leading positions that are padding in every row (a batch of one has none left)."""
    real = cache.mask.any(dim=0)
    if not bool(real.any()):
        return keep_last(cache, 0)
    first = int(real.nonzero()[0])
    return keep_last(cache, cache.seq_len - first)


def nbytes(cache: KVCache) -> int:
    """Bytes held by the keys, values, mask and positions."""
    return sum(t.numel() * t.element_size() for t in cache)
