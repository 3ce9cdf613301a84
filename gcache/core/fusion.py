"""Fusion of the KV-caches a node receives from its predecessors into the one cache it decodes on.

Three modes, all pure functions of explicit parameters:

``concat``
    The predecessors' caches side by side along time, in the given order (as LatentMAS and
    KVComm prepend caches). Nothing is mixed: every position of every predecessor stays a
    position the receiver attends to, with its own mask entry. Attention over a cache is a
    set operation over its unmasked positions (RoPE is already in the keys), so the order of
    the parts changes the layout but not what the receiver computes.

``weighted``
    A per-layer gated, weighted mixture of the caches, position by position::

        base   = mean_i c_i                              (uniform over the predecessors)
        out_l  = base + g_l * sum_i w_i (c_i - base)     w_i = e_i / sum_j e_j
               = sum_i [(1 - g_l) / k + g_l w_i] c_i

    with ``e`` the edge weights and ``g_l = sigmoid(gate_logits[l])`` (``g = 1`` when no
    parameters are given). Why this base: the mean is smooth in every parameter (a
    "highest-weight cache" base jumps where two weights cross), needs no tie-break so
    permuting the predecessors with their weights cannot change the result, and keeps every
    output a convex combination of the inputs, so it stays inside their per-element range.
    ``g_l`` says how far layer ``l`` moves from the plain average toward the weighted one.
    With one predecessor the output is that predecessor's cache, whatever the gate. Where the
    weights are uniform the gates change nothing (and get no gradient) until the weights part.

``learned``
    As ``weighted``, with weights that also depend on the fuser's parameters::

        w = softmax(log e + source_logits[sources])      (computed as e * exp(s) / sum)

    ``sources`` names each predecessor's agent (slot) id, so a source's logit travels with it
    when predecessors are permuted. Computing ``e * exp(s)`` instead of ``log e`` keeps the
    gradient finite for a zero edge weight. Gradients reach ``gate_logits``,
    ``source_logits`` and, if they require grad, the edge weights.

Rules shared by the mixing modes (``weighted``, ``learned``):

- Lengths: each cache's real positions are first packed to its right end (padding a batch
  left inside a row, e.g. between an inherited cache and the agent's prompt, moves to the
  left), then caches are aligned at their last position; a shorter cache is left-padded with
  masked positions up to the longest length. No predecessor and no real position is dropped,
  and which slots meet does not depend on how rows were batched (it did before packing: a
  full cache rolled out beside a longer prompt carried two more padding slots, and mixing
  then met other positions). Latent-only caches (all ``latent_steps`` long) need no padding.
- Masks: at each slot the mixture runs over the predecessors whose entry there is real;
  their coefficients are renormalised. The fused mask is True where any is real. A slot
  where none is real mixes them all (its content is never attended).
- Keys are mixed as stored. RoPE is baked into them, so mixing caches whose slots carry
  different positions mixes rotations; that is the approximation every cache-mixing fuser
  makes, and the ``learned`` mode can learn to lean on one source.

Rules shared by all modes:

- Edge weights: shape ``[k]`` (one graph for the batch) or ``[k, B]`` (one per row). A zero
  weight means the edge is absent for that row: the predecessor takes no part (masked out
  in ``concat``; left out of the mixture and of the base). Every row needs a positive weight.
- Positions: the fused cache's ``next_pos`` is the largest ``next_pos`` of the predecessors
  taking part in each row, so the receiver's tokens come after everything it attends to.
- Bad input (no caches, caches from different models, a weight count that differs from the
  cache count, non-finite or negative weights) raises ValueError naming what differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, Sequence

import torch
from einops import rearrange
from torch import Tensor

from gcache.core.batch import pad_left
from gcache.core.cache import KVCache, check_compatible, trim_padding, validate

Mode = Literal["concat", "weighted", "learned"]
MODES: tuple[str, ...] = ("concat", "weighted", "learned")
EdgeWeights = Tensor  # [k] or [k, B], non-negative
Sources = Tensor  # [k] long, agent ids in [0, num_agents)


@dataclass(frozen=True)
class FuserConfig:
    """Static shape of a fuser: the model's layer count, how many agents can be a source, the mode.

    ``gate_init`` is the initial gate logit (sigmoid(2) = 0.88: open-ish, so the untrained
    learned fuser is close to the edge-weighted mixture).
    """

    num_layers: int
    num_agents: int
    mode: Mode = "learned"
    gate_init: float = 2.0

    def __post_init__(self) -> None:
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"num_layers: expected a positive int, got {self.num_layers!r}")
        if not isinstance(self.num_agents, int) or self.num_agents < 1:
            raise ValueError(f"num_agents: expected a positive int, got {self.num_agents!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if not math.isfinite(self.gate_init):
            raise ValueError(f"gate_init: expected a finite logit, got {self.gate_init!r}")


class FuserParams(NamedTuple):
    """The fuser's trainable tensors."""

    gate_logits: Tensor  # [L]  g_l = sigmoid(gate_logits[l])
    source_logits: Tensor  # [N] one per agent id


