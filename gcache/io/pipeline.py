"""The multi-agent runner: a topology executed over agents, caches (or texts) flowing along its edges.

A question's execution graph has a node per (round, agent) and one decision node. Node
(r, j) receives from the agents i with a spatial edge i -> j in round r and, for r > 0,
from the agents i with a temporal edge i -> j between rounds r - 1 and r. The decision
node receives from every agent of the last round. Nodes run in waves of equal depth;
every node of a wave, across all questions of the batch, runs in one batched forward of
the local model (or in concurrent API requests).

Latent methods (``latent-mas``, ``gcache``): an agent prefills its prompt on the fusion of
its predecessors' caches, runs ``latent_steps`` latent steps, and passes on its cache (only
the latent positions with ``latent_only``). Text methods (``single``, ``text-mas``): an agent
writes text, and its successors read that text in their prompts.

Decision rules: ``refer`` (a judger reads its predecessors: their caches, or their texts),
``direct`` (the last agent of the execution order writes the answer), ``vote`` (every agent
of the last round writes an answer; the majority of extracted answers wins), ``code``
(every agent of the last round writes a program; the first that passes the prompt's
examples in the sandbox wins, else the judger's program).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from gcache.core import cache as kv
from gcache.core.batch import stack_rows
from gcache.io.config import RunConfig, api_config

log = logging.getLogger(__name__)

Node = tuple[int, int]  # (round, agent)
DECISION: Node = (-1, -1)


def _seed(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (the same run, step and question give the same draw)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class Plan:
    """One question's execution graph."""

    item: Any
    spatial: Tensor  # [N, N] bool, agent i -> agent j within a round
    temporal: Tensor  # [N, N] bool, agent i (round r-1) -> agent j (round r)
    log_prob: Tensor  # [] with grad to the policy when sampled for training
    spatial_probs: Tensor | None  # [N, N] edge probabilities (None for fixed topologies)
    temporal_probs: Tensor | None
    num_rounds: int
    decision_inputs: Tensor  # [N] bool, the last-round agents that feed the decision node

    def preds(self, node: Node) -> list[Node]:
        n = self.spatial.shape[0]
        if node == DECISION:
            return [(self.num_rounds - 1, j) for j in range(n) if bool(self.decision_inputs[j])]
        r, j = node
        out = [(r, i) for i in range(n) if bool(self.spatial[i, j])]
        if r > 0:
            out += [(r - 1, i) for i in range(n) if bool(self.temporal[i, j])]
        return out

    def edge_prob(self, src: Node, dst: Node) -> float:
        if dst == DECISION:
            return 1.0
        probs = self.spatial_probs if src[0] == dst[0] else self.temporal_probs
        return 1.0 if probs is None else float(probs[src[1], dst[1]])

    def waves(self) -> list[list[Node]]:
        """Agent nodes grouped by depth (longest path from a source), in execution order."""
        depth: dict[Node, int] = {}
        n = self.spatial.shape[0]
        order = [(r, j) for r in range(self.num_rounds) for j in range(n)]
        pending = list(order)
        while pending:
            progressed = False
            for node in list(pending):
                ps = self.preds(node)
                if all(p in depth for p in ps):
                    depth[node] = 1 + max((depth[p] for p in ps), default=-1)
                    pending.remove(node)
                    progressed = True
            if not progressed:
                raise ValueError(f"topology: the execution graph has a cycle among {pending}")
        waves: dict[int, list[Node]] = {}
        for node in order:
            waves.setdefault(depth[node], []).append(node)
        return [waves[d] for d in sorted(waves)]


@dataclass
class NodeOut:
    """What a node produced for one question."""

    role: str
    cache: kv.KVCache | None = None
    text: str | None = None
    tokens: dict = field(default_factory=lambda: {"prompt": 0, "latent": 0, "generated": 0})
    seconds: float = 0.0


@dataclass
class QuestionOut:
    answer: str
    outputs: dict[Node, NodeOut]
    decision: NodeOut | None
    fuser_loss: Tensor | None = None
    error: str | None = None


def _majority(predictions: Sequence[str | None]) -> int | None:
    """Index of the first prediction of the most frequent non-empty value (None when all are empty)."""
    values = [p for p in predictions if p]
    if not values:
        return None
    winner, _ = Counter(values).most_common(1)[0]
    return next(i for i, p in enumerate(predictions) if p == winner)


