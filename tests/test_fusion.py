"""Properties of the pure cache fuser (gcache.core.fusion), checked against a brute-force reference."""

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gcache.core.cache import KVCache, concat
from gcache.testing import assert_caches_close, fusion_cases
from gcache.core.fusion import (
    MODES,
    FuserConfig,
    FuserParams,
    fuse,
    gates,
    init_fuser,
    source_weights,
)

L, H, D = 3, 2, 4
NUM_AGENTS = 6


def make_cache(seed: int, T: int, B: int = 2, *, pad: list[int] | None = None, L: int = L, H: int = H, D: int = D):
    """A random cache; row b has its first pad[b] positions masked (left padding)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(L, B, H, T, D, generator=g)
    values = torch.randn(L, B, H, T, D, generator=g)
    pad = pad or [0] * B
    mask = torch.arange(T)[None, :] >= torch.tensor(pad)[:, None]
    next_pos = mask.sum(1) + torch.randint(0, 20, (B,), generator=g)
    return KVCache(keys, values, mask, next_pos)


def random_params(seed: int, *, num_layers: int = L) -> FuserParams:
    g = torch.Generator().manual_seed(seed)
    return FuserParams(torch.randn(num_layers, generator=g) * 2, torch.randn(NUM_AGENTS, generator=g) * 2)


def reference_pack(cache: KVCache) -> KVCache:
    """Row by row: the padding slots in their order, then the real ones in theirs, keeping the last
    (most real slots of any row) columns: the documented packing, written as plain loops."""
    B, T = cache.mask.shape
    keep = max(int(cache.mask[b].sum()) for b in range(B))
    keys, values = torch.zeros_like(cache.keys[:, :, :, :keep]), torch.zeros_like(cache.values[:, :, :, :keep])
    mask = torch.zeros(B, keep, dtype=torch.bool)
    for b in range(B):
        real = [t for t in range(T) if cache.mask[b, t]]
        order = ([t for t in range(T) if not cache.mask[b, t]] + real)[T - keep :]
        for j, t in enumerate(order):
            keys[:, b, :, j], values[:, b, :, j], mask[b, j] = cache.keys[:, b, :, t], cache.values[:, b, :, t], cache.mask[b, t]
    return KVCache(keys, values, mask, cache.next_pos)


def reference_fuse(params, caches, edge_weights, *, mode, sources):
    """Element by element, straight from the documented formulas (mixing modes only): each cache
    packed (``reference_pack``), then aligned at its last slot."""
    caches = [reference_pack(c) for c in caches]
    k, B = len(caches), caches[0].batch_size
    T = max(c.seq_len for c in caches)
    e = torch.as_tensor(edge_weights, dtype=torch.float64)
    e = e[:, None].expand(k, B) if e.dim() == 1 else e
    g = torch.ones(L, dtype=torch.float64) if params is None else torch.sigmoid(params.gate_logits.double())
    keys = torch.zeros(L, B, H, T, D, dtype=torch.float64)
    values = torch.zeros_like(keys)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        logits = [math.log(e[i, b]) if e[i, b] > 0 else -math.inf for i in range(k)]
        if mode == "learned":
            logits = [lg + float(params.source_logits[s]) for lg, s in zip(logits, sources)]
        present = [e[i, b] > 0 for i in range(k)]
        for t in range(T):
            entry = {}  # predecessor -> its slot index, if it has one at this aligned slot
            for i, c in enumerate(caches):
                ti = t - (T - c.seq_len)
                if ti >= 0:
                    entry[i] = ti
            real = [i for i in entry if present[i] and bool(caches[i].mask[b, entry[i]])]
            mask[b, t] = bool(real)
            if not real:
                # no real entry: all present predecessors, padding counting as zeros
                real = [i for i in range(k) if present[i]]
            z = sum(math.exp(logits[i]) for i in real)
            for i in real:
                u, v = 1 / len(real), math.exp(logits[i]) / z
                if i not in entry:
                    continue  # the zero padding adds nothing
                c, ti = caches[i], entry[i]
                for l in range(L):
                    a = u + float(g[l]) * (v - u)
                    keys[l, b, :, t] += a * c.keys[l, b, :, ti].double()
                    values[l, b, :, t] += a * c.values[l, b, :, ti].double()
    next_pos = torch.stack(
        [torch.where(e[i] > 0, c.next_pos, torch.iinfo(torch.long).min) for i, c in enumerate(caches)]
    ).amax(0)
    return KVCache(keys, values, mask, next_pos)


def assert_cache_close(a: KVCache, b: KVCache, atol=1e-5):
    # the brute-force reference computes in float64
    assert_caches_close(a, b, atol=atol, rtol=1e-5, check_dtype=False)


def attention(cache: KVCache, query: torch.Tensor) -> torch.Tensor:
    """Softmax attention of query [L, B, H, D] over the cache's unmasked positions -> [L, B, H, D]."""
    scores = torch.einsum("lbhd,lbhtd->lbht", query.double(), cache.keys.double())
    scores = scores.masked_fill(~cache.mask[None, :, None, :], -math.inf)
    return torch.einsum("lbht,lbhtd->lbhd", scores.softmax(-1), cache.values.double())


