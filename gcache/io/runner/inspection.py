"""What a latent run's agents thought and what its judger read: ``gcache inspect RUN``.

A run's chosen test questions are answered again, deterministically, from its saved config and
parameters (no training): the same planner, communication, fuser and decision rule as its
evaluation (``build_pipeline``, then ``Pipeline.load`` of ``params.safetensors``). Then, per
question:

- **latent tokens**: each thinking agent's prompt is read again on its fused input cache and its
  latent steps rerun one by one (gcache.core.latent's ``prefill`` and ``latent_step``). The
  vector fed back at latent step i is ``realign(h_{i-1})``, with ``h_0`` the prompt's last hidden
  state. It is shown two ways: the top-k tokens of ``softmax(lm_head(h_{i-1}))`` (what the model
  would have written there) and the top-k input embeddings by cosine similarity to the realigned
  vector (what the fed-back vector looks like as an input).
- **provenance**: every cache position carries a distribution over the agents it came from,
  ``[L, T, N]``: one-hot on an agent's own prompt and latent positions, and through fusion what
  fusion does to the positions themselves (the provenance runs through ``gcache.core.fusion.fuse``
  with the same weights, sources and fuser, and through ``latent_part``): side by side under
  ``concat`` (exact), the per-layer mixing coefficients under ``weighted`` and ``learned`` (an
  attribution: a mixed position belongs to its sources in proportion to their coefficients).
  A full cache passed along a chain keeps its earlier agents' positions, so the judger of a
  LatentMAS chain sees the planner's positions as the planner's.
- **attention**: the judger's context, the answer line's prefix and the reference answer's tokens
  (gcache.io.runner.answers) go through the model once with eager attention; at every query
  position that predicts an answer token, the attention (heads averaged) over the fused cache is
  split by provenance, and the rest is the judger's own prompt. Per layer, and averaged over layers
  and query tokens; the parts sum to 1 per query token.
- **fusion**: at every node fusing several caches, each source's edge weight, normalised weight
  and per-layer coefficient ``(1 - g_l) / k + g_l w_i`` (``weighted``/``learned``; ``concat``
  mixes nothing).
- **edges**: every candidate edge with the policy's probability (1 for a fixed graph) and
  whether the deterministic graph took it, and the judger's inputs.

Text methods (``single``, ``text-mas``) pass text, not caches: ``inspect_run`` refuses them.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor

from gcache.core import cache as kv
from gcache.core.fusion import fuse, gates, source_weights
from gcache.core.graph import DECISION, Node, Schedule
from gcache.core.latent import latent_step, prefill
from gcache.core.realign import apply_realign
from gcache.io.models.hf import backbone
from gcache.io.models.local import LocalModel, encode_chat
from gcache.io.records.runlog import CONFIG, PARAMS, RESULTS, latest_records, read_records
from gcache.io.runner.answers import answer_inputs
from gcache.io.runner.communication import Context, LatentCaches, Outputs
from gcache.io.runner.config import RunConfig, with_api_settings
from gcache.io.runner.pipeline import Pipeline, build_pipeline
from gcache.io.runner.planner import Plan
from gcache.io.runner.prompts import agent_messages
from gcache.io.tasks.datasets import Item, load_items

INSPECTION = "inspect.json"
PROMPT = "judger prompt"  # the attention source that is the judger's own context and answer line


class LatentStep(NamedTuple):
    """What one latent step fed back, read as tokens."""

    step: int  # 1-based: the latent position this vector filled
    head: list[tuple[str, float]]  # top-k (token, probability) of softmax(lm_head(h))
    embedding: list[tuple[str, float]]  # top-k (token, cosine) of the input embeddings to realign(h)


class AgentThought(NamedTuple):
    """One thinking agent of a question."""

    node: str  # "r0:a1": round 0, agent 1
    role: str
    inputs: list[str]  # the nodes whose caches it read
    steps: list[LatentStep]


class Fusion(NamedTuple):
    """How one node fused its inputs' caches."""

    node: str  # an agent ("r0:a1") or "decision"
    mode: str  # concat | weighted | learned
    sources: list[str]  # the inputs' nodes
    edge_weights: list[float]  # [k] the edges' probabilities
    source_weights: list[float] | None  # [k] normalised (learned: with the source logits); None for concat
    gates: list[float] | None  # [L] per-layer gates; None for concat
    coefficients: list[list[float]] | None  # [k][L] (1 - g_l)/k + g_l w_i; None for concat


