"""gcache.testing: the strategies generate valid states, and the assertion helpers fail when they should."""

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import find as _find
from hypothesis import strategies as st

import gcache
from gcache import testing as gt
from gcache.core.cache import KVCache


def find(strategy, condition):
    """The first generated example meeting ``condition`` (no shrinking: existence is the point)."""
    return _find(strategy, condition, settings=settings(phases=[Phase.generate], max_examples=1000, database=None))


def _nilpotent(adj: torch.Tensor) -> bool:
    """Brute-force DAG check: A is acyclic iff A^N == 0 (no walk of N edges)."""
    n = adj.shape[-1]
    a = adj.double()
    power = torch.eye(n, dtype=torch.float64)
    for _ in range(n):
        power = (power @ a).clamp(max=1.0)
    return not bool(power.any())


# ----------------------------------------------------------------------------- caches


@given(gt.kv_caches(left_padded=True))
def test_kv_caches_are_valid_left_padded_and_positioned(cache):
    gcache.validate(cache)
    gt.assert_left_padded(cache.mask)
    L, B, H, T, D = cache.keys.shape
    assert 1 <= L <= 3 and 1 <= B <= 3 and 1 <= H <= 2 and 0 <= T <= 6 and 1 <= D <= 4
    assert cache.keys.dtype in gt.DTYPES
    # each row was read from some position on: the next one is after its real positions
    assert bool((cache.next_pos >= cache.mask.sum(1)).all())
    assert bool((cache.next_pos <= cache.mask.sum(1) + 50).all())
    assert bool(torch.isfinite(cache.keys).all() and torch.isfinite(cache.values).all())


@given(gt.kv_caches())
def test_kv_caches_with_arbitrary_masks_are_valid(cache):
    gcache.validate(cache)
    assert bool((cache.next_pos >= cache.mask.sum(1)).all())


def test_kv_caches_draw_every_dtype_and_non_left_padded_masks():
    for dtype in gt.DTYPES:
        find(gt.kv_caches(), lambda c, dtype=dtype: c.keys.dtype == dtype)
    holey = find(gt.kv_caches(), lambda c: bool((c.mask[:, 1:] < c.mask[:, :-1]).any()))
    with pytest.raises(AssertionError, match="left padding"):
        gt.assert_left_padded(holey.mask)


@given(gt.kv_caches((2, 3, 1, st.integers(4, 5)), max_len=4, dtype=torch.bfloat16, left_padded=True, min_real=2,
                    max_pos_offset=0))
def test_kv_caches_respect_fixed_sizes_min_real_and_offset(cache):
    assert cache.keys.shape[:3] == (2, 3, 1) and cache.keys.shape[4] in (4, 5)
    assert cache.seq_len >= 2 and bool((cache.mask.sum(1) >= 2).all())
    assert cache.keys.dtype == torch.bfloat16
    assert torch.equal(cache.next_pos, cache.mask.sum(1))


@given(gt.kv_caches(gt.cache_dims(max_layers=1, max_head_dim=8), min_len=2, max_len=3, full_masks=True))
def test_kv_caches_with_full_masks_and_drawn_dims(cache):
    assert bool(cache.mask.all()) and cache.num_layers == 1 and 2 <= cache.seq_len <= 3


@given(gt.kv_caches((1, 1, 1, 2), min_len=2, max_len=2, elements=st.sampled_from([0.5, -3.0])))
def test_kv_caches_draw_elements_from_a_strategy(cache):
    assert set(cache.keys.flatten().tolist()) | set(cache.values.flatten().tolist()) <= {0.5, -3.0}


def test_kv_caches_generate_left_padding_and_full_padding():
    padded = find(gt.kv_caches(left_padded=True), lambda c: bool((~c.mask).any() & c.mask.any()))
    gt.assert_left_padded(padded.mask)
    assert bool((~padded.mask[:, 0]).any())
    empty_row = find(gt.kv_caches(min_len=1, left_padded=True), lambda c: bool((~c.mask.any(1)).any()))
    assert empty_row.seq_len >= 1


