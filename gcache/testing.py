"""Hypothesis strategies that generate valid gcache states, and assertion helpers for property tests.

Sizes take an ``int`` (fixed) or a hypothesis strategy of ints (drawn per
example), including each entry of a cache's ``dims`` (layers, batch, heads,
head_dim); lengths are drawn in [min_len, max_len]. A test pins what it needs
and lets the rest vary::

    from hypothesis import given
    from gcache import keep_last
    from gcache.testing import assert_caches_close, kv_caches

    @given(kv_caches((2, 1, 2, 4), max_len=8, left_padded=True))
    def test_keep_all(cache):
        assert_caches_close(keep_last(cache, cache.seq_len), cache)

Tensor contents are drawn from a seeded ``torch.Generator`` (fast; the seed
shrinks to 0), or element by element from a float strategy passed as
``elements=`` (slow, but the shrunk counterexample shows the offending numbers).

What is generated, and the invariants it keeps:

- ``cache_dims``, ``kv_caches``: keys/values [L, B, H, T, D] of one dtype (by default any of
  ``DTYPES``: float32, float16, bfloat16, float64), a mask [B, T] that is arbitrary, LEFT-padded
  (``left_padded``: row b False on its first pad[b] positions, True after) or full, and
  next_pos [B] >= each row's real count. ``gcache.validate`` passes on every one.
- ``left_padded_masks``: [B, T] bool masks alone.
- ``compatible_caches``: k caches sharing L, B, H, D, dtype (what concat and fuse accept).
- ``adjacency_matrices``: [..., N, N] bool; DAGs (edges forward in a drawn node order),
  graphs with at least one cycle, or anything.
- ``topology_configs``, ``spatial_masks``, ``candidate_masks``, ``policy_outputs``, ``policy_params``,
  ``topology_cases``: what the topology sampler accepts (masks valid for the config's mode).
- ``fuser_configs``, ``fuser_params``, ``edge_weights``, ``fusion_cases``: fuser inputs.

Helpers raise AssertionError with a message that says where things differ:
``assert_caches_close``, ``assert_left_padded``, ``assert_acyclic``.
``tiny_model`` is the 2-layer random model of ``gcache.io.models.local`` (imported on first use).
"""

import importlib as _importlib
from typing import Any as _Any
from typing import NamedTuple, Sequence, Union

import torch
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from torch import Tensor

from gcache.core.cache import KVCache
from gcache.core.checks import check_int
from gcache.core.fusion import MODES as _FUSION_MODES
from gcache.core.fusion import FuserConfig, FuserParams
from gcache.core.policy import PolicyLogits, PolicyParams, init_policy
from gcache.core.topology import MODES as _TOPOLOGY_MODES
from gcache.core.topology import WIRINGS as _WIRINGS
from gcache.core.topology import TopologyConfig, spatial_mask

Size = Union[int, SearchStrategy]  # a fixed int or a strategy of ints
DTypes = Union[torch.dtype, Sequence[torch.dtype], SearchStrategy]

_SEEDS = st.integers(0, 2**32 - 1)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _draw_size(draw: _Any, value: Size, name: str, minimum: int) -> int:
    """A fixed size, or one drawn from a strategy; raises ValueError below ``minimum``."""
    size = draw(value) if isinstance(value, SearchStrategy) else value
    if isinstance(size, bool) or not isinstance(size, int) or size < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum} (or a strategy of them), got {size!r}")
    return size


def _draw_dtype(draw: _Any, dtypes: DTypes) -> torch.dtype:
    if isinstance(dtypes, SearchStrategy):
        dtype = draw(dtypes)
    elif isinstance(dtypes, torch.dtype):
        dtype = dtypes
    else:
        options = list(dtypes)
        if not options:
            raise ValueError("dtypes: expected at least one dtype, got an empty sequence")
        dtype = draw(st.sampled_from(options))
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtypes: expected floating torch dtypes, got {dtype!r}")
    return dtype