# ----------------------------------------------------------------------------- equivalences


@given(fusion_cases(), st.sampled_from(["weighted", "learned"]), st.booleans())
def test_mixing_matches_brute_force_reference(case, mode, no_params):
    caches, weights, sources, params = case
    if no_params and mode == "weighted":
        params = None
    out = fuse(params, caches, weights, mode=mode, sources=sources)
    assert_cache_close(out, reference_fuse(params, caches, weights, mode=mode, sources=sources))


@given(fusion_cases())
def test_learned_with_zero_source_logits_is_weighted(case):
    caches, weights, sources, params = case
    params = params._replace(source_logits=torch.zeros(NUM_AGENTS))
    assert_cache_close(
        fuse(params, caches, weights, mode="learned", sources=sources),
        fuse(params, caches, weights, mode="weighted"),
    )


@given(fusion_cases(per_row=True), st.sampled_from(MODES))
def test_per_row_weights_equal_fusing_each_row_alone(case, mode):
    caches, weights, sources, params = case
    out = fuse(params, caches, weights, mode=mode, sources=sources)
    for b in range(caches[0].batch_size):
        rows = [KVCache(c.keys[:, b : b + 1], c.values[:, b : b + 1], c.mask[b : b + 1], c.next_pos[b : b + 1])
                for c in caches]
        one = fuse(params, rows, weights[:, b], mode=mode, sources=sources)
        # Alone, a row keeps only as many slots as it has real ones (packing trims the rest): the
        # batch's row ends with the same slots, all slots before them padding. Padding's content
        # is never attended, so real slots are compared.
        t = one.seq_len
        tail = out.mask[b, out.seq_len - t :]
        assert torch.equal(tail, one.mask[0]) and not out.mask[b, : out.seq_len - t].any()
        for field in ("keys", "values"):
            got = getattr(out, field)[:, b, :, out.seq_len - t :][:, :, tail]
            torch.testing.assert_close(got, getattr(one, field)[:, 0][:, :, tail], atol=1e-6, rtol=1e-5)
        assert torch.equal(out.next_pos[b : b + 1], one.next_pos)


def test_concat_is_the_cache_concatenation_with_max_next_pos():
    caches = [make_cache(1, 3, pad=[1, 0]), make_cache(2, 5, pad=[0, 2]), make_cache(3, 2)]
    out = fuse(None, caches, [0.2, 1.0, 0.5], mode="concat")
    ref = concat(caches)
    assert torch.equal(out.keys, ref.keys) and torch.equal(out.values, ref.values)
    assert torch.equal(out.mask, ref.mask)
    assert torch.equal(out.next_pos, torch.stack([c.next_pos for c in caches]).amax(0))


# ----------------------------------------------------------------------------- invariants


