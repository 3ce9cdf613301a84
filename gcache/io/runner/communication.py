"""How agents communicate: through KV-caches (latent methods) or through text (text methods).

A communication strategy, chosen once per run, builds what a node reads (its ``Context``:
chat messages, and with caches the fusion of its inputs' caches) and, for latent
communication, runs the agents that think: one batched rollout for every thinking node of
a wave, across the questions of a batch.

- ``LatentCaches`` (``latent-mas``, ``gcache``): an agent prefills its prompt on the fusion
  of its inputs' caches (gcache.core.fusion, weighted by the edges' probabilities), runs
  ``latent_steps`` latent steps and passes its cache on (with ``latent_only``, only the
  latent positions and the first ``sink_positions`` ones). An agent that writes text passes
  no cache. The decision node reads the fusion of its inputs' caches, with the fuser parameters
  that the holder given at build (the run's learner) holds at that moment.
- ``TextMessages`` (``single``, ``text-mas``): every agent writes text, and a node reads
  its inputs' texts in its prompt.

Runs that answer the same questions on one model (a benchmark comparing graphs) may share a
``Rollouts`` memo: an agent whose question, role, settings, inputs and fuser are those of a
rollout already done reuses it instead of thinking again.
"""

from __future__ import annotations

import hashlib
import time
from typing import Hashable, NamedTuple, Protocol, Sequence

import torch
from torch import Tensor

from gcache.core import cache as kv
from gcache.core.batch import stack_rows
from gcache.core.fusion import FuserParams, fuse
from gcache.core.graph import DECISION, Node, Schedule
from gcache.core.latent import rollout
from gcache.io.models.generation import CacheInfo
from gcache.io.models.local import LocalModel, encode_chat
from gcache.io.runner.prompts import Role, agent_messages, decision_messages, item_roles
from gcache.io.tasks.datasets import Item


class NodeOut(NamedTuple):
    """What a node produced for one question."""

    role: str
    cache: kv.KVCache | None  # what it passes on (latent thinking), else None
    text: str | None  # what it wrote, else None
    tokens: dict[str, int]  # {"prompt", "latent", "generated"} on the local model
    seconds: float
    key: Hashable = None  # what determined its rollout, when a ``Rollouts`` memo is shared (else None)


class FusionInputs(NamedTuple):
    """The caches a node fused, as the fuser objective re-fuses them."""

    caches: tuple[kv.KVCache, ...]  # k inputs, [L, 1, H, T_i, D]
    weights: Tensor  # [k] the edges' probabilities
    sources: Tensor  # [k] long, the inputs' agent ids


class Context(NamedTuple):
    """What one node reads before it writes or thinks."""

    conversation: list[dict[str, str]]
    cache: kv.KVCache | None  # [L, 1, H, T, D] the fusion of its inputs' caches, else None
    info: CacheInfo | None  # the cache's size in words' terms, for api_hint (latent only)
    fusion: FusionInputs | None  # the fused inputs (latent with at least one input cache)
    read: kv.KVCache | None = None  # once decoded locally: the cache and the prompt but its last token, as read


Outputs = dict[Node, NodeOut]


class Rollouts:
    """Latent rollouts kept by what determines them, shared by runs on one model and one set
    of questions (the caller clears it between batches: every entry holds a cache)."""

    def __init__(self) -> None:
        self.done: dict[Hashable, NodeOut] = {}
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self.done.clear()


def _digest(fuser: FuserParams | None) -> str | None:
    """The fuser's values (equal parameters fuse equally, whichever run holds them)."""
    if fuser is None:
        return None
    h = hashlib.sha256()
    for t in fuser:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def stack_contexts(local: LocalModel | None, caches: Sequence[kv.KVCache | None]) -> kv.KVCache | None:
    """One left-padded batch of caches (an empty cache for rows without one); None when no row has one."""
    if all(c is None for c in caches):
        return None
    assert local is not None, "caches come from a local model"
    fns = local.fns
    empty = kv.empty(fns.num_layers, 1, fns.num_kv_heads, fns.head_dim, dtype=fns.dtype, device=fns.device)
    return stack_rows([empty if c is None else c for c in caches])


class FuserHolder(Protocol):
    """Whatever holds the fuser's parameters as they train (gcache.io.runner.learner.Learner)."""

    @property
    def fuser(self) -> FuserParams | None: ...