@given(st.data())
def test_bad_sizes_are_refused(data):
    with pytest.raises(ValueError, match="dims.layers"):
        data.draw(gt.kv_caches((0, 1, 1, 1)))
    with pytest.raises(ValueError, match="dtypes"):
        data.draw(gt.kv_caches(dtype=torch.long))
    with pytest.raises(ValueError, match="min_real"):
        data.draw(gt.kv_caches(min_real=1))
    with pytest.raises(ValueError, match="self_loops"):
        data.draw(gt.adjacency_matrices(acyclic=True, self_loops=True))


@given(gt.left_padded_masks(st.integers(0, 4), st.integers(0, 7), min_real=1))
def test_left_padded_masks(mask):
    gt.assert_left_padded(mask)
    assert mask.dtype == torch.bool and mask.shape[1] >= 1
    assert bool(mask.any(1).all())


@given(gt.compatible_caches(left_padded=True))
def test_compatible_caches_concat_and_stack(caches):
    for c in caches:
        gcache.validate(c)
        gt.assert_left_padded(c.mask)
    assert len({(c.keys.shape[:3], c.head_dim, c.keys.dtype) for c in caches}) == 1
    joined = gcache.concat(caches)
    assert joined.seq_len == sum(c.seq_len for c in caches)
    rows = gcache.stack_rows(caches)
    assert rows.batch_size == sum(c.batch_size for c in caches)
    gt.assert_left_padded(rows.mask)


@given(gt.compatible_caches(st.integers(2, 4), equal_lengths=True))
def test_compatible_caches_of_equal_lengths(caches):
    assert len({c.seq_len for c in caches}) == 1


# ----------------------------------------------------------------------------- graphs


@given(gt.adjacency_matrices())
def test_dags_are_acyclic(adj):
    assert adj.dtype == torch.bool and adj.shape[0] == adj.shape[1]
    assert _nilpotent(adj)
    gt.assert_acyclic(adj)
    assert bool(gcache.is_acyclic(adj))


def test_dags_point_both_ways_across_examples():
    # edges follow a drawn order, not the index order: a backward edge must occur
    back = find(gt.adjacency_matrices(2), lambda a: bool(a[1, 0]))
    assert bool(back[1, 0]) and not bool(back[0, 1])


@pytest.mark.parametrize("self_loops", [False, True])
@given(data=st.data())
def test_cyclic_graphs_have_a_cycle_and_the_helper_names_a_real_one(self_loops, data):
    adj = data.draw(gt.adjacency_matrices(acyclic=False, self_loops=self_loops))
    assert not _nilpotent(adj)
    with pytest.raises(AssertionError, match="found the cycle") as info:
        gt.assert_acyclic(adj)
    nodes = [int(x) for x in str(info.value).split("cycle ")[1].split(" (")[0].split(" -> ")]
    assert nodes[0] == nodes[-1] and len(nodes) >= (2 if self_loops else 3)
    assert all(bool(adj[a, b]) for a, b in zip(nodes, nodes[1:]))


@given(gt.adjacency_matrices(st.integers(1, 5), acyclic=None, self_loops=True, batch_shape=(2, 3)))
def test_assert_acyclic_agrees_with_brute_force_on_any_graph(adj):
    assert adj.shape[:2] == (2, 3)
    every = all(_nilpotent(a) for a in adj.reshape(-1, adj.shape[-1], adj.shape[-1]))
    if every:
        gt.assert_acyclic(adj)
    else:
        with pytest.raises(AssertionError, match="graph \\d+ of the batch"):
            gt.assert_acyclic(adj)


