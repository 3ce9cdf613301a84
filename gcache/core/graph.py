"""From a topology to an execution schedule: which node runs when, and what it reads.

A question's execution graph has one node per (round, agent) and one decision node::

    (r, j) reads (r, i)      for every spatial edge i -> j            (this round's agents)
    (r, j) reads (r - 1, i)  for every temporal edge i -> j, r > 0    (the previous round's)
    DECISION reads (R - 1, j) for every j in topology.decision_inputs (the last round's)

Nodes run in waves: a node's wave is its depth, the longest path from a node without
predecessors, so every node of a wave can run at once (one batched forward), after all its
predecessors. A ``Schedule`` is immutable and holds no tensors; every method's graph (learned,
fixed, LatentMAS's chain, a single agent) is executed from one. ``live_nodes`` names the agents
whose work reaches the decision: a graph that leaves an agent without a path to it need not run it.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Iterable, Mapping, NamedTuple

from torch import Tensor

from gcache.core.checks import check_int
from gcache.core.topology import Topology

Node = tuple[int, int]  # (round, agent)
DECISION: Node = (-1, -1)


class Edge(NamedTuple):
    """One input of a node: where it comes from, and the edge's probability (its fusion weight)."""

    src: Node
    weight: float  # the policy's probability of the edge; 1.0 for fixed edges and decision inputs


class Schedule(NamedTuple):
    """The execution of one question's graph."""

    num_agents: int
    num_rounds: int
    waves: tuple[tuple[Node, ...], ...]  # agent nodes by depth; within a wave in (round, agent) order
    inputs: Mapping[Node, tuple[Edge, ...]]  # every node's inputs (DECISION included): spatial, then temporal

    @property
    def last(self) -> Node:
        """The last agent node of the execution order (the one that answers under ``direct``)."""
        return self.waves[-1][-1]

    def sources(self, node: Node) -> tuple[Node, ...]:
        """The nodes ``node`` reads, in input order."""
        return tuple(e.src for e in self.inputs[node])


def _weight(probs: Tensor | None, i: int, j: int) -> float:
    return 1.0 if probs is None else float(probs[i, j])


def schedule(
    topology: Topology,
    num_rounds: int,
    *,
    spatial_probs: Tensor | None = None,  # [N, N] edge probabilities (None: fixed edges, weight 1)
    temporal_probs: Tensor | None = None,  # [N, N]
) -> Schedule:
    """The schedule of one (unbatched) topology run for ``num_rounds`` rounds.

    Raises ValueError when the topology is batched, ``num_rounds`` < 1, temporal edges are
    given for one round, the spatial graph has a cycle (no order runs it), or no agent feeds
    the decision node.
    """
    spatial, temporal = topology.spatial, topology.temporal
    if spatial.dim() != 2 or spatial.shape[0] != spatial.shape[1]:
        raise ValueError(f"topology.spatial: expected one graph [N, N], got {tuple(spatial.shape)}")
    n = spatial.shape[0]
    check_int(num_rounds, "num_rounds")
    if num_rounds == 1 and bool(temporal.any()):
        raise ValueError("topology.temporal: one round has no temporal edges, got some")
    if not bool(topology.decision_inputs.any()):
        raise ValueError("topology.decision_inputs: expected at least one agent feeding the decision node, got none")
    s, t = spatial.tolist(), temporal.tolist()
    inputs: dict[Node, tuple[Edge, ...]] = {}
    for r in range(num_rounds):
        for j in range(n):
            here = [Edge((r, i), _weight(spatial_probs, i, j)) for i in range(n) if s[i][j]]
            before = [Edge((r - 1, i), _weight(temporal_probs, i, j)) for i in range(n) if r > 0 and t[i][j]]
            inputs[(r, j)] = tuple(here + before)
    last = num_rounds - 1
    inputs[DECISION] = tuple(Edge((last, j), 1.0) for j, fed in enumerate(topology.decision_inputs.tolist()) if fed)
    return Schedule(n, num_rounds, _waves(inputs, n, num_rounds), MappingProxyType(inputs))


def live_nodes(schedule: Schedule, answering: Iterable[Node] = ()) -> frozenset[Node]:
    """The agent nodes whose output is used: those with a path of edges to the decision node or to
    a node of ``answering`` (agents whose own text is used, e.g. the answering agent of a decision
    rule), those nodes included. Any other agent's work reaches nobody.

    Raises ValueError when ``answering`` names a node the schedule does not run.
    """
    answering = tuple(answering)
    unknown = [v for v in answering if v == DECISION or v not in schedule.inputs]
    if unknown:
        raise ValueError(f"answering: expected agent nodes of the schedule, got {unknown}")
    live: set[Node] = set()
    pending = [*schedule.sources(DECISION), *answering]
    while pending:
        node = pending.pop()
        if node not in live:
            live.add(node)
            pending.extend(schedule.sources(node))
    return frozenset(live)


def _waves(inputs: Mapping[Node, tuple[Edge, ...]], n: int, num_rounds: int) -> tuple[tuple[Node, ...], ...]:
    """Agent nodes grouped by depth. Rounds run in order; within a round, agents are visited in
    rounds of relaxation until every depth is known (at most N passes for a DAG of N agents)."""
    depth: dict[Node, int] = {}
    for r in range(num_rounds):
        pending = [(r, j) for j in range(n)]
        while pending:
            ready = [v for v in pending if all(e.src in depth for e in inputs[v])]
            if not ready:
                raise ValueError(f"topology.spatial: the graph has a cycle among agents {[v[1] for v in pending]}")
            for v in ready:
                depth[v] = 1 + max((depth[e.src] for e in inputs[v]), default=-1)
            pending = [v for v in pending if v not in depth]
    waves: dict[int, list[Node]] = {}
    for node in sorted(depth):
        waves.setdefault(depth[node], []).append(node)
    return tuple(tuple(waves[d]) for d in sorted(waves))


__all__ = ["DECISION", "Edge", "Node", "Schedule", "live_nodes", "schedule"]
