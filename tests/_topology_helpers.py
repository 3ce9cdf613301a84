"""Brute-force enumeration of the topology sampler's support, and a synthetic task with no LLM.

Shared by tests/test_topology.py, tests/test_reinforce.py and benchmarks/topology_learning.py
(which puts this folder on sys.path). Needs only torch and gcache.

The synthetic task ("whom to listen to"). Agent 0 is adversarial (believes -1),
agent 1 is informed (believes +1), the others are neutral. Beliefs flow along the
sampled spatial graph: a neutral agent takes the sign of the sum of its direct
predecessors' beliefs (0 with none, or a tie). The decision node takes the sign
of the sum of its inputs' beliefs; the answer is right when it is positive.
With wiring "all" this means the informed agent must feed the neutral
agents and the adversarial one must not outvote it: the graph, not mere
reachability, decides (under the documented invariant every agent reaches the
decision node, so "the adversary does not reach it" could never hold).
Observed reward = right (0/1) + Gaussian noise of std ``noise``; the expected
reward is the exact probability of a right answer under the policy.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
from torch import Tensor

from gcache.core import optim, reinforce
from gcache.core import policy as pl
from gcache.core import sampling as sm
from gcache.core import topology as tp

ADVERSARY = 0
INFORMED = 1


# ---------------------------------------------------------------------------- enumeration


def enumerate_topologies(mask: Tensor, config: tp.TopologyConfig) -> tp.Topology:
    """Every (order, spatial, temporal[, decision inputs]) the sampler can draw, stacked on a
    leading dim [K, ...] (under wiring "learned", every non-empty set of decision inputs).

    log_prob is a placeholder (zeros): compute it with sm.log_prob.
    """
    n = config.num_agents
    orders = list(itertools.permutations(range(n))) if config.samples_order else [tuple(range(n))]
    spatial_list, order_list = [], []
    for order in orders:
        pos = torch.empty(n, dtype=torch.long)
        pos[list(order)] = torch.arange(n)
        candidate = mask & (pos[:, None] < pos[None, :])
        if not config.optimize_spatial:
            spatial_list.append(candidate)
            order_list.append(torch.tensor(order))
            continue
        cells = torch.nonzero(candidate).tolist()
        for bits in range(2 ** len(cells)):
            spatial = torch.zeros(n, n, dtype=torch.bool)
            for k, (i, j) in enumerate(cells):
                if bits >> k & 1:
                    spatial[i, j] = True
            spatial_list.append(spatial)
            order_list.append(torch.tensor(order))
    if config.num_rounds == 1:
        temporals = torch.zeros(1, n, n, dtype=torch.bool)
    elif config.optimize_temporal:
        codes = torch.arange(2 ** (n * n))
        temporals = ((codes[:, None] >> torch.arange(n * n)) & 1).bool().reshape(-1, n, n)
    else:
        temporals = torch.ones(1, n, n, dtype=torch.bool)
    spatial = torch.stack(spatial_list)
    order = torch.stack(order_list)
    k_s, k_t = spatial.shape[0], temporals.shape[0]
    spatial = spatial.repeat_interleave(k_t, 0)
    order = order.repeat_interleave(k_t, 0)
    temporal = temporals.repeat(k_s, 1, 1)
    if config.wiring != "learned":
        inputs = tp.decision_inputs(spatial, config.wiring)
        return tp.Topology(spatial, temporal, order, inputs, torch.zeros(spatial.shape[0]))
    codes = torch.arange(1, 2**n)  # every non-empty subset of the agents
    subsets = ((codes[:, None] >> torch.arange(n)) & 1).bool()
    k, k_d = spatial.shape[0], subsets.shape[0]
    return tp.Topology(
        spatial.repeat_interleave(k_d, 0), temporal.repeat_interleave(k_d, 0), order.repeat_interleave(k_d, 0),
        subsets.repeat(k, 1), torch.zeros(k * k_d),
    )  # fmt: skip


def reference_log_prob(logits: pl.PolicyLogits, mask: Tensor, config: tp.TopologyConfig, topology: tp.Topology) -> float:
    """The exact log-probability of one outcome, by plain float64 arithmetic (products of p and 1-p,
    Plackett-Luce as a product of softmax choices), independent of sm.log_prob's code path."""
    n = config.num_agents
    order = topology.order.tolist()
    prob = 1.0
    if config.samples_order:
        weights = [math.exp(float(s)) for s in logits.order.double()]
        left = list(range(n))
        for node in order:
            prob *= weights[node] / sum(weights[i] for i in left)
            left.remove(node)
    elif order != list(range(n)):
        return -math.inf
    pos = {node: k for k, node in enumerate(order)}
    for i in range(n):
        for j in range(n):
            candidate = bool(mask[i, j]) and pos[i] < pos[j]
            taken = bool(topology.spatial[i, j])
            if taken and not candidate:
                return -math.inf
            if candidate and config.optimize_spatial:
                p = 1.0 / (1.0 + math.exp(-float(logits.edge[i, j])))
                prob *= p if taken else 1.0 - p
            elif candidate and not taken:
                return -math.inf
    for i in range(n):
        for j in range(n):
            taken = bool(topology.temporal[i, j])
            if config.num_rounds == 1:
                if taken:
                    return -math.inf
            elif config.optimize_temporal:
                p = 1.0 / (1.0 + math.exp(-float(logits.temporal[i, j])))
                prob *= p if taken else 1.0 - p
            elif not taken:
                return -math.inf
    if config.wiring == "learned":
        p = [1.0 / (1.0 + math.exp(-float(x))) for x in logits.decision]
        chosen = topology.decision_inputs.tolist()
        if not any(chosen):
            return -math.inf
        none = math.prod(1.0 - q for q in p)
        prob *= math.prod(q if c else 1.0 - q for q, c in zip(p, chosen)) / (1.0 - none)
    return math.log(prob) if prob > 0 else -math.inf


