"""The learned communication topology: masks, a GCN policy, DAG sampling with exact log-probabilities.

Graph semantics (one question, N agents, ``num_rounds`` rounds, one decision node)::

    spatial[i, j]   agent i's cache flows into agent j within the same round   [N, N] bool
    temporal[i, j]  agent i's cache of round r flows into agent j at round r+1 [N, N] bool
    order           an execution order of the agents, a topological order of `spatial`  [N] long
    decision_inputs the agents of the last round whose caches the decision node reads  [N] bool

The same spatial and temporal graphs serve every round. The decision node's
inputs are fixed by the rule ``TopologyConfig.decision`` (they carry no
log-probability):

- ``"all"``: every agent of the last round feeds the decision node (as G-Designer).
- ``"sinks"``: only the agents without a spatial successor feed it. Every agent
  still reaches the decision node through the graph (follow successors until a
  sink), so for a runner whose caches accumulate along paths (an agent's cache
  holds its predecessors'), the decision node sees every agent's contribution
  once, without duplicates. ``chain`` then reproduces LatentMAS's sequential pipeline.

Invariant, checked by the tests: the decision node is reachable from every
agent of the last round.

Acyclicity and the meaning of the modes. Every spatial edge is sampled forward
in a node order, so every sampled graph is a DAG by construction and every
candidate edge is an independent Bernoulli whose log-probability is counted:

- ``full``: every ordered pair (i, j), i != j, is a candidate. The node order is
  sampled from a Plackett-Luce distribution over learned per-node scores, and
  then each candidate edge forward in that order is a Bernoulli(p_ij). The
  action is the pair (order, graph), and ``log_prob`` is the exact log-probability
  of that pair: log PL(order) + sum of the edges' Bernoulli log-probabilities.
  (A DAG's marginal probability sums this over its linear extensions; the
  REINFORCE estimator on the pair is unbiased.) Both i -> j and j -> i can be
  learned; which one can occur depends on the sampled order.
- ``mesh``: every forward pair i < j of the fixed order 0..N-1 (a full DAG).
- ``chain``: i -> i+1.  ``star``: agent 0 (the hub) -> every other agent.
- ``layered``: agents split into consecutive layers of ``layer_width`` agents
  (default ceil(sqrt(N))); edges from every agent of layer k to every agent of layer k+1.
- ``random``: each forward pair i < j is a candidate with probability 1/2, drawn
  once from an explicit generator (so a seed fixes the mask).
- ``debate``: no spatial edges; the agents talk only through temporal edges.

In every mode but ``full`` the order is the identity and the mask must be
strictly upper triangular. Temporal candidates are all N x N pairs (self edges
included: an agent may read its own previous round); they are independent
Bernoullis with their own learned logits [N, N]. With ``optimize_spatial=False``
every mask edge forward in the identity order is taken with log-probability 0
(for ``full`` that is the ``mesh`` graph); with ``optimize_temporal=False``
every temporal pair is taken. With ``num_rounds == 1`` there are no temporal edges.

From a ``Topology`` to an execution (one sample, tensors on any device)::

    for r in range(num_rounds):
        for j in topology.order.tolist():                 # topological: predecessors ran first
            inputs  = predecessors(topology.spatial, j)   # this round's caches
            inputs += predecessors(topology.temporal, j) if r > 0 else []  # last round's caches
            run agent j on the fused caches of `inputs`
    decide from the caches of the agents where topology.decision_inputs is True

``with_decision_node(topology)`` gives the (N+1) x (N+1) adjacency with the
decision node as index N; ``topological_order(adjacency)`` orders any DAG.

The policy (G-Designer's, with its traps removed): node features are each
role's profile embedding concatenated with the question's embedding [N, F];
a 2-layer GCN over the symmetrically normalized role-prior adjacency (with
self-loops), plus a linear skip from the raw features (a GCN over a complete
prior alone averages every node to the same vector and could not tell agents
apart), then an MLP, then separate source and target heads: s_ij = <q_i, k_j>
/ head_dim, so i -> j and j -> i differ. Edge logits are
exp(log_scale) * s_ij + bias and probabilities sigmoid(logits): they can reach
0 and 1 (no minmax squashing). Every tensor of ``PolicyParams`` shapes the
distribution and is meant to be optimized (``order_head`` only in ``full`` mode,
``temporal_logits`` only with ``num_rounds > 1``).

Parameterization: one Adam step moves every pre-activation by about lr.
Adam moves every weight entry by about lr per step whatever its gradient's size,
and the step of a weight matrix is aligned with its input (the gradient of
``x @ W`` is ``x`` times something, so Adam's early, sign-like step is
``lr * sign(x)`` along each output). A plain ``x @ W`` therefore moves its
output by ``lr * sum_i |x_i|`` per step: for 768-d features (two unit-norm
MiniLM embeddings) and lr 0.1 that drove the logits to 1e5 within a few steps,
and the policy collapsed onto one graph, with no gradient left to leave it.
The policy is therefore written so that the size of a step in the function does
not depend on the feature width, nor on the scale of the encoder's vectors
(the per-layer multipliers of muP / "abc" parameterizations, for Adam):

- the input of each block is RMS-normalized without parameters (each node's
  vector divided by its root mean square; ``_rms_norm``): the raw features (into
  the GCN and skip), the GCN output (into the MLP), the MLP output (into the
  heads). An embedding of any width or norm enters as a vector of RMS 1, and
  growing weights upstream cannot enlarge the steps downstream. The ReLU layers
  inside a block read the O(1) output of a LeCun-scaled layer.
- every weight matrix is applied as ``x @ W / fan_in`` (``_linear``), stored with
  raw entries of standard deviation sqrt(fan_in), so the effective weight
  ``W / fan_in`` starts at LeCun's variance 1 / fan_in and activations start at
  O(1). Since sum_i |x_i| <= fan_in for an input of RMS 1 (Cauchy-Schwarz), a
  step of lr in every raw entry moves every output by at most lr.
- the score is <q, k> / head_dim, not / sqrt(head_dim): training aligns q and k,
  and aligned vectors' product grows like head_dim (muP's attention scaling).

Through the ~8 layers between the features and a logit these per-layer moves
add up: at lr 0.1, Adam's first step (lr * sign(grad) in every entry at once)
moves an edge logit by about 1 at most, whatever the feature width, and the
REINFORCE steps of the synthetic training (tests/_topology_helpers.py) by
0.1-0.7; the plain parameterization moved them by ~1e5 within a few steps.
Saturating probabilities thus takes several steps of consistent reward signal,
not one noisy batch, and the same lr suits every feature width. Nothing bounds
the logits: log_scale and bias (learned, unclamped) and the weights can take
every probability as close to 0 or 1 as the reward asks (the tests train a
policy beyond G-Designer's [0.27, 0.73]). The price: a smaller lr learns
proportionally slower (the product's lr 0.1, the seed system's, is the intended
one). Temporal logits are free [N, N] parameters: one Adam step already moves
each by about lr.

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
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

Adjacency = Tensor  # [..., N, N] bool; [i, j] is the edge i -> j
Mask = Tensor  # [N, N] bool; candidate spatial edges
LogProb = Tensor  # [...] float

MODES = ("full", "chain", "star", "mesh", "layered", "random", "debate")
DECISION_RULES = ("all", "sinks")


def _check_num_agents(num_agents: object, name: str = "num_agents") -> int:
    if isinstance(num_agents, bool) or not isinstance(num_agents, int) or num_agents < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {num_agents!r}")
    return num_agents


def _check_mode(mode: object) -> str:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    return mode  # type: ignore[return-value]


@dataclass(frozen=True)
class TopologyConfig:
    """Static description of the communication graph and of the policy's sizes.

    num_agents: N >= 1. mode: one of MODES. num_rounds: >= 1 (temporal edges need >= 2).
    optimize_spatial / optimize_temporal: sample those edges (False: take every candidate).
    decision: "all" or "sinks" (see the module docstring).
    hidden_dim: GCN/MLP width. head_dim: width of the source/target heads.
    Raises ValueError on any bad field.
    """

    num_agents: int
    mode: str = "full"
    num_rounds: int = 1
    optimize_spatial: bool = True
    optimize_temporal: bool = True
    decision: str = "all"
    hidden_dim: int = 32
    head_dim: int = 16

    def __post_init__(self) -> None:
        _check_num_agents(self.num_agents)
        _check_mode(self.mode)
        for name in ("num_rounds", "hidden_dim", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if self.decision not in DECISION_RULES:
            raise ValueError(f"decision: expected one of {', '.join(DECISION_RULES)}, got {self.decision!r}")

    @property
    def samples_order(self) -> bool:
        """True when the node order is sampled (mode ``full`` with spatial optimization)."""
        return self.mode == "full" and self.optimize_spatial


class PolicyParams(NamedTuple):
    """Every tensor of the topology policy (F: feature dim, H: hidden_dim, E: head_dim, N: agents).

    Weights are raw: the policy applies each as ``weight / fan_in`` (fan_in: its first dim), see
    "Parameterization" in the module docstring.
    """

    gcn_weight_1: Tensor  # [F, H]
    gcn_bias_1: Tensor  # [H]
    gcn_weight_2: Tensor  # [H, H]
    gcn_bias_2: Tensor  # [H]
    skip_weight: Tensor  # [F, H]
    mlp_weight_1: Tensor  # [H, H]
    mlp_bias_1: Tensor  # [H]
    mlp_weight_2: Tensor  # [H, H]
    mlp_bias_2: Tensor  # [H]
    source_head: Tensor  # [H, E]
    target_head: Tensor  # [H, E]
    order_head: Tensor  # [H]
    log_scale: Tensor  # []
    bias: Tensor  # []
    temporal_logits: Tensor  # [N, N]


class PolicyLogits(NamedTuple):
    """What the policy outputs for one question (or a batch of questions, leading dims ...)."""

    edge: Tensor  # [..., N, N] spatial edge logits; p_ij = sigmoid(edge[i, j])
    order: Tensor  # [..., N] Plackett-Luce scores of the node order (used in mode full)
    temporal: Tensor  # [N, N] temporal edge logits


class Topology(NamedTuple):
    """A sampled (or deterministic) communication graph; leading batch dims ... allowed."""

    spatial: Tensor  # [..., N, N] bool
    temporal: Tensor  # [..., N, N] bool
    order: Tensor  # [..., N] long, a topological order of `spatial`
    decision_inputs: Tensor  # [..., N] bool
    log_prob: Tensor  # [...] float, differentiable w.r.t. the policy params


# ---------------------------------------------------------------------------- masks


def spatial_mask(
    mode: str,
    num_agents: int,
    generator: torch.Generator | None = None,
    *,
    layer_width: int | None = None,
) -> Mask:
    """Candidate spatial edges of a mode, [N, N] bool (see the module docstring).

    ``generator`` is required for mode ``random`` (its device is used); ``layer_width``
    only for ``layered``. Raises ValueError on an unknown mode, N < 1, a missing generator
    or a bad layer_width.
    """
    _check_mode(mode)
    n = _check_num_agents(num_agents)
    idx = torch.arange(n)
    forward = idx[:, None] < idx[None, :]
    if mode == "full":
        return ~torch.eye(n, dtype=torch.bool)
    if mode == "mesh":
        return forward
    if mode == "chain":
        return idx[None, :] == idx[:, None] + 1
    if mode == "star":
        return (idx[:, None] == 0) & (idx[None, :] != 0)
    if mode == "debate":
        return torch.zeros(n, n, dtype=torch.bool)
    if mode == "layered":
        width = math.ceil(math.sqrt(n)) if layer_width is None else layer_width
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"layer_width: expected an integer >= 1, got {layer_width!r}")
        layer = idx // width
        return layer[None, :] == layer[:, None] + 1
    # mode == "random"
    if generator is None:
        raise ValueError("generator: mode 'random' needs an explicit torch.Generator, got None")
    draw = torch.rand(n, n, generator=generator, device=generator.device).cpu() < 0.5
    return forward & draw


def _check_mask(mask: Tensor, config: TopologyConfig, name: str = "mask") -> Tensor:
    n = config.num_agents
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != (n, n):
        raise ValueError(f"{name}: expected shape [N, N] = {(n, n)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype torch.bool, got {mask.dtype}")
    if bool(mask.diagonal().any()):
        raise ValueError(f"{name}: expected no self-loops (a False diagonal)")
    if config.mode != "full" and bool(mask.tril().any()):
        raise ValueError(
            f"{name}: mode {config.mode!r} uses the identity order, so the mask must be strictly "
            "upper triangular (edges i -> j with i < j only)"
        )
    return mask


# ---------------------------------------------------------------------------- graph helpers


def predecessors(adjacency: Adjacency, node: int) -> list[int]:
    """Sources of the edges into ``node`` of one [N, N] adjacency, in index order."""
    return torch.nonzero(adjacency[:, node]).flatten().tolist()


def successors(adjacency: Adjacency, node: int) -> list[int]:
    """Targets of the edges out of ``node`` of one [N, N] adjacency, in index order."""
    return torch.nonzero(adjacency[node, :]).flatten().tolist()


def topological_order(adjacency: Adjacency) -> list[int]:
    """A topological order of one [N, N] adjacency (Kahn; ties by smallest index).

    Raises ValueError if the graph has a cycle.
    """
    if adjacency.dim() != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise ValueError(f"adjacency: expected shape [N, N], got {tuple(adjacency.shape)}")
    adj = adjacency.bool().cpu()
    indegree = adj.sum(0).tolist()
    ready = [j for j in range(adj.shape[0]) if indegree[j] == 0]
    order: list[int] = []
    while ready:
        ready.sort()
        i = ready.pop(0)
        order.append(i)
        for j in torch.nonzero(adj[i]).flatten().tolist():
            indegree[j] -= 1
            if indegree[j] == 0:
                ready.append(j)
    if len(order) != adj.shape[0]:
        raise ValueError("adjacency: expected a DAG, found a cycle")
    return order


def reachability(adjacency: Adjacency) -> Tensor:
    """Transitive closure of [..., N, N]: [i, j] True when a path of >= 1 edge goes from i to j."""
    step = adjacency.bool()
    closure = step.clone()
    for _ in range(max(adjacency.shape[-1] - 1, 0)):
        grown = closure | (closure.float() @ step.float() > 0)
        if torch.equal(grown, closure):
            break
        closure = grown
    return closure


def is_acyclic(adjacency: Adjacency) -> Tensor:
    """[...] bool: True where the graph has no cycle (no node reaches itself)."""
    return ~reachability(adjacency).diagonal(dim1=-2, dim2=-1).any(-1)


def decision_inputs(spatial: Adjacency, decision: str) -> Tensor:
    """[..., N] bool: the agents feeding the decision node under rule ``decision`` ("all"/"sinks").

    Raises ValueError on an unknown rule.
    """
    if decision == "all":
        return torch.ones(spatial.shape[:-1], dtype=torch.bool, device=spatial.device)
    if decision == "sinks":
        return ~spatial.any(-1)
    raise ValueError(f"decision: expected one of {', '.join(DECISION_RULES)}, got {decision!r}")


def with_decision_node(topology: Topology) -> Adjacency:
    """The [N+1, N+1] bool spatial adjacency of one topology, the decision node being index N."""
    spatial = topology.spatial
    n = spatial.shape[-1]
    full = torch.zeros(*spatial.shape[:-2], n + 1, n + 1, dtype=torch.bool, device=spatial.device)
    full[..., :n, :n] = spatial
    full[..., :n, n] = topology.decision_inputs
    return full


def num_edges(topology: Topology) -> Tensor:
    """[...] long: spatial plus temporal edges, the count an edge cost is charged on."""
    return topology.spatial.sum((-1, -2)) + topology.temporal.sum((-1, -2))


# ---------------------------------------------------------------------------- policy


def node_features(role_embeddings: Tensor, query_embedding: Tensor) -> Tensor:
    """Concatenate each role's embedding [N, D] with the question's [D] (or [..., D]) into [..., N, 2D].

    Raises ValueError when the shapes are not [N, D] and [..., D] with the same D.
    """
    if role_embeddings.dim() != 2:
        raise ValueError(f"role_embeddings: expected shape [N, D], got {tuple(role_embeddings.shape)}")
    if query_embedding.shape[-1:] != role_embeddings.shape[-1:]:
        raise ValueError(
            f"query_embedding: expected last dim {role_embeddings.shape[-1]} (the roles'), "
            f"got shape {tuple(query_embedding.shape)}"
        )
    n = role_embeddings.shape[0]
    query = query_embedding.unsqueeze(-2).expand(*query_embedding.shape[:-1], n, query_embedding.shape[-1])
    roles = role_embeddings.expand(*query_embedding.shape[:-1], *role_embeddings.shape)
    return torch.cat([roles, query], dim=-1)


def normalized_adjacency(role_adjacency: Tensor) -> Tensor:
    """D^-1/2 (A + A^T + I) D^-1/2 of a role prior [N, N] (bool or weights), as float [N, N].

    Raises ValueError when the prior is not square.
    """
    if role_adjacency.dim() != 2 or role_adjacency.shape[0] != role_adjacency.shape[1]:
        raise ValueError(f"role_adjacency: expected shape [N, N], got {tuple(role_adjacency.shape)}")
    a = role_adjacency.float()
    # The prior says who is related, not who speaks first, so the GCN smooths over both directions.
    a = ((a + a.T) > 0).float() + torch.eye(a.shape[0], device=a.device)
    inv_sqrt = a.sum(-1).rsqrt()
    return inv_sqrt[:, None] * a * inv_sqrt[None, :]


def _rms_norm(x: Tensor) -> Tensor:
    """x [..., D] divided by its root mean square over D (no parameters): each row has RMS 1 (0 stays 0)."""
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-12)


def _linear(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., fan_in] @ weight [fan_in, out] / fan_in (see "Parameterization" in the module docstring)."""
    return x @ weight / weight.shape[0]