def _prediction(item, text: str) -> str | None:
    """The answer a reply gives, without running anything (a program is its own prediction)."""
    from gcache.io import extract
    from gcache.io.tasks import score, task_family

    if task_family(item.task) == "code":
        return extract.extract_code(text) or None
    return score(item, text).prediction


class Pipeline:
    """A method's components (models, roles, learned parameters) and how they answer a batch.

    Learned parameters are immutable NamedTuples replaced by each optimizer step (the core's
    pure Adam); this object is the shell that holds the current ones.
    """

    def __init__(self, config: RunConfig, local, api, roles) -> None:
        from gcache.io import prompts

        self.config = config
        self.local = local  # LocalModel or None (text-only API runs)
        self.api = api  # ApiClient or None
        self.roles = roles
        self.prompts = prompts
        self.api_usage = {"prompt": 0, "completion": 0}
        self.learner = None  # set by build_pipeline for methods with learned parts

    # ---------------------------------------------------------------- public

    def train_step(self, items: Sequence, step: int) -> list[dict]:
        """Answer a train batch with sampled topologies, update the learned parts, return its records.

        A batch that fails (an API error, say) is recorded with its error and makes no update.
        """
        started = time.perf_counter()
        self.learner.start_step()
        plans = [self.learner.plan(item, train=True, seed=_seed(self.config.seed, "train", step, item.id)) for item in items]
        try:
            outs = self._run(plans, train=True, step=step)
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            log.warning("train step %d failed: %s", step, e)
            outs = [QuestionOut("", {}, None, error=f"{type(e).__name__}: {e}") for _ in plans]
        verdicts = self._score_all(plans, outs)
        if not any(o.error for o in outs):
            self.learner.update(plans, outs, [float(v.correct) for v in verdicts])
        per_q = (time.perf_counter() - started) / len(items)
        return [
            self._record("train", f"{step}:{p.item.id}", p, o, v, per_q, step=step)
            for p, o, v in zip(plans, outs, verdicts)
        ]

    def evaluate(self, items: Sequence) -> list[dict]:
        """Answer an eval batch with deterministic topologies and no gradient; one record per question."""
        started = time.perf_counter()
        plans = [self._eval_plan(item) for item in items]
        with torch.no_grad():
            try:
                outs = self._run(plans, train=False, step=0)
            except Exception as e:  # noqa: BLE001 - isolate the failing question, keep the others
                if len(items) == 1:
                    log.warning("question %s failed: %s", items[0].id, e)
                    outs = [QuestionOut(answer="", outputs={}, decision=None, error=f"{type(e).__name__}: {e}")]
                else:
                    log.warning("a batch failed (%s); answering its questions one by one", e)
                    return [r for item in items for r in self.evaluate([item])]
        verdicts = self._score_all(plans, outs)
        per_q = (time.perf_counter() - started) / len(items)
        return [self._record("eval", p.item.id, p, o, v, per_q) for p, o, v in zip(plans, outs, verdicts)]

    def checkpoint(self, out: Path, step: int) -> None:
        if self.learner is not None:
            self.learner.save(out, step)

    def restore(self, out: Path) -> int:
        return self.learner.restore(out) if self.learner is not None else 0

    def load(self, path: Path) -> None:
        if self.learner is None:
            raise ValueError(f"--params: method {self.config.method} has no learned parameters to load")
        self.learner.load(path)

    def api_tokens(self) -> dict:
        return dict(self.api_usage)

    # ---------------------------------------------------------------- planning

    def _eval_plan(self, item) -> Plan:
        if self.learner is not None:
            return self.learner.plan(item, train=False, seed=_seed(self.config.seed, "eval", item.id))
        return fixed_plan(item, self.config, len(self.roles), seed=_seed(self.config.seed, "eval", item.id))

    # ---------------------------------------------------------------- execution

    def _speaks(self, plan: Plan, node: Node, last: Node) -> bool:
        """Whether an agent node writes text (else it thinks in latent space)."""
        if not self.config.latent:
            return True
        if self.config.decision == "direct":
            return node == last
        if self.config.decision in ("vote", "code"):
            return node[0] == plan.num_rounds - 1
        return False

    def _run(self, plans: list[Plan], *, train: bool, step: int) -> list[QuestionOut]:
        outputs: list[dict[Node, NodeOut]] = [{} for _ in plans]
        waves = [p.waves() for p in plans]
        lasts = [w[-1][-1] for w in waves]
        for depth in range(max(len(w) for w in waves)):
            think, speak = [], []
            for q, w in enumerate(waves):
                for node in w[depth] if depth < len(w) else []:
                    (speak if self._speaks(plans[q], node, lasts[q]) else think).append((q, node))
            if think:
                self._think(plans, outputs, think)
            if speak:
                self._speak(plans, outputs, speak, step=step)

        results: list[QuestionOut] = [QuestionOut("", outputs[q], None) for q in range(len(plans))]
        need_judger = []
        for q, plan in enumerate(plans):
            rule = self.config.decision
            finals = [n for n in plan.preds(DECISION)]
            if rule == "direct":
                results[q].answer = outputs[q][lasts[q]].text or ""
            elif rule == "vote":
                texts = [outputs[q][n].text or "" for n in finals]
                preds = [_prediction(plan.item, t) for t in texts]
                best = _majority(preds)
                results[q].answer = texts[best if best is not None else -1]
            elif rule == "code":
                passing = [n for n in finals if self._passes_examples(plan.item, outputs[q][n].text or "")]
                if passing:
                    results[q].answer = outputs[q][passing[0]].text or ""
                else:
                    need_judger.append(q)
            else:
                need_judger.append(q)
        if need_judger:
            self._judge(plans, outputs, results, need_judger, train=train, step=step)
        return results

    def _passes_examples(self, item, text: str) -> bool:
        from gcache.io.tasks import run_examples

        try:
            return bool(run_examples(item, text))
        except Exception as e:  # noqa: BLE001 - a sandbox failure means "did not pass"
            log.warning("question %s: running the examples failed: %s", item.id, e)
            return False

    def _incoming(self, plan: Plan, outputs: dict[Node, NodeOut], node: Node, *, grad: bool = False):
        """The fusion of a node's predecessors' caches (None when it has none)."""
        from gcache.core.fusion import fuse

        preds = [p for p in plan.preds(node) if outputs.get(p) is not None and outputs[p].cache is not None]
        if not preds:
            return None
        caches = [outputs[p].cache for p in preds]
        weights = torch.tensor([plan.edge_prob(p, node) for p in preds], dtype=torch.float32)
        params = self.learner.fuser if (self.learner is not None and self.config.fusion != "concat") else None
        if params is not None and not grad:
            params = type(params)(*(t.detach() for t in params))
        return fuse(params, caches, weights, mode=self.config.fusion, sources=[p[1] for p in preds])

    def _empty_cache(self):
        fns = self.local.fns
        return kv.empty(fns.num_layers, 1, fns.num_heads, fns.head_dim, dtype=fns.dtype, device=fns.device)

    def _stack(self, caches: list) -> kv.KVCache | None:
        if all(c is None for c in caches):
            return None
        return stack_rows([c if c is not None else self._empty_cache() for c in caches])

    def _think(self, plans: list[Plan], outputs: list[dict], rows: list[tuple[int, Node]]) -> None:
        """One batched latent rollout for every (question, agent) row of a wave."""
        from gcache.core.latent import rollout
        from gcache.io.models import encode_chat

        started = time.perf_counter()
        convs, incoming = [], []
        for q, node in rows:
            role = self.roles[node[1]]
            convs.append(self.prompts.agent_messages(self.config.task, role, plans[q].item.question, latent=True))
            incoming.append(self._incoming(plans[q], outputs[q], node))
        ids, mask = encode_chat(self.local, convs)  # [B, S], [B, S]
        ro = rollout(
            self.local.fns, self.local.realign, ids, mask,
            cache=self._stack(incoming), latent_steps=self.config.latent_steps,
        )  # fmt: skip
        per_row = (time.perf_counter() - started) / len(rows)
        for i, (q, node) in enumerate(rows):
            c = kv.trim_padding(kv.select_rows(ro.cache, [i]))
            if self.config.latent_only:
                c = kv.latent_part(c, self.config.latent_steps, self.config.sink_positions)
            outputs[q][node] = NodeOut(
                role=self.roles[node[1]].name,
                cache=c,
                tokens={"prompt": int(ro.prompt_tokens[i]), "latent": ro.latent_tokens, "generated": 0},
                seconds=per_row,
            )

    def _generate(self, convs: list, caches: list, *, step: int, key: str, cache_infos=None):
        """Answers for a batch of conversations in the run's generation mode. An API failure raises
        (``evaluate`` then answers the batch's questions one by one, recording each one's error)."""
        from gcache.io.backends import generate_answer
        from gcache.io.tasks import task_family

        mode = self.config.generation_mode
        stacked = self._stack(caches) if self.config.latent else None
        # Seeded by the rows it decodes, so sampled answers differ across batches but repeat across runs.
        gen = torch.Generator().manual_seed(_seed(self.config.seed, "decode", step, key))
        kwargs = dict(
            local=self.local, api=self.api, cache=stacked, cache_info=cache_infos,
            max_new_tokens=self.config.max_new_tokens, temperature=self.config.temperature, generator=gen,
            stop_family=task_family(self.config.task) if self.config.stop_at_answer else None,
        )  # fmt: skip
        if mode != "api_hint":
            kwargs.pop("cache_info")
        answers = asyncio.run(generate_answer(mode, convs, **kwargs))
        for a in answers:
            for k in self.api_usage:
                self.api_usage[k] += int(a.api_tokens.get(k, 0))
        return answers

    def _cache_info(self, plan: Plan, node: Node, cache) -> Any:
        from gcache.io.backends import CacheInfo

        return CacheInfo(len(plan.preds(node)), 0 if cache is None else cache.seq_len, self.config.latent_steps)

    def _speak(self, plans: list[Plan], outputs: list[dict], rows: list[tuple[int, Node]], *, step: int) -> None:
        """One batched generation for every (question, agent) row of a wave that writes text."""
        started = time.perf_counter()
        convs, caches, infos = [], [], []
        for q, node in rows:
            role = self.roles[node[1]]
            question = plans[q].item.question
            if self.config.latent:
                c = self._incoming(plans[q], outputs[q], node)
                convs.append(self.prompts.agent_messages(self.config.task, role, question, latent=c is not None))
                caches.append(c)
                infos.append(self._cache_info(plans[q], node, c))
            else:
                texts = [(outputs[q][p].role, outputs[q][p].text or "") for p in plans[q].preds(node)]
                convs.append(self.prompts.agent_messages(self.config.task, role, question, predecessor_texts=texts))
                caches.append(None)
        key = ",".join(f"{plans[q].item.id}/{node}" for q, node in rows)
        answers = self._generate(convs, caches, step=step, key=key, cache_infos=infos if self.config.latent else None)
        per_row = (time.perf_counter() - started) / len(rows)
        for (q, node), a in zip(rows, answers):
            outputs[q][node] = NodeOut(
                role=self.roles[node[1]].name, cache=None, text=a.text, tokens=dict(a.tokens), seconds=per_row
            )

    def _judge(self, plans, outputs, results, qs: list[int], *, train: bool, step: int) -> None:
        """The decision node of each question in ``qs`` reads its predecessors and writes the answer."""
        started = time.perf_counter()
        convs, caches, infos = [], [], []
        for q in qs:
            plan = plans[q]
            question = plan.item.question
            if self.config.latent:
                c = self._incoming(plan, outputs[q], DECISION)
                convs.append(self.prompts.decision_messages(self.config.task, question, latent=c is not None))
                caches.append(c)
                infos.append(self._cache_info(plan, DECISION, c))
            else:
                texts = [(outputs[q][p].role, outputs[q][p].text or "") for p in plan.preds(DECISION) if p in outputs[q]]
                convs.append(self.prompts.decision_messages(self.config.task, question, predecessor_texts=texts))
                caches.append(None)
        if train and self.learner is not None and self.learner.trains_fuser:
            losses = self.learner.fuser_losses(self, plans, outputs, qs, convs)
            for q, loss in zip(qs, losses):
                results[q].fuser_loss = loss
        key = ",".join(f"{plans[q].item.id}/decision" for q in qs)
        answers = self._generate(convs, caches, step=step, key=key, cache_infos=infos if self.config.latent else None)
        per_row = (time.perf_counter() - started) / len(qs)
        for q, a in zip(qs, answers):
            results[q].answer = a.text
            results[q].decision = NodeOut(role="decision", text=a.text, tokens=dict(a.tokens), seconds=per_row)

    # ---------------------------------------------------------------- records

    def _score_all(self, plans: list[Plan], outs: list[QuestionOut]) -> list:
        """Verdicts of a batch (code runs in parallel sandboxes); a failed question scores wrong."""
        from gcache.io.tasks import score_many

        return score_many([p.item for p in plans], [o.answer for o in outs])

    def _record(self, phase: str, rid: str, plan: Plan, out: QuestionOut, verdict, seconds: float, **extra) -> dict:
        tokens = {"prompt": 0, "latent": 0, "generated": 0}
        trace = []
        nodes = sorted(out.outputs.items()) + ([(DECISION, out.decision)] if out.decision is not None else [])
        for node, o in nodes:
            for k in tokens:
                tokens[k] += int(o.tokens.get(k, 0))
            trace.append({
                "node": "decision" if node == DECISION else f"r{node[0]}:a{node[1]}",
                "role": o.role,
                "text": o.text,
                "tokens": o.tokens,
                "cache_len": None if o.cache is None else o.cache.seq_len,
                "seconds": round(o.seconds, 4),
            })  # fmt: skip
        return {
            "id": rid,
            "phase": phase,
            "gold": plan.item.gold,
            "prediction": verdict.prediction,
            "correct": bool(verdict.correct),
            "tokens": tokens,
            "seconds": round(seconds, 4),
            "edges": self._edges(plan),
            "trace": trace,
            "error": out.error,
            "score_note": verdict.error,
            "answer": out.answer,
            "log_prob": float(plan.log_prob.detach()),
            **extra,
        }

    def _edges(self, plan: Plan) -> list[dict]:
        n = plan.spatial.shape[0]
        name = lambda j: f"{j}:{self.roles[j].name}"  # noqa: E731
        edges = []
        for kind, adj, probs in (("spatial", plan.spatial, plan.spatial_probs), ("temporal", plan.temporal, plan.temporal_probs)):
            if kind == "temporal" and plan.num_rounds < 2:
                continue
            for i in range(n):
                for j in range(n):
                    p = None if probs is None else float(probs[i, j])
                    if bool(adj[i, j]) or (p is not None and p > 0):
                        edges.append({"src": name(i), "dst": name(j), "kind": kind, "p": 1.0 if p is None else p, "taken": bool(adj[i, j])})
        return edges