class Attention(NamedTuple):
    """The attention mass the judger's answer tokens put on each source (heads and query tokens averaged)."""

    sources: list[str]  # agent names ("0:Math Solver") then PROMPT
    per_layer: list[list[float]]  # [L][S], each row sums to 1
    mean: list[float]  # [S], averaged over layers
    queries: list[str]  # the tokens at the query positions (the prefix's last, then the answer's but its last)
    positions: list[float]  # [S] positions of each source in the judger's context (fractional under mixing)
    attribution: str  # "positions" (concat: exact) or "coefficients" (mixing fusion: an attribution)


class QuestionInspection(NamedTuple):
    """Everything ``inspect`` shows for one question."""

    id: str
    question: str
    gold: str
    answer: str  # the rerun's answer
    recorded: str | None  # the run's recorded answer (None: not in the run's results)
    edges: list[dict[str, Any]]  # {"src", "dst", "p", "taken"}
    agents: list[AgentThought]
    fusion: list[Fusion]
    attention: Attention | None  # None when the judger did not write the answer (direct, vote, code)


class Inspection(NamedTuple):
    """``inspect_run``'s result: the run's identity and one entry per question."""

    run: str
    task: str
    method: str
    model: str
    top_k: int
    questions: list[QuestionInspection]


# ----------------------------------------------------------------------------- public


def inspect_run(run: Path | str, question_ids: Sequence[str] | None = None, *, top_k: int = 5) -> Inspection:
    """Rerun the chosen test questions of a latent run (gcache, latent-mas) and inspect them.

    run: a run folder holding config.json (and, for methods that learn, params.safetensors).
    question_ids: ids as in results.jsonl ("gsm8k/test/3") or their last part ("3"); None: the
    run's first recorded test question. top_k: tokens shown per latent step (>= 1).
    Raises ValueError when the folder holds no config, the method passes text (single, text-mas),
    an id is not a test question of the run, or top_k < 1.
    """
    run = Path(run)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k: expected an integer >= 1, got {top_k!r}")
    config = load_config(run)
    if not config.latent:
        raise ValueError(
            f"method {config.method} passes text between agents, not caches: there are no latent steps, "
            f"fused caches or cache attention to inspect (the agents' texts are in {run / RESULTS})"
        )
    recorded = {str(r["id"]): r for r in latest_records(read_records(run / RESULTS)) if r.get("phase") == "eval"}
    items = _chosen(config, list(recorded), question_ids)
    pipeline = build_pipeline(config)
    if config.learns and (run / PARAMS).exists():
        pipeline.load(run / PARAMS)
    found = inspect_questions(pipeline, items, top_k=top_k)
    found = [q._replace(recorded=recorded[q.id].get("answer") if q.id in recorded else None) for q in found]
    return Inspection(str(run), config.task, config.method, config.model, top_k, found)


def load_config(run: Path) -> RunConfig:
    """The RunConfig a run folder was made with (config.json), to be rerun as it was.

    Raises ValueError when config.json is missing or not a run's config."""
    path = Path(run) / CONFIG
    if not path.is_file():
        raise ValueError(f"run: {run} holds no {CONFIG} (expected a folder written by gcache run)")
    saved = json.loads(path.read_text())
    known = {f.name for f in fields(RunConfig)}
    if not isinstance(saved, dict) or "method" not in saved:
        raise ValueError(f"run: {path} is not a gcache run's config")
    config = RunConfig(**{k: v for k, v in saved.items() if k in known})
    return with_api_settings(replace(config, resume=False, params=None))


def inspect_questions(pipeline: Pipeline, items: Sequence[Item], *, top_k: int = 5) -> list[QuestionInspection]:
    """Answer each item alone with the pipeline's deterministic graph and inspect it (see the module docstring).

    Raises ValueError when the pipeline's communication is not latent."""
    if not isinstance(pipeline.comm, LatentCaches):
        raise ValueError(f"pipeline: expected latent communication (gcache, latent-mas), got {type(pipeline.comm).__name__}")
    return [_inspect_one(pipeline, item, top_k) for item in items]