def _raw_weight(fan_in: int, fan_out: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """[fan_in, fan_out] uniform with std sqrt(fan_in): ``weight / fan_in`` has LeCun's variance 1 / fan_in."""
    bound = math.sqrt(3.0 * fan_in)
    u = torch.rand(fan_in, fan_out, generator=generator, device=generator.device, dtype=dtype)
    return (2 * u - 1) * bound


def init_policy(
    config: TopologyConfig,
    feature_dim: int,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float32,
) -> PolicyParams:
    """Fresh policy parameters on the generator's device: raw weights of std sqrt(fan_in)
    (applied as ``weight / fan_in``, see "Parameterization"), zero biases, log_scale 0, bias 0,
    temporal logits 0 (every edge starts near p = 1/2).
    Raises ValueError on a bad feature_dim."""
    if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
        raise ValueError(f"feature_dim: expected an integer >= 1, got {feature_dim!r}")
    h, e, n = config.hidden_dim, config.head_dim, config.num_agents
    dev = generator.device

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(*shape, dtype=dtype, device=dev)

    return PolicyParams(
        gcn_weight_1=_raw_weight(feature_dim, h, generator, dtype),
        gcn_bias_1=zeros(h),
        gcn_weight_2=_raw_weight(h, h, generator, dtype),
        gcn_bias_2=zeros(h),
        skip_weight=_raw_weight(feature_dim, h, generator, dtype),
        mlp_weight_1=_raw_weight(h, h, generator, dtype),
        mlp_bias_1=zeros(h),
        mlp_weight_2=_raw_weight(h, h, generator, dtype),
        mlp_bias_2=zeros(h),
        source_head=_raw_weight(h, e, generator, dtype),
        target_head=_raw_weight(h, e, generator, dtype),
        order_head=_raw_weight(h, 1, generator, dtype).squeeze(-1),
        log_scale=zeros(()),
        bias=zeros(()),
        temporal_logits=zeros(n, n),
    )


def policy_logits(params: PolicyParams, features: Tensor, role_adjacency: Tensor) -> PolicyLogits:
    """Run the policy on node features [..., N, F] over a role prior [N, N].

    Returns edge logits [..., N, N], order scores [..., N] and the temporal logits [N, N].
    Raises ValueError on mismatched shapes.
    """
    n = role_adjacency.shape[-1] if role_adjacency.dim() == 2 else -1
    if features.dim() < 2 or features.shape[-2] != n:
        raise ValueError(
            f"features: expected shape [..., N, F] with N = {n} (role_adjacency's), got {tuple(features.shape)}"
        )
    if features.shape[-1] != params.gcn_weight_1.shape[0]:
        raise ValueError(
            f"features: expected feature dim F = {params.gcn_weight_1.shape[0]} (the policy's), "
            f"got {features.shape[-1]}"
        )
    if params.temporal_logits.shape != (n, n):
        raise ValueError(
            f"params.temporal_logits: expected shape {(n, n)} (role_adjacency's N), "
            f"got {tuple(params.temporal_logits.shape)}"
        )
    a_hat = normalized_adjacency(role_adjacency).to(features.dtype)  # [N, N]
    x = _rms_norm(features)  # [..., N, F]
    h = F.relu(a_hat @ _linear(x, params.gcn_weight_1) + params.gcn_bias_1)  # [..., N, H]
    h = a_hat @ _linear(h, params.gcn_weight_2) + params.gcn_bias_2 + _linear(x, params.skip_weight)
    h = _rms_norm(h)  # [..., N, H]
    z = _linear(F.relu(_linear(h, params.mlp_weight_1) + params.mlp_bias_1), params.mlp_weight_2)
    z = _rms_norm(z + params.mlp_bias_2)  # [..., N, H]
    q = _linear(z, params.source_head)  # [..., N, E]
    k = _linear(z, params.target_head)  # [..., N, E]
    scores = q @ k.transpose(-1, -2) / q.shape[-1]  # [..., N, N]
    edge = params.log_scale.exp() * scores + params.bias
    order = _linear(z, params.order_head[:, None]).squeeze(-1)  # [..., N]
    return PolicyLogits(edge=edge, order=order, temporal=params.temporal_logits)


def edge_logits(params: PolicyParams, features: Tensor, role_adjacency: Tensor) -> Tensor:
    """Spatial edge logits [..., N, N] (asymmetric: [i, j] scores i -> j)."""
    return policy_logits(params, features, role_adjacency).edge


def edge_probs(params: PolicyParams, features: Tensor, role_adjacency: Tensor) -> Tensor:
    """Spatial edge probabilities sigmoid(edge_logits) [..., N, N], anywhere in (0, 1)."""
    return torch.sigmoid(edge_logits(params, features, role_adjacency))


# ---------------------------------------------------------------------------- sampling


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
    for name, value in zip(PolicyLogits._fields, logits):
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


def log_prob(logits: PolicyLogits, mask: Mask, config: TopologyConfig, topology: Topology) -> LogProb:
    """Exact log-probability [...] that ``sample_topology`` draws ``topology``'s (order, spatial, temporal).

    Differentiable w.r.t. the logits; -inf for a graph outside the sampler's support.
    Broadcasts logits [..., N, N] against the topology's batch dims.
    Raises ValueError on a bad mask, shapes or non-finite logits.
    """
    _check_logits(logits, config)
    _check_mask(mask, config)
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
    return torch.where(impossible, torch.full_like(total, -math.inf), total)


def _assemble(
    logits: PolicyLogits, mask: Mask, config: TopologyConfig, spatial: Tensor, temporal: Tensor, order: Tensor
) -> Topology:
    partial = Topology(spatial, temporal, order, decision_inputs(spatial, config.decision), torch.zeros(()))
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
    in it is an independent Bernoulli. Randomness comes only from ``generator``.
    Raises ValueError on a bad mask, shapes, num_samples or non-finite logits.
    """
    _check_logits(logits, config)
    _check_mask(mask, config)
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise ValueError(f"num_samples: expected None or an integer >= 1, got {num_samples!r}")
    n = config.num_agents
    lead = () if num_samples is None else (num_samples,)
    batch = torch.Size(lead) + logits.edge.shape[:-2]
    dev = logits.edge.device

    def uniform(*shape: int) -> Tensor:
        u = torch.rand(*shape, generator=generator, device=generator.device, dtype=torch.float64)
        return u.to(dev)

    with torch.no_grad():
        edge = logits.edge.detach().double().expand(*batch, n, n)
        if config.samples_order:
            gumbel = -torch.log(-torch.log(uniform(*batch, n).clamp_min(1e-300)))
            order = torch.argsort(logits.order.detach().double() + gumbel, dim=-1, descending=True)
        else:
            order = _identity_order(batch, n, dev)
        pos = _positions(order)
        candidate = mask.to(dev) & (pos[..., :, None] < pos[..., None, :])
        if config.optimize_spatial:
            spatial = candidate & (uniform(*batch, n, n) < torch.sigmoid(edge))
        else:
            spatial = candidate
        if config.num_rounds == 1:
            temporal = torch.zeros(*batch, n, n, dtype=torch.bool, device=dev)
        elif config.optimize_temporal:
            temporal = uniform(*batch, n, n) < torch.sigmoid(logits.temporal.detach().double())
        else:
            temporal = torch.ones(*batch, n, n, dtype=torch.bool, device=dev)
    return _assemble(logits, mask, config, spatial, temporal, order)


def deterministic_topology(logits: PolicyLogits, mask: Mask, config: TopologyConfig) -> Topology:
    """The evaluation graph: the most likely order (scores sorted, ties by index), then every
    candidate edge with p > 1/2 (temporal likewise), with that outcome's log-probability."""
    _check_logits(logits, config)
    _check_mask(mask, config)
    n = config.num_agents
    batch = logits.edge.shape[:-2]
    dev = logits.edge.device
    with torch.no_grad():
        if config.samples_order:
            order = torch.argsort(logits.order.detach(), dim=-1, descending=True, stable=True)
        else:
            order = _identity_order(batch, n, dev)
        pos = _positions(order)
        candidate = mask.to(dev) & (pos[..., :, None] < pos[..., None, :])
        spatial = candidate & (logits.edge.detach() > 0) if config.optimize_spatial else candidate
        if config.num_rounds == 1:
            temporal = torch.zeros(*batch, n, n, dtype=torch.bool, device=dev)
        elif config.optimize_temporal:
            temporal = (logits.temporal.detach() > 0).expand(*batch, n, n).clone()
        else:
            temporal = torch.ones(*batch, n, n, dtype=torch.bool, device=dev)
    return _assemble(logits, mask, config, spatial, temporal, order)
