"""REINFORCE losses and baselines, as pure functions of explicit inputs.

For sampled actions a_b with log-probabilities log_probs [B] and rewards [B],
the score-function estimator of grad E[R] is mean_b (R_b - baseline_b) grad log p(a_b).
``reinforce_loss`` is a scalar whose gradient is minus that estimate. With a
baseline, below-average (wrong) answers push their graphs' probability down
instead of giving no gradient (G-Designer has no baseline). A baseline that does
not depend on the sample it corrects keeps the estimator unbiased:

- ``batch_baseline``: for each sample, the mean reward of the *other* samples of
  the batch (leave-one-out); zero for a batch of one.
- ``RunningBaseline``: an exponential moving average of past batches' mean
  reward, bias-corrected; read it with ``baseline_value`` *before* folding the
  current batch in with ``update_baseline``.

An optional cost per edge turns task reward into ``reward - edge_cost * num_edges``
(``penalize_edges``), so sparser graphs win ties.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class RunningBaseline(NamedTuple):
    """EMA of mean rewards: biased average [] float and number of batches folded in [] long."""

    average: Tensor  # [] float
    count: Tensor  # [] long
    decay: Tensor  # [] float, in [0, 1)


def _check_rewards(rewards: Tensor, name: str = "rewards") -> Tensor:
    if not isinstance(rewards, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1 or rewards.shape[0] < 1:
        raise ValueError(f"{name}: expected shape [B] with B >= 1, got {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {rewards.dtype}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or inf")
    return rewards


def init_baseline(decay: float = 0.9) -> RunningBaseline:
    """A running baseline with no batch seen yet (its value is 0). Raises ValueError unless 0 <= decay < 1."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ValueError(f"decay: expected a number in [0, 1), got {decay!r}")
    return RunningBaseline(torch.zeros(()), torch.zeros((), dtype=torch.long), torch.tensor(float(decay)))


def update_baseline(state: RunningBaseline, rewards: Tensor) -> RunningBaseline:
    """Fold a batch's mean reward [B] -> [] into the moving average; returns a new state."""
    _check_rewards(rewards)
    mean = rewards.detach().mean().to(state.average)
    average = state.decay * state.average + (1 - state.decay) * mean
    return RunningBaseline(average, state.count + 1, state.decay)


def baseline_value(state: RunningBaseline) -> Tensor:
    """The bias-corrected moving average [] (0 before any batch)."""
    if int(state.count) == 0:
        return torch.zeros_like(state.average)
    return state.average / (1 - state.decay ** state.count.to(state.average))


def batch_baseline(rewards: Tensor) -> Tensor:
    """Leave-one-out mean [B]: for each sample, the mean reward of the others (0 when B == 1)."""
    _check_rewards(rewards)
    r = rewards.detach()
    b = r.shape[0]
    if b == 1:
        return torch.zeros_like(r)
    return (r.sum() - r) / (b - 1)


def penalize_edges(rewards: Tensor, num_edges: Tensor, edge_cost: float) -> Tensor:
    """rewards [B] - edge_cost * num_edges [B]. Raises ValueError on mismatched shapes or a negative cost."""
    _check_rewards(rewards)
    if num_edges.shape != rewards.shape:
        raise ValueError(f"num_edges: expected shape {tuple(rewards.shape)} (the rewards'), got {tuple(num_edges.shape)}")
    if isinstance(edge_cost, bool) or not isinstance(edge_cost, (int, float)) or not edge_cost >= 0:
        raise ValueError(f"edge_cost: expected a number >= 0, got {edge_cost!r}")
    return rewards - edge_cost * num_edges.to(rewards.dtype)


def reinforce_loss(log_probs: Tensor, rewards: Tensor, baseline: Tensor | float = 0.0) -> Tensor:
    """Scalar -mean((rewards - baseline) * log_probs); rewards and baseline carry no gradient.

    log_probs: [B] with grad. rewards: [B]. baseline: a scalar or [B].
    Raises ValueError on mismatched shapes or non-finite values.
    """
    _check_rewards(rewards)
    if not isinstance(log_probs, Tensor) or log_probs.shape != rewards.shape:
        shape = tuple(log_probs.shape) if isinstance(log_probs, Tensor) else type(log_probs).__name__
        raise ValueError(f"log_probs: expected shape {tuple(rewards.shape)} (the rewards'), got {shape}")
    if not bool(torch.isfinite(log_probs).all()):
        raise ValueError("log_probs: expected finite values (a sample outside the policy's support?)")
    baseline = torch.as_tensor(baseline, dtype=rewards.dtype, device=rewards.device).detach()
    if baseline.dim() > 1 or (baseline.dim() == 1 and baseline.shape != rewards.shape):
        raise ValueError(f"baseline: expected a scalar or shape {tuple(rewards.shape)}, got {tuple(baseline.shape)}")
    advantages = (rewards.detach() - baseline).to(log_probs.dtype)
    return -(advantages * log_probs).mean()