# ----------------------------------------------------------------------------- one question


def _chosen(config: RunConfig, recorded: list[str], question_ids: Sequence[str] | None) -> list[Item]:
    items = {item.id: item for item in load_items(config.task, "test", seed=config.seed)}
    if not question_ids:
        if not recorded:
            raise ValueError("question: the run recorded no test question; name one with --question")
        question_ids = recorded[:1]
    chosen = []
    for qid in question_ids:
        qid = str(qid)
        matches = [i for i in items if i == qid or i.rsplit("/", 1)[-1] == qid]
        if len(matches) != 1:
            shown = ", ".join(recorded[:5]) or ", ".join(list(items)[:5])
            raise ValueError(f"question: expected a test question id of task {config.task} (e.g. {shown}), got {qid!r}")
        chosen.append(items[matches[0]])
    return chosen


def _name(node: Node) -> str:
    return "decision" if node == DECISION else f"r{node[0]}:a{node[1]}"


def _inspect_one(pipeline: Pipeline, item: Item, top_k: int) -> QuestionInspection:
    plan = pipeline.planner.plan(item, train=False, seed=0)  # evaluation's graph: no draw
    # The pipeline's own pass answers, so the answer is the one evaluation writes (no public
    # method returns the caches with it; pipeline.py is not changed for this reader).
    out = pipeline._answer([plan], step=0)[0]
    if out.error:
        raise ValueError(f"question {item.id}: the rerun failed: {out.error}")
    comm: LatentCaches = pipeline.comm
    local, fuser = comm.local, comm.fuser
    sched = plan.schedule
    agents, fusions, provenance = [], [], {}
    for wave in sched.waves:
        for node in wave:
            if node not in out.outputs:  # no path to the decision: the pipeline did not run it
                continue
            ctx = comm.context(item, sched, out.outputs, node)
            inputs = _cache_inputs(sched, out.outputs, node)
            if len(inputs) > 1:
                fusions.append(_fusion(node, ctx, comm, fuser))
            if out.outputs[node].cache is None:  # an agent that spoke (direct, vote, code)
                continue
            incoming = _fused_provenance(ctx, comm.fusion, fuser, [provenance[n] for n in inputs])
            steps, provenance[node] = _rethink(comm, item, node, ctx, incoming, top_k)
            agents.append(AgentThought(_name(node), comm.roles[node[1]].name, [_name(n) for n in inputs], steps))
    attention = None
    if out.decision is not None and out.context is not None:
        inputs = _cache_inputs(sched, out.outputs, DECISION)
        if len(inputs) > 1:
            fusions.append(_fusion(DECISION, out.context, comm, fuser))
        prov = _fused_provenance(out.context, comm.fusion, fuser, [provenance[n] for n in inputs])
        names = [f"{j}:{r.name}" for j, r in enumerate(comm.roles)]
        attention = judger_attention(local, out.context, item, prov, names)
        if out.context.fusion is not None and comm.fusion != "concat" and len(out.context.fusion.caches) > 1:
            attention = attention._replace(attribution="coefficients")
    return QuestionInspection(item.id, item.question, item.gold, out.answer, None, _edges(plan, comm), agents, fusions, attention)


def _edges(plan: Plan, comm: LatentCaches) -> list[dict[str, Any]]:
    """Every candidate or taken spatial edge with its probability, then the judger's inputs."""
    n = plan.schedule.num_agents
    name = lambda j: f"{j}:{comm.roles[j].name}"  # noqa: E731 - one line, used below
    adj, probs = plan.topology.spatial, plan.spatial_probs
    edges = []
    for i in range(n):
        for j in range(n):
            p = None if probs is None else float(probs[i, j])
            if bool(adj[i, j]) or (p is not None and p > 0):
                edges.append({"src": name(i), "dst": name(j), "p": 1.0 if p is None else p, "taken": bool(adj[i, j])})
    for e in plan.schedule.inputs[DECISION]:
        edges.append({"src": name(e.src[1]), "dst": "decision", "p": float(e.weight), "taken": True})
    return edges


# ----------------------------------------------------------------------------- latent steps