class LatentCaches:
    """Agents think in latent space and pass KV-caches along the graph's edges."""

    thinks = True

    def __init__(
        self, task: str, local: LocalModel, roles: Sequence[Role], *,
        latent_steps: int, latent_only: bool, sink_positions: int, fusion: str, rollouts: Rollouts | None = None,
        params: FuserHolder | None = None,
    ) -> None:  # fmt: skip
        self.task, self.local, self.roles = task, local, list(roles)
        self.latent_steps, self.latent_only, self.sink_positions = latent_steps, latent_only, sink_positions
        self.fusion = fusion
        self.accumulates = not latent_only  # a full cache holds its inputs' caches
        self.rollouts = rollouts  # a memo shared with other runs (see ``Rollouts``), given at build
        self.params = params  # holds the fuser's current parameters (the run's learner); None: untrained

    @property
    def fuser(self) -> FuserParams | None:
        """The fuser parameters every node mixes its inputs with now (None: untrained fusion)."""
        return None if self.params is None else self.params.fuser

    @staticmethod
    def _cache_inputs(schedule: Schedule, outputs: Outputs, node: Node) -> list:
        """The node's input edges whose source passed a cache on."""
        return [e for e in schedule.inputs[node] if e.src in outputs and outputs[e.src].cache is not None]

    def _fused(
        self, schedule: Schedule, outputs: Outputs, node: Node, fuser: FuserParams | None
    ) -> tuple[kv.KVCache | None, FusionInputs | None]:
        edges = self._cache_inputs(schedule, outputs, node)
        if not edges:
            return None, None
        inputs = FusionInputs(
            tuple(outputs[e.src].cache for e in edges),
            torch.tensor([e.weight for e in edges], dtype=torch.float32),
            torch.tensor([e.src[1] for e in edges], dtype=torch.long),
        )
        fused = fuse(fuser, list(inputs.caches), inputs.weights, mode=self.fusion, sources=inputs.sources.tolist())
        return fused, inputs

    def context(self, item: Item, schedule: Schedule, outputs: Outputs, node: Node) -> Context:
        """The node's prompt (told that caches precede it when some do) and its fused input cache."""
        cache, inputs = self._fused(schedule, outputs, node, self.fuser)
        latent = cache is not None
        if node == DECISION:
            conversation = decision_messages(self.task, item.question, latent=latent)
        else:
            conversation = agent_messages(self.task, item_roles(item, self.roles)[node[1]], item.question, latent=latent)
        info = CacheInfo(len(schedule.inputs[node]), 0 if cache is None else cache.seq_len, self.latent_steps)
        return Context(conversation, cache, info, inputs)

    def think(self, rows: Sequence[tuple[Item, Schedule, Outputs, Node]]) -> list[NodeOut]:
        """One batched latent rollout for every (question, agent node) row of a wave (rows whose
        rollout the shared ``rollouts`` memo holds reuse it)."""
        fuser = self.fuser
        if self.rollouts is None:
            return self._think(rows, fuser, [None] * len(rows))
        digest = _digest(fuser)
        keys = [self._key(item, schedule, outputs, node, digest) for item, schedule, outputs, node in rows]
        memo = self.rollouts
        first: dict[Hashable, int] = {}  # a key new to the memo -> its first row
        for i, k in enumerate(keys):
            if k not in memo.done:
                first.setdefault(k, i)
        todo = list(first.values())
        memo.hits += len(rows) - len(todo)
        memo.misses += len(todo)
        if todo:
            done = self._think([rows[i] for i in todo], fuser, [keys[i] for i in todo])
            memo.done.update((keys[i], out) for i, out in zip(todo, done))
        return [memo.done[k] for k in keys]

    def _key(self, item: Item, schedule: Schedule, outputs: Outputs, node: Node, digest: str | None) -> Hashable:
        """What a rollout depends on: the model, the question, the role, the settings, and the
        inputs' rollouts with their edge weights and the fuser that mixes them."""
        edges = self._cache_inputs(schedule, outputs, node)
        inputs = tuple((outputs[e.src].key, e.src[1], float(e.weight)) for e in edges)
        settings = (self.latent_steps, self.latent_only, self.sink_positions)
        mixing = (self.fusion, digest) if inputs else None  # how the inputs were fused (no inputs: nothing)
        role = item_roles(item, self.roles)[node[1]]
        return (id(self.local), self.task, item.id, item.question, role, settings, inputs, mixing)

    def _think(self, rows, fuser: FuserParams | None, keys: Sequence[Hashable]) -> list[NodeOut]:
        started = time.perf_counter()
        conversations, caches, names = [], [], []
        for item, schedule, outputs, node in rows:
            role = item_roles(item, self.roles)[node[1]]
            names.append(role.name)
            # A thinking agent is told that caches precede its prompt even when none does (as LatentMAS).
            conversations.append(agent_messages(self.task, role, item.question, latent=True))
            caches.append(self._fused(schedule, outputs, node, fuser)[0])
        ids, mask = encode_chat(self.local, conversations)  # [B, S], [B, S]
        out = rollout(
            self.local.fns, self.local.realign, ids, mask,
            cache=stack_contexts(self.local, caches), latent_steps=self.latent_steps,
        )  # fmt: skip
        seconds = (time.perf_counter() - started) / len(rows)
        return [self._passed_on(out, i, name, seconds, key) for i, (name, key) in enumerate(zip(names, keys))]

    def _passed_on(self, out, row: int, name: str, seconds: float, key: Hashable) -> NodeOut:
        cache = kv.trim_padding(kv.select_rows(out.cache, [row]))
        if self.latent_only:
            cache = kv.latent_part(cache, self.latent_steps, self.sink_positions)
        tokens = {"prompt": int(out.prompt_tokens[row]), "latent": out.latent_tokens, "generated": 0}
        return NodeOut(name, cache, None, tokens, seconds, key)


class TextMessages:
    """Agents write text; a node reads its inputs' texts in its prompt."""

    thinks = False
    accumulates = False

    def __init__(self, task: str, roles: Sequence[Role]) -> None:
        self.task, self.roles = task, list(roles)

    def context(self, item: Item, schedule: Schedule, outputs: Outputs, node: Node) -> Context:
        """The node's prompt holding its inputs' texts (role name, text), in input order."""
        texts = [(outputs[s].role, outputs[s].text or "") for s in schedule.sources(node) if s in outputs]
        if node == DECISION:
            conversation = decision_messages(self.task, item.question, predecessor_texts=texts)
        else:
            conversation = agent_messages(self.task, item_roles(item, self.roles)[node[1]], item.question, predecessor_texts=texts)
        return Context(conversation, None, None, None)

    def think(self, rows: Sequence[tuple[Item, Schedule, Outputs, Node]]) -> list[NodeOut]:
        raise ValueError("text communication: every agent writes text, none thinks in latent space")


Communication = LatentCaches | TextMessages

__all__ = ["Communication", "Context", "FuserHolder", "FusionInputs", "LatentCaches", "NodeOut", "Rollouts", "TextMessages", "stack_contexts"]
