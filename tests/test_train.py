"""The core's pure training step (gcache.core.train) against an independent reference: the same
loss written out by hand and minimised by torch.optim.Adam."""

from __future__ import annotations

import math

import pytest
import torch

from gcache.core.fusion import FuserConfig, fuse, init_fuser
from gcache.core.latent import rollout, sequence_logprob
from gcache.core.objectives import answer_batch
from gcache.core.optim import adam, tree_leaves
from gcache.core.policy import init_policy, policy_logits
from gcache.core.reinforce import baseline_value, init_baseline, update_baseline
from gcache.core.sampling import log_prob, sample_topology
from gcache.core.topology import TopologyConfig, spatial_mask
from gcache.core.train import (
    FuserBatch,
    FuserExample,
    MeasuredRewards,
    PolicyBatch,
    Shard,
    TrainState,
    fuser_losses,
    train_step,
)
from gcache.io.models.local import tiny_model

N, F, LR = 3, 12, 0.05


@pytest.fixture(scope="module")
def lm():
    return tiny_model("llama", seed=1)


def _batch(lm, seed: int = 0):
    """Three questions: sampled graphs with their features, and two input caches per decision node."""
    g = torch.Generator().manual_seed(seed)
    config = TopologyConfig(N, mode="full", optimize_temporal=False)
    mask = spatial_mask("full", N)
    params = {"policy": init_policy(config, F, g), "fuser": init_fuser(FuserConfig(lm.fns.num_layers, N))}
    params["fuser"] = params["fuser"]._replace(source_logits=torch.randn(N, generator=g))
    adjacency = torch.ones(N, N)
    features = tuple(torch.randn(N, F, generator=g) for _ in range(3))
    sampled = (sample_topology(policy_logits(params["policy"], f, adjacency), mask, config, g) for f in features)
    topologies = tuple(type(t)(*(x.detach() for x in t)) for t in sampled)
    policy = PolicyBatch(features, topologies, adjacency, mask, config)
    examples = []
    for q in range(3):
        ids = torch.randint(5, 4000, (2, 6), generator=g)
        caches = rollout(lm.fns, lm.realign, ids, torch.ones(2, 6, dtype=torch.bool), latent_steps=2).cache
        parts = tuple(type(caches)(caches.keys[:, i : i + 1], caches.values[:, i : i + 1], caches.mask[i : i + 1],
                                   caches.next_pos[i : i + 1]) for i in range(2))  # fmt: skip
        prompt = torch.randint(5, 4000, (5,), generator=g).tolist()
        answer = torch.randint(5, 4000, (4,), generator=g).tolist()
        batch = answer_batch([prompt], [answer], pad_token_id=0)
        examples.append(FuserExample(parts, torch.tensor([0.7, 0.3]), torch.tensor([q % N, (q + 1) % N]), batch))
    fuser = FuserBatch(lm.fns, "learned", tuple(examples))
    return params, policy, fuser


def _reference_step(lm, params, policy, fuser, rewards, baseline):
    """The same objective written out directly, one step of torch.optim.Adam."""
    leaves = {k: [t.detach().clone().requires_grad_(True) for t in v] for k, v in params.items()}
    pol = type(params["policy"])(*leaves["policy"])
    fus = type(params["fuser"])(*leaves["fuser"])
    log_probs = torch.stack([
        log_prob(policy_logits(pol, f, policy.role_adjacency), policy.mask, policy.config, t)
        for f, t in zip(policy.features, policy.topologies)
    ])  # fmt: skip
    policy_loss = -((rewards - baseline) * log_probs).mean()
    nlls = []
    for e in fuser.examples if fuser is not None else ():
        fused = fuse(fus, list(e.caches), e.edge_weights, mode="learned", sources=e.sources.tolist())
        lp = sequence_logprob(lm.fns, fused, e.answer.input_ids, e.answer.attention_mask, e.answer.target_mask)
        nlls.append(-(lp / e.answer.target_mask.sum(1)).mean())
    loss = policy_loss + (torch.stack(nlls).mean() if nlls else 0.0)
    opt = torch.optim.Adam([t for v in leaves.values() for t in v], lr=LR, eps=1e-8)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return {k: [t.detach() for t in v] for k, v in leaves.items()}