def decision_rule(config: RunConfig) -> str:
    """Which agents feed the decision node: all of the last round, or only the sinks when caches
    accumulate along paths (full caches), so no agent's content reaches the judger twice."""
    return "sinks" if (config.latent and not config.latent_only) else "all"


def topology_config(config: RunConfig, num_agents: int):
    from gcache.core.topology import TopologyConfig

    return TopologyConfig(
        num_agents=num_agents,
        mode=config.topology,
        num_rounds=config.num_rounds,
        optimize_spatial=config.optimize_spatial,
        optimize_temporal=config.optimize_temporal,
        decision=decision_rule(config),
    )


def fixed_plan(item, config: RunConfig, num_agents: int, *, seed: int) -> Plan:
    """The plan of a fixed topology: every candidate edge of the mode's mask is taken."""
    from gcache.core.topology import decision_inputs, spatial_mask

    mask = spatial_mask(config.topology, num_agents, generator=torch.Generator().manual_seed(config.seed))
    spatial = mask & torch.ones(num_agents, num_agents, dtype=torch.bool).triu(1)
    temporal = torch.ones(num_agents, num_agents, dtype=torch.bool) if config.num_rounds > 1 else torch.zeros(num_agents, num_agents, dtype=torch.bool)
    inputs = decision_inputs(spatial, decision_rule(config))
    return Plan(item, spatial, temporal, torch.zeros(()), None, None, config.num_rounds, inputs)