def _cache_inputs(sched: Schedule, outputs: Outputs, node: Node) -> list[Node]:
    """The node's inputs that passed a cache on, in the order LatentCaches fuses them."""
    return [e.src for e in sched.inputs[node] if e.src in outputs and outputs[e.src].cache is not None]


def _rethink(
    comm: LatentCaches, item: Item, node: Node, ctx: Context, incoming: kv.KVCache | None, top_k: int
) -> tuple[list[LatentStep], kv.KVCache]:
    """Rerun one agent's latent steps (a row of one) on its fused input cache, reading each
    fed-back vector as tokens; returns them and the provenance of the cache it passes on
    (``incoming``: the provenance of its fused input cache)."""
    local = comm.local
    fns, realign = local.fns, local.realign
    conversation = agent_messages(comm.task, comm.roles[node[1]], item.question, latent=True)  # as LatentCaches thinks
    ids, mask = encode_chat(local, [conversation])  # [1, S]
    with torch.no_grad():
        pre = prefill(fns, ids, mask, cache=ctx.cache)
        width = pre.mask.shape[1]
        full = torch.cat([pre.mask, pre.mask.new_ones(1, comm.latent_steps)], dim=1)  # [1, T + S + K]
        hidden, state, steps = pre.hidden[:, -1], pre.state, []
        for i in range(comm.latent_steps):
            steps.append(_read(local, hidden[0], i + 1, top_k))
            hidden, state = latent_step(fns, realign, hidden, state, full[:, : width + i + 1], (pre.next_pos + i)[:, None])
    n = len(comm.roles)
    own = torch.zeros(fns.num_layers, 1, 1, ids.shape[1] + comm.latent_steps, n)
    own[..., node[1]] = 1.0
    mine = kv.KVCache(own, own, torch.ones(1, own.shape[3], dtype=torch.bool), pre.next_pos.cpu() + comm.latent_steps)
    prov = mine if incoming is None else kv.KVCache(
        torch.cat([incoming.keys, own], dim=3), torch.cat([incoming.values, own], dim=3),
        torch.cat([incoming.mask, mine.mask], dim=1), mine.next_pos,
    )  # fmt: skip
    prov = kv.trim_padding(prov)  # as LatentCaches passes a row on
    if comm.latent_only:
        prov = kv.latent_part(prov, comm.latent_steps, comm.sink_positions)
    return steps, prov


def _read(local: LocalModel, hidden: Tensor, step: int, top_k: int) -> LatentStep:
    """The tokens nearest to one fed-back vector: through lm_head and, realigned, by cosine to the input embeddings."""
    tok = local.tokenizer
    probs = torch.softmax(local.fns.logits(hidden).float(), dim=-1)  # [V]
    p, i = probs.topk(top_k)
    vector = apply_realign(local.realign, hidden).float()  # [d]
    table = local.model.get_input_embeddings().weight.float()  # [V, d]
    cos = torch.nn.functional.cosine_similarity(table, vector[None, :], dim=-1)  # [V]
    c, j = cos.topk(top_k)
    head = [(tok.decode([int(t)]), float(v)) for t, v in zip(i, p)]
    embedding = [(tok.decode([int(t)]), float(v)) for t, v in zip(j, c)]
    return LatentStep(step, head, embedding)


# ----------------------------------------------------------------------------- fusion and provenance


def _fusion(node: Node, ctx: Context, comm: LatentCaches, fuser: Any) -> Fusion:
    f, mode, num_layers = ctx.fusion, comm.fusion, comm.local.fns.num_layers
    k = len(f.caches)
    srcs = [f"{int(s)}:{comm.roles[int(s)].name}" for s in f.sources]
    edge = [float(w) for w in f.weights]
    if mode == "concat":
        return Fusion(_name(node), mode, srcs, edge, None, None, None)
    w = source_weights(fuser, f.weights, mode=mode, sources=f.sources.tolist())[:, 0]  # [k]
    g = gates(fuser, num_layers)  # [L]
    coef = (1 - g)[None, :] / k + g[None, :] * w[:, None]  # [k, L]
    return Fusion(_name(node), mode, srcs, edge, w.tolist(), g.tolist(), coef.tolist())