def outcome_keys(topology: tp.Topology) -> list[tuple]:
    """A hashable key per outcome of a batched topology [K, ...] (order, spatial, temporal, decision inputs)."""
    k = topology.spatial.shape[0]
    flat = torch.cat(
        [topology.order.reshape(k, -1), topology.spatial.reshape(k, -1).long(), topology.temporal.reshape(k, -1).long(),
         topology.decision_inputs.reshape(k, -1).long()],
        dim=1,
    )
    return [tuple(row) for row in flat.tolist()]


def chi_square_p_value(observed: list[int], expected: list[float]) -> float:
    """Pearson chi-square goodness of fit; cells with expected count < 5 are pooled into one.

    Uses scipy when installed, else the regularized upper incomplete gamma of torch.special.
    """
    big = [(o, e) for o, e in zip(observed, expected) if e >= 5]
    small_o = sum(o for o, e in zip(observed, expected) if e < 5)
    small_e = sum(e for e in expected if e < 5)
    if small_e > 0:
        big.append((small_o, small_e))
    stat = sum((o - e) ** 2 / e for o, e in big)
    dof = len(big) - 1
    if dof < 1:
        return 1.0
    try:
        from scipy.stats import chi2
    except ImportError:
        return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                             torch.tensor(stat / 2, dtype=torch.float64)))
    return float(chi2.sf(stat, dof))


# ---------------------------------------------------------------------------- synthetic task


def synthetic_right(topology: tp.Topology) -> Tensor:
    """[...] bool: whether the decision node's vote is positive (see the module docstring)."""
    spatial = topology.spatial.float()  # [..., N, N]
    n = spatial.shape[-1]
    fixed = torch.zeros(n)
    fixed[ADVERSARY] = -1.0
    if n > INFORMED:
        fixed[INFORMED] = 1.0
    is_fixed = fixed != 0
    beliefs = torch.zeros(spatial.shape[:-1])
    # A DAG of N nodes has paths of at most N - 1 edges: N sweeps settle every belief.
    for _ in range(n):
        incoming = torch.einsum("...ij,...i->...j", spatial, beliefs)
        beliefs = torch.where(is_fixed, fixed, torch.sign(incoming))
    vote = (beliefs * topology.decision_inputs.float()).sum(-1)
    return vote > 0


class SyntheticTask(NamedTuple):
    """Fixed role features [N, D], a pool of question embeddings [Q, D], the prior and mask."""

    roles: Tensor  # [N, D]
    questions: Tensor  # [Q, D]
    role_adjacency: Tensor  # [N, N] bool
    mask: Tensor  # [N, N] bool
    config: tp.TopologyConfig