def reference_text(item) -> str:
    """The reference answer the fuser learns to make likely: a worked solution, a program, an option."""
    meta = getattr(item, "meta", {}) or {}
    for key in ("reference", "solution", "canonical_solution", "answer_text"):
        if meta.get(key):
            return str(meta[key])
    return str(item.gold)


class Learner:
    """The learned parts of a method (topology policy, cache fuser), their optimizer and baseline.

    Parameters live in one tree ``{"policy": PolicyParams, "fuser": FuserParams}`` (only the
    parts the method learns) updated by the core's pure Adam; this object only holds the
    current tree between steps.
    """

    def __init__(self, config: RunConfig, roles, local, encoder) -> None:
        from gcache.core.fusion import FuserConfig, init_fuser
        from gcache.core.optim import adam
        from gcache.core.reinforce import init_baseline
        from gcache.core.topology import init_policy, spatial_mask

        self.config = config
        self.local = local
        self.encoder = encoder
        n = len(roles)
        self.topo = topology_config(config, n)
        self.mask = spatial_mask(config.topology, n, generator=torch.Generator().manual_seed(config.seed))
        self.params: dict[str, Any] = {}
        if config.optimize_spatial or config.optimize_temporal:
            from gcache.io.embed import role_embeddings

            self.role_embeddings = role_embeddings([r.profile for r in roles], encoder=encoder)  # [N, E]
            self.role_adjacency = torch.ones(n, n)
            feature_dim = 2 * self.role_embeddings.shape[-1]
            self.params["policy"] = init_policy(self.topo, feature_dim, torch.Generator().manual_seed(config.seed))
        if config.method == "gcache" and config.fusion != "concat":
            fcfg = FuserConfig(num_layers=local.fns.num_layers, num_agents=n, mode=config.fusion)
            self.params["fuser"] = init_fuser(fcfg)
        self.opt = adam(config.lr)
        self.opt_state = self.opt.init(self.params)
        self.baseline = init_baseline()
        self._questions: dict[str, Tensor] = {}

    @property
    def trains_fuser(self) -> bool:
        return "fuser" in self.params

    @property
    def fuser(self):
        return self.params.get("fuser")

    # ------------------------------------------------------------ topology

    def _question_embedding(self, item) -> Tensor:
        from gcache.io.embed import embed_texts

        if item.id not in self._questions:
            self._questions[item.id] = embed_texts([item.question], encoder=self.encoder)[0]
        return self._questions[item.id]

    def plan(self, item, *, train: bool, seed: int) -> Plan:
        """A sampled (train) or deterministic (eval) topology for one question."""
        from gcache.core.topology import deterministic_topology, node_features, policy_logits, sample_topology

        if "policy" not in self.params:
            return fixed_plan(item, self.config, self.topo.num_agents, seed=seed)
        features = node_features(self.role_embeddings, self._question_embedding(item))  # [N, 2E]
        logits = policy_logits(self.params["policy"], features, self.role_adjacency)
        if train:
            topo = sample_topology(logits, self.mask, self.topo, torch.Generator().manual_seed(seed))
        else:
            topo = deterministic_topology(logits, self.mask, self.topo)
        spatial_probs = torch.sigmoid(logits.edge.detach()) * self.mask
        temporal_probs = torch.sigmoid(logits.temporal.detach()) if self.topo.num_rounds > 1 else None
        return Plan(
            item, topo.spatial, topo.temporal, topo.log_prob, spatial_probs, temporal_probs,
            self.topo.num_rounds, topo.decision_inputs,
        )  # fmt: skip

    # ------------------------------------------------------------ fuser objective

    def fuser_losses(self, pipeline: "Pipeline", plans, outputs, qs: list[int], convs: list) -> list[Tensor | None]:
        """Per question, -mean log p(reference | fused decision cache, decision prompt), with grad to the fuser."""
        from gcache.core.objectives import answer_batch, fuser_loss
        from gcache.io.models import encode_chat

        tok = self.local.tokenizer
        losses: list[Tensor | None] = []
        for q, conv in zip(qs, convs):
            plan = plans[q]
            preds = [p for p in plan.preds(DECISION) if outputs[q].get(p) is not None and outputs[q][p].cache is not None]
            if not preds:
                losses.append(None)
                continue
            ids, mask = encode_chat(self.local, [conv])
            prompt = ids[0][mask[0].bool()].tolist()
            answer = tok.encode(reference_text(plan.item), add_special_tokens=False)[:256]
            answer += list(self.local.eos_token_ids[:1])
            batch = answer_batch([prompt], [answer], pad_token_id=tok.pad_token_id or 0)
            weights = torch.tensor([plan.edge_prob(p, DECISION) for p in preds])
            losses.append(
                fuser_loss(
                    self.params["fuser"], self.local.fns, [outputs[q][p].cache for p in preds], weights, batch,
                    mode=self.config.fusion, sources=[p[1] for p in preds],
                )
            )  # fmt: skip
        return losses

    # ------------------------------------------------------------ update

    def start_step(self) -> None:
        """Make the current parameters leaves that record gradients for this step."""
        from gcache.core.optim import tree_map

        self.params = tree_map(lambda t: t.detach().requires_grad_(True), self.params)

    def update(self, plans: list[Plan], outs: list[QuestionOut], rewards: list[float]) -> dict:
        """One Adam step on REINFORCE-with-baseline (policy) plus the fuser objective."""
        from gcache.core.optim import apply_updates, tree_leaves, tree_map
        from gcache.core.reinforce import baseline_value, batch_baseline, reinforce_loss, update_baseline

        r = torch.tensor(rewards, dtype=torch.float32)
        total = torch.zeros(())
        stats: dict[str, float] = {}
        if "policy" in self.params:
            log_probs = torch.stack([p.log_prob for p in plans])
            # Before any batch the running mean knows nothing: use the batch's leave-one-out mean.
            base = baseline_value(self.baseline) if int(self.baseline.count) else batch_baseline(r)
            policy_loss = reinforce_loss(log_probs, r, base)
            total = total + policy_loss
            stats["policy_loss"] = float(policy_loss.detach())
        fuser_terms = [o.fuser_loss for o in outs if o.fuser_loss is not None]
        if fuser_terms:
            fuser_loss = torch.stack(fuser_terms).mean()
            total = total + fuser_loss
            stats["fuser_loss"] = float(fuser_loss.detach())
        self.baseline = update_baseline(self.baseline, r)
        leaves = tree_leaves(self.params)
        if total.requires_grad:
            grads = torch.autograd.grad(total, leaves, allow_unused=True)
        else:
            grads = [None] * len(leaves)
        it = iter([torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)])
        grad_tree = tree_map(lambda _: next(it), self.params)
        updates, self.opt_state = self.opt.update(grad_tree, self.opt_state, self.params)
        self.params = tree_map(lambda t: t.detach(), apply_updates(self.params, updates))
        return stats

    # ------------------------------------------------------------ persistence

    def save(self, out: Path, step: int) -> None:
        """Write params.safetensors, then the optimizer/baseline state with the finished step count."""
        from gcache.io.params import save_params
        from gcache.io.runlog import PARAMS, STATE

        save_params(Path(out) / PARAMS, self.params)
        state = {"opt_state": self.opt_state, "baseline": self.baseline, "step": torch.tensor(step)}
        save_params(Path(out) / STATE, state)

    def restore(self, out: Path) -> int:
        """Reload the last checkpoint of a run folder; returns the number of finished steps (0: none)."""
        from gcache.io.params import load_params
        from gcache.io.runlog import PARAMS, STATE

        path, state = Path(out) / PARAMS, Path(out) / STATE
        if not path.exists() or not state.exists():
            return 0
        like = {"opt_state": self.opt_state, "baseline": self.baseline, "step": torch.tensor(0)}
        saved = load_params(state, like)
        self.params = load_params(path, self.params)
        self.opt_state, self.baseline = saved["opt_state"], saved["baseline"]
        return int(saved["step"])

    def load(self, path: Path) -> None:
        from gcache.io.params import load_params

        self.params = load_params(Path(path), self.params)