def _draw_tensor(
    draw: _Any, shape: Sequence[int], dtype: torch.dtype, elements: SearchStrategy | None, scale: float = 1.0
) -> Tensor:
    """A tensor of ``shape``: standard normal * scale from a drawn seed, or element by element."""
    if elements is None:
        g = torch.Generator().manual_seed(draw(_SEEDS))
        return (torch.randn(*shape, generator=g) * scale).to(dtype)
    count = 1
    for n in shape:
        count *= n
    values = draw(st.lists(elements, min_size=count, max_size=count))
    return torch.tensor(values, dtype=torch.float64).reshape(*shape).to(dtype)


# ----------------------------------------------------------------------------- caches


@st.composite
def left_padded_masks(
    draw: _Any,
    batch_size: Size = st.integers(1, 3),
    seq_len: Size = st.integers(0, 6),
    *,
    min_real: int = 0,
    padding: bool = True,
) -> Tensor:
    """[B, T] bool masks, left-padded: row b is False on its first pad[b] positions and True after.

    pad[b] is drawn in [0, T - min_real] (0 for every row when ``padding`` is False), so each
    row keeps at least ``min_real`` real positions; T is raised to ``min_real`` when smaller.
    Raises ValueError on negative sizes.
    """
    b = _draw_size(draw, batch_size, "batch_size", 0)
    t = max(_draw_size(draw, seq_len, "seq_len", 0), min_real)
    if min_real < 0:
        raise ValueError(f"min_real: expected an integer >= 0, got {min_real!r}")
    pads = [draw(st.integers(0, t - min_real)) if padding else 0 for _ in range(b)]
    return torch.arange(t)[None, :] >= torch.tensor(pads, dtype=torch.long).reshape(b, 1)


def cache_dims(
    *,
    max_layers: int = 3,
    max_batch: int = 3,
    max_heads: int = 2,
    max_head_dim: int = 4,
) -> SearchStrategy:
    """Strategy of (layers, batch, heads, head_dim) tuples, each in [1, max_*]."""
    for name, value in (("max_layers", max_layers), ("max_batch", max_batch), ("max_heads", max_heads),
                        ("max_head_dim", max_head_dim)):
        check_int(value, name)
    return st.tuples(
        st.integers(1, max_layers), st.integers(1, max_batch), st.integers(1, max_heads), st.integers(1, max_head_dim)
    )


Dims = Union[tuple, SearchStrategy, None]  # (layers, batch, heads, head_dim), fixed or drawn


def _draw_dims(draw: _Any, dims: Dims) -> tuple[int, int, int, int]:
    value = draw(cache_dims()) if dims is None else draw(dims) if isinstance(dims, SearchStrategy) else dims
    if not isinstance(value, (tuple, list)) or len(value) != 4:
        raise ValueError(f"dims: expected (layers, batch, heads, head_dim), got {value!r}")
    names = ("layers", "batch", "heads", "head_dim")
    return tuple(_draw_size(draw, v, f"dims.{n}", 1) for n, v in zip(names, value))  # type: ignore[return-value]