@given(gt.topology_cases(batch_shape=(2,)))
def test_topology_cases_are_accepted_by_the_sampler(case):
    config, mask, logits = case
    assert not bool(mask.diagonal().any())
    if config.mode != "full":
        assert not bool(mask.tril().any())
    topology = gcache.sample_topology(logits, mask, config, torch.Generator().manual_seed(0), num_samples=3)
    assert topology.spatial.shape == (3, 2, config.num_agents, config.num_agents)
    assert bool(torch.isfinite(topology.log_prob).all())
    gt.assert_acyclic(topology.spatial)


@given(gt.topology_configs(), st.data())
def test_policy_params_run_and_every_tensor_is_finite(config, data):
    params = data.draw(gt.policy_params(config))
    feature_dim = params.gcn_weight_1.shape[0]
    features = torch.randn(config.num_agents, feature_dim, generator=torch.Generator().manual_seed(1))
    prior = ~torch.eye(config.num_agents, dtype=torch.bool)
    logits = gcache.policy_logits(params, features, prior)
    assert logits.edge.shape == (config.num_agents, config.num_agents)
    assert all(bool(torch.isfinite(t).all()) for t in logits)
    # perturbed: the zero-initialised tensors are not all zero any more
    assert float(params.bias) != 0.0 and float(params.temporal_logits.abs().sum()) > 0


def test_spatial_masks_include_proper_sub_masks():
    config = gcache.TopologyConfig(num_agents=3, mode="mesh")
    full = gcache.spatial_mask("mesh", 3)
    sub = find(gt.spatial_masks(config), lambda m: not torch.equal(m, full))
    assert bool((sub <= full).all())


# ----------------------------------------------------------------------------- fusion


@given(gt.fusion_cases(absent=True), st.sampled_from(["concat", "weighted", "learned"]))
def test_fusion_cases_are_accepted_by_fuse(case, mode):
    caches, weights, sources, params = case
    assert len(caches) == len(sources) == weights.shape[0]
    assert params.gate_logits.shape == (caches[0].num_layers,) and params.source_logits.shape == (6,)
    assert bool((weights >= 0).all()) and bool((weights > 0).any(0).all())
    out = gcache.fuse(params, caches, weights, mode=mode, sources=sources)
    gcache.validate(out)


@given(gt.edge_weights(3, 2, per_row=True, absent=True))
def test_edge_weights_keep_a_positive_one_per_row(weights):
    assert weights.shape == (3, 2) and bool((weights > 0).any(0).all())


def test_edge_weights_can_be_absent():
    w = find(gt.edge_weights(3, 1, per_row=False, absent=True), lambda w: bool((w == 0).any()))
    assert bool((w > 0).any())


@given(gt.fuser_configs(), st.data())
def test_fuser_configs_and_params_match(config, data):
    params = data.draw(gt.fuser_params(config.num_layers, config.num_agents))
    init = gcache.init_fuser(config)
    assert [p.shape for p in params] == [p.shape for p in init]


# ----------------------------------------------------------------------------- assertion helpers


@given(gt.kv_caches(min_len=1), st.data())
def test_assert_caches_close_passes_on_itself_and_fails_on_each_difference(cache, data):
    gt.assert_caches_close(cache, KVCache(*(t.clone() for t in cache)))
    idx = tuple(data.draw(st.integers(0, n - 1)) for n in cache.keys.shape)
    keys = cache.keys.clone()
    keys[idx] += 1.0
    with pytest.raises(AssertionError, match=r"keys: 1 of \d+ elements differ"):
        gt.assert_caches_close(cache._replace(keys=keys), cache)
    values = cache.values.clone()
    values[idx] = float("nan")
    with pytest.raises(AssertionError, match="values"):
        gt.assert_caches_close(cache._replace(values=values), cache)
    with pytest.raises(AssertionError, match="next_pos"):
        gt.assert_caches_close(cache._replace(next_pos=cache.next_pos + 1), cache)
    mask = cache.mask.clone()
    mask[idx[1], idx[3]] = ~mask[idx[1], idx[3]]
    with pytest.raises(AssertionError, match="mask"):
        gt.assert_caches_close(cache._replace(mask=mask), cache)
    with pytest.raises(AssertionError, match="dtypes"):
        other = torch.float32 if cache.keys.dtype == torch.float64 else torch.float64
        gt.assert_caches_close(cache._replace(keys=cache.keys.to(other)), cache)
    with pytest.raises(AssertionError, match="shapes"):
        gt.assert_caches_close(gcache.keep_last(cache, cache.seq_len - 1), cache)
    # real_only: a change at a padded slot is ignored, at a real slot it is not
    if bool(cache.mask[idx[1], idx[3]]):
        with pytest.raises(AssertionError, match="keys"):
            gt.assert_caches_close(cache._replace(keys=keys), cache, real_only=True)
    else:
        gt.assert_caches_close(cache._replace(keys=keys), cache, real_only=True)