@given(st.integers(0, 10_000), st.integers(1, 6), st.sampled_from(MODES), st.floats(0.01, 5.0), st.booleans())
def test_single_predecessor_is_returned_unchanged(seed, T, mode, weight, random_gates):
    cache = make_cache(seed, T, pad=[seed % (T + 1), 0])
    params = random_params(seed) if random_gates else init_fuser(FuserConfig(L, NUM_AGENTS))
    if not random_gates:
        params = params._replace(gate_logits=torch.full((L,), math.inf))  # gates exactly open
    out = fuse(params, [cache], [weight], mode=mode, sources=[seed % NUM_AGENTS])
    for got, want in zip(out, cache):
        assert torch.equal(got, want)


@given(fusion_cases(), st.sampled_from(MODES), st.randoms(use_true_random=False))
def test_permuting_predecessors_with_their_weights_changes_nothing(case, mode, rnd):
    caches, weights, sources, params = case
    perm = list(range(len(caches)))
    rnd.shuffle(perm)
    out = fuse(params, caches, weights, mode=mode, sources=sources)
    permuted = fuse(params, [caches[i] for i in perm], weights[perm], mode=mode, sources=[sources[i] for i in perm])
    if mode == "concat":
        # the parts change places along time; what any query reads from the cache does not
        q = torch.randn(L, caches[0].batch_size, H, D, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(attention(out, q), attention(permuted, q), equal_nan=True)
        assert torch.equal(out.next_pos, permuted.next_pos)
        assert sorted(out.mask.sum(1).tolist()) == sorted(permuted.mask.sum(1).tolist())
    else:
        assert_cache_close(out, permuted)


@given(fusion_cases(full_masks=True), st.sampled_from(["weighted", "learned"]))
def test_mixture_lies_within_the_inputs_elementwise_bounds(case, mode):
    caches, weights, sources, params = case
    out = fuse(params, caches, weights, mode=mode, sources=sources)
    T = out.seq_len
    for b in range(out.batch_size):
        for t in range(T):
            # the predecessors that have an entry at this right-aligned slot
            parts = [c for c in caches if t - (T - c.seq_len) >= 0]
            for field in ("keys", "values"):
                stack = torch.stack([getattr(c, field)[:, b, :, t - (T - c.seq_len)] for c in parts])
                got = getattr(out, field)[:, b, :, t]
                assert bool((got >= stack.amin(0) - 1e-5).all()) and bool((got <= stack.amax(0) + 1e-5).all())


@given(st.integers(0, 10_000), st.integers(2, 4), st.sampled_from(["weighted", "learned"]))
def test_copies_of_one_cache_fuse_to_it(seed, k, mode):
    cache = make_cache(seed, 4)
    out = fuse(random_params(seed), [cache] * k, torch.rand(k) + 0.1, mode=mode, sources=list(range(k)))
    assert_cache_close(out, cache)


@given(fusion_cases(), st.sampled_from(MODES))
def test_absent_edge_equals_leaving_the_predecessor_out(case, mode):
    caches, weights, sources, params = case
    if len(caches) < 2:
        return
    w = weights.clone()
    w[-1] = 0.0
    without = fuse(params, caches[:-1], w[:-1], mode=mode, sources=sources[:-1])
    out = fuse(params, caches, w, mode=mode, sources=sources)
    if mode == "concat":
        q = torch.randn(L, caches[0].batch_size, H, D, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(attention(out, q), attention(without, q), equal_nan=True)
        assert torch.equal(out.next_pos, without.next_pos)
        return
    # the absent predecessor may be the longest: compare on the slots both have
    T = without.seq_len
    s = out.seq_len - T  # (packing can leave no slot at all where every remaining row is padding)
    keep = lambda c: KVCache(c.keys[..., s:, :], c.values[..., s:, :], c.mask[:, s:], c.next_pos)  # noqa: E731
    got = keep(out)
    real = without.mask[None, :, None, :, None]
    torch.testing.assert_close(got.keys * real, without.keys * real, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.values * real, without.values * real, atol=1e-5, rtol=1e-5)
    assert torch.equal(got.mask, without.mask)
    assert not bool(out.mask[:, : out.seq_len - T].any())
    assert torch.equal(out.next_pos, without.next_pos)


@given(fusion_cases(), st.sampled_from(MODES))
def test_inputs_are_not_modified(case, mode):
    caches, weights, sources, params = case
    before = [tuple(t.clone() for t in c) for c in caches], weights.clone(), tuple(p.clone() for p in params)
    fuse(params, caches, weights, mode=mode, sources=sources)
    for c, saved in zip(caches, before[0]):
        assert all(torch.equal(a, b) for a, b in zip(c, saved))
    assert torch.equal(weights, before[1])
    assert all(torch.equal(a, b) for a, b in zip(params, before[2]))


def test_lengths_differ_shorter_caches_are_right_aligned_and_nothing_is_dropped():
    short, long = make_cache(1, 2), make_cache(2, 5)
    out = fuse(None, [short, long], [1.0, 1.0], mode="weighted")
    assert out.seq_len == 5 and bool(out.mask.all())
    # the first three slots exist only in the long cache: they are its entries
    assert torch.equal(out.keys[..., :3, :], long.keys[..., :3, :])
    # the last two are the mean of both (open gates, equal weights)
    torch.testing.assert_close(out.keys[..., 3:, :], (short.keys + long.keys[..., 3:, :]) / 2)


def test_weighted_mode_uses_the_normalised_edge_weights():
    a, b = make_cache(1, 3), make_cache(2, 3)
    out = fuse(None, [a, b], [3.0, 1.0], mode="weighted")
    torch.testing.assert_close(out.values, 0.75 * a.values + 0.25 * b.values)
    closed = FuserParams(torch.full((L,), -math.inf), torch.zeros(NUM_AGENTS))
    torch.testing.assert_close(fuse(closed, [a, b], [3.0, 1.0], mode="weighted").values, (a.values + b.values) / 2)


def test_source_logits_follow_the_agent_id():
    a, b = make_cache(1, 3), make_cache(2, 3)
    params = FuserParams(torch.full((L,), math.inf), torch.tensor([0.0, math.log(3.0), 0, 0, 0, 0]))
    out = fuse(params, [a, b], [1.0, 1.0], mode="learned", sources=[1, 4])
    torch.testing.assert_close(out.keys, 0.75 * a.keys + 0.25 * b.keys)
    w = source_weights(params, [0.5, 0.5], mode="learned", sources=[4, 1])
    torch.testing.assert_close(w[:, 0], torch.tensor([0.25, 0.75]))


def test_init_fuser_shapes_and_default():
    cfg = FuserConfig(num_layers=30, num_agents=4)
    p = init_fuser(cfg)
    assert p.gate_logits.shape == (30,) and p.source_logits.shape == (4,)
    assert bool(torch.isfinite(p.gate_logits).all()) and bool((p.source_logits == 0).all())
    g = gates(p, 30)
    assert bool(((g > 0.5) & (g < 1)).all())  # open-ish, not saturated: gradients can move it


# ----------------------------------------------------------------------------- gradients


def test_learned_gradients_reach_every_parameter_and_the_edge_weights():
    caches = [make_cache(i, 4, pad=[i % 2, 0]) for i in range(3)]
    params = FuserParams(*(t.clone().requires_grad_(True) for t in init_fuser(FuserConfig(L, NUM_AGENTS))))
    e = torch.tensor([0.9, 0.3, 0.6], requires_grad=True)
    out = fuse(params, caches, e, mode="learned", sources=[0, 2, 5])
    target = torch.randn_like(out.keys, generator=torch.Generator().manual_seed(1))
    loss = ((out.keys - target) ** 2).sum() + out.values.square().sum()
    g_gate, g_src, g_e = torch.autograd.grad(loss, [params.gate_logits, params.source_logits, e])
    assert bool((g_gate != 0).all())
    assert bool((g_src[[0, 2, 5]] != 0).all()) and bool((g_src[[1, 3, 4]] == 0).all())
    assert bool((g_e != 0).all())


def test_gradient_is_finite_at_a_zero_edge_weight():
    caches = [make_cache(i, 3) for i in range(2)]
    params = FuserParams(torch.zeros(L, requires_grad=True), torch.zeros(NUM_AGENTS, requires_grad=True))
    e = torch.tensor([0.0, 0.7], requires_grad=True)
    out = fuse(params, caches, e, mode="learned", sources=[0, 1])
    grads = torch.autograd.grad(out.keys.sum() + out.values.square().sum(), [*params, e])
    assert all(bool(torch.isfinite(g).all()) for g in grads)


def test_inference_mode_caches_are_refused_only_where_a_gradient_is_needed():
    with torch.inference_mode():
        caches = [make_cache(i, 3) for i in range(2)]
    params = FuserParams(*(t.requires_grad_(True) for t in random_params(0)))
    with pytest.raises(ValueError, match=r"caches\[0\]: made under torch.inference_mode\(\)"):
        fuse(params, caches, [0.4, 0.6], mode="learned", sources=[0, 1])
    with torch.no_grad():
        fuse(params, caches, [0.4, 0.6], mode="learned", sources=[0, 1])
    fuse(None, caches, [0.4, 0.6], mode="weighted")


def _wide_case(k: int, seed: int):
    """k predecessors of different lengths and left padding, per-row weights with one absent
    edge, random gates and source logits, the sources in a shuffled order."""
    g = torch.Generator().manual_seed(seed)
    caches = [make_cache(seed * 100 + i, 2 + i % 4, pad=[i % 3, (i + 1) % 2]) for i in range(k)]
    weights = torch.rand(k, 2, generator=g) + 0.05
    weights[-1, 0] = 0.0
    params = FuserParams(torch.randn(L, generator=g) * 2, torch.randn(8, generator=g) * 2)
    sources = torch.randperm(8, generator=g)[:k].tolist()
    return caches, weights, params, sources


@pytest.mark.parametrize("k", [2, 5, 8])
@pytest.mark.parametrize("mode", ["weighted", "learned"])
def test_up_to_eight_predecessors_match_the_float64_reference(k, mode):
    caches, weights, params, sources = _wide_case(k, seed=k)
    out = fuse(params, caches, weights, mode=mode, sources=sources)
    assert_cache_close(out, reference_fuse(params, caches, weights, mode=mode, sources=sources))


def _bf16(cache: KVCache) -> KVCache:
    return KVCache(cache.keys.bfloat16(), cache.values.bfloat16(), cache.mask, cache.next_pos)


@pytest.mark.parametrize("k", [2, 8])
@pytest.mark.parametrize("mode", ["weighted", "learned"])
def test_bf16_fusion_matches_the_float64_reference_within_bf16_rounding(k, mode):
    """bf16 caches fuse in bf16: the float32 coefficients are rounded to bf16 (relative error
    2^-9) and each of the k multiply-adds rounds its partial sum (2^-9 of at most
    sum_i a_i |c_i|, as every a_i >= 0). So every element is within (k + 1) 2^-9 sum_i a_i |c_i|
    of the exact mixture of the same bf16 inputs; the test allows twice that. Rounding to
    nearest is unbiased, so on average the error stays far below one unit of 2^-8 (measured:
    under 0.75 * 2^-9 at k = 8), which a systematic error of 0.4% in a coefficient exceeds."""
    caches, weights, params, sources = _wide_case(k, seed=10 + k)
    caches = [_bf16(c) for c in caches]
    out = fuse(params, caches, weights, mode=mode, sources=sources)
    assert out.keys.dtype == torch.bfloat16 and out.values.dtype == torch.bfloat16
    exact = reference_fuse(params, caches, weights, mode=mode, sources=sources)  # float64 of the bf16 inputs
    magnitude = reference_fuse(params, [c._replace(keys=c.keys.abs(), values=c.values.abs()) for c in caches],
                               weights, mode=mode, sources=sources)  # sum_i a_i |c_i|
    for field in ("keys", "values"):
        error = (getattr(out, field).double() - getattr(exact, field)).abs()
        bound = 2 * (k + 1) * 2.0**-9 * getattr(magnitude, field)
        worst = (error - bound).max().item()
        assert worst <= 0, f"{field}: bf16 error exceeds the rounding bound by {worst}"
        assert error.mean().item() <= 2.0**-8 * getattr(magnitude, field).mean().item(), field
        assert error.max().item() > 0  # bf16 did round: the comparison is not float32 in disguise
    assert torch.equal(out.mask, exact.mask) and torch.equal(out.next_pos, exact.next_pos)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("mode", MODES)
def test_empty_list_is_refused(mode):
    with pytest.raises(ValueError, match="at least one predecessor"):
        fuse(None, [], [], mode=mode)


@pytest.mark.parametrize(
    "other, what",
    [
        (dict(L=L + 1), "layers"),
        (dict(H=H + 1), "KV heads"),
        (dict(D=D + 2), "head dim"),
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_caches_from_different_models_are_refused(other, what, mode):
    caches = [make_cache(0, 3), make_cache(1, 3, **other)]
    with pytest.raises(ValueError, match=rf"caches\[1\] has \d+ {what} but caches\[0\] has"):
        fuse(random_params(0), caches, [1.0, 1.0], mode=mode, sources=[0, 1])


def test_batch_and_dtype_mismatches_are_refused():
    with pytest.raises(ValueError, match="batch rows"):
        fuse(None, [make_cache(0, 3, B=2), make_cache(1, 3, B=3)], [1.0, 1.0], mode="weighted")
    c = make_cache(1, 3)
    half = KVCache(c.keys.half(), c.values.half(), c.mask, c.next_pos)
    with pytest.raises(ValueError, match="dtype"):
        fuse(None, [make_cache(0, 3), half], [1.0, 1.0], mode="weighted")


@pytest.mark.parametrize(
    "weights, match",
    [
        ([1.0], r"one weight per cache \(2 caches\), got 1"),
        ([1.0, 1.0, 1.0], r"one weight per cache \(2 caches\), got 3"),
        ([1.0, math.nan], "finite"),
        ([math.inf, 1.0], "finite"),
        ([-0.5, 1.0], "non-negative"),
        ([0.0, 0.0], "positive weight"),
        (torch.ones(2, 5), r"\[k, B\]"),
    ],
)
@pytest.mark.parametrize("mode", MODES)
def test_bad_weights_are_refused(weights, match, mode):
    with pytest.raises(ValueError, match=match):
        fuse(random_params(0), [make_cache(0, 3), make_cache(1, 3)], weights, mode=mode, sources=[0, 1])


def test_learned_mode_needs_params_and_valid_sources():
    caches = [make_cache(0, 3), make_cache(1, 3)]
    with pytest.raises(ValueError, match="params"):
        fuse(None, caches, [1.0, 1.0], mode="learned", sources=[0, 1])
    with pytest.raises(ValueError, match="sources: the learned mode needs"):
        fuse(random_params(0), caches, [1.0, 1.0], mode="learned")
    with pytest.raises(ValueError, match=r"agent ids in \[0, 6\)"):
        fuse(random_params(0), caches, [1.0, 1.0], mode="learned", sources=[0, 6])
    with pytest.raises(ValueError, match="one agent id per cache"):
        fuse(random_params(0), caches, [1.0, 1.0], mode="learned", sources=[0])
    with pytest.raises(ValueError, match=r"gate_logits: expected shape \[L\] = \(3,\)"):
        fuse(random_params(0, num_layers=4), caches, [1.0, 1.0], mode="learned", sources=[0, 1])


def test_bad_mode_and_config_are_refused():
    with pytest.raises(ValueError, match="mode"):
        fuse(None, [make_cache(0, 3)], [1.0], mode="mean")
    with pytest.raises(ValueError, match="num_layers"):
        FuserConfig(num_layers=0, num_agents=3)
    with pytest.raises(ValueError, match="mode"):
        FuserConfig(num_layers=2, num_agents=3, mode="sum")
    with pytest.raises(TypeError, match="single KVCache"):
        fuse(None, make_cache(0, 3), [1.0], mode="weighted")


def test_all_modes_accept_every_k_up_to_eight():
    for mode, k in itertools.product(MODES, (1, 2, 4, 8)):
        caches = [make_cache(i, 2 + i % 3, pad=[i % 2, 0]) for i in range(k)]
        out = fuse(init_fuser(FuserConfig(L, 8)), caches, torch.rand(k) + 0.01, mode=mode, sources=list(range(k)))
        assert bool(torch.isfinite(out.keys).all()) and bool(torch.isfinite(out.values).all())