def test_one_step_equals_the_objective_written_out_and_adam(lm):
    params, policy, fuser = _batch(lm)
    rewards = torch.tensor([1.0, 0.0, 0.5])
    optimizer = adam(LR)
    state = TrainState(params, optimizer.init(params), init_baseline())
    new, stats = train_step(state, optimizer, rewards, policy=policy, fuser=fuser)
    # Before any batch the baseline is each sample's leave-one-out mean.
    loo = torch.tensor([0.25, 0.75, 0.5])
    want = _reference_step(lm, params, policy, fuser, rewards, loo)
    for key in ("policy", "fuser"):
        for got, ref, old in zip(new.params[key], want[key], params[key]):
            assert torch.allclose(got, ref, atol=1e-6), key
    moved = [not torch.equal(a, b) for a, b in zip(tree_leaves(new.params), tree_leaves(params))]
    # The policy's decision head reads nothing under a fixed wiring: 3 tensors that must not move.
    assert sum(moved) >= len(moved) - 2 - 3, "nearly every learned tensor moves (temporal logits and order head may not)"
    for name in ("decision_head", "decision_similarity", "decision_bias"):
        assert torch.equal(getattr(new.params["policy"], name), getattr(params["policy"], name)), name
    assert set(stats) == {"policy_loss", "fuser_loss"}
    assert int(new.baseline.count) == 1 and float(new.baseline.average) == pytest.approx(0.1 * 0.5)


def test_second_step_uses_the_running_baseline(lm):
    """After a batch, the step's baseline is the running mean of past rewards, not the batch's own.

    The second batch's rewards [1, 0, 0] are chosen so the two baselines differ for every row
    (running: 2/3 from the first batch [1, 1, 0]; leave-one-out: [0, 0.5, 0.5]), and the step is
    compared with the objective written out by hand under each: it must equal the running one's
    and not the leave-one-out one's (a step that ignored the running baseline fails here)."""
    params, policy, fuser = _batch(lm, seed=3)
    optimizer = adam(LR)
    seen = update_baseline(init_baseline(), torch.tensor([1.0, 1.0, 0.0]))
    rewards = torch.tensor([1.0, 0.0, 0.0])
    new, _ = train_step(TrainState(params, optimizer.init(params), seen), optimizer, rewards, policy=policy)
    running = _reference_step(lm, params, policy, None, rewards, baseline_value(seen))
    leave_one_out = _reference_step(lm, params, policy, None, rewards, torch.tensor([0.0, 0.5, 0.5]))
    assert float(baseline_value(seen)) == pytest.approx(2 / 3)
    for got, ref, other in zip(new.params["policy"], running["policy"], leave_one_out["policy"]):
        assert torch.allclose(got, ref, atol=1e-6)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(running["policy"], leave_one_out["policy"]))
    assert int(new.baseline.count) == 2


def test_inputs_are_untouched_and_the_model_gets_no_gradient(lm):
    params, policy, fuser = _batch(lm, seed=5)
    before = [t.clone() for t in tree_leaves(params)]
    optimizer = adam(LR)
    state = TrainState(params, optimizer.init(params), init_baseline())
    new, _ = train_step(state, optimizer, torch.tensor([1.0, 0.0, 0.0]), policy=policy, fuser=fuser)
    assert all(torch.equal(a, b) for a, b in zip(before, tree_leaves(params)))
    assert all(p.grad is None for p in lm.model.parameters())
    assert all(not t.requires_grad for t in tree_leaves(new.params))