@st.composite
def kv_caches(
    draw: _Any,
    dims: Dims = None,
    *,
    max_len: int = 6,
    min_len: int = 0,
    dtype: torch.dtype | None = None,
    dtypes: DTypes = DTYPES,
    left_padded: bool = False,
    full_masks: bool = False,
    min_real: int = 0,
    max_pos_offset: int = 50,
    elements: SearchStrategy | None = None,
) -> KVCache:
    """Valid caches (``gcache.validate`` passes): keys/values [L, B, H, T, D] of one dtype,
    mask [B, T] bool, next_pos [B] long.

    dims: (layers, batch, heads, head_dim), fixed, drawn from a strategy, or drawn from
    ``cache_dims()`` when None. T is drawn in [min_len, max_len]. dtype fixes the dtype;
    otherwise it is drawn from ``dtypes`` (default: float32, float16, bfloat16, float64).
    Masks: arbitrary (any pattern, as ``concat`` produces) by default; LEFT padding with
    ``left_padded`` (row b False on its first pad[b] positions, True after; each row keeps
    at least ``min_real`` real positions, T raised to min_real if needed); all True with
    ``full_masks``. next_pos = each row's real count + an offset in [0, max_pos_offset].
    Contents: standard normal from a drawn seed, or drawn one by one from ``elements``.
    Raises ValueError on bad sizes, dtypes, or min_real without left_padded.
    """
    layers, batch, heads, head_dim = _draw_dims(draw, dims)
    if not 0 <= min_len <= max_len:
        raise ValueError(f"min_len, max_len: expected 0 <= min_len <= max_len, got {min_len}, {max_len}")
    if max_pos_offset < 0:
        raise ValueError(f"max_pos_offset: expected an integer >= 0, got {max_pos_offset!r}")
    if min_real and not left_padded:
        raise ValueError(f"min_real: only meaningful with left_padded=True, got min_real={min_real}")
    length = draw(st.integers(min_len, max_len))
    dtype = _draw_dtype(draw, dtypes if dtype is None else dtype)
    if full_masks:
        mask = torch.ones(batch, length, dtype=torch.bool)
    elif left_padded:
        mask = draw(left_padded_masks(batch, length, min_real=min_real))  # [B, T]
        length = mask.shape[1]
    else:
        bits = draw(st.lists(st.booleans(), min_size=batch * length, max_size=batch * length))
        mask = torch.tensor(bits, dtype=torch.bool).reshape(batch, length)
    shape = (layers, batch, heads, length, head_dim)
    keys = _draw_tensor(draw, shape, dtype, elements)  # [L, B, H, T, D]
    values = _draw_tensor(draw, shape, dtype, elements)  # [L, B, H, T, D]
    offsets = draw(st.lists(st.integers(0, max_pos_offset), min_size=batch, max_size=batch))
    return KVCache(keys, values, mask, mask.sum(dim=1) + torch.tensor(offsets, dtype=torch.long))


@st.composite
def compatible_caches(
    draw: _Any,
    count: Size = st.integers(1, 4),
    dims: Dims = None,
    *,
    equal_lengths: bool = False,
    dtype: torch.dtype | None = None,
    dtypes: DTypes = DTYPES,
    **kwargs: _Any,
) -> list[KVCache]:
    """``count`` caches sharing layers, batch, heads, head dim and dtype (what ``concat``,
    ``stack_rows`` and ``fuse`` accept): dims and dtype are drawn once. Lengths, masks and
    positions are each cache's own (one length for all with ``equal_lengths``). Other
    keyword arguments (max_len, min_len, left_padded, ...) go to ``kv_caches``."""
    k = _draw_size(draw, count, "count", 1)
    fixed = _draw_dims(draw, dims)
    chosen = _draw_dtype(draw, dtypes if dtype is None else dtype)
    if equal_lengths:
        length = draw(st.integers(kwargs.get("min_len", 0), kwargs.get("max_len", 6)))
        kwargs = {**kwargs, "min_len": length, "max_len": length}
    return [draw(kv_caches(fixed, dtype=chosen, **kwargs)) for _ in range(k)]


# ----------------------------------------------------------------------------- graphs


@st.composite
def adjacency_matrices(
    draw: _Any,
    num_agents: Size | None = None,
    *,
    acyclic: bool | None = True,
    self_loops: bool = False,
    batch_shape: Sequence[int] = (),
) -> Tensor:
    """[*batch_shape, N, N] bool adjacency, [i, j] the edge i -> j.

    acyclic=True: DAGs, every edge forward in a node order drawn per matrix (so both i -> j
    and j -> i occur across examples; no self-loops). acyclic=False: every matrix has at
    least one cycle (a self-loop needs ``self_loops``; otherwise N >= 2 is required).
    acyclic=None: any graph. ``self_loops`` allows diagonal entries (not with acyclic=True).
    num_agents defaults to N in [1, 6] ([2, 6] when a cycle without self-loops is asked for).
    Raises ValueError on a combination that cannot be generated.
    """
    if num_agents is None:
        num_agents = st.integers(2 if acyclic is False and not self_loops else 1, 6)
    n = _draw_size(draw, num_agents, "num_agents", 1)
    if acyclic is True and self_loops:
        raise ValueError("self_loops: a graph with a self-loop is never acyclic; use acyclic=None or False")
    if acyclic is False and n < 2 and not self_loops:
        raise ValueError(f"num_agents: a cycle without self-loops needs N >= 2, got {n}")
    count = 1
    for d in batch_shape:
        count *= int(d)
    mats = []
    for _ in range(count):
        bits = torch.tensor(draw(st.lists(st.booleans(), min_size=n * n, max_size=n * n)), dtype=torch.bool)
        adj = bits.reshape(n, n)
        if acyclic is True:
            order = draw(st.permutations(range(n)))
            pos = torch.empty(n, dtype=torch.long)
            pos[list(order)] = torch.arange(n)
            adj = adj & (pos[:, None] < pos[None, :])
        else:
            if not self_loops:
                adj = adj & ~torch.eye(n, dtype=torch.bool)
            if acyclic is False:
                size = draw(st.integers(1 if self_loops else 2, n))
                cycle = draw(st.permutations(range(n)))[:size]
                for a, b in zip(cycle, cycle[1:] + cycle[:1]):
                    adj[a, b] = True
        mats.append(adj)
    return torch.stack(mats).reshape(*batch_shape, n, n)