TINY_MODELS = {"tiny-llama": "llama", "tiny-qwen3": "qwen3"}


def load_local(config: RunConfig):
    """The local model of a run; ``tiny-llama`` / ``tiny-qwen3`` are seeded random models for smoke tests."""
    from gcache.io.models import load_model, tiny_model

    if config.model in TINY_MODELS:
        return tiny_model(TINY_MODELS[config.model], seed=config.seed)
    return load_model(config.model, device=config.device, dtype=config.dtype, threads=config.threads)


def build_pipeline(config: RunConfig) -> Pipeline:
    """Load what a method needs (local model unless text-only API, API client for API modes,
    roles, sentence encoder and learned parts when it learns)."""
    from gcache.io import prompts

    local = None
    if config.generation_mode != "api" or config.latent:
        local = load_local(config)
    api = None
    if config.generation_mode != "local":
        from gcache.io.backends import ApiClient

        api = ApiClient(api_config(config))
    if config.method == "latent-mas":
        roles = prompts.latent_mas_roles()
    else:
        roles = prompts.agent_roles(config.task, config.agents, config.agent_nums)
    pipeline = Pipeline(config, local, api, roles)
    if config.learns:
        encoder = None
        if config.optimize_spatial or config.optimize_temporal:
            from gcache.io.embed import load_encoder

            encoder = load_encoder()
        pipeline.learner = Learner(config, roles, local, encoder)
    return pipeline