def test_assert_caches_close_honours_the_tolerance():
    cache = KVCache(torch.ones(1, 1, 1, 2, 2), torch.ones(1, 1, 1, 2, 2), torch.ones(1, 2, dtype=torch.bool),
                    torch.tensor([2]))
    near = cache._replace(keys=cache.keys + 1e-3)
    gt.assert_caches_close(near, cache, atol=2e-3)
    with pytest.raises(AssertionError, match=r"first at \[L, B, H, T, D\] = \(0, 0, 0, 0, 0\)"):
        gt.assert_caches_close(near, cache, atol=1e-4, rtol=0.0)


def test_assert_left_padded_fails_on_right_or_middle_padding():
    gt.assert_left_padded(torch.tensor([[False, True, True], [True, True, True], [False, False, False]]))
    with pytest.raises(AssertionError, match=r"rows \[1\]"):
        gt.assert_left_padded(torch.tensor([[False, True], [True, False]]))
    with pytest.raises(AssertionError, match="bool"):
        gt.assert_left_padded(torch.ones(2, 2))


def test_tiny_model_is_re_exported_without_importing_it_eagerly():
    from gcache.io.models import local as models

    assert gt.tiny_model is models.tiny_model
    assert "tiny_model" in dir(gt)
    with pytest.raises(AttributeError):
        gt.no_such_name  # noqa: B018


def test_import_gcache_testing_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, gcache.testing; sys.exit('transformers' in sys.modules or 'gcache.io.models' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_module_docstring_example_runs():
    import textwrap

    block = []
    for line in gt.__doc__.split("::\n", 1)[1].splitlines():
        if line and not line.startswith("    "):
            break
        block.append(line)
    namespace: dict = {}
    exec(compile(textwrap.dedent("\n".join(block)), "<doc>", "exec"), namespace)  # noqa: S102
    namespace["test_keep_all"]()


@pytest.mark.parametrize("mode", ["full", "mesh", "chain"])
@given(data=st.data())
def test_candidate_masks_are_accepted_for_their_mode(mode, data):
    n, mask = data.draw(gt.candidate_masks(4, mode))
    assert mask.shape == (n, n) and 1 <= n <= 4 and not bool(mask.diagonal().any())
    config = gcache.TopologyConfig(num_agents=n, mode=mode)
    logits = data.draw(gt.policy_outputs(config, dtype=torch.float64))
    assert logits.edge.dtype == torch.float64
    topology = gcache.sample_topology(logits, mask, config, torch.Generator().manual_seed(0))
    assert bool((topology.spatial <= mask).all()) and bool(torch.isfinite(topology.log_prob))


@pytest.mark.parametrize("name", gt.__all__)
def test_every_testing_name_is_documented(name):
    obj = getattr(gt, name)
    if isinstance(obj, tuple):  # a constant has no docstring of its own: the module's names it
        assert f"``{name}``" in gt.__doc__, name
        return
    doc = obj.__doc__ or ""
    assert doc.strip() and not doc.startswith(f"{name}("), name
