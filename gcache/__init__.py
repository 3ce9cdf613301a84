"""gcache: multi-agent LLM reasoning through KV-caches along a learned communication graph.

The public surface is this module's ``__all__``: the state types of the core
(``KVCache``, ``Topology``, ``PolicyParams``, ``FuserParams``, ``AdamState``, ...)
and its pure functions (cache transforms, realignment, latent rollout, topology
masks, sampling and log-probabilities, execution schedules, fusion, losses, optimizer
updates and the training step),
plus the shell's model loader (``load_model``, ``tiny_model``, ``LocalModel``,
``encode_chat``, ``decode_text``) and the inspection of a latent run (``inspect_run``,
``Inspection``: `gcache inspect` as data). Property-test strategies live in
``gcache.testing`` (it needs hypothesis, so it is not imported here).

``import gcache`` costs torch and nothing else: the shell's names are resolved on
first use, so transformers (about 3 s to import) loads only when a model does.
Everything not listed in ``__all__`` is private, even where it has no underscore.
"""

import importlib as _importlib
from typing import Any as _Any

from gcache.core.batch import pad_left, stack_rows
from gcache.core.cache import (
    KVCache,
    check_compatible,
    concat,
    empty,
    keep_first,
    keep_last,
    latent_part,
    nbytes,
    select_rows,
    trim_padding,
    validate,
)
from gcache.core.fusion import FuserConfig, FuserParams, fuse, gates, init_fuser, source_weights
from gcache.core.graph import Edge, Schedule, schedule
from gcache.core.latent import (
    Decoding,
    Generation,
    ModelFns,
    Prefill,
    Rollout,
    StaticFns,
    generate,
    latent_step,
    prefill,
    rollout,
    sequence_logprob,
)
from gcache.core.objectives import (
    AnswerBatch,
    answer_batch,
    answer_logprobs,
    answer_nll,
    fuser_loss,
)
from gcache.core.optim import (
    AdamState,
    GradientTransformation,
    adam,
    apply_updates,
    sgd,
    tree_leaves,
    tree_map,
    value_and_grad,
)
from gcache.core.policy import (
    PolicyLogits,
    PolicyParams,
    edge_logits,
    edge_probs,
    init_policy,
    node_features,
    normalized_adjacency,
    policy_logits,
)
from gcache.core.realign import Realign, apply_realign, identity_realign, realign_params
from gcache.core.reinforce import (
    RunningBaseline,
    baseline_value,
    batch_baseline,
    init_baseline,
    penalize_edges,
    reinforce_loss,
    update_baseline,
)
from gcache.core.rewards import reward
from gcache.core.sampling import deterministic_topology, fixed_topology, log_prob, sample_topology
from gcache.core.topology import (
    Topology,
    TopologyConfig,
    decision_inputs,
    is_acyclic,
    num_edges,
    predecessors,
    reachability,
    spatial_mask,
    successors,
    topological_order,
    with_decision_node,
)
from gcache.core.train import FuserBatch, FuserExample, PolicyBatch, TrainState, train_loss, train_step

__version__ = "0.1.0"

# Shell names, imported on first attribute access (module-level __getattr__, PEP 562).
_LAZY = {
    "LocalModel": "gcache.io.models.local",
    "decode_text": "gcache.io.models.local",
    "encode_chat": "gcache.io.models.local",
    "load_model": "gcache.io.models.local",
    "tiny_model": "gcache.io.models.local",
    "Inspection": "gcache.io.runner.inspection",
    "inspect_run": "gcache.io.runner.inspection",
}

__all__ = [
    # cache state and transforms
    "KVCache",
    "check_compatible",
    "concat",
    "empty",
    "keep_first",
    "keep_last",
    "latent_part",
    "nbytes",
    "pad_left",
    "select_rows",
    "stack_rows",
    "trim_padding",
    "validate",
    # realignment
    "Realign",
    "apply_realign",
    "identity_realign",
    "realign_params",
    # latent rollout
    "Decoding",
    "Generation",
    "ModelFns",
    "Prefill",
    "Rollout",
    "StaticFns",
    "generate",
    "latent_step",
    "prefill",
    "rollout",
    "sequence_logprob",
    # topology: graphs, masks, policy, sampling, log-probabilities
    "PolicyLogits",
    "PolicyParams",
    "Topology",
    "TopologyConfig",
    "decision_inputs",
    "deterministic_topology",
    "edge_logits",
    "edge_probs",
    "fixed_topology",
    "init_policy",
    "is_acyclic",
    "log_prob",
    "node_features",
    "normalized_adjacency",
    "num_edges",
    "policy_logits",
    "predecessors",
    "reachability",
    "sample_topology",
    "spatial_mask",
    "successors",
    "topological_order",
    "with_decision_node",
    # execution schedule of a graph
    "Edge",
    "Schedule",
    "schedule",
    # fusion and its objective
    "AnswerBatch",
    "FuserConfig",
    "FuserParams",
    "answer_batch",
    "answer_logprobs",
    "answer_nll",
    "fuse",
    "fuser_loss",
    "gates",
    "init_fuser",
    "source_weights",
    # REINFORCE and its rewards
    "RunningBaseline",
    "baseline_value",
    "batch_baseline",
    "init_baseline",
    "penalize_edges",
    "reinforce_loss",
    "reward",
    "update_baseline",
    # optimizers
    "AdamState",
    "GradientTransformation",
    "adam",
    "apply_updates",
    "sgd",
    "tree_leaves",
    "tree_map",
    "value_and_grad",
    # the training step
    "FuserBatch",
    "FuserExample",
    "PolicyBatch",
    "TrainState",
    "train_loss",
    "train_step",
    # shell: local models (lazy)
    "LocalModel",
    "decode_text",
    "encode_chat",
    "load_model",
    "tiny_model",
    # shell: what a latent run's agents thought and its judger read (lazy)
    "Inspection",
    "inspect_run",
]


def __getattr__(name: str) -> _Any:
    """Resolve a shell name on first use and keep it in the module's namespace."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gcache' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names and the version (what tab completion should offer)."""
    return sorted([*__all__, "__version__"])
