"""Does gcache learn to route? The learned graph + fuser against fixed graphs, the oracle graph and
latent-mas on held-out routing questions (gcache.io.tasks.routing), by the contrastive margin.

1. Trains gcache (policy + fuser, ``--reward margin``: no decoding; the policy also chooses the
   decision node's inputs, ``--learn-decision-inputs``, unless ``--fixed-decision-inputs``) on the first ``--train-size``
   routing train worlds of ``--variant``, ``--steps`` steps of ``--batch-size`` questions (cycling
   through them), recording each step's mean reward and, every ``--eval-every`` steps, the mean
   margin on the first ``--curve-size`` held-out worlds.
2. On the first ``--test-size`` routing test worlds, for: the learned graph + fuser; the same agents
   on every fixed topology (chain, star, mesh, layered, random) and on ``full`` with the untrained
   policy, all with untrained learned fusion; the oracle graph (only the informed agent,
   ``item.meta["informed"]``, feeds the decision node; no edges between agents); latent-mas (its
   structure on the world's K agents: a chain with concat fusion, full caches, nothing learned;
   ``--method latent-mas`` itself is a chain of three agents, which K = 4 worlds refuse): the mean margin and mean answer log-probability with 95%
   bootstrap CIs, the paired difference learned-minus-each (paired bootstrap 95% CI) for both,
   prompt tokens and edges per question, and the accuracy on the first ``--decode-size`` worlds
   (decoded). ``single`` is not applicable: the config refuses it on routing (a world needs an
   informed agent and a distractor); routing_carry.py's "no agents" row is the nearest baseline.

Every gcache method passes full caches (``latent_only: False``) with ``--latent-steps`` (2) steps:
benchmarks/results/routing_carry*.md shows that full caches carry the informed agent's number on the
embedded model and latent-only caches carry nothing.

Edges per question: ``agent edges`` are the spatial edges taken between agents; ``decision inputs``
the agents whose caches the decision node reads (full caches accumulate, so the judger reads the
sinks only; the oracle reads the informed agent only).

**Routing accuracy** (learned graph only): the share of held-out questions on which the informed
agent gets strictly the largest weight at the decision node. The weight of agent i is

    weight_i = sum over decision inputs j of  c_j * reach_ij

with ``c_j = mean over layers l of [(1 - g_l) / k + g_l * w_j]`` the coefficient of input j in the
decision node's fused cache (gcache.core.fusion: ``w = softmax(log e + source_logits[sources])`` over
the k decision inputs, e = 1 for decision inputs, ``g_l = sigmoid(gate_logits[l])``), and
``reach_ij`` = 1 for i = j, else the largest product of the learned edge probabilities
(``Plan.spatial_probs``) along a path i -> ... -> j of taken edges (0 when i does not reach j): how
much of i's cache the accumulated cache of j carries, by the policy's own confidence in the path.
A tie for the largest weight counts as not routed.

The held-out questions are answered batch by batch, every method on a batch before the next; the
latent methods share a ``Rollouts`` memo cleared after each batch (benchmarks/learning.py says why
that changes no result). A method's seconds are those of its own calls.

Writes routing_<variant>.json, .md and .png (the learning curve) to ``--out``.

    nice -n 10 python benchmarks/routing.py --variant unreliable --threads 2
    python benchmarks/routing.py --smoke    # tiny random model, a few questions, for CI
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from _common import (
    add_common_args,
    build_pipelines,
    load_average,
    machine_info,
    print_table,
    report_header,
    setup,
    short_decoding,
    write_json,
)

from gcache.core.graph import schedule
from gcache.core.policy import policy_logits
from gcache.core.topology import Topology, reachability
from gcache.io.records.report import plot_learning_curve
from gcache.io.records.stats import excludes_zero, mean_ci, paired_diff_ci
from gcache.io.runner.communication import Rollouts
from gcache.io.runner.planner import Plan
from gcache.io.tasks.routing import RoutingOptions, load_items

FIXED = ("chain", "star", "mesh", "layered", "random")
MEASURES = ("margin", "answer_logprob")


class OracleGraph:
    """A per-question graph: no edges between agents, only the informed agent feeds the decision node."""

    def __init__(self, num_agents: int) -> None:
        self.num_agents = num_agents

    def plan(self, item, params=None, *, train: bool = False, seed: int = 0) -> Plan:
        n = self.num_agents
        informed = item.meta["informed"]
        inputs = torch.zeros(n, dtype=torch.bool)
        inputs[informed] = True
        none = torch.zeros(n, n, dtype=torch.bool)
        topology = Topology(none, none.clone(), torch.arange(n), inputs, torch.zeros(()))
        return Plan(item, topology, schedule(topology, 1), None, None, None)


def method_flags(args: argparse.Namespace) -> dict[str, dict]:
    """The `gcache run` flags of every compared method (all on one shared model)."""
    common = {"task": "routing", "routing_variant": args.variant, "model": args.model,
              "max_new_tokens": args.max_new_tokens, "seed": args.seed, "temperature": 0.0,
              "stop_at_answer": args.stop_at_answer, "latent_steps": args.latent_steps, "latent_only": False,
              "num_agents": args.agent_nums}  # fmt: skip
    if args.dtype is not None:
        common["dtype"] = args.dtype
    # Every method but the learned one reads its graph's sinks: gcache on routing learns its decision
    # inputs by default, which would hand the fixed graphs an untrained policy's choice of inputs.
    gc = {**common, "method": "gcache", "fusion": "learned", "learn_decision_inputs": False}
    flags = {"learned": {**gc, "topology": "full", "reward": "margin", "lr": args.lr, "batch_size": args.batch_size,
                         "learn_decision_inputs": not args.fixed_decision_inputs, "edge_cost": args.edge_cost}}
    for topology in FIXED:
        flags[topology] = {**gc, "topology": topology, "optimize_spatial": False}
    flags["full (untrained)"] = {**gc, "topology": "full"}
    flags["oracle"] = {**gc, "topology": "mesh", "optimize_spatial": False}  # its planner is replaced
    # `--method latent-mas` is a chain of three agents (--agent-nums does not apply to it), which a
    # world of K != 3 agents refuses; its structure on the world's K agents is gcache's chain with
    # concat fusion (LATENT_MAS_DEFAULTS: chain, concat, full caches, no learning).
    flags["latent-mas"] = {**common, "method": "gcache", "topology": "chain", "optimize_spatial": False, "fusion": "concat",
                           "learn_decision_inputs": False}
    return flags


def answered(pipeline, items, batch_size: int, decode: bool = False) -> dict[str, dict]:
    """Per question id, what the method's eval graph gives: margin, answer log-probability, prompt
    tokens, edges between agents, decision inputs (and the decoded verdict with ``decode``)."""
    out = {}
    with short_decoding(pipeline, 1) if not decode else _nothing():
        for i in range(0, len(items), batch_size):
            batch = items[i : i + batch_size]
            plans = {item.id: pipeline._plan(item, train=False, seed=0) for item in batch}
            for r in pipeline.evaluate(batch, decode=decode):
                if r["margin"] is None:
                    continue
                topo = plans[r["id"]].topology
                out[r["id"]] = {"margin": r["margin"], "answer_logprob": r["answer_logprob"], "correct": r["correct"],
                                "prompt_tokens": r["tokens"]["prompt"], "agent_edges": int(topo.spatial.sum()),
                                "decision_inputs": int(topo.decision_inputs.sum())}  # fmt: skip
    return out


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def routing_weights(plan: Plan, fuser) -> list[float]:
    """Per agent, its weight at the decision node (the module docstring defines it)."""
    topo = plan.topology
    n = topo.spatial.shape[-1]
    probs = plan.spatial_probs if plan.spatial_probs is not None else topo.spatial.float()
    taken = torch.where(topo.spatial, probs, torch.zeros(()))  # [N, N]
    reach = torch.eye(n)  # [N, N] best path product i -> j (paths have at most n - 1 edges)
    for _ in range(n - 1):
        reach = torch.maximum(reach, (reach[:, :, None] * taken[None, :, :]).amax(1))
    inputs = torch.nonzero(topo.decision_inputs).flatten()
    k = len(inputs)
    if fuser is None:
        coef = torch.full((k,), 1.0 / k)
    else:
        w = torch.softmax(fuser.source_logits.detach().float()[inputs], 0)  # [k]
        g = torch.sigmoid(fuser.gate_logits.detach().float())  # [L]
        coef = ((1 - g)[:, None] / k + g[:, None] * w[None, :]).mean(0)  # [k]
    return (reach[:, inputs] * coef[None, :]).sum(1).tolist()


def routing(pipeline, items) -> tuple[dict, dict[str, dict]]:
    """Routing accuracy of the learned graph + fuser on ``items``, and per question its learned edge
    probabilities, taken edges, decision inputs and agent weights."""
    learner = pipeline.learner
    per_question, routed = {}, []
    for item in items:
        plan = pipeline.planner.plan(item, train=False, seed=0)
        weights = routing_weights(plan, learner.fuser)
        with torch.no_grad():
            logits = policy_logits(learner.policy, plan.features, pipeline.planner.role_adjacency)
        best = max(weights)
        informed = item.meta["informed"]
        ok = weights[informed] == best and sum(w == best for w in weights) == 1
        routed.append(ok)
        per_question[item.id] = {
            "informed": informed, "liar": item.meta.get("liar"), "routed": ok,
            "weights": [round(w, 4) for w in weights],
            "spatial_probs": [[round(float(p), 4) for p in row] for row in plan.spatial_probs],
            "taken": plan.topology.spatial.int().tolist(), "decision_inputs": plan.topology.decision_inputs.int().tolist(),
            "decision_probs": [round(float(p), 4) for p in torch.sigmoid(logits.decision)],
            "reaches_decision": bool(reachability(plan.topology.spatial)[informed].any() or plan.topology.decision_inputs[informed]),
        }  # fmt: skip
    return {"correct": sum(routed), "n": len(routed), "accuracy": sum(routed) / max(len(routed), 1)}, per_question


def input_probs_by_kind(rows: list[tuple[list[float], int, int | None]]) -> dict[str, float | None]:
    """Mean decision-input probability of the informed keeper, of the unreliable agent and of the
    other keepers over rows of (per-agent probabilities, informed slot, unreliable slot or None);
    None where a kind never occurs."""
    informed, liar, others = [], [], []
    for p, i, lie in rows:
        informed.append(p[i])
        liar += [p[lie]] if lie is not None else []
        others += [q for j, q in enumerate(p) if j not in (i, lie)]
    mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
    return {"p_informed": mean(informed), "p_unreliable": mean(liar), "p_other_keepers": mean(others)}


def diagnosis(per_question: dict[str, dict], policy) -> dict:
    """Does the question reach the learned graph's decision inputs? Over the held-out worlds: the mean
    decision-input probability of the informed keeper, of the unreliable agent and of the other
    keepers; how often the informed keeper has the largest one, is read alone, and how often the
    unreliable agent's cache reaches the judger (read, or upstream of a read agent along taken edges);
    and the policy's decision-head scalars (its weight on the role-question similarity, its bias)."""
    rows = list(per_question.values())
    top, alone, leaks = 0, 0, 0
    for r in rows:
        p, i, lie = r.get("decision_probs"), r["informed"], r["liar"]
        inputs = r["decision_inputs"]
        alone += inputs == [int(j == i) for j in range(len(inputs))]
        if lie is not None:
            reach = reachability(torch.tensor(r["taken"], dtype=torch.bool))
            leaks += bool(inputs[lie]) or any(bool(reach[lie, j]) and inputs[j] for j in range(len(inputs)))
        if p is not None:
            top += max(range(len(p)), key=p.__getitem__) == i
    n = len(rows)
    kinds = input_probs_by_kind([(r["decision_probs"], r["informed"], r["liar"]) for r in rows
                                 if r.get("decision_probs") is not None])
    return {"n": n, **kinds,
            "informed_most_likely": top / n if n else None, "informed_read_alone": alone / n if n else None,
            "unreliable_reaches_judger": leaks / n if n else None,
            "decision_similarity": None if policy is None else float(policy.decision_similarity),
            "decision_bias": None if policy is None else float(policy.decision_bias)}