@st.composite
def topology_configs(
    draw: _Any,
    num_agents: Size = st.integers(1, 4),
    *,
    modes: Sequence[str] = _TOPOLOGY_MODES,
    num_rounds: Size = st.integers(1, 2),
    optimize_spatial: bool | SearchStrategy = st.booleans(),
    optimize_temporal: bool | SearchStrategy = st.booleans(),
    wirings: Sequence[str] = _WIRINGS,
    hidden_dim: Size = st.integers(1, 8),
    head_dim: Size = st.integers(1, 8),
) -> TopologyConfig:
    """Valid ``TopologyConfig``s over the given modes and decision-node wirings (defaults: all of them)."""

    def flag(value: bool | SearchStrategy) -> bool:
        return bool(draw(value)) if isinstance(value, SearchStrategy) else bool(value)

    return TopologyConfig(
        num_agents=_draw_size(draw, num_agents, "num_agents", 1),
        mode=draw(st.sampled_from(list(modes))),
        num_rounds=_draw_size(draw, num_rounds, "num_rounds", 1),
        optimize_spatial=flag(optimize_spatial),
        optimize_temporal=flag(optimize_temporal),
        wiring=draw(st.sampled_from(list(wirings))),
        hidden_dim=_draw_size(draw, hidden_dim, "hidden_dim", 1),
        head_dim=_draw_size(draw, head_dim, "head_dim", 1),
    )


@st.composite
def spatial_masks(draw: _Any, config: TopologyConfig, *, sub_masks: bool = True) -> Tensor:
    """[N, N] bool candidate masks valid for ``config``: its mode's own mask (``spatial_mask``;
    mode random from a drawn seed) or, with ``sub_masks``, any subset of it (still no
    self-loops, still strictly upper triangular outside mode full)."""
    g = torch.Generator().manual_seed(draw(_SEEDS))
    mask = spatial_mask(config.mode, config.num_agents, g)
    if sub_masks and draw(st.booleans()):
        n = config.num_agents
        keep = torch.tensor(draw(st.lists(st.booleans(), min_size=n * n, max_size=n * n)), dtype=torch.bool)
        mask = mask & keep.reshape(n, n)
    return mask


@st.composite
def candidate_masks(draw: _Any, max_agents: int = 6, mode: str = "full") -> tuple[int, Tensor]:
    """(N, mask [N, N] bool) with N in [1, max_agents]: for mode "full" any mask with a False
    diagonal; for any other mode any strictly upper-triangular mask (the identity order must
    make it a DAG). Every such mask is accepted by a config of that mode and N agents."""
    if mode not in _TOPOLOGY_MODES:
        raise ValueError(f"mode: expected one of {', '.join(_TOPOLOGY_MODES)}, got {mode!r}")
    n = _draw_size(draw, st.integers(1, max_agents), "max_agents", 1)
    bits = draw(st.lists(st.booleans(), min_size=n * n, max_size=n * n))
    keep = ~torch.eye(n, dtype=torch.bool) if mode == "full" else torch.ones(n, n, dtype=torch.bool).triu(1)
    return n, torch.tensor(bits, dtype=torch.bool).reshape(n, n) & keep


