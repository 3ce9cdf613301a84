"""Where a question's graph comes from: a fixed topology, or the learned policy.

Both give a ``Plan``: the topology (sampled for training, the deterministic graph for
evaluation), its execution schedule (gcache.core.graph) and, for the policy, the node
features it read, so that the training step can recompute the graph's log-probability.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, Sequence

import torch
from torch import Tensor

from gcache.core.graph import Schedule, schedule
from gcache.core.policy import node_features, policy_logits
from gcache.core.sampling import deterministic_topology, fixed_topology, sample_topology
from gcache.core.topology import Topology, TopologyConfig, spatial_mask
from gcache.io.models.embed import EMBED_DIM, embed_texts, role_embeddings
from gcache.io.tasks.datasets import Item


class Plan(NamedTuple):
    """One question's graph."""

    item: Item
    topology: Topology  # spatial/temporal adjacency, order, decision inputs, log_prob
    schedule: Schedule
    spatial_probs: Tensor | None  # [N, N] the policy's edge probabilities (None: fixed graph)
    temporal_probs: Tensor | None  # [N, N] (None: fixed, or one round)
    features: Tensor | None  # [N, F] node features the policy read (None: fixed graph)


class GraphSpec(NamedTuple):
    """What the policy's parameters and its training step know of a learned graph."""

    config: TopologyConfig
    mask: Tensor  # [N, N] bool candidate spatial edges
    role_adjacency: Tensor  # [N, N] the GCN's prior over the agents
    feature_dim: int  # F of the node features (role ++ question embeddings)


def graph_spec(config: TopologyConfig, mask: Tensor) -> GraphSpec:
    """The spec of a learned graph over ``config``'s agents: a complete role prior, MiniLM features."""
    n = config.num_agents
    return GraphSpec(config, mask, torch.ones(n, n), 2 * EMBED_DIM)


class PolicyHolder(Protocol):
    """Whatever holds the policy's parameters as they train (gcache.io.runner.learner.Learner)."""

    @property
    def policy(self) -> Any: ...


def candidate_mask(config: TopologyConfig, seed: int) -> Tensor:
    """[N, N] bool candidate spatial edges of the run's topology (``random`` draws it from ``seed``)."""
    return spatial_mask(config.mode, config.num_agents, generator=torch.Generator().manual_seed(seed))


class FixedGraph:
    """The same graph for every question (chain, star, mesh, ..., or one agent)."""

    def __init__(self, config: TopologyConfig, mask: Tensor) -> None:
        self.config = config
        topology = fixed_topology(mask, config)
        self._plan = (topology, schedule(topology, config.num_rounds))

    def plan(self, item: Item, *, train: bool = False, seed: int = 0) -> Plan:
        topology, sched = self._plan
        return Plan(item, topology, sched, None, None, None)


class LearnedGraph:
    """The policy's graph: sampled (training) or the most likely one (evaluation), from the policy
    parameters that ``params`` (the run's learner) holds when a question is planned."""

    def __init__(self, spec: GraphSpec, profiles: Sequence[str], encoder: Any, params: PolicyHolder) -> None:
        self.config, self.mask, self.role_adjacency = spec.config, spec.mask, spec.role_adjacency
        self.encoder, self.params = encoder, params
        self.role_embeddings = role_embeddings(list(profiles), encoder=encoder)  # [N, E]
        if 2 * self.role_embeddings.shape[-1] != spec.feature_dim:
            raise ValueError(f"spec.feature_dim: expected {2 * self.role_embeddings.shape[-1]} (twice the encoder's "
                             f"width), got {spec.feature_dim}")
        self._questions: dict[str, Tensor] = {}
        self._worlds: dict[tuple[str, ...], Tensor] = {}  # a routing world's profiles -> their embeddings

    @property
    def feature_dim(self) -> int:
        return 2 * self.role_embeddings.shape[-1]

    def features(self, item: Item) -> Tensor:
        """[N, F] role embeddings (the item's own roles where it has them) ++ the question's
        embedding (cached per question)."""
        if item.id not in self._questions:
            self._questions[item.id] = embed_texts([item.question], encoder=self.encoder)[0]
        roles = self.role_embeddings
        own = (item.meta or {}).get("roles")
        if own is not None:
            profiles = tuple(r.profile for r in own)
            if profiles not in self._worlds:
                self._worlds[profiles] = role_embeddings(list(profiles), encoder=self.encoder)
            roles = self._worlds[profiles]
        return node_features(roles, self._questions[item.id])

    def plan(self, item: Item, *, train: bool, seed: int) -> Plan:
        """A sampled graph (``train``, drawn from ``seed``) or the deterministic one, with no gradient."""
        features = self.features(item)
        with torch.no_grad():
            logits = policy_logits(self.params.policy, features, self.role_adjacency)
            if train:
                topology = sample_topology(logits, self.mask, self.config, torch.Generator().manual_seed(seed))
            else:
                topology = deterministic_topology(logits, self.mask, self.config)
            spatial_probs = torch.sigmoid(logits.edge) * self.mask
            temporal_probs = torch.sigmoid(logits.temporal) if self.config.num_rounds > 1 else None
        sched = schedule(topology, self.config.num_rounds, spatial_probs=spatial_probs, temporal_probs=temporal_probs)
        return Plan(item, topology, sched, spatial_probs, temporal_probs, features)


Planner = FixedGraph | LearnedGraph

__all__ = ["FixedGraph", "GraphSpec", "LearnedGraph", "Plan", "Planner", "PolicyHolder", "candidate_mask", "graph_spec"]
