"""The multi-agent runner: a batch of questions answered along their graphs, scored, recorded.

One run is a ``Pipeline`` assembled once by ``build_pipeline`` from four choices:

- a planner (gcache.io.runner.planner): a fixed topology, or the learned policy;
- a communication strategy (gcache.io.runner.communication): latent caches, or text;
- a decision rule (gcache.io.runner.decision): refer, direct, vote or code;
- a speaker: how text is written (the generation mode: local, api_hint, hybrid, api) with
  the run's ``Decoding``.

Answering a batch: each question gets a ``Plan`` (its graph and schedule); nodes run wave by
wave, and every node of a wave across the batch runs at once: the thinking ones in one
batched latent rollout, the speaking ones in one batched generation (or concurrent API
requests); then the rule decides each answer, or the judger writes it from the decision
node's context. Training answers with sampled graphs and no gradient, scores, and then
calls the core's pure ``train_step`` (gcache.io.runner.learner).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch

from gcache.core.fusion import FuserConfig
from gcache.core.graph import DECISION, Node, live_nodes
from gcache.core.latent import Decoding
from gcache.core.reinforce import penalize_edges
from gcache.core.rewards import reward
from gcache.core.topology import TopologyConfig, num_edges
from gcache.io.models.api import ApiClient, ApiOutageError
from gcache.io.models.embed import load_encoder
from gcache.io.models.generation import Answer, answer_stop, generate_answer
from gcache.io.models.local import LocalModel, load_model, tiny_model
from gcache.io.runner.communication import (
    Communication,
    Context,
    LatentCaches,
    NodeOut,
    Outputs,
    Rollouts,
    TextMessages,
    stack_contexts,
)
from gcache.io.runner.config import TINY_MODELS, RunConfig, api_config
from gcache.io.runner.decision import DECISIONS, Decision
from gcache.io.runner.learner import Learner, Team
from gcache.io.runner.margin import answer_scores, has_distractors
from gcache.io.runner.planner import FixedGraph, LearnedGraph, Plan, Planner, candidate_mask, graph_spec
from gcache.io.runner.prompts import Role, agent_roles, item_roles, latent_mas_roles
from gcache.io.tasks.datasets import Item, task_family
from gcache.io.tasks.scoring import Verdict, score_many

log = logging.getLogger(__name__)

NOT_DECODED = "not decoded: only the answer log-probability was measured"
LOSSES = ("policy_loss", "fuser_loss")  # a training step's loss parts, recorded on its train lines


def _seed(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (the same run, step and question give the same draw)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class QuestionOut(NamedTuple):
    """A question's answer and what produced it."""

    answer: str
    outputs: Outputs  # every agent node's output
    decision: NodeOut | None  # the judger's output (None when the rule took an agent's text)
    context: Context | None  # what the answer was decoded from: the judger's, or the answering agent's
    error: str | None = None
    refused: bool = False  # the API client refused to send it (endpoint held for down): not tried

    @property
    def judged(self) -> Context | None:
        """The decision node's context when the judger wrote the answer (what the fuser learns on)."""
        return self.context if self.decision is not None else None


def _failed(error: Exception) -> QuestionOut:
    return QuestionOut("", {}, None, None, f"{type(error).__name__}: {error}", isinstance(error, ApiOutageError))


class Speaker:
    """Writes text for a batch of contexts in the run's generation mode; counts API tokens."""

    def __init__(self, mode: str, local: LocalModel | None, api: ApiClient | None, decoding: Decoding) -> None:
        self.mode, self.local, self.api, self.decoding = mode, local, api, decoding
        self.api_usage = {"prompt": 0, "completion": 0}

    def write(self, contexts: Sequence[Context], *, seed: int) -> list[Answer]:
        """One answer per context. An API failure raises (the caller records it)."""
        infos = [c.info for c in contexts] if self.mode == "api_hint" else None
        answers = generate_answer(
            self.mode, [c.conversation for c in contexts], replace(self.decoding, seed=seed),
            local=self.local, api=self.api, cache=stack_contexts(self.local, [c.cache for c in contexts]),
            cache_info=infos,
        )  # fmt: skip
        for a in answers:
            for k in self.api_usage:
                self.api_usage[k] += int(a.api_tokens.get(k, 0))
        return answers