@st.composite
def policy_outputs(
    draw: _Any,
    config: TopologyConfig,
    *,
    batch_shape: Sequence[int] = (),
    scale: float = 3.0,
    dtype: torch.dtype = torch.float32,
    elements: SearchStrategy | None = None,
) -> PolicyLogits:
    """Finite ``PolicyLogits`` for ``config`` in ``dtype``: edge [*batch_shape, N, N], order
    [*batch_shape, N], temporal [N, N], decision [*batch_shape, N], normal * ``scale`` from a
    drawn seed (or drawn from ``elements``)."""
    n = config.num_agents
    lead = [int(d) for d in batch_shape]
    return PolicyLogits(
        edge=_draw_tensor(draw, [*lead, n, n], dtype, elements, scale),
        order=_draw_tensor(draw, [*lead, n], dtype, elements, scale),
        temporal=_draw_tensor(draw, [n, n], dtype, elements, scale),
        decision=_draw_tensor(draw, [*lead, n], dtype, elements, scale),
    )


@st.composite
def policy_params(
    draw: _Any,
    config: TopologyConfig,
    feature_dim: Size = st.integers(1, 8),
    *,
    perturb: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> PolicyParams:
    """``init_policy(config, feature_dim, generator)`` from a drawn seed; with ``perturb`` > 0,
    the zero-initialised tensors (biases, scale, temporal logits) get normal * perturb noise, so
    every parameter matters. The feature dim is ``params.gcn_weight_1.shape[0]``."""
    f = _draw_size(draw, feature_dim, "feature_dim", 1)
    g = torch.Generator().manual_seed(draw(_SEEDS))
    params = init_policy(config, f, g, dtype=dtype)
    if perturb:
        params = PolicyParams(*(p + perturb * torch.randn(p.shape, generator=g, dtype=dtype) for p in params))
    return params


class TopologyCase(NamedTuple):
    """A config, a mask valid for it and policy logits: the sampler's full input."""

    config: TopologyConfig
    mask: Tensor  # [N, N] bool
    logits: PolicyLogits


@st.composite
def topology_cases(
    draw: _Any,
    num_agents: Size = st.integers(1, 4),
    *,
    modes: Sequence[str] = _TOPOLOGY_MODES,
    num_rounds: Size = st.integers(1, 2),
    batch_shape: Sequence[int] = (),
    sub_masks: bool = True,
    scale: float = 3.0,
) -> TopologyCase:
    """(config, mask, logits) accepted by ``sample_topology``, ``log_prob`` and
    ``deterministic_topology``; see ``topology_configs``, ``spatial_masks``, ``policy_outputs``."""
    config = draw(topology_configs(num_agents, modes=modes, num_rounds=num_rounds))
    mask = draw(spatial_masks(config, sub_masks=sub_masks))
    return TopologyCase(config, mask, draw(policy_outputs(config, batch_shape=batch_shape, scale=scale)))


# ----------------------------------------------------------------------------- fusion


@st.composite
def fuser_configs(
    draw: _Any,
    num_layers: Size = st.integers(1, 4),
    num_agents: Size = st.integers(1, 6),
    *,
    modes: Sequence[str] = _FUSION_MODES,
) -> FuserConfig:
    """Valid ``FuserConfig``s over the given modes, with a gate_init drawn in [-4, 4]."""
    return FuserConfig(
        num_layers=_draw_size(draw, num_layers, "num_layers", 1),
        num_agents=_draw_size(draw, num_agents, "num_agents", 1),
        mode=draw(st.sampled_from(list(modes))),
        gate_init=draw(st.floats(-4.0, 4.0)),
    )


@st.composite
def fuser_params(
    draw: _Any,
    num_layers: Size = st.integers(1, 4),
    num_agents: Size = st.integers(1, 6),
    *,
    scale: float = 2.0,
    dtype: torch.dtype = torch.float32,
    elements: SearchStrategy | None = None,
) -> FuserParams:
    """FuserParams: gate_logits [L] and source_logits [N], normal * ``scale`` from a drawn seed
    (or drawn from ``elements``)."""
    layers = _draw_size(draw, num_layers, "num_layers", 1)
    agents = _draw_size(draw, num_agents, "num_agents", 1)
    return FuserParams(
        _draw_tensor(draw, [layers], dtype, elements, scale),
        _draw_tensor(draw, [agents], dtype, elements, scale),
    )


@st.composite
def edge_weights(
    draw: _Any,
    num_caches: Size = st.integers(1, 4),
    batch_size: Size = st.integers(1, 3),
    *,
    per_row: bool | None = None,
    min_value: float = 0.01,
    max_value: float = 10.0,
    absent: bool = False,
) -> Tensor:
    """Edge weights float32 [k] (one graph) or [k, B] (one per row; ``per_row`` None draws which),
    each in [min_value, max_value]; with ``absent``, some are 0 (an absent edge) but every row
    keeps a positive one, as ``fuse`` requires."""
    k = _draw_size(draw, num_caches, "num_caches", 1)
    b = _draw_size(draw, batch_size, "batch_size", 1)
    if not 0 < min_value <= max_value:
        raise ValueError(f"min_value, max_value: expected 0 < min_value <= max_value, got {min_value}, {max_value}")
    rows = draw(st.booleans()) if per_row is None else per_row
    cols = b if rows else 1
    value = st.floats(min_value, max_value)
    w = torch.tensor([[draw(value) for _ in range(cols)] for _ in range(k)], dtype=torch.float32)  # [k, cols]
    if absent:
        drop = torch.tensor([[draw(st.booleans()) for _ in range(cols)] for _ in range(k)])
        keeper = [draw(st.integers(0, k - 1)) for _ in range(cols)]
        drop[keeper, list(range(cols))] = False
        w = w.masked_fill(drop, 0.0)
    return w if rows else w[:, 0]


class FusionCase(NamedTuple):
    """Inputs of ``fuse``: k caches, their edge weights, their agent ids and fuser parameters."""

    caches: list[KVCache]
    edge_weights: Tensor  # [k] or [k, B]
    sources: list[int]  # [k] agent ids in [0, num_agents)
    params: FuserParams


@st.composite
def fusion_cases(
    draw: _Any,
    *,
    num_caches: Size = st.integers(1, 5),
    dims: Dims = (3, st.integers(1, 3), 2, 4),
    min_len: int = 1,
    max_len: int = 6,
    num_agents: int = 6,
    equal_lengths: bool = False,
    full_masks: bool = False,
    per_row: bool | None = None,
    absent: bool = False,
    dtype: torch.dtype = torch.float32,
    max_pos_offset: int = 19,
    scale: float = 2.0,
) -> FusionCase:
    """Everything ``fuse`` needs for k predecessors: ``compatible_caches`` with left-padded
    masks (a row may be all padding) or, with ``full_masks``, none; ``edge_weights`` (see there
    for ``per_row`` and ``absent``); k agent ids in [0, num_agents) (repeats allowed); and
    ``fuser_params`` with gate_logits [L] and source_logits [num_agents] (normal * scale).
    dims defaults to L = 3, B in [1, 3], H = 2, D = 4."""
    caches = draw(
        compatible_caches(
            num_caches, dims, equal_lengths=equal_lengths, dtype=dtype, min_len=min_len, max_len=max_len,
            left_padded=not full_masks, full_masks=full_masks, max_pos_offset=max_pos_offset,
        )
    )
    k, first = len(caches), caches[0]
    weights = draw(edge_weights(k, first.batch_size, per_row=per_row, absent=absent))
    sources = draw(st.lists(st.integers(0, num_agents - 1), min_size=k, max_size=k))
    params = draw(fuser_params(first.num_layers, num_agents, scale=scale))
    return FusionCase(caches, weights, sources, params)


# ----------------------------------------------------------------------------- assertions


def assert_left_padded(mask: Tensor) -> None:
    """Raise AssertionError unless mask [B, T] bool is False only before each row's first True."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise AssertionError(f"mask: expected a bool tensor [B, T], got {mask.dtype} {tuple(mask.shape)}")
    bad = (mask[:, 1:] < mask[:, :-1]).any(dim=1)  # a True followed by a False
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise AssertionError(f"mask: expected left padding, rows {rows} have a False after a True: "
                             f"{mask[rows[0]].int().tolist()}")


def assert_caches_close(
    actual: KVCache,
    expected: KVCache,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    real_only: bool = False,
    check_dtype: bool = True,
) -> None:
    """Raise AssertionError unless the caches have the same shapes (and dtype when ``check_dtype``),
    equal masks and next positions, and keys and values within atol + rtol * |expected|.

    ``real_only`` compares keys and values at unmasked positions only (padding content is
    never attended, so two equivalent caches may differ there). Values are compared in float64.
    """
    for name, a, b in (("keys", actual.keys, expected.keys), ("values", actual.values, expected.values)):
        if a.shape != b.shape:
            raise AssertionError(f"{name}: shapes [L, B, H, T, D] differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        if check_dtype and a.dtype != b.dtype:
            raise AssertionError(f"{name}: dtypes differ: {a.dtype} vs {b.dtype}")
    if actual.mask.shape != expected.mask.shape or not torch.equal(actual.mask, expected.mask):
        raise AssertionError(f"mask: differs: {actual.mask.int().tolist()} vs {expected.mask.int().tolist()}")
    if not torch.equal(actual.next_pos, expected.next_pos):
        raise AssertionError(f"next_pos: differs: {actual.next_pos.tolist()} vs {expected.next_pos.tolist()}")
    select = expected.mask[None, :, None, :, None].expand_as(expected.keys) if real_only else None
    for name, a, b in (("keys", actual.keys, expected.keys), ("values", actual.values, expected.values)):
        a64, b64 = a.detach().double(), b.detach().double()
        err = (a64 - b64).abs()
        bound = atol + rtol * b64.abs()
        # NaN in one and not the other, or NaN vs a number, is a difference.
        bad = ~(err <= bound) & ~(a64.isnan() & b64.isnan())
        if select is not None:
            bad = bad & select
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise AssertionError(
                f"{name}: {int(bad.sum())} of {bad.numel()} elements differ beyond atol={atol}, rtol={rtol}; "
                f"first at [L, B, H, T, D] = {where}: {float(a64[where])} vs {float(b64[where])}"
            )


def _find_cycle(adj: list[list[bool]]) -> list[int] | None:
    """A cycle of one adjacency as a node list [a, b, ..., a], or None (iterative DFS)."""
    n = len(adj)
    state = [0] * n  # 0 unseen, 1 on the current path, 2 done
    for root in range(n):
        if state[root]:
            continue
        path, stack = [root], [iter([j for j in range(n) if adj[root][j]])]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            elif state[nxt] == 0:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter([j for j in range(n) if adj[nxt][j]]))
    return None


def assert_acyclic(adjacency: Tensor) -> None:
    """Raise AssertionError naming a cycle unless every graph of adjacency [..., N, N] is a DAG
    ([i, j] the edge i -> j; a self-loop is a cycle). Independent of gcache's own graph code."""
    if adjacency.dim() < 2 or adjacency.shape[-1] != adjacency.shape[-2]:
        raise AssertionError(f"adjacency: expected shape [..., N, N], got {tuple(adjacency.shape)}")
    n = adjacency.shape[-1]
    flat = adjacency.bool().reshape(-1, n, n).cpu()
    for index, graph in enumerate(flat.tolist()):
        cycle = _find_cycle(graph)
        if cycle is not None:
            where = f" (graph {index} of the batch)" if adjacency.dim() > 2 else ""
            raise AssertionError(f"adjacency: expected a DAG, found the cycle {' -> '.join(map(str, cycle))}{where}")


# ----------------------------------------------------------------------------- models


def __getattr__(name: str) -> _Any:
    """``tiny_model`` (from gcache.io.models.local) on first use, so importing this module stays cheap."""
    if name == "tiny_model":
        value = _importlib.import_module("gcache.io.models.local").tiny_model
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gcache.testing' has no attribute {name!r}")


__all__ = [
    "FusionCase",
    "TopologyCase",
    "adjacency_matrices",
    "assert_acyclic",
    "assert_caches_close",
    "assert_left_padded",
    "DTYPES",
    "cache_dims",
    "candidate_masks",
    "compatible_caches",
    "edge_weights",
    "fuser_configs",
    "fuser_params",
    "fusion_cases",
    "kv_caches",
    "left_padded_masks",
    "policy_outputs",
    "policy_params",
    "spatial_masks",
    "tiny_model",
    "topology_cases",
    "topology_configs",
]


def __dir__() -> list[str]:
    """The public names."""
    return sorted(__all__)