def make_task(seed: int, *, num_agents: int = 4, mode: str = "full", embed_dim: int = 384,
              num_questions: int = 8, wiring: str = "all") -> SyntheticTask:
    """Random unit-norm role and question embeddings (stand-ins for MiniLM's), a complete role prior."""
    g = torch.Generator().manual_seed(seed)
    roles = torch.nn.functional.normalize(torch.randn(num_agents, embed_dim, generator=g), dim=-1)
    questions = torch.nn.functional.normalize(torch.randn(num_questions, embed_dim, generator=g), dim=-1)
    config = tp.TopologyConfig(num_agents=num_agents, mode=mode, wiring=wiring)
    mask = tp.spatial_mask(mode, num_agents, g)
    prior = ~torch.eye(num_agents, dtype=torch.bool)
    return SyntheticTask(roles, questions, prior, mask, config)


def task_features(task: SyntheticTask) -> Tensor:
    """[Q, N, 2D] node features of every question of the pool."""
    return pl.node_features(task.roles, task.questions)


def expected_reward(params: pl.PolicyParams, task: SyntheticTask) -> float:
    """Exact probability of a right answer, averaged over the question pool (by enumeration)."""
    support = enumerate_topologies(task.mask, task.config)
    right = synthetic_right(support).double()
    with torch.no_grad():
        logits = pl.policy_logits(params, task_features(task), task.role_adjacency)  # [Q, N, N]
        batched = support._replace(
            spatial=support.spatial[:, None], temporal=support.temporal[:, None], order=support.order[:, None]
        )
        probs = sm.log_prob(logits, task.mask, task.config, batched).double().exp()  # [K, Q]
    return float((probs * right[:, None]).sum(0).mean())


class TrainResult(NamedTuple):
    params: pl.PolicyParams
    expected_rewards: list[float]  # at step 0, every `eval_every` steps, and at the end


def policy_gradient(params: pl.PolicyParams, task: SyntheticTask, features: Tensor, topology: tp.Topology,
                    rewards: Tensor, baseline: Tensor | float) -> pl.PolicyParams:
    """The REINFORCE gradient (a PolicyParams of grads) for one question's sampled batch."""

    def loss_fn(p: pl.PolicyParams) -> Tensor:
        lp = sm.log_prob(pl.policy_logits(p, features, task.role_adjacency), task.mask, task.config, topology)
        return reinforce.reinforce_loss(lp, rewards, baseline)

    return torch.func.grad(loss_fn)(params)


def sample_rewards(params: pl.PolicyParams, task: SyntheticTask, features: Tensor, batch_size: int,
                   noise: float, generator: torch.Generator) -> tuple[tp.Topology, Tensor]:
    """Sample batch_size graphs for one question; observed rewards [B] = right + noise."""
    with torch.no_grad():
        logits = pl.policy_logits(params, features, task.role_adjacency)
    topology = sm.sample_topology(logits, task.mask, task.config, generator, num_samples=batch_size)
    right = synthetic_right(topology).float()
    rewards = right + noise * torch.randn(batch_size, generator=generator)
    return topology._replace(log_prob=topology.log_prob.detach()), rewards


def train(seed: int, task: SyntheticTask, *, steps: int, batch_size: int = 16, lr: float = 0.1,
          baseline: str = "batch", noise: float = 0.1, eval_every: int = 0) -> TrainResult:
    """REINFORCE + Adam on the synthetic task. baseline: "batch" (leave-one-out), "running" or "none"."""
    g = torch.Generator().manual_seed(seed)
    features = task_features(task)
    params = pl.init_policy(task.config, features.shape[-1], g)
    opt = optim.adam(lr)
    opt_state = opt.init(params)
    running = reinforce.init_baseline()
    history = [expected_reward(params, task)]
    for step in range(steps):
        q = int(torch.randint(features.shape[0], (1,), generator=g))
        topology, rewards = sample_rewards(params, task, features[q], batch_size, noise, g)
        if baseline == "batch":
            b: Tensor | float = reinforce.batch_baseline(rewards)
        elif baseline == "running":
            b = reinforce.baseline_value(running)
            running = reinforce.update_baseline(running, rewards)
        elif baseline == "none":
            b = 0.0
        else:
            raise ValueError(f"baseline: expected 'batch', 'running' or 'none', got {baseline!r}")
        grads = policy_gradient(params, task, features[q], topology, rewards, b)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optim.apply_updates(params, updates)
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            history.append(expected_reward(params, task))
    history.append(expected_reward(params, task))
    return TrainResult(params, history)