class Pipeline:
    """A run's components and how they answer, train on and record a batch."""

    ranks = 1  # processes answering each batch together (gcache.io.runner.distributed.TeamPipeline: several)

    def __init__(
        self, config: RunConfig, roles: Sequence[Role], planner: Planner, comm: Communication,
        decision: Decision, speaker: Speaker, learner: Learner | None,
    ) -> None:  # fmt: skip
        self.config, self.roles, self.planner = config, list(roles), planner
        self.comm, self.decision, self.speaker, self.learner = comm, decision, speaker, learner

    # ---------------------------------------------------------------- public

    def train_step(self, items: Sequence[Item], step: int) -> list[dict]:
        """Answer a train batch with sampled graphs, update the learned parts, return its records.

        The reward of each question is ``gcache.core.rewards.reward(config.reward, ...)``: with
        ``likelihood`` the judger does not decode (the reward reads only its context), and the
        records say so. A batch that fails (an API error, say) is recorded with its error and
        makes no update.
        """
        if not items:  # a rank of a team with no question of this batch still takes the step
            if self.learner is not None:
                self.learner.update([], [], torch.zeros(0))
            return []
        started = time.perf_counter()
        plans = [self._plan(item, train=True, seed=_seed(self.config.seed, "train", step, item.id)) for item in items]
        decode = self.config.reward not in ("likelihood", "margin")
        shared: set[int] = set()  # rows whose answer log-probability the learner's own forward measures
        # The learner's forward reads no distractors: questions that have them are measured here.
        contrasted = any(has_distractors(p.item) for p in plans)
        try:
            outs = self._answer(plans, step=step, decode=decode)
            # The learner's forward measures rewards without the edge cost: with one, they are measured here.
            if self.learner is not None and self.learner.measures_answers and not contrasted and not self.config.edge_cost:
                shared = set(self.learner.fused_rows([o.judged for o in outs]))
            logprobs, margins = self._answer_logprobs(plans, outs, skip=shared)
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            log.warning("train step %d failed: %s", step, e)
            outs, logprobs, margins = [_failed(e) for _ in plans], [None] * len(plans), [None] * len(plans)
        verdicts = self._verdicts(plans, outs, decode)
        correct = [v.correct if decode else None for v in verdicts]
        failed = any(o.error for o in outs)
        rewards: list[float | None] = [None] * len(plans)
        if not failed:  # the rows the step measures get their rewards from it
            rewards = [
                None if q in shared else reward(self.config.reward, c, lp, margin=m)
                for q, (c, lp, m) in enumerate(zip(correct, logprobs, margins))
            ]  # fmt: skip
            if self.config.edge_cost:  # no row is shared then: every reward is a number
                edges = torch.stack([num_edges(p.topology) for p in plans])
                rewards = penalize_edges(torch.tensor(rewards, dtype=torch.float64), edges, self.config.edge_cost).tolist()
        losses: dict[str, float] = {}
        if self.learner is not None:
            # Every process of a team calls the step, even on a failed batch: they agree to skip it together.
            values = torch.tensor([0.0 if r is None else r for r in rewards])
            done = self.learner.update(
                plans, [o.judged for o in outs], values, failed=failed,
                measure=self.config.reward if shared else None, correct=correct,
            )  # fmt: skip
            logprobs = [done.answer_logprobs.get(q, lp) for q, lp in enumerate(logprobs)]
            rewards = [done.rewards.get(q, r) for q, r in enumerate(rewards)]
            losses = {k: done.stats[k] for k in LOSSES if k in done.stats}
        seconds = (time.perf_counter() - started) / len(items)
        return [
            self._record("train", f"{step}:{p.item.id}", p, o, v, seconds, decode, step=step, answer_logprob=lp, margin=m,
                         reward=r, **losses)
            for p, o, v, lp, m, r in zip(plans, outs, verdicts, logprobs, margins, rewards)
        ]  # fmt: skip

    def evaluate(self, items: Sequence[Item], *, decode: bool = True) -> list[dict]:
        """Answer an eval batch with deterministic graphs and no gradient; one record per question.
        A failing batch is answered question by question, each failure recorded with its error.
        With ``decode`` False the judger only reads its context: the records hold the answer
        log-probability and no answer (agents that speak under the decision rule still write)."""
        started = time.perf_counter()
        plans = [self._plan(item, train=False, seed=_seed(self.config.seed, "eval", item.id)) for item in items]
        try:
            outs = self._answer(plans, step=0, decode=decode)
            logprobs, margins = self._answer_logprobs(plans, outs)
        except Exception as e:  # noqa: BLE001 - isolate the failing question, keep the others
            # With the endpoint held for down, retrying question by question only repeats the local work.
            if len(items) > 1 and not isinstance(e, ApiOutageError):
                log.warning("a batch failed (%s); answering its questions one by one", e)
                return [r for item in items for r in self.evaluate([item], decode=decode)]
            log.warning("%s failed: %s", ", ".join(str(item.id) for item in items), e)
            outs, logprobs, margins = [_failed(e) for _ in items], [None] * len(items), [None] * len(items)
        verdicts = self._verdicts(plans, outs, decode)
        seconds = (time.perf_counter() - started) / len(items)
        return [
            self._record("eval", p.item.id, p, o, v, seconds, decode, answer_logprob=lp, margin=m)
            for p, o, v, lp, m in zip(plans, outs, verdicts, logprobs, margins)
        ]

    @staticmethod
    def _verdicts(plans: Sequence[Plan], outs: Sequence[QuestionOut], decode: bool) -> list[Verdict]:
        if not decode:
            return [Verdict(False, None, NOT_DECODED) for _ in plans]
        return score_many([p.item for p in plans], [o.answer for o in outs])

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
        return dict(self.speaker.api_usage)

    @property
    def api(self) -> ApiClient | None:
        """The run's API client (None for local runs)."""
        return self.speaker.api

    @property
    def outage(self) -> str | None:
        """Why the run's API client holds its endpoint for down (its circuit breaker), or None."""
        outage = None if self.speaker.api is None else self.speaker.api.outage
        return None if outage is None else str(outage)

    # ---------------------------------------------------------------- answering

    def _plan(self, item: Item, *, train: bool, seed: int) -> Plan:
        return self.planner.plan(item, train=train, seed=seed)

    def _thinks(self, speakers: frozenset[Node], node: Node) -> bool:
        return self.comm.thinks and node not in speakers

    def _answer(self, plans: Sequence[Plan], *, step: int, decode: bool = True) -> list[QuestionOut]:
        """Run every question's graph wave by wave, then decide each answer (no gradient).

        With ``decode`` False the judger builds its context but writes nothing (its answer is "");
        agents that speak under the decision rule still do (their text is their message)."""
        with torch.no_grad():
            outputs: list[Outputs] = [{} for _ in plans]
            contexts: list[dict[Node, Context]] = [{} for _ in plans]  # of the agents that wrote text
            speakers = [self.decision.speakers(p.schedule) for p in plans]
            # Agents with no path to the decision node (or to a speaker whose text is used) are not run.
            live = [live_nodes(p.schedule, speakers[q]) for q, p in enumerate(plans)]
            for depth in range(max(len(p.schedule.waves) for p in plans)):
                waves = [
                    tuple(n for n in p.schedule.waves[depth] if n in live[q]) if depth < len(p.schedule.waves) else ()
                    for q, p in enumerate(plans)
                ]  # fmt: skip
                rows = [(q, n) for q, wave in enumerate(waves) for n in wave]
                think = [(q, n) for q, n in rows if self._thinks(speakers[q], n)]
                speak = [(q, n) for q, n in rows if not self._thinks(speakers[q], n)]
                if think:
                    done = self.comm.think([(plans[q].item, plans[q].schedule, outputs[q], n) for q, n in think])
                    for (q, n), out in zip(think, done):
                        outputs[q][n] = out
                if speak:
                    self._speak(plans, outputs, contexts, speak, step=step)
            chosen = [self.decision.decide(p.item, p.schedule, outputs[q]) for q, p in enumerate(plans)]
            judged = self._judge(plans, outputs, [q for q, node in enumerate(chosen) if node is None], step=step, decode=decode)
        return [
            judged[q] if node is None else QuestionOut(outputs[q][node].text or "", outputs[q], None, contexts[q][node])
            for q, node in enumerate(chosen)
        ]

    def _speak(
        self, plans: Sequence[Plan], outputs: list[Outputs], contexts: list[dict[Node, Context]],
        rows: list[tuple[int, Node]], *, step: int,
    ) -> None:  # fmt: skip
        """One batched generation for every (question, agent node) row of a wave that writes text."""
        started = time.perf_counter()
        read = [self.comm.context(plans[q].item, plans[q].schedule, outputs[q], n) for q, n in rows]
        key = ",".join(f"{plans[q].item.id}/{n}" for q, n in rows)
        answers = self.speaker.write(read, seed=_seed(self.config.seed, "decode", step, key))
        seconds = (time.perf_counter() - started) / len(rows)
        for (q, n), a, c in zip(rows, answers, read):
            outputs[q][n] = NodeOut(item_roles(plans[q].item, self.roles)[n[1]].name, None, a.text, dict(a.tokens), seconds)
            contexts[q][n] = c._replace(read=a.read)

    def _judge(
        self, plans: Sequence[Plan], outputs: list[Outputs], qs: list[int], *, step: int, decode: bool = True
    ) -> dict[int, QuestionOut]:
        """The decision node of each question in ``qs`` reads its inputs and writes the answer
        (with ``decode`` False, only reads: the answer is "" and nothing is generated)."""
        if not qs:
            return {}
        started = time.perf_counter()
        contexts = [self.comm.context(plans[q].item, plans[q].schedule, outputs[q], DECISION) for q in qs]
        if not decode:
            seconds = (time.perf_counter() - started) / len(qs)
            return {q: QuestionOut("", outputs[q], NodeOut("decision", None, None, {}, seconds), c) for q, c in zip(qs, contexts)}
        key = ",".join(f"{plans[q].item.id}/decision" for q in qs)
        answers = self.speaker.write(contexts, seed=_seed(self.config.seed, "decode", step, key))
        seconds = (time.perf_counter() - started) / len(qs)
        return {
            q: QuestionOut(a.text, outputs[q], NodeOut("decision", None, a.text, dict(a.tokens), seconds), c._replace(read=a.read))
            for q, a, c in zip(qs, answers, contexts)
        }

    def _answer_logprobs(
        self, plans: Sequence[Plan], outs: Sequence[QuestionOut], *, skip: set[int] = frozenset()
    ) -> tuple[list[float | None], list[float | None]]:  # fmt: skip
        """Per question, the reference answer's mean log-probability per token under the context the
        answer was (or would be) decoded from (gcache.io.runner.answers), and its contrastive margin over the
        item's distractors (gcache.io.runner.margin; None for items without), in one batched forward with no
        gradient (over the answer lines alone where the decode kept its read of every context); None
        where there is no context (a failed question), no local model (API text), or the row is in
        ``skip`` (measured elsewhere)."""
        local = self.speaker.local
        rows = [q for q, o in enumerate(outs) if o.context is not None and o.error is None and q not in skip]
        found: list[float | None] = [None] * len(outs)
        margins: list[float | None] = [None] * len(outs)
        if local is None or not rows:
            return found, margins
        with torch.no_grad():
            values, contrasts = answer_scores(
                local, [outs[q].context.conversation for q in rows], [outs[q].context.cache for q in rows],
                [plans[q].item for q in rows], reads=[outs[q].context.read for q in rows],
            )  # fmt: skip
        for q, v, m in zip(rows, values.tolist(), contrasts):
            found[q], margins[q] = float(v), m
        return found, margins

    # ---------------------------------------------------------------- records

    def _record(
        self, phase: str, rid: str, plan: Plan, out: QuestionOut, verdict: Verdict, seconds: float, decoded: bool, **extra
    ) -> dict:  # fmt: skip
        """One results.jsonl line; ``correct`` is None where nothing was decoded."""
        tokens = {"prompt": 0, "latent": 0, "generated": 0}
        roles = item_roles(plan.item, self.roles)
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
            "correct": bool(verdict.correct) if decoded else None,
            "tokens": tokens,
            "seconds": round(seconds, 4),
            "edges": self._edges(plan),
            "decision_inputs": [_agent_name(roles, j) for j, fed in enumerate(plan.topology.decision_inputs.tolist()) if fed],
            "trace": trace,
            "error": out.error,
            **({"refused": True} if out.refused else {}),
            "score_note": verdict.error,
            "answer": out.answer,
            "log_prob": float(plan.topology.log_prob),
            **extra,
        }

    def _edges(self, plan: Plan) -> list[dict]:
        """Every taken edge and every edge the policy gives a probability, with that probability."""
        n = plan.schedule.num_agents
        roles = item_roles(plan.item, self.roles)
        name = lambda j: _agent_name(roles, j)  # noqa: E731
        kinds = [("spatial", plan.topology.spatial, plan.spatial_probs)]
        if plan.schedule.num_rounds > 1:
            kinds.append(("temporal", plan.topology.temporal, plan.temporal_probs))
        edges = []
        for kind, adj, probs in kinds:
            for i in range(n):
                for j in range(n):
                    p = None if probs is None else float(probs[i, j])
                    if bool(adj[i, j]) or (p is not None and p > 0):
                        edges.append({"src": name(i), "dst": name(j), "kind": kind, "p": 1.0 if p is None else p, "taken": bool(adj[i, j])})
        return edges


