"""The topology policy: a GCN over the agents that scores every edge and the node order.

Node features are each role's profile embedding concatenated with the question's
embedding [N, F]. A 2-layer GCN runs over the symmetrically normalized role
prior (with self-loops), plus a linear skip from the raw features (a GCN over a
complete prior alone averages every node to the same vector and could not tell
agents apart), then an MLP, then separate source and target heads:
s_ij = <q_i, k_j> / head_dim, so i -> j and j -> i differ. Edge logits are
exp(log_scale) * s_ij + bias and probabilities sigmoid(logits): they can reach 0
and 1 (no minmax squashing, unlike G-Designer). Every tensor of ``PolicyParams``
shapes the distribution (``order_head`` only in mode ``full``, ``temporal_logits``,
free [N, N] logits, only with ``num_rounds > 1``; the ``decision_*`` tensors only under
wiring ``"learned"``, where each agent's Bernoulli logit of feeding the decision node is a
readout of its GCN state plus a learned multiple of its role's similarity to the question,
``query_similarity``). gcache/core/sampling.py turns
the logits into graphs and log-probabilities.

Parameterization: one Adam step moves every pre-activation by about lr, whatever
the feature width. Adam moves every weight entry by about lr per step, along the
sign of the layer's input, so a plain ``x @ W`` moves its output by
``lr * sum_i |x_i|``: with 768-d features (two unit-norm MiniLM embeddings) and
lr 0.1 that drove the logits to 1e5 within a few steps, and the policy collapsed
onto one graph with no gradient left to leave it. Hence (muP / "abc"
parameterizations, for Adam):

- each block's input is RMS-normalized without parameters (``_rms_norm``): the
  raw features, the GCN output, the MLP output. An embedding of any width or
  norm enters with RMS 1, and growing weights upstream cannot enlarge the steps
  downstream.
- every weight is applied as ``x @ W / fan_in`` (``_linear``), its raw entries of
  std sqrt(fan_in), so ``W / fan_in`` starts at LeCun's variance. Since
  sum_i |x_i| <= fan_in for an input of RMS 1, a step of lr in every raw entry
  moves every output by at most lr.
- the score is <q, k> / head_dim, not / sqrt(head_dim): training aligns q and k,
  and aligned vectors' product grows like head_dim (muP's attention scaling).

Decision inputs: an agent's logit of feeding the decision node is its readout of the GCN state
*centred over the agents*, plus ``decision_similarity`` times its standardized role-question
similarity (mean 0 over the agents), plus ``decision_bias``. So the readout and the similarity
only rank the agents, and how many are read moves with one scalar, the bias, by about lr per Adam
step. Uncentred, the readout moved every agent's logit together: on routing ``unreliable`` seed 2
(benchmarks/routing.py records the policy after every step) Adam's first steps shifted the MLP
towards the readout and every input probability went 0.5 -> 0.67 -> 0.85 -> 0.94 in three steps
(the bias moved +0.27 of that), the liar's included. Once every agent is read (p ~0.99),
REINFORCE's (taken - p) leaves almost no gradient to learn which agent to read.

Through the ~8 layers between features and a logit, Adam's first step at lr 0.1
moves an edge logit by about 1 at most (REINFORCE steps of the synthetic task in
tests/_topology_helpers.py: 0.1-0.7), so saturating a probability takes several
steps of consistent reward, and one lr suits every feature width. Nothing bounds
the logits (log_scale, bias and the weights are unclamped): the tests train a
policy beyond G-Designer's [0.27, 0.73]. The price: a smaller lr learns
proportionally slower (0.1 is the intended one).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gcache.core.checks import check_int
from gcache.core.topology import TopologyConfig


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
    decision_head: Tensor  # [H] readout of each agent's GCN state for its decision-input logit
    decision_similarity: Tensor  # [] weight of the standardized role-question similarity
    decision_bias: Tensor  # []


class PolicyLogits(NamedTuple):
    """What the policy outputs for one question (or a batch of questions, leading dims ...)."""

    edge: Tensor  # [..., N, N] spatial edge logits; p_ij = sigmoid(edge[i, j])
    order: Tensor  # [..., N] Plackett-Luce scores of the node order (used in mode full)
    temporal: Tensor  # [N, N] temporal edge logits
    decision: Tensor | None = None  # [..., N] decision-input logits (read under wiring "learned")


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
    check_int(feature_dim, "feature_dim")
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
        # Drawn last, so every other tensor is the same as before the decision head existed.
        decision_head=_raw_weight(h, 1, generator, dtype).squeeze(-1),
        decision_similarity=zeros(()),
        decision_bias=zeros(()),
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
    decision = _linear(z, params.decision_head[:, None]).squeeze(-1)  # [..., N]
    # Centred over the agents: the readout ranks them, and only decision_bias says how many are read
    # (see "Decision inputs" in the module docstring).
    decision = decision - decision.mean(-1, keepdim=True)
    if features.shape[-1] % 2 == 0:  # an odd width is not role ++ question: no similarity to read
        decision = decision + params.decision_similarity * query_similarity(features)
    decision = decision + params.decision_bias
    return PolicyLogits(edge=edge, order=order, temporal=params.temporal_logits, decision=decision)


def query_similarity(features: Tensor) -> Tensor:
    """[..., N]: each agent's role-question cosine similarity, standardized over the N agents
    (mean 0, unit variance; 0 for N = 1 or equal similarities), read from features laid out as
    ``node_features`` builds them (the role's embedding, then the question's: F even).

    Which agent knows what the question asks is a product of the role's and the question's
    embeddings, which the GCN's sums of the concatenation could only approximate; standardized,
    it has the scale of one Adam step per unit of ``decision_similarity`` (see "Parameterization").
    Raises ValueError for an odd F.
    """
    f = features.shape[-1]
    if f % 2:
        raise ValueError(f"features: expected an even feature dim (role ++ question embeddings), got {f}")
    role, query = features[..., : f // 2], features[..., f // 2 :]
    cos = F.cosine_similarity(role, query, dim=-1, eps=1e-12)  # [..., N]
    centred = cos - cos.mean(-1, keepdim=True)
    scale = centred.square().mean(-1, keepdim=True).sqrt()
    return torch.where(scale > 1e-6, centred / scale.clamp_min(1e-6), torch.zeros_like(centred))


def edge_logits(params: PolicyParams, features: Tensor, role_adjacency: Tensor) -> Tensor:
    """Spatial edge logits [..., N, N] (asymmetric: [i, j] scores i -> j)."""
    return policy_logits(params, features, role_adjacency).edge


def edge_probs(params: PolicyParams, features: Tensor, role_adjacency: Tensor) -> Tensor:
    """Spatial edge probabilities sigmoid(edge_logits) [..., N, N], anywhere in (0, 1)."""
    return torch.sigmoid(edge_logits(params, features, role_adjacency))