def init_fuser(
    config: FuserConfig, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> FuserParams:
    """Parameters of an untrained fuser: gates at ``sigmoid(gate_init)``, zero source logits
    (so ``learned`` starts as the gated edge-weighted mixture)."""
    return FuserParams(
        torch.full((config.num_layers,), float(config.gate_init), dtype=dtype, device=device),
        torch.zeros(config.num_agents, dtype=dtype, device=device),
    )


def gates(params: FuserParams | None, num_layers: int, *, device: torch.device | str = "cpu") -> Tensor:
    """Per-layer gates in [0, 1], float32 [L]; all ones (open) when ``params`` is None.

    Raises ValueError when ``params.gate_logits`` is not of shape [num_layers].
    """
    if params is None:
        return torch.ones(num_layers, device=device)
    if params.gate_logits.shape != (num_layers,):
        raise ValueError(
            f"params.gate_logits: expected shape [L] = ({num_layers},) for caches of {num_layers} layers, "
            f"got {tuple(params.gate_logits.shape)}"
        )
    return torch.sigmoid(params.gate_logits.to(device=device, dtype=torch.float32))


def source_weights(
    params: FuserParams | None,
    edge_weights: EdgeWeights | Sequence[float],
    *,
    mode: Mode,
    sources: Sources | Sequence[int] | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """The normalised weight of each predecessor in each row, float32 [k, B] (B = 1 for [k] input).

    ``weighted``/``concat``: e / sum e. ``learned``: softmax(log e + source_logits[sources]).
    Absent edges (e = 0) get weight 0. Raises ValueError on bad weights or sources.
    """
    e = _edge_weights(edge_weights, None, batch_size)
    k = e.shape[0]
    if mode == "learned":
        if params is None:
            raise ValueError("params: the learned mode needs FuserParams, got None")
        src = _sources(sources, k, params.source_logits.shape[0], e.device)
        s = params.source_logits.to(device=e.device, dtype=torch.float32)[src]  # [k]
        s = s - s.max().detach()  # exp without overflow; the shift cancels in the ratio
        e = e * torch.exp(s)[:, None]
    elif mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    return e / e.sum(dim=0, keepdim=True)


def fuse(
    params: FuserParams | None,
    caches: Sequence[KVCache],
    edge_weights: EdgeWeights | Sequence[float],
    *,
    mode: Mode,
    sources: Sources | Sequence[int] | None = None,
) -> KVCache:
    """Fuse the caches of k >= 1 predecessors into one cache (see the module docstring for the
    exact formulas and rules).

    caches: k caches, keys/values [L, B, H, T_i, D], same L, B, H, D, dtype and device.
    edge_weights: [k] or [k, B], finite and non-negative, a positive one in every row.
    mode: "concat" -> T = sum T_i; "weighted"/"learned" -> T = max T_i.
    sources: [k] agent ids, required by "learned" (indexes params.source_logits).
    params: gates and source logits; may be None for "concat" and "weighted" (open gates).
    Returns a new KVCache; the inputs are not modified.
    Raises ValueError on an empty list, mismatched caches, a weight count different from
    the cache count, non-finite or negative weights, missing or out-of-range sources, and on
    inference-mode caches when the result would need a gradient.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    caches = _check_caches(caches)
    first = caches[0]
    e = _edge_weights(edge_weights, len(caches), first.batch_size, device=first.keys.device)
    present = e > 0  # [k, B]

    if mode == "concat":
        return _concat(caches, present)

    w = source_weights(params, e, mode=mode, sources=sources, batch_size=first.batch_size)  # [k, B]
    g = gates(params, first.num_layers, device=first.keys.device)  # [L]
    if (w.requires_grad or g.requires_grad) and torch.is_grad_enabled():
        for i, c in enumerate(caches):
            if c.keys.is_inference() or c.values.is_inference():
                raise ValueError(
                    f"caches[{i}]: made under torch.inference_mode(), it cannot carry gradient to the fuser; "
                    "build it under torch.no_grad() instead (or clone it outside inference mode)"
                )
    return _mix(_align_right(caches), w, g, present)


# ----------------------------------------------------------------------------- internals


def _check_caches(caches: Sequence[KVCache]) -> list[KVCache]:
    if isinstance(caches, KVCache):
        raise TypeError("caches: expected a sequence of KVCache, got a single KVCache (wrap it in a list)")
    caches = list(caches)
    if not caches:
        raise ValueError("caches: expected at least one predecessor cache, got an empty list")
    for i, c in enumerate(caches):
        validate(c, f"caches[{i}]")
    for i, c in enumerate(caches[1:], start=1):
        check_compatible(caches[0], c, ("caches[0]", f"caches[{i}]"))
    return caches


def _edge_weights(
    edge_weights: EdgeWeights | Sequence[float],
    k: int | None,
    batch_size: int | None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Checked edge weights as float32 [k, B] (a [k] input is broadcast over the rows)."""
    e = edge_weights if isinstance(edge_weights, Tensor) else torch.as_tensor(edge_weights)
    if device is not None:
        e = e.to(device)
    if not (e.is_floating_point() or e.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"edge_weights: expected real numbers, got dtype {e.dtype}")
    e = e.to(torch.float32)
    if e.dim() not in (1, 2):
        raise ValueError(f"edge_weights: expected shape [k] or [k, B], got {tuple(e.shape)}")
    if k is not None and e.shape[0] != k:
        raise ValueError(f"edge_weights: expected one weight per cache ({k} caches), got {e.shape[0]} weights")
    if e.dim() == 2 and batch_size is not None and e.shape[1] != batch_size:
        raise ValueError(f"edge_weights: expected shape [k, B] = ({e.shape[0]}, {batch_size}), got {tuple(e.shape)}")
    if e.shape[0] == 0:
        raise ValueError("edge_weights: expected at least one weight, got none")
    if not bool(torch.isfinite(e).all()):
        raise ValueError(f"edge_weights: expected finite weights, got {e.detach().tolist()}")
    if bool((e < 0).any()):
        raise ValueError(f"edge_weights: expected non-negative weights, got {e.detach().tolist()}")
    if e.dim() == 1:
        e = e[:, None].expand(-1, batch_size if batch_size is not None else 1)
    if not bool((e > 0).any(dim=0).all()):
        raise ValueError(f"edge_weights: every row needs a positive weight, got {e.detach().tolist()}")
    return e


def _sources(sources: Sources | Sequence[int] | None, k: int, num_agents: int, device: torch.device) -> Tensor:
    if sources is None:
        raise ValueError("sources: the learned mode needs the agent id of each predecessor, got None")
    src = torch.as_tensor(sources, device=device)
    if src.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"sources: expected integer agent ids, got dtype {src.dtype}")
    if src.shape != (k,):
        raise ValueError(f"sources: expected one agent id per cache, shape ({k},), got {tuple(src.shape)}")
    if bool(((src < 0) | (src >= num_agents)).any()):
        raise ValueError(f"sources: expected agent ids in [0, {num_agents}), got {src.tolist()}")
    return src.long()


def _concat(caches: list[KVCache], present: Tensor) -> KVCache:
    """Side by side along time; an absent predecessor's positions are masked in its rows."""
    masks = [c.mask & present[i][:, None] for i, c in enumerate(caches)]
    low = torch.iinfo(torch.long).min
    next_pos = torch.stack([torch.where(present[i], c.next_pos, low) for i, c in enumerate(caches)]).amax(0)
    if len(caches) == 1:
        return KVCache(caches[0].keys, caches[0].values, masks[0], next_pos)
    return KVCache(
        torch.cat([c.keys for c in caches], dim=3),
        torch.cat([c.values for c in caches], dim=3),
        torch.cat(masks, dim=1),
        next_pos,
    )


def _packed(cache: KVCache) -> KVCache:
    """The cache with each row's real positions moved to the right end, in their order, and the
    columns that are then padding in every row dropped. Attention over a cache is a set operation
    over its real positions (RoPE is in the keys), so the receiver computes the same; what changes
    is where a row's content sits, which no longer depends on the padding its batch added."""
    if bool(cache.mask.all()):
        return cache
    order = torch.argsort(cache.mask.to(torch.int8), dim=-1, stable=True)  # [B, T]: padding first
    index = rearrange(order, "b t -> 1 b 1 t 1").expand_as(cache.keys)
    packed = KVCache(cache.keys.gather(3, index), cache.values.gather(3, index), cache.mask.gather(1, order),
                     cache.next_pos)  # fmt: skip
    return trim_padding(packed)


def _align_right(caches: list[KVCache]) -> list[KVCache]:
    """Pack each cache's real positions to its right end (``_packed``), then left-pad shorter caches
    with masked zero positions up to the longest length."""
    caches = [_packed(c) for c in caches]
    t_max = max(c.seq_len for c in caches)
    return [pad_left(c, t_max) for c in caches]


def _mix(caches: list[KVCache], w: Tensor, g: Tensor, present: Tensor) -> KVCache:
    """sum_i a_i c_i with a_i = u_i + g_l (v_i - u_i), u uniform and v proportional to w, both
    over the predecessors taking part at each (row, slot). w, present: [k, B]; g: [L].

    Written as a residual on u so that one predecessor gets a coefficient of exactly 1."""
    first = caches[0]
    masks = torch.stack([c.mask for c in caches])  # [k, B, T]
    avail = masks & present[:, :, None]  # [k, B, T]
    # a slot no predecessor fills is never attended; mixing them all there keeps a single
    # predecessor's cache identical to the input, padding included
    avail = torch.where(avail.any(0, keepdim=True), avail, present[:, :, None])
    fused_mask = (masks & present[:, :, None]).any(0)  # [B, T]

    if bool(avail.all()):
        u = present.float() / present.sum(0, keepdim=True)
        step = w - u
        a = rearrange(u, "k b -> k 1 b") + rearrange(g, "l -> 1 l 1") * rearrange(step, "k b -> k 1 b")
        a = rearrange(a, "k l b -> k l b 1 1 1")  # one coefficient for every head, slot and channel
    else:
        af = avail.float()
        u = af / af.sum(0, keepdim=True)
        wv = rearrange(w, "k b -> k b 1") * af
        step = wv / wv.sum(0, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) - u
        a = rearrange(u, "k b t -> k 1 b t") + rearrange(g, "l -> 1 l 1 1") * rearrange(step, "k b t -> k 1 b t")
        a = rearrange(a, "k l b t -> k l b 1 t 1")  # one coefficient for every head and channel
    # Coefficients and sums stay in float32 (or wider) and the result is rounded once: rounded to
    # bf16 first, the coefficients would no longer sum to 1. A no-op for float32 caches.
    dtype = first.keys.dtype
    wide = torch.promote_types(dtype, torch.float32)
    a = a.to(wide)  # [k, L, B, H or 1, T or 1, D or 1], broadcast against each cache

    keys = first.keys.to(wide) * a[0]
    values = first.values.to(wide) * a[0]
    for i, c in enumerate(caches[1:], start=1):
        keys = torch.addcmul(keys, c.keys.to(wide), a[i])
        values = torch.addcmul(values, c.values.to(wide), a[i])
    keys, values = keys.to(dtype), values.to(dtype)

    low = torch.iinfo(torch.long).min
    next_pos = torch.stack([torch.where(present[i], c.next_pos, low) for i, c in enumerate(caches)]).amax(0)
    return KVCache(keys, values, fused_mask, next_pos)