def test_only_the_parts_given_are_trained(lm):
    params, policy, fuser = _batch(lm, seed=7)
    optimizer = adam(LR)
    state = TrainState(params, optimizer.init(params), init_baseline())
    new, stats = train_step(state, optimizer, torch.tensor([1.0, 0.0, 0.0]), fuser=fuser)
    assert set(stats) == {"fuser_loss"}
    assert all(torch.equal(a, b) for a, b in zip(new.params["policy"], params["policy"]))
    with pytest.raises(ValueError, match="policy: expected one graph per reward"):
        train_step(state, optimizer, torch.tensor([1.0, 0.0]), policy=policy)


@pytest.mark.parametrize("kind", ["likelihood", "mixed"])
def test_rewards_read_from_the_fusers_forward_equal_rewards_given_from_a_separate_one(lm, kind):
    """Rows 2 and 0 take their reward from the fuser objective's forward (the mixed reward with
    their verdicts: row 2 right, row 0 wrong); the step equals one given those rewards, computed
    by hand from log-probabilities measured apart, and reports them."""
    params, policy, fuser = _batch(lm, seed=11)
    two = fuser._replace(examples=fuser.examples[:2])  # examples for rows 2 and 0, in that order
    optimizer = adam(LR)
    state = TrainState(params, optimizer.init(params), init_baseline())
    measured = -fuser_losses(params["fuser"], two).detach()  # [2] answer log-probabilities
    by_hand = {  # the kinds' definitions, written out (log-probabilities here are within the clip)
        "likelihood": lambda lp, right: lp,
        "mixed": lambda lp, right: float(right) + math.exp(lp),
    }[kind]
    given = torch.tensor([by_hand(float(measured[1]), False), 0.25, by_hand(float(measured[0]), True)])
    apart, _ = train_step(state, optimizer, given, policy=policy, fuser=two)
    verdicts = (True, False) if kind == "mixed" else None
    ignored = torch.tensor([123.0, 0.25, -77.0])  # the measured rows' values are not read
    measured_rows = MeasuredRewards(torch.tensor([2, 0]), kind, verdicts)
    together, stats = train_step(state, optimizer, ignored, policy=policy, fuser=two, measured=measured_rows)
    for key in ("policy", "fuser"):
        for a, b in zip(together.params[key], apart.params[key]):
            assert torch.allclose(a, b, atol=1e-6), key
    assert torch.allclose(stats["rewards"], given, atol=1e-6)
    assert torch.allclose(stats["answer_logprobs"], measured, atol=1e-6)
    assert torch.allclose(together.baseline.average, apart.baseline.average, atol=1e-7)


def test_measured_rewards_are_refused_where_the_forward_cannot_give_them(lm):
    params, policy, fuser = _batch(lm, seed=13)
    optimizer = adam(LR)
    state = TrainState(params, optimizer.init(params), init_baseline())
    rewards = torch.zeros(3)
    ok = MeasuredRewards(torch.tensor([0, 1, 2]), "likelihood")
    cases = [
        (dict(measured=ok), "measured: expected a learned fuser"),
        (dict(fuser=fuser, measured=ok._replace(rows=torch.tensor([0, 1]))), "one row per fuser example"),
        (dict(fuser=fuser, measured=ok._replace(rows=torch.tensor([0, 0, 1]))), "distinct positions"),
        (dict(fuser=fuser, measured=ok._replace(rows=torch.tensor([0, 1, 3]))), "distinct positions"),
        (dict(fuser=fuser, measured=ok, shard=Shard(torch.tensor([0, 1, 2]), 3, lambda g: g)), "expected no shard"),
        (dict(fuser=fuser, measured=ok._replace(kind="mixed", correct=(True,))), "measured.correct: expected one verdict"),
        (dict(fuser=fuser, measured=ok._replace(kind="mixed")), "correct: the mixed reward needs"),
        (dict(fuser=fuser, measured=ok._replace(kind="nonsense")), "reward: expected one of"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            train_step(state, optimizer, rewards, policy=policy, **kwargs)
