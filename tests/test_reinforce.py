"""REINFORCE losses and baselines: the estimator's gradient against the exact one, baselines, bad input."""

from __future__ import annotations

import statistics

import pytest
import torch

from gcache.core import policy as pl
from gcache.core import reinforce
from gcache.core import sampling as sm

from _topology_helpers import (
    enumerate_topologies,
    make_task,
    sample_rewards,
    synthetic_right,
    task_features,
    train,
)


def test_loss_gradient_is_the_score_function_estimate():
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    rewards = torch.tensor([1.0, 0.0, 0.5])
    baseline = torch.tensor(0.25)
    reinforce.reinforce_loss(logp, rewards, baseline).backward()
    torch.testing.assert_close(logp.grad, -(rewards - baseline) / 3)


def test_wrong_answers_move_the_policy_only_with_a_baseline():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    rewards = torch.tensor([1.0, 0.0])
    reinforce.reinforce_loss(logp, rewards, 0.0).backward()
    assert logp.grad[1] == 0
    logp.grad = None
    reinforce.reinforce_loss(logp, rewards, reinforce.batch_baseline(rewards)).backward()
    assert logp.grad[1] > 0  # a wrong answer's graph becomes less likely


def test_batch_baseline_is_leave_one_out():
    rewards = torch.tensor([1.0, 2.0, 6.0])
    torch.testing.assert_close(reinforce.batch_baseline(rewards), torch.tensor([4.0, 3.5, 1.5]))
    assert torch.equal(reinforce.batch_baseline(torch.tensor([3.0])), torch.zeros(1))


def test_running_baseline_is_a_bias_corrected_average():
    state = reinforce.init_baseline(decay=0.5)
    assert reinforce.baseline_value(state) == 0
    state = reinforce.update_baseline(state, torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(reinforce.baseline_value(state), torch.tensor(3.0))
    before = state
    state = reinforce.update_baseline(state, torch.tensor([5.0]))
    # biased EMA: 0.5*1.5 + 0.5*5 = 3.25, corrected by 1 - 0.25.
    torch.testing.assert_close(reinforce.baseline_value(state), torch.tensor(3.25 / 0.75))
    assert int(before.count) == 1 and int(state.count) == 2


def test_penalize_edges():
    out = reinforce.penalize_edges(torch.tensor([1.0, 1.0]), torch.tensor([0, 4]), 0.05)
    torch.testing.assert_close(out, torch.tensor([1.0, 0.8]))


def estimator_agreement(seed: int) -> dict[str, float]:
    """The mean of 160 REINFORCE estimates (64 graphs each, leave-one-out baseline) against the
    exact gradient of the expected reward (every graph enumerated), on the synthetic task of
    ``seed`` (3 agents, mode full): their cosine and the ratio of their norms."""
    task = make_task(seed, num_agents=3, mode="full", embed_dim=8)
    features = task_features(task)[0]
    g = torch.Generator().manual_seed(seed)
    params = pl.init_policy(task.config, features.shape[-1], g)._replace(log_scale=torch.tensor(1.0))
    support = enumerate_topologies(task.mask, task.config)
    right = synthetic_right(support).double()
    leaves = pl.PolicyParams(*(p.detach().double().requires_grad_() for p in params))
    lp = sm.log_prob(pl.policy_logits(leaves, features.double(), task.role_adjacency), task.mask, task.config,
                     support)
    grads = torch.autograd.grad((lp.exp() * right).sum(), leaves, materialize_grads=True)
    exact = torch.cat([grad.flatten() for grad in grads])

    estimates = []
    for _ in range(160):
        topo, rewards = sample_rewards(params, task, features, 64, noise=0.0, generator=g)
        leaves = pl.PolicyParams(*(p.detach().double().requires_grad_() for p in params))
        lp = sm.log_prob(pl.policy_logits(leaves, features.double(), task.role_adjacency), task.mask,
                         task.config, topo)
        loss = reinforce.reinforce_loss(lp, rewards.double(), reinforce.batch_baseline(rewards.double()))
        grads = torch.autograd.grad(loss, leaves, materialize_grads=True)
        estimates.append(-torch.cat([grad.flatten() for grad in grads]))
    mean = torch.stack(estimates).mean(0)
    cosine = torch.nn.functional.cosine_similarity(mean, exact, dim=0)
    return {"cosine": float(cosine), "norm_ratio": float(mean.norm() / exact.norm())}


def test_estimator_is_unbiased_against_the_exact_gradient():
    """Mean of many REINFORCE estimates (with the leave-one-out baseline) equals the exact
    gradient of the expected reward, computed by enumerating every graph.

    Seed study (study reinforce_estimator, seeds 100-119): with 160 estimates the cosine held for
    20/20 seeds, lowest 0.9986 against 0.95, and the norm ratio for 20/20, farthest from 1 by
    0.089 against 0.15. With the 40 estimates this test used before, both held 20/20 but the
    ratio came within 0.004 of its bound (1.146 at seed 115), so the mean is now over four times
    as many."""
    got = estimator_agreement(0)
    assert got["cosine"] > 0.95
    assert got["norm_ratio"] == pytest.approx(1.0, abs=0.15)


def baseline_learning(seed: int, baseline: str) -> float:
    """The rise of the exact expected reward over 30 REINFORCE steps (batches of 16, the product's
    lr 0.1) on the synthetic task of ``seed`` in mode mesh, under ``baseline``."""
    result = train(seed, make_task(seed, mode="mesh"), steps=30, batch_size=16, lr=0.1, baseline=baseline)
    return result.expected_rewards[-1] - result.expected_rewards[0]


def test_training_improves_with_a_running_baseline():
    """Seed study (study reinforce_baselines, seeds 100-119): the rise held for 20/20 seeds,
    smallest 0.439 against 0.3 (40/40 over seeds 100-139)."""
    assert baseline_learning(0, "running") > 0.3


def test_training_improves_without_a_baseline_on_most_seeds():
    """Without a baseline every sampled graph is pushed up, and some seeds lock into wrong ones:
    the rise exceeded 0.3 for 19/20 seeds 100-119 (seed 113: -0.327; 38/40 over 100-139, and 37/40
    at 60 steps, so more steps do not help). The median over three consecutive seeds exceeded 0.3
    for 20/20 windows starting at 100-119, smallest 0.498 (seeds 113-115); that is asserted, on
    seeds 0-2."""
    assert statistics.median(baseline_learning(seed, "none") for seed in (0, 1, 2)) > 0.3


def test_bad_input():
    with pytest.raises(ValueError, match="log_probs"):
        reinforce.reinforce_loss(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="rewards"):
        reinforce.reinforce_loss(torch.zeros(2), torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="log_probs"):
        reinforce.reinforce_loss(torch.tensor([0.0, -float("inf")]), torch.zeros(2))
    with pytest.raises(ValueError, match="baseline"):
        reinforce.reinforce_loss(torch.zeros(2), torch.zeros(2), torch.zeros(3))
    with pytest.raises(TypeError, match="rewards"):
        reinforce.batch_baseline(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="rewards"):
        reinforce.update_baseline(reinforce.init_baseline(), torch.zeros(0))
    with pytest.raises(ValueError, match="decay"):
        reinforce.init_baseline(1.0)
    with pytest.raises(ValueError, match="edge_cost"):
        reinforce.penalize_edges(torch.zeros(2), torch.zeros(2), -1.0)
    with pytest.raises(ValueError, match="num_edges"):
        reinforce.penalize_edges(torch.zeros(2), torch.zeros(3), 0.1)