def _fused_provenance(ctx: Context, mode: str, fuser: Any, parts: list[kv.KVCache]) -> kv.KVCache | None:
    """The provenance [L, 1, 1, T, N] of a node's fused input cache: its inputs' provenances
    (``parts``, in fusion order) fused as their caches were (the same weights, sources, mode and
    fuser), so a slot's distribution is exactly the mixture of its sources' (fusion is linear in
    the caches)."""
    if ctx.fusion is None:
        return None
    with torch.no_grad():
        return fuse(fuser, parts, ctx.fusion.weights, mode=mode, sources=ctx.fusion.sources.tolist())


# ----------------------------------------------------------------------------- attention


@contextmanager
def _eager(model: Any) -> Iterator[None]:
    """The model with eager attention (the only one that returns its weights), restored after."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def attention_weights(local: LocalModel, context: Context, item: Item) -> tuple[Tensor, Tensor, list[str]]:
    """The judger's attention while it reads the reference answer line on its context.

    Returns (weights [L, Q, T + S]: heads averaged, at the Q positions that predict an answer
    token, over the context cache's T positions and the S tokens of prompt + answer line;
    the row sums are 1), the cache mask [T], and the query positions' tokens."""
    batch = answer_inputs(local, [context.conversation], [item])
    ids, target = batch.input_ids, batch.target_mask  # [1, S]
    cache = context.cache
    fns = local.fns
    if cache is None:
        cache = kv.empty(fns.num_layers, 1, fns.num_kv_heads, fns.head_dim, dtype=fns.dtype, device=fns.device)
    positions = cache.next_pos[:, None] + torch.arange(ids.shape[1], device=ids.device)[None, :]  # [1, S]
    mask = torch.cat([cache.mask, batch.attention_mask], dim=1)  # [1, T + S]
    with torch.no_grad(), _eager(local.model):
        out = backbone(local.model)(
            inputs_embeds=fns.embed(ids), attention_mask=mask, position_ids=positions,
            cache=fns.to_state(cache), use_cache=True, output_attentions=True,
        )  # fmt: skip
    predicts = target[0, 1:].nonzero().flatten()  # [Q] positions whose next token is an answer token
    weights = torch.stack([a[0].float().mean(0)[predicts] for a in out.attentions])  # [L, Q, T + S]
    queries = [local.tokenizer.decode([int(t)]) for t in ids[0, predicts]]
    return weights, cache.mask[0], queries


def judger_attention(
    local: LocalModel, context: Context, item: Item, provenance: kv.KVCache | None, names: Sequence[str]
) -> Attention:
    """Attention mass per source (provenance [L, 1, 1, T, N] of the context cache, None: no cache) and on the
    judger's own prompt, per layer and averaged."""
    weights, _, queries = attention_weights(local, context, item)  # [L, Q, T + S]
    t = 0 if context.cache is None else context.cache.seq_len
    n = len(names)
    prov = torch.zeros(weights.shape[0], t, n) if provenance is None else provenance.keys[:, 0, 0].float()  # [L, T, N]
    on_cache = torch.einsum("lqt,ltn->lqn", weights[:, :, :t], prov)  # [L, Q, N]
    on_prompt = weights[:, :, t:].sum(-1, keepdim=True)  # [L, Q, 1]
    per_query = torch.cat([on_cache, on_prompt], dim=-1)  # [L, Q, N + 1]
    per_layer = per_query.mean(1)  # [L, N + 1]
    counts = prov[0].sum(0).tolist() + [float(weights.shape[-1] - t)]
    return Attention(list(names) + [PROMPT], per_layer.tolist(), per_layer.mean(0).tolist(), queries, counts, "positions")


# ----------------------------------------------------------------------------- JSON


def to_json(value: Any) -> Any:
    """Plain JSON data of an Inspection (or any of its parts): NamedTuples become objects."""
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return {k: to_json(v) for k, v in value._asdict().items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


__all__ = [
    "INSPECTION",
    "PROMPT",
    "AgentThought",
    "Attention",
    "Fusion",
    "Inspection",
    "LatentStep",
    "QuestionInspection",
    "attention_weights",
    "inspect_questions",
    "inspect_run",
    "judger_attention",
    "load_config",
    "to_json",
]