def _agent_name(roles: Sequence[Role], j: int) -> str:
    """Agent j as results.jsonl names it: "j:Role" (the question's roles: routing questions name their own)."""
    return f"{j}:{roles[j].name}"


# -------------------------------------------------------------------- assembly


def load_local(config: RunConfig) -> LocalModel:
    """The local model of a run; ``tiny-llama`` / ``tiny-qwen3`` are seeded random models for smoke tests."""
    decode_step = "compiled" if config.compile else "dynamic"
    if config.model in TINY_MODELS:
        return tiny_model(TINY_MODELS[config.model], seed=config.seed, weights=config.weights, decode_step=decode_step)
    return load_model(
        config.model, device=config.device, dtype=config.dtype, weights=config.weights, threads=config.threads,
        decode_step=decode_step,
    )  # fmt: skip


def _roles(config: RunConfig) -> list[Role]:
    if config.method == "latent-mas":
        return latent_mas_roles()
    return agent_roles(config.task, config.agents, config.num_agents)


def build_pipeline(
    config: RunConfig, *, team: Team | None = None, roles: Sequence[Role] | None = None, rollouts: Rollouts | None = None,
) -> Pipeline:
    """The one place where a run's method becomes components: the local model (unless text-only
    API), the API client (API modes), the roles, the planner, the communication, the decision
    rule, the speaker and the learned parts (which, under a ``team`` of processes, step together).

    ``roles`` replaces the method's agents (default: the task family's roles, ``config.agents``,
    ``config.num_agents`` of them; LatentMAS's three thinkers for latent-mas). ``rollouts``: a memo
    the latent communication shares with other pipelines (benchmarks comparing methods on the same
    questions; see ``Rollouts``).
    """
    latent = config.method in ("latent-mas", "gcache")
    if roles is not None and (not roles or not all(isinstance(r, Role) for r in roles)):
        raise ValueError(f"roles: expected a non-empty sequence of Role, got {roles!r:.80}")
    local = load_local(config) if (config.generation_mode != "api" or latent) else None
    api = ApiClient(api_config(config)) if config.generation_mode != "local" else None
    roles = list(roles) if roles is not None else _roles(config)
    decision = DECISIONS[config.decision]
    # Latent agents think; a full cache holds its inputs' caches (LatentCaches.accumulates).
    thinks, accumulates = latent, latent and not config.latent_only
    topo = TopologyConfig(
        num_agents=len(roles), mode=config.topology, num_rounds=config.num_rounds,
        optimize_spatial=config.optimize_spatial, optimize_temporal=config.optimize_temporal,
        wiring="learned" if config.learn_decision_inputs else decision.wiring(accumulates, thinks),
    )  # fmt: skip
    mask = candidate_mask(topo, config.seed)
    spec = graph_spec(topo, mask) if config.learns_graph else None
    learner = None
    if config.learns:
        fuser = None
        if config.method == "gcache" and config.fusion != "concat":
            fuser = FuserConfig(num_layers=local.fns.num_layers, num_agents=len(roles), mode=config.fusion)
        learner = Learner(
            lr=config.lr, seed=config.seed, graph=spec, fuser=fuser, local=local,
            fuser_target="reference" if config.reward == "accuracy" else "answer", team=team,
        )  # fmt: skip
    # The planner and the communication read the learner's current parameters when they use them.
    planner: Planner = (
        FixedGraph(topo, mask) if spec is None else LearnedGraph(spec, [r.profile for r in roles], load_encoder(), learner)
    )
    comm: Communication
    if latent:
        comm = LatentCaches(
            config.task, local, roles, latent_steps=config.latent_steps, latent_only=config.latent_only,
            sink_positions=config.sink_positions, fusion=config.fusion, rollouts=rollouts, params=learner,
        )  # fmt: skip
    else:
        comm = TextMessages(config.task, roles)
    stop = answer_stop(local, task_family(config.task)) if (config.stop_at_answer and local is not None) else None
    decoding = Decoding(config.max_new_tokens, temperature=config.temperature, stop=stop)
    return Pipeline(config, roles, planner, comm, decision, Speaker(config.generation_mode, local, api, decoding), learner)


__all__ = ["Pipeline", "QuestionOut", "Speaker", "build_pipeline", "load_local"]
