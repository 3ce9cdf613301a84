"""One training step of a method's learned parts, as a pure function (optax style).

The runner answers a batch with no gradient, recording what the update needs (the sampled
graphs with their node features; the decision node's incoming caches and the reference
answer), scores it, and then calls::

    state, stats = train_step(state, optimizer, rewards, policy=PolicyBatch(...), fuser=FuserBatch(...))

The loss is recomputed here from the parameters, so no autograd graph outlives the
inference pass::

    loss = reinforce_loss(log p_params(graph_b), rewards, baseline)       (policy, when learned)
         + mean_b fuser_loss(params.fuser, decision caches_b, reference_b)  (fuser, when learned)

The baseline is the running mean of past batches' rewards, or, before any batch, each
sample's leave-one-out mean of this batch; the batch's rewards are folded in after the step.

One forward for the fuser and the likelihood reward: when the fuser learns the answer line
the likelihood reward measures, its objective's forward computes each judged question's
answer log-probability under the current parameters, the very value the reward is made
of. With ``measured=MeasuredRewards(rows, kind, correct)`` the step makes those rows' rewards
from that forward (``gcache.core.rewards.rewards_of`` of the detached log-probabilities: data,
not a callback) instead of the caller measuring them in a forward of its own; the rewards the
step used, every row's, then come back in its stats, the one place they are computed.

Data parallelism: when several processes answer one batch, each passes the whole batch's
``rewards`` (all-gathered), its own graphs and fuser examples, and a ``Shard`` saying where its
graphs sit in the batch, how many fuser examples the batch holds in all, and how to sum a
gradient tree over the processes (an all-reduce). Each process's loss is then its share of
the one-process loss (sums over its rows divided by the whole batch's counts), so the summed
gradients, and the step, equal one process's on the whole batch.
Parameters live in one tree ``{"policy": PolicyParams, "fuser": FuserParams}`` holding only
the parts a method learns.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from gcache.core.cache import KVCache
from gcache.core.latent import ModelFns
from gcache.core.objectives import AnswerBatch, fuser_loss
from gcache.core.optim import GradientTransformation, apply_updates, tree_map, value_and_grad
from gcache.core.policy import policy_logits
from gcache.core.reinforce import (
    RunningBaseline,
    baseline_value,
    batch_baseline,
    reinforce_loss,
    update_baseline,
)
from gcache.core.rewards import rewards_of
from gcache.core.sampling import log_prob
from gcache.core.topology import Topology, TopologyConfig

Params = dict[str, Any]  # {"policy": PolicyParams, "fuser": FuserParams}, the learned parts only


class TrainState(NamedTuple):
    """Everything a training step reads and returns."""

    params: Params
    opt_state: Any  # the optimizer's state for ``params``
    baseline: RunningBaseline


class PolicyBatch(NamedTuple):
    """The sampled graphs of a batch, with what recomputes their log-probabilities."""

    features: tuple[Tensor, ...]  # per question [N, F] node features
    topologies: tuple[Topology, ...]  # per question, the sampled graph
    role_adjacency: Tensor  # [N, N] the GCN's prior
    mask: Tensor  # [N, N] bool candidate spatial edges
    config: TopologyConfig


class FuserExample(NamedTuple):
    """One question's decision node: the caches it fuses and the reference answer it should make likely."""

    caches: tuple[KVCache, ...]  # the k inputs' caches, [L, 1, H, T_i, D]
    edge_weights: Tensor  # [k]
    sources: Tensor  # [k] long, the inputs' agent ids
    answer: AnswerBatch  # one row: the decision prompt + the reference answer


class FuserBatch(NamedTuple):
    """The fuser objective's inputs for a batch (questions whose judger decided)."""

    fns: ModelFns
    mode: str  # fusion mode
    examples: tuple[FuserExample, ...]


class MeasuredRewards(NamedTuple):
    """Rows whose rewards the fuser objective's forward gives (see the module's docstring)."""

    rows: Tensor  # [E] long, the batch row of each fuser example, in the examples' order
    kind: str  # the reward (gcache.core.rewards.REWARDS) made of each row's answer log-probability
    correct: tuple[bool | None, ...] | None = None  # [E] the rows' verdicts, for the kinds that read them