def policy_snapshot(pipeline, items) -> dict | None:
    """The policy on ``items`` now: mean decision-input probability of the informed keeper, of the
    unreliable agent and of the other keepers, the mean edge probability, and the decision head's
    scalars (its weight on the role-question similarity, its bias). None without a learned policy."""
    policy = pipeline.learner.policy if pipeline.learner is not None else None
    if policy is None:
        return None
    probs, edges = [], []
    for item in items:
        plan = pipeline.planner.plan(item, train=False, seed=0)
        with torch.no_grad():
            logits = policy_logits(policy, plan.features, pipeline.planner.role_adjacency)
        edges.append(float(plan.spatial_probs.mean()))
        if logits.decision is not None:
            probs.append((torch.sigmoid(logits.decision).tolist(), item.meta["informed"], item.meta.get("liar")))
    rounded = {k: None if v is None else round(v, 4) for k, v in input_probs_by_kind(probs).items()}
    return {**rounded, "edge_prob": round(sum(edges) / len(edges), 4) if edges else None,
            "decision_similarity": round(float(policy.decision_similarity), 4),
            "decision_bias": round(float(policy.decision_bias), 4)}


def train(pipeline, train_items, curve_items, args, memo: Rollouts) -> tuple[list[dict], list[dict], float]:
    """Training steps with the held-out margin curve; returns (per step: the train reward and the
    policy's ``policy_snapshot`` on the curve worlds after the step; held-out points; seconds)."""
    started = time.perf_counter()

    def point(step):
        values = [v["margin"] for v in answered(pipeline, curve_items, args.batch_size).values()]
        return {"step": step, **mean_ci(values).as_dict()}

    rewards, held = [], [point(0)]
    for step in range(args.steps):
        start = (step * args.batch_size) % len(train_items)
        batch = (train_items + train_items)[start : start + args.batch_size]
        records = pipeline.train_step(batch, step)
        memo.clear()  # nothing repeats between steps (the parameters changed): keep the memory flat
        values = [r["reward"] for r in records if r["reward"] is not None]
        rewards.append({"step": step, "n": len(values), "reward": sum(values) / len(values) if values else None,
                        "policy": policy_snapshot(pipeline, curve_items)})
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            held.append(point(step + 1))
        print(f"step {step + 1}/{args.steps}: reward {rewards[-1]['reward']:.3f}{_policy_line(rewards[-1]['policy'])}"
              + (f", held-out margin {held[-1]['mean']:.3f}" if held[-1]["step"] == step + 1 else "")
              + f" ({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    return rewards, held, time.perf_counter() - started


def _policy_line(snap: dict | None) -> str:
    """The step line's policy part (empty without decision inputs)."""
    if snap is None or snap["p_informed"] is None:
        return ""
    liar = "" if snap["p_unreliable"] is None else f"unreliable {snap['p_unreliable']:.2f} "
    return (f", input p informed {snap['p_informed']:.2f} {liar}others {snap['p_other_keepers']:.2f}, "
            f"similarity {snap['decision_similarity']:+.2f} bias {snap['decision_bias']:+.2f}")


def held_out(pipelines: dict, items, batch_size: int, memo: Rollouts) -> tuple[dict[str, dict[str, dict]], dict[str, float], dict]:
    """Every method's values on ``items``, batch by batch, the latent methods sharing rollouts within a batch."""
    memo.clear()
    hits, misses = memo.hits, memo.misses
    per_method: dict[str, dict[str, dict]] = {name: {} for name in pipelines}
    seconds = dict.fromkeys(pipelines, 0.0)
    started = time.perf_counter()
    try:
        for i in range(0, len(items), batch_size):
            for name, pipeline in pipelines.items():
                t = time.perf_counter()
                per_method[name].update(answered(pipeline, items[i : i + batch_size], batch_size))
                seconds[name] += time.perf_counter() - t
            memo.clear()
            print(f"held-out {min(i + batch_size, len(items))}/{len(items)} (rollouts reused {memo.hits}, "
                  f"run {memo.misses}; {time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    finally:
        memo.clear()
    return per_method, seconds, {"reused": memo.hits - hits, "run": memo.misses - misses}


def compare(per_method: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Mean [CI] per method and measure, learned-minus-method paired differences on shared questions,
    mean prompt tokens and edges per question."""
    learned = per_method["learned"]
    rows = {}
    for name, values in per_method.items():
        row: dict = {"n": len(values)}
        for m in MEASURES:
            row[m] = mean_ci([v[m] for v in values.values()]).as_dict()
            if name != "learned":
                ids = [q for q in values if q in learned]
                diff = paired_diff_ci([learned[q][m] for q in ids], [values[q][m] for q in ids])
                row[f"learned_minus_{m}"] = {**diff.as_dict(), "excludes_zero": excludes_zero(diff)}
        for k in ("prompt_tokens", "agent_edges", "decision_inputs"):
            row[k] = sum(v[k] for v in values.values()) / max(len(values), 1)
        rows[name] = row
    return rows


def _ci(d: dict, sign: str = "") -> str:
    return f"{d['mean']:{sign}.3f} [{d['low']:{sign}.3f}, {d['high']:{sign}.3f}]"


def _charged(settings: dict) -> str:
    cost = settings.get("edge_cost") or 0.0
    return f" minus {cost} per edge between agents" if cost else ""


def markdown(report: dict) -> str:
    s = report["settings"]
    r = report["routing_accuracy"]
    lines = [
        f"# Routing `{s['variant']}`: learned graph + fuser vs fixed graphs, the oracle graph and latent-mas",
        "",
        f"Model {report['model']} ({report['dtype']}), {s['agent_nums']} agents per world, full caches, "
        f"{s['latent_steps']} latent steps; {s['train_size']} train worlds, {s['steps']} steps of {s['batch_size']} "
        f"(margin reward{_charged(s)}, lr {s['lr']}), the learned graph's decision inputs "
        f"{'fixed (the sinks)' if s.get('fixed_decision_inputs') else 'chosen by the policy'}; "
        f"{s['test_size']} held-out test worlds. "
        + (f"Compared only with: {s['methods']} (`--methods`). " if s.get("methods") else "")
        + f"Took {report['seconds']['total']:.0f} s "
        f"on {report['machine']['cpu_count']} cores, {report['threads']} threads (load average "
        f"{report['load_average_before']} before, {report['load_average_after']} after); commit "
        f"{(report['machine'].get('source') or {}).get('commit', '?')}. Command: `{report['command']}`.",
        "",
        f"**Routing accuracy** (informed agent strictly the largest weight at the decision node; "
        f"benchmarks/routing.py defines it): {r['correct']}/{r['n']} = {r['accuracy']:.3f}.",
        "",
        "Means with 95% bootstrap CIs; learned minus the method on the same questions with a paired bootstrap 95% CI "
        "(* : the CI excludes 0). `single` is not applicable (refused on routing).",
        "",
        "| method | n | margin | learned minus it | answer log-prob | learned minus it | accuracy (decoded) | prompt tokens | agent edges | decision inputs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["methods"].items():
        cells = [name, str(row["n"])]
        for m in MEASURES:
            cells.append(_ci(row[m], "+"))
            d = row.get(f"learned_minus_{m}")
            cells.append("-" if d is None else _ci(d, "+") + (" *" if d["excludes_zero"] else ""))
        acc = row.get("accuracy")
        cells.append("-" if acc is None else f"{acc['correct']}/{acc['n']}")
        cells += [f"{row['prompt_tokens']:.0f}", f"{row['agent_edges']:.2f}", f"{row['decision_inputs']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    d = report.get("diagnosis")
    if d is not None:
        f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        lines += ["", f"**Where the learned graph reads** ({d['n']} held-out worlds): mean decision-input probability "
                  f"of the informed keeper {f(d['p_informed'])}, of the unreliable agent {f(d['p_unreliable'])}, of "
                  f"the other keepers {f(d['p_other_keepers'])}; the informed keeper is the most likely input in "
                  f"{f(d['informed_most_likely'])} of the worlds and read alone in {f(d['informed_read_alone'])}; the "
                  f"unreliable agent's cache reaches the judger in {f(d['unreliable_reaches_judger'])}."
                  + ("" if d["decision_similarity"] is None else
                     f" The policy's weight on the role-question similarity is {d['decision_similarity']:+.2f}, "
                     f"its decision bias {d['decision_bias']:+.2f}.")]
    lines += ["", "Learning curve (train margin reward per step; held-out mean margin on the curve worlds; the policy "
              "after the step on the curve worlds: mean decision-input probability of the informed keeper / the "
              "unreliable agent / the other keepers, mean edge probability, similarity weight and decision bias):", "",
              "| step | train reward | held-out margin [95% CI] | input p: informed / unreliable / others | edge p "
              "| similarity / bias |", "|---|---|---|---|---|---|"]  # fmt: skip
    held = {h["step"]: h for h in report["curve"]["held_out"]}
    if 0 in held:
        lines.append(f"| 0 | | {_ci(held[0], '+')} | | | |")
    for t in report["curve"]["train"]:
        h = held.get(t["step"] + 1)
        reward = "-" if t["reward"] is None else f"{t['reward']:+.3f}"
        lines.append(f"| {t['step'] + 1} | {reward} | " + (_ci(h, "+") if h else "") + " | " + _policy_cells(t.get("policy")))
    return "\n".join(lines) + "\n"


def _policy_cells(snap: dict | None) -> str:
    """The learning curve's policy columns of one step (blank without a record)."""
    if snap is None or snap.get("p_informed") is None:
        return " | | |"
    p = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    return (f"{p(snap['p_informed'])} / {p(snap['p_unreliable'])} / {p(snap['p_other_keepers'])} | "
            f"{p(snap['edge_prob'])} | {snap['decision_similarity']:+.2f} / {snap['decision_bias']:+.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, max_new_tokens=16)
    parser.add_argument("--variant", default="unreliable", choices=("topics", "unreliable"))
    parser.add_argument("--train-size", type=int, default=128)
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=8)
    parser.add_argument("--curve-size", type=int, default=16)
    parser.add_argument("--decode-size", type=int, default=0, help="held-out worlds decoded for accuracy by every method")
    parser.add_argument("--latent-steps", type=int, default=2)
    parser.add_argument("--agent-nums", type=int, default=4, help="agents per routing world (gcache run's --agent-nums)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--edge-cost", type=float, default=0.0,
                        help="the learned method's cost per sampled edge between agents (gcache run's --edge-cost)")
    parser.add_argument("--fixed-decision-inputs", action="store_true",
                        help="the learned method reads the sinks, as before the policy chose its decision inputs")
    parser.add_argument("--methods", default=None,
                        help="compare the learned graph with these methods only (comma-separated; default: all)")
    args = parser.parse_args()
    setup(args)
    if args.smoke:
        args.train_size, args.test_size, args.steps, args.batch_size = 4, 3, 2, 2
        args.eval_every, args.curve_size, args.decode_size = 1, 2, 1
    load_before = load_average()
    machine = machine_info()
    started = time.perf_counter()
    options = RoutingOptions(args.variant, args.agent_nums)
    train_items = load_items("train", limit=args.train_size, seed=args.seed, options=options)
    test_items = load_items("test", limit=args.test_size, seed=args.seed, options=options)
    flags = method_flags(args)
    if args.methods is not None:
        wanted = ["learned", *(m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != "learned")]
        unknown = [m for m in wanted if m not in flags]
        if unknown:
            parser.error(f"--methods: expected names among {', '.join(flags)}, got {', '.join(unknown)}")
        flags = {m: flags[m] for m in wanted}
    memo = Rollouts()  # the latent methods' shared rollouts, cleared after each batch
    pipelines, local = build_pipelines(flags, rollouts=memo)
    if "oracle" in pipelines:
        pipelines["oracle"].planner = OracleGraph(args.agent_nums)
    learned = pipelines["learned"]
    train_rewards, held, train_seconds = train(learned, train_items, test_items[: args.curve_size], args, memo)
    per_method, seconds, reuse = held_out(pipelines, test_items, args.batch_size, memo)
    seconds["train"] = train_seconds
    methods = compare(per_method)
    if args.decode_size:
        t = time.perf_counter()
        for name, pipeline in pipelines.items():
            recs = answered(pipeline, test_items[: args.decode_size], args.batch_size, decode=True)
            methods[name]["accuracy"] = {"correct": sum(bool(r["correct"]) for r in recs.values()), "n": len(recs)}
        seconds["decode"] = time.perf_counter() - t
    accuracy, per_question = routing(learned, test_items)
    seconds["total"] = time.perf_counter() - started
    report = {
        **report_header(local, args, machine, load_before),
        "command": " ".join(["python", "benchmarks/routing.py", *sys.argv[1:]]),
        "settings": {k: getattr(args, k) for k in ("variant", "train_size", "test_size", "steps", "batch_size", "eval_every",
                                                     "curve_size", "decode_size", "latent_steps", "agent_nums", "lr",
                                                     "fixed_decision_inputs", "edge_cost", "methods")},
        "flags": flags,
        "methods": methods,
        "routing_accuracy": accuracy,
        "diagnosis": diagnosis(per_question, learned.learner.policy),
        "learned_routing": per_question,
        "per_question": per_method,
        "curve": {"train": train_rewards, "held_out": held},
        "rollouts": reuse,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }  # fmt: skip
    out = Path(args.out)
    write_json(out / f"routing_{args.variant}.json", report)
    (out / f"routing_{args.variant}.md").write_text(markdown(report))
    plot_learning_curve(
        [{"step": r["step"] + 1, "reward": r["reward"]} for r in train_rewards], out / f"routing_{args.variant}.png",
        title=f"routing {args.variant} / gcache (margin reward; held-out: margin)", held_out=held,
    )
    print_table(
        f"routing {args.variant}: held-out margin",
        ("method", "n", "margin", "low", "high", "learned minus", "low", "high", "prompt tokens", "edges"),
        [(n, r["n"], r["margin"]["mean"], r["margin"]["low"], r["margin"]["high"],
          *((r["learned_minus_margin"]["mean"], r["learned_minus_margin"]["low"], r["learned_minus_margin"]["high"])
            if "learned_minus_margin" in r else (None,) * 3), r["prompt_tokens"], r["agent_edges"])
         for n, r in methods.items()],
    )  # fmt: skip
    print(f"routing accuracy {accuracy['correct']}/{accuracy['n']}; total {seconds['total']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
