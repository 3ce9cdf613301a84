"""Sampling communication graphs from the policy's logits, with exact log-probabilities.

The action is the triple (order, spatial, temporal), built in one path
(``_build``): the order, then the candidate edges forward in it, then the
spatial edges among them, then the temporal edges.

- order: in mode ``full`` (with ``optimize_spatial``) a Plackett-Luce draw over
  the learned per-node scores (the Gumbel trick); otherwise the identity.
- spatial: every mask edge forward in the order is an independent
  Bernoulli(sigmoid(logits.edge[i, j])); with ``optimize_spatial=False`` every
  candidate is taken with log-probability 0 (for ``full`` that is ``mesh``).
- temporal: every pair (self edges included) an independent
  Bernoulli(sigmoid(logits.temporal[i, j])); all taken with
  ``optimize_temporal=False``; none with ``num_rounds == 1``.
- decision inputs, under wiring ``"learned"`` only (else ``topology.decision_inputs``
  of the spatial graph): one Bernoulli(sigmoid(logits.decision[j])) per agent,
  conditioned on at least one being taken (the decision node needs an input),
  drawn agent by agent: while none is taken, agent j is taken with probability
  p_j / P(any of j..N-1), which is 1 for the last.

``log_prob`` is the exact log-probability of that triple (quadruple under
``"learned"``): log PL(order) plus the edges' Bernoulli log-probabilities, plus
the decision inputs' Bernoulli log-probabilities minus log P(at least one). A DAG's marginal probability would sum this
over its linear extensions; the REINFORCE estimator on the triple is unbiased.
``sample_topology`` draws it; ``deterministic_topology`` takes each choice's
mode (scores sorted, edges with p > 1/2), for evaluation.

Training recipe (REINFORCE, see gcache/core/reinforce.py and gcache/core/optim.py)::

    logits = policy_logits(params, features, role_adjacency)
    topology = sample_topology(logits, mask, config, generator, num_samples=B)
    rewards = run(topology)                                      # [B], no grad
    def loss_fn(p):
        lp = log_prob(policy_logits(p, features, role_adjacency), mask, config, topology)
        return reinforce_loss(lp, rewards, batch_baseline(rewards))
    grads = torch.func.grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = apply_updates(params, updates)
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from gcache.core.checks import check_int
from gcache.core.policy import PolicyLogits
from gcache.core.topology import LogProb, Mask, Topology, TopologyConfig, check_mask, decision_inputs


def _check_logits(logits: PolicyLogits, config: TopologyConfig) -> None:
    n = config.num_agents
    if logits.edge.shape[-2:] != (n, n):
        raise ValueError(f"logits.edge: expected shape [..., N, N] with N = {n}, got {tuple(logits.edge.shape)}")
    if logits.order.shape != logits.edge.shape[:-1]:
        raise ValueError(
            f"logits.order: expected shape {tuple(logits.edge.shape[:-1])}, got {tuple(logits.order.shape)}"
        )
    if logits.temporal.shape != (n, n):
        raise ValueError(f"logits.temporal: expected shape {(n, n)}, got {tuple(logits.temporal.shape)}")
    if config.wiring == "learned":
        if logits.decision is None or logits.decision.shape != logits.edge.shape[:-1]:
            got = None if logits.decision is None else tuple(logits.decision.shape)
            raise ValueError(f"logits.decision: expected shape {tuple(logits.edge.shape[:-1])} under wiring "
                             f"'learned', got {got}")
    for name, value in zip(PolicyLogits._fields, logits):
        if value is None:
            continue
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"logits.{name}: expected finite values, got NaN or inf (check features and params)")


def _positions(order: Tensor) -> Tensor:
    """Inverse permutation [..., N]: position of each node in the order."""
    return torch.argsort(order, dim=-1)


def _identity_order(shape: torch.Size, n: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device).expand(*shape, n).clone()


def _plackett_luce_log_prob(scores: Tensor, order: Tensor) -> Tensor:
    """log P(order) [...] under Plackett-Luce with scores [..., N] (broadcast against order [..., N])."""
    shape = torch.broadcast_shapes(scores.shape, order.shape)
    ranked = torch.gather(scores.expand(shape), -1, order.expand(shape))  # [..., N]
    # log of the sum of the scores still to be placed, from position k on.
    remaining = torch.logcumsumexp(ranked.flip(-1), dim=-1).flip(-1)
    return (ranked - remaining).sum(-1)


def _bernoulli_log_prob(logits: Tensor, taken: Tensor, candidate: Tensor) -> Tensor:
    """Sum over candidate entries of log p (taken) or log(1 - p) (not taken); [..., N, N] -> [...]."""
    per_edge = torch.where(taken, F.logsigmoid(logits), F.logsigmoid(-logits))
    return torch.where(candidate, per_edge, torch.zeros_like(per_edge)).sum((-1, -2))


def _decision_log_prob(logits: Tensor, taken: Tensor) -> Tensor:
    """log P(taken | at least one) [...] of independent Bernoulli(sigmoid(logits)) [..., N]; -inf when none is taken."""
    per_agent = torch.where(taken, F.logsigmoid(logits), F.logsigmoid(-logits)).sum(-1)
    none = F.logsigmoid(-logits).sum(-1)  # log P(no agent taken)
    total = per_agent - torch.log(-torch.expm1(none))
    return torch.where(taken.any(-1), total, torch.full_like(total, -math.inf))


def _conditional_bernoulli(logits: Tensor, u: Tensor) -> Tensor:
    """Draw [..., N] bool from independent Bernoulli(sigmoid(logits)) conditioned on at least one
    True, agent by agent from the uniforms u [..., N] (float64; exact, no rejection)."""
    logits = logits.double().expand(u.shape)
    # log P(none of j..N-1 taken), then P(agent j taken | none before it, at least one from j on).
    tail_none = F.logsigmoid(-logits).flip(-1).cumsum(-1).flip(-1)
    first = (F.logsigmoid(logits) - torch.log(-torch.expm1(tail_none))).exp().clamp(max=1.0)
    free = torch.sigmoid(logits)
    taken, seen = [], torch.zeros(u.shape[:-1], dtype=torch.bool, device=u.device)
    for j in range(u.shape[-1]):
        t = u[..., j] < torch.where(seen, free[..., j], first[..., j])
        taken.append(t)
        seen = seen | t
    return torch.stack(taken, -1)


def log_prob(logits: PolicyLogits, mask: Mask, config: TopologyConfig, topology: Topology) -> LogProb:
    """Exact log-probability [...] that ``sample_topology`` draws ``topology``'s (order, spatial, temporal).

    Differentiable w.r.t. the logits; -inf for a graph outside the sampler's support.
    Broadcasts logits [..., N, N] against the topology's batch dims.
    Raises ValueError on a bad mask, shapes or non-finite logits.
    """
    _check_logits(logits, config)
    check_mask(mask, config)
    n = config.num_agents
    spatial, temporal, order = topology.spatial, topology.temporal, topology.order
    if spatial.shape[-2:] != (n, n) or temporal.shape[-2:] != (n, n) or order.shape[-1:] != (n,):
        raise ValueError(
            f"topology: expected spatial/temporal [..., {n}, {n}] and order [..., {n}], got "
            f"{tuple(spatial.shape)}, {tuple(temporal.shape)}, {tuple(order.shape)}"
        )
    mask = mask.to(spatial.device)
    pos = _positions(order)
    forward = pos[..., :, None] < pos[..., None, :]  # [..., N, N]
    candidate = mask & forward
    dtype = logits.edge.dtype
    total = torch.zeros(torch.broadcast_shapes(logits.edge.shape[:-2], spatial.shape[:-2]), dtype=dtype,
                        device=logits.edge.device)
    impossible = (spatial & ~candidate).any((-1, -2))
    identity = torch.arange(n, device=order.device)
    if config.samples_order:
        total = total + _plackett_luce_log_prob(logits.order, order)
    else:
        impossible = impossible | (order != identity).any(-1)
    if config.optimize_spatial:
        total = total + _bernoulli_log_prob(logits.edge, spatial, candidate)
    else:
        impossible = impossible | (spatial != candidate).any((-1, -2))
    if config.num_rounds == 1:
        impossible = impossible | temporal.any((-1, -2))
    elif config.optimize_temporal:
        everywhere = torch.ones_like(temporal)
        total = total + _bernoulli_log_prob(logits.temporal, temporal, everywhere)
    else:
        impossible = impossible | ~temporal.all((-1, -2))
    if config.wiring == "learned":
        total = total + _decision_log_prob(logits.decision, topology.decision_inputs.to(spatial.device))
    return torch.where(impossible, torch.full_like(total, -math.inf), total)


def _build(
    logits: PolicyLogits,
    mask: Mask,
    config: TopologyConfig,
    batch: torch.Size,
    *,
    choose_order: Callable[[Tensor], Tensor],
    take_edges: Callable[[Tensor], Tensor],
    take_temporal: Callable[[Tensor], Tensor],
    take_decision: Callable[[Tensor], Tensor],
) -> Topology:
    """The one construction path: order -> candidates -> spatial -> temporal -> decision inputs,
    then the log-probability.

    The three choices are made by the callables, which see detached logits: ``choose_order``
    maps scores [..., N] to an order [*batch, N], ``take_edges`` edge logits [..., N, N] to
    taken edges (bool, broadcastable to [*batch, N, N]) and ``take_temporal`` temporal logits
    [N, N] to taken edges [*batch, N, N], ``take_decision`` decision logits [..., N] to the
    decision inputs [*batch, N]. Each is called only when the config makes that choice, in this order (so a sampler draws its random numbers in a fixed order).
    """
    n = config.num_agents
    dev = logits.edge.device
    with torch.no_grad():
        order = choose_order(logits.order.detach()) if config.samples_order else _identity_order(batch, n, dev)
        pos = _positions(order)
        candidate = mask.to(dev) & (pos[..., :, None] < pos[..., None, :])
        spatial = candidate & take_edges(logits.edge.detach()) if config.optimize_spatial else candidate
        if config.num_rounds == 1:
            temporal = torch.zeros(*batch, n, n, dtype=torch.bool, device=dev)
        elif config.optimize_temporal:
            temporal = take_temporal(logits.temporal.detach())
        else:
            temporal = torch.ones(*batch, n, n, dtype=torch.bool, device=dev)
        if config.wiring == "learned":
            inputs = take_decision(logits.decision.detach())
        else:
            inputs = decision_inputs(spatial, config.wiring)
    partial = Topology(spatial, temporal, order, inputs, torch.zeros(()))
    return partial._replace(log_prob=log_prob(logits, mask, config, partial))


def sample_topology(
    logits: PolicyLogits,
    mask: Mask,
    config: TopologyConfig,
    generator: torch.Generator,
    num_samples: int | None = None,
) -> Topology:
    """Sample one topology per leading batch entry of the logits (``num_samples``: S of them,
    in a new leading dim [S, ...]), with its exact log-probability (with grad).

    The order (mode full) is Plackett-Luce via the Gumbel trick; each candidate edge forward
    in it is an independent Bernoulli. Randomness comes only from ``generator``, drawn in
    float64 in the order: Gumbel noise [S, ..., N], spatial [S, ..., N, N], temporal [S, ..., N, N],
    decision inputs [S, ..., N] (each only where the config samples it).
    Raises ValueError on a bad mask, shapes, num_samples or non-finite logits.
    """
    _check_logits(logits, config)
    check_mask(mask, config)
    if num_samples is not None:
        check_int(num_samples, "num_samples")
    n = config.num_agents
    lead = () if num_samples is None else (num_samples,)
    batch = torch.Size(lead) + logits.edge.shape[:-2]
    dev = logits.edge.device

    def uniform(*shape: int) -> Tensor:
        u = torch.rand(*shape, generator=generator, device=generator.device, dtype=torch.float64)
        return u.to(dev)

    def gumbel_order(scores: Tensor) -> Tensor:
        gumbel = -torch.log(-torch.log(uniform(*batch, n).clamp_min(1e-300)))
        return torch.argsort(scores.double() + gumbel, dim=-1, descending=True)

    def bernoulli(edge_logits: Tensor) -> Tensor:
        return uniform(*batch, n, n) < torch.sigmoid(edge_logits.double())

    def decision(decision_logits: Tensor) -> Tensor:
        return _conditional_bernoulli(decision_logits, uniform(*batch, n))

    return _build(logits, mask, config, batch, choose_order=gumbel_order, take_edges=bernoulli,
                  take_temporal=bernoulli, take_decision=decision)


def deterministic_topology(logits: PolicyLogits, mask: Mask, config: TopologyConfig) -> Topology:
    """The evaluation graph: the most likely order (scores sorted, ties by index), then every
    candidate edge with p > 1/2 (temporal and decision inputs likewise; with no decision input
    above 1/2, the most likely one), with that outcome's log-probability.
    Raises ValueError on a bad mask, shapes or non-finite logits."""
    _check_logits(logits, config)
    check_mask(mask, config)
    n = config.num_agents
    batch = logits.edge.shape[:-2]

    def sorted_order(scores: Tensor) -> Tensor:
        return torch.argsort(scores, dim=-1, descending=True, stable=True)

    def likely_temporal(temporal_logits: Tensor) -> Tensor:
        return (temporal_logits > 0).expand(*batch, n, n).clone()

    def likely_inputs(decision_logits: Tensor) -> Tensor:
        best = F.one_hot(decision_logits.argmax(-1), n).bool()
        taken = decision_logits > 0
        return torch.where(taken.any(-1, keepdim=True), taken, best).expand(*batch, n).clone()

    return _build(logits, mask, config, batch, choose_order=sorted_order, take_edges=lambda edge: edge > 0,
                  take_temporal=likely_temporal, take_decision=likely_inputs)

def fixed_topology(mask: Mask, config: TopologyConfig) -> Topology:
    """The graph of a topology that learns nothing (optimize_spatial and optimize_temporal off):
    every candidate edge forward in the identity order, every temporal pair when rounds > 1,
    log-probability 0. The deterministic graph of any policy under such a config.
    Raises ValueError when the config learns edges (sample from a policy instead) or on a bad mask."""
    if config.optimize_spatial or config.optimize_temporal:
        raise ValueError("config: a fixed topology learns no edges; expected optimize_spatial and optimize_temporal off")
    if config.wiring == "learned":
        raise ValueError("config: a fixed topology has no policy to choose its decision inputs; expected wiring all or sinks")
    n = config.num_agents
    device = mask.device
    uniform = PolicyLogits(torch.zeros(n, n, device=device), torch.zeros(n, device=device), torch.zeros(n, n, device=device))
    return deterministic_topology(uniform, mask, config)