class Shard(NamedTuple):
    """This process's part of a batch answered by several processes (see the module's docstring)."""

    rows: Tensor  # [b] long, where this process's graphs sit in the batch's rewards [B]
    num_examples: int  # fuser examples of the whole batch, over every process
    reduce: Callable[[Any], Any]  # a gradient tree -> its sum over the processes (same structure)


def policy_log_probs(params: Any, batch: PolicyBatch) -> Tensor:
    """[B] log-probabilities of the batch's graphs under ``params`` (differentiable)."""
    out = []
    for features, topology in zip(batch.features, batch.topologies):
        logits = policy_logits(params, features, batch.role_adjacency)
        out.append(log_prob(logits, batch.mask, batch.config, topology))
    return torch.stack(out)


def fuser_losses(params: Any, batch: FuserBatch) -> Tensor:  # [E]
    """Per example, the reference answer's per-token NLL on the fused cache (minus its answer log-probability)."""
    losses = [
        fuser_loss(params, batch.fns, list(e.caches), e.edge_weights, e.answer, mode=batch.mode, sources=e.sources)
        for e in batch.examples
    ]
    return torch.stack(losses)


def fuser_objective(params: Any, batch: FuserBatch) -> Tensor:
    """Mean over the batch's examples of the reference answer's per-token NLL on the fused cache."""
    return fuser_losses(params, batch).mean()


def train_loss(
    params: Params,
    rewards: Tensor,  # [B]
    baseline: Tensor,  # [] or [B]
    *,
    policy: PolicyBatch | None = None,
    fuser: FuserBatch | None = None,
    shard: Shard | None = None,
    fuser_nll: Tensor | None = None,  # [E] ``fuser_losses(params["fuser"], fuser)``, when already computed
) -> tuple[Tensor, dict[str, float]]:
    """The step's scalar loss and its parts (floats, for logging).

    With a ``shard``, this process's share of the batch's loss: its graphs' REINFORCE terms over
    the batch size B, its fuser examples' NLLs over the batch's number of examples.
    """
    total = torch.zeros(())
    stats: dict[str, float] = {}
    if "policy" in params and policy is not None and (shard is None or shard.rows.numel()):
        if shard is None:
            part = reinforce_loss(policy_log_probs(params["policy"], policy), rewards, baseline)
        else:
            rows = shard.rows
            local = baseline if baseline.dim() == 0 else baseline[rows]
            part = reinforce_loss(policy_log_probs(params["policy"], policy), rewards[rows], local)
            part = part * (rows.numel() / rewards.shape[0])  # mean over b rows -> share of the mean over B
        total, stats["policy_loss"] = total + part, float(part.detach())
    if "fuser" in params and fuser is not None and fuser.examples:
        part = (fuser_losses(params["fuser"], fuser) if fuser_nll is None else fuser_nll).mean()
        if shard is not None:
            part = part * (len(fuser.examples) / shard.num_examples)  # mean over local -> share of the mean over all
        total, stats["fuser_loss"] = total + part, float(part.detach())
    return total, stats


