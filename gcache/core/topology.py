"""The communication graph: what a topology is, the modes' candidate edges, graph helpers.

One question, N agents, ``num_rounds`` rounds, one decision node::

    spatial[i, j]   agent i's cache flows into agent j within the same round   [N, N] bool
    temporal[i, j]  agent i's cache of round r flows into agent j at round r+1 [N, N] bool
    order           an execution order of the agents, a topological order of `spatial`  [N] long
    decision_inputs the agents of the last round whose caches the decision node reads  [N] bool

The same spatial and temporal graphs serve every round; with ``num_rounds == 1``
there are no temporal edges. Temporal candidates are all N x N pairs (an agent
may read its own previous round). ``TopologyConfig.wiring`` gives the decision
node's inputs:

- ``"all"``: every agent of the last round feeds the decision node (as G-Designer).
- ``"sinks"``: only the agents without a spatial successor. Every agent still
  reaches the decision node (follow successors to a sink), so when caches
  accumulate along paths the decision node sees each contribution once;
  ``chain`` then reproduces LatentMAS's sequential pipeline.
- ``"learned"``: the policy samples them, one Bernoulli per agent conditioned on
  at least one being taken (gcache/core/sampling.py), so a graph can keep an
  agent's cache, and everything upstream of it, from the decision node.

Under ``"all"`` and ``"sinks"`` the decision node is reachable from every agent of
the last round (checked by the tests) and the inputs carry no log-probability. How the decision node then answers (refer, direct,
vote, code) is the runner's decision rule, not part of the graph.

Modes (candidate spatial edges, ``spatial_mask``). Spatial edges only go forward
in a node order, so every graph is a DAG by construction:

- ``full``: every ordered pair i != j; the order itself is sampled (see
  gcache/core/sampling.py), so both i -> j and j -> i can be learned.
- ``mesh``: every forward pair i < j of the identity order (a full DAG).
- ``chain``: i -> i+1.  ``star``: agent 0 (the hub) -> every other agent.
- ``layered``: consecutive layers of ``layer_width`` agents (default ceil(sqrt(N))),
  every agent of layer k -> every agent of layer k+1.
- ``random``: each forward pair i < j with probability 1/2, from an explicit generator.
- ``debate``: no spatial edges; agents talk only through temporal edges.

Every mode but ``full`` uses the identity order, so its mask is strictly upper triangular.

Running one ``Topology`` (tensors on any device)::

    for r in range(num_rounds):
        for j in topology.order.tolist():                 # topological: predecessors ran first
            inputs  = predecessors(topology.spatial, j)   # this round's caches
            inputs += predecessors(topology.temporal, j) if r > 0 else []  # last round's caches
            run agent j on the fused caches of `inputs`
    decide from the caches of the agents where topology.decision_inputs is True

``with_decision_node(topology)`` gives the (N+1) x (N+1) adjacency with the
decision node as index N; ``topological_order(adjacency)`` orders any DAG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from gcache.core.checks import check_int

Adjacency = Tensor  # [..., N, N] bool; [i, j] is the edge i -> j
Mask = Tensor  # [N, N] bool; candidate spatial edges
LogProb = Tensor  # [...] float

MODES = ("full", "chain", "star", "mesh", "layered", "random", "debate")
WIRINGS = ("all", "sinks", "learned")


def _check_num_agents(num_agents: object, name: str = "num_agents") -> int:
    return check_int(num_agents, name)


def _check_mode(mode: object) -> str:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    return mode  # type: ignore[return-value]


@dataclass(frozen=True)
class TopologyConfig:
    """Static description of the communication graph and of the policy's sizes.

    num_agents: N >= 1. mode: one of MODES. num_rounds: >= 1 (temporal edges need >= 2).
    optimize_spatial / optimize_temporal: sample those edges (False: take every candidate).
    wiring: the decision node's inputs, one of WIRINGS (see the module docstring).
    hidden_dim: GCN/MLP width. head_dim: width of the source/target heads.
    Raises ValueError on any bad field.
    """

    num_agents: int
    mode: str = "full"
    num_rounds: int = 1
    optimize_spatial: bool = True
    optimize_temporal: bool = True
    wiring: str = "all"
    hidden_dim: int = 32
    head_dim: int = 16

    def __post_init__(self) -> None:
        _check_num_agents(self.num_agents)
        _check_mode(self.mode)
        for name in ("num_rounds", "hidden_dim", "head_dim"):
            value = getattr(self, name)
            check_int(value, name)
        if self.wiring not in WIRINGS:
            raise ValueError(f"wiring: expected one of {', '.join(WIRINGS)}, got {self.wiring!r}")

    @property
    def samples_order(self) -> bool:
        """True when the node order is sampled (mode ``full`` with spatial optimization)."""
        return self.mode == "full" and self.optimize_spatial


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
    """Candidate spatial edges of a mode, [N, N] bool (see "Modes" in the module docstring).

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


def check_mask(mask: Tensor, config: TopologyConfig, name: str = "mask") -> Tensor:
    """``mask`` itself when it is a valid [N, N] bool candidate mask for ``config``.

    Raises TypeError/ValueError naming ``name`` otherwise.
    """
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


def decision_inputs(spatial: Adjacency, wiring: str) -> Tensor:
    """[..., N] bool: the agents feeding the decision node under ``wiring`` ("all"/"sinks").

    Raises ValueError on an unknown wiring, and on ``"learned"`` (the policy samples those).
    """
    if wiring == "all":
        return torch.ones(spatial.shape[:-1], dtype=torch.bool, device=spatial.device)
    if wiring == "sinks":
        return ~spatial.any(-1)
    if wiring == "learned":
        raise ValueError('wiring: "learned" decision inputs are sampled by the policy (gcache.core.sampling)')
    raise ValueError(f"wiring: expected one of {', '.join(WIRINGS)}, got {wiring!r}")


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