def train_step(
    state: TrainState,
    optimizer: GradientTransformation,
    rewards: Tensor,  # [B] float
    *,
    policy: PolicyBatch | None = None,
    fuser: FuserBatch | None = None,
    shard: Shard | None = None,
    measured: MeasuredRewards | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer step on ``train_loss``; returns the new state and the loss parts (with a
    ``shard``, this process's parts; the gradients are summed over the processes before the update).

    With ``measured``, the rows it names take their rewards from the fuser objective's forward
    (their values in ``rewards`` are ignored), and the stats add ``rewards`` ([B], the rewards
    the step used) and ``answer_logprobs`` ([E], per fuser example).

    Raises ValueError when the policy batch's size differs from the rewards' (or the shard's
    rows), when the shard's rows fall outside the batch or it counts fewer fuser examples than
    this process holds, when ``measured`` comes without a learned fuser, with a shard, or names
    rows that do not match the fuser's examples, and the errors of ``reinforce_loss``, ``fuse``
    and ``answer_nll`` on bad inputs; and when a gradient is not finite (no step is taken).
    """
    expected = rewards.shape[0] if shard is None else shard.rows.numel()
    if policy is not None and len(policy.topologies) != expected:
        raise ValueError(f"policy: expected one graph per reward ({expected}), got {len(policy.topologies)}")
    if shard is not None:
        _check_shard(shard, rewards.shape[0], len(fuser.examples) if fuser is not None else 0)
    if measured is not None:
        _check_measured(measured, state.params, fuser, shard, rewards.shape[0])
    rewards = rewards.to(torch.float32)

    def loss_fn(params: Params) -> tuple[Tensor, tuple[dict[str, Any], Tensor]]:
        nll, used = None, rewards
        if measured is not None and measured.rows.numel():
            nll = fuser_losses(params["fuser"], fuser)  # [E], the forward both parts read
            found = rewards_of(measured.kind, measured.correct, -nll.detach())
            used = rewards.index_copy(0, measured.rows, found)
        baseline = baseline_value(state.baseline) if int(state.baseline.count) else batch_baseline(used)
        loss, stats = train_loss(params, used, baseline, policy=policy, fuser=fuser, shard=shard, fuser_nll=nll)
        if nll is not None:
            stats = {**stats, "rewards": used, "answer_logprobs": -nll.detach()}
        return loss, (stats, used)

    loss, (stats, used), grads = value_and_grad(loss_fn, state.params)
    if shard is not None:
        grads = shard.reduce(grads)
    _check_finite(grads, float(loss))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = tree_map(lambda t: t.detach(), apply_updates(state.params, updates))
    return TrainState(params, opt_state, update_baseline(state.baseline, used)), stats


def _check_finite(grads: Params, loss: float) -> None:
    """A non-finite gradient would poison the parameters: refuse the step, naming the part."""
    for part, tree in grads.items():
        for name, g in zip(getattr(tree, "_fields", range(len(tree))), tree):
            if not bool(torch.isfinite(g).all()):
                raise ValueError(f"grads[{part!r}].{name}: expected finite gradients, got non-finite values (loss {loss})")


def _check_measured(measured: MeasuredRewards, params: Params, fuser: FuserBatch | None, shard: Shard | None, batch: int) -> None:
    if "fuser" not in params or fuser is None:
        raise ValueError("measured: expected a learned fuser and its batch (the forward the rewards are read from), got none")
    if shard is not None:
        raise ValueError("measured: expected no shard (the rewards of other processes' rows are not in this forward)")
    rows = measured.rows
    if not isinstance(rows, Tensor) or rows.dim() != 1 or rows.dtype != torch.long:
        raise ValueError(f"measured.rows: expected a [E] long tensor, got {getattr(rows, 'shape', type(rows).__name__)}")
    if rows.numel() != len(fuser.examples):
        raise ValueError(f"measured.rows: expected one row per fuser example ({len(fuser.examples)}), got {rows.numel()}")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= batch or rows.unique().numel() != rows.numel()):
        raise ValueError(f"measured.rows: expected distinct positions in [0, {batch}), got {rows.tolist()}")
    if measured.correct is not None and len(measured.correct) != rows.numel():
        raise ValueError(f"measured.correct: expected one verdict per row ({rows.numel()}), got {len(measured.correct)}")


def _check_shard(shard: Shard, batch: int, examples: int) -> None:
    rows = shard.rows
    if not isinstance(rows, Tensor) or rows.dim() != 1 or rows.dtype != torch.long:
        raise ValueError(f"shard.rows: expected a [b] long tensor, got {getattr(rows, 'shape', type(rows).__name__)}")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= batch):
        raise ValueError(f"shard.rows: expected positions in [0, {batch}), got {rows.tolist()}")
    if shard.num_examples < examples:
        raise ValueError(f"shard.num_examples: expected at least this process's {examples} examples, got {shard.num_examples}")


__all__ = [
    "FuserBatch",
    "FuserExample",
    "PolicyBatch",
    "Shard",
    "MeasuredRewards",
    "TrainState",
    "fuser_losses",
    "fuser_objective",
    "policy_log_probs",
    "train_loss",
    "train_step",
]
