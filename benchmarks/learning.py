"""Learning that shows on the embedded model: gcache's learned graph + fuser against fixed graphs,
on held-out GSM8K questions, measured by the reference answer's log-probability.

1. Trains gcache (policy + fuser, ``--reward likelihood``: no decoding) on the first
   ``--train-size`` GSM8K train questions, ``--steps`` steps of ``--batch-size`` questions
   (cycling through them), recording each step's mean reward and, every ``--eval-every``
   steps, the mean answer log-probability on the first ``--curve-size`` held-out questions.
2. On the first ``--test-size`` GSM8K test questions, the mean answer log-probability
   (gcache.io.runner.answers; no decoding) of: the learned graph + fuser; the same agents on every
   fixed topology (chain, star, mesh, layered, random) and on ``full`` with the untrained
   policy, all with untrained fusion; latent-mas; single; and text-mas on the first
   ``--text-mas-size`` questions (its agents must write their messages, which costs decoding).
   Each with its 95% bootstrap CI, and the paired difference learned-minus-each with a paired
   bootstrap 95% CI (gcache.io.records.stats). ``--decode-size`` questions are also decoded for
   accuracy by every method.

The held-out questions are answered batch by batch, every method on a batch before the next
(batches of questions of similar length, to pad little). The latent methods share a
``Rollouts`` memo, cleared after each batch: an agent whose question, role, inputs, edge
weights and fuser are those of a rollout another method already ran reuses it (every fixed
graph starts with the same first agent, chain, star and mesh share its successor, ...), which
changes no result and saves about half of the agents' prefills. A method's seconds are those of
its own calls, so a method that reuses rollouts looks cheaper than it would alone.

Every gcache graph passes full caches (what carries information on the embedded model: the
README's "What carries information"). ``--leave-out`` names methods not run, to fit a time budget;
the results record them.

Writes learning.json, learning.md and learning.png (the learning curve) to ``--out``.

    python benchmarks/learning.py            # the full benchmark (see the README for its time)
    python benchmarks/learning.py --smoke    # tiny random model, a few questions, for CI
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import (
    add_common_args,
    base_flags,
    build_pipelines,
    load_average,
    machine_info,
    print_table,
    report_header,
    setup,
    short_decoding,
    write_json,
)

from gcache.io.records.report import plot_learning_curve
from gcache.io.records.stats import excludes_zero, mean_ci, paired_diff_ci
from gcache.io.runner.communication import Rollouts
from gcache.io.tasks.datasets import load_items

FIXED = ("chain", "star", "mesh", "layered", "random")


def method_flags(args: argparse.Namespace) -> dict[str, dict]:
    """The `gcache run` flags of every compared method (all on one shared model)."""
    common = {**base_flags(args), "latent_steps": args.latent_steps}
    base = {**common, "num_agents": args.agent_nums}
    text = {k: v for k, v in base.items() if k != "latent_steps"}
    base["latent_only"] = False  # full caches: what carries information on the embedded model (README)
    learned = {**base, "method": "gcache", "topology": "full", "reward": "likelihood", "lr": args.lr,
               "batch_size": args.batch_size}
    flags = {"learned": learned}
    for topology in FIXED:
        flags[topology] = {**base, "method": "gcache", "topology": topology, "optimize_spatial": False}
    flags["full (untrained)"] = {**base, "method": "gcache", "topology": "full"}
    flags["latent-mas"] = {**common, "method": "latent-mas"}  # its own three agents
    flags["single"] = {k: v for k, v in text.items() if k != "num_agents"} | {"method": "single"}
    flags["text-mas"] = {**text, "method": "text-mas", "optimize_spatial": False}
    return flags


def logprobs(pipeline, items, batch_size: int) -> dict[str, float]:
    """Per question id, the answer log-probability under the method's eval graph (no judger
    decoding; agents that speak under the rule write one token, their context is what counts)."""
    out = {}
    with short_decoding(pipeline, 1):
        for i in range(0, len(items), batch_size):
            for r in pipeline.evaluate(items[i : i + batch_size], decode=False):
                if r["answer_logprob"] is not None:
                    out[r["id"]] = r["answer_logprob"]
    return out


def decoded(pipeline, items, batch_size: int) -> dict[str, dict]:
    """Per question id, the decoded record (full decoding: answer, correctness, log-probability)."""
    return {r["id"]: r for i in range(0, len(items), batch_size) for r in pipeline.evaluate(items[i : i + batch_size])}


def held_out_point(values: dict[str, float], step: int) -> dict:
    return {"step": step, **mean_ci(list(values.values())).as_dict()}


def train(pipeline, train_items, curve_items, args, memo: Rollouts) -> tuple[list[dict], list[dict], float]:
    """Training steps with the curve; returns (train reward per step, held-out points, seconds).
    The curve's last point (the trained parameters) is left to the held-out pass, which
    measures those very questions with those parameters."""
    started = time.perf_counter()
    rewards, held = [], [held_out_point(logprobs(pipeline, curve_items, args.batch_size), 0)]
    for step in range(args.steps):
        start = (step * args.batch_size) % len(train_items)
        batch = (train_items + train_items)[start : start + args.batch_size]
        records = pipeline.train_step(batch, step)
        memo.clear()  # nothing repeats between steps (the parameters changed): keep the memory flat
        values = [r["reward"] for r in records if r["reward"] is not None]
        rewards.append({"step": step, "n": len(values), "reward": sum(values) / len(values) if values else None})
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            held.append(held_out_point(logprobs(pipeline, curve_items, args.batch_size), step + 1))
        print(f"step {step + 1}/{args.steps}: reward {rewards[-1]['reward']:.3f}"
              + (f", held-out {held[-1]['mean']:.3f}" if held[-1]["step"] == step + 1 else ""), flush=True)
    return rewards, held, time.perf_counter() - started


def held_out(pipelines: dict, items, batch_size: int, memo: Rollouts) -> tuple[dict[str, dict[str, float]], dict[str, float], dict]:
    """Every method's answer log-probability on ``items``, batch by batch (every method on a
    batch before the next), the latent methods sharing their rollouts within a batch.
    Returns (per method, per question id, the value), seconds per method, and the memo's counts."""
    memo.clear()
    hits, misses = memo.hits, memo.misses
    ordered = sorted(items, key=lambda item: len(item.question))  # similar lengths pad little
    per_method: dict[str, dict[str, float]] = {name: {} for name in pipelines}
    seconds = dict.fromkeys(pipelines, 0.0)
    try:
        for i in range(0, len(ordered), batch_size):
            for name, pipeline in pipelines.items():
                t = time.perf_counter()
                per_method[name].update(logprobs(pipeline, ordered[i : i + batch_size], batch_size))
                seconds[name] += time.perf_counter() - t
            memo.clear()
            print(f"held-out {min(i + batch_size, len(ordered))}/{len(ordered)} "
                  f"(rollouts reused {memo.hits}, run {memo.misses})", flush=True)
    finally:
        memo.clear()
    return per_method, seconds, {"reused": memo.hits - hits, "run": memo.misses - misses}


def compare(per_method: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Mean [CI] per method, and learned-minus-method paired differences on shared questions."""
    learned = per_method["learned"]
    rows = {}
    for name, values in per_method.items():
        row = {"answer_logprob": mean_ci(list(values.values())).as_dict()}
        if name != "learned":
            ids = [q for q in values if q in learned]
            diff = paired_diff_ci([learned[q] for q in ids], [values[q] for q in ids])
            row["learned_minus"] = {**diff.as_dict(), "excludes_zero": excludes_zero(diff)}
        rows[name] = row
    return rows


def markdown(report: dict) -> str:
    lines = [
        "# Learned graph + fuser vs fixed graphs: held-out GSM8K answer log-probability",
        "",
        f"Model {report['model']} ({report['dtype']}), {report['settings']['train_size']} train questions, "
        f"{report['settings']['steps']} steps of {report['settings']['batch_size']} (likelihood reward), "
        f"{report['settings']['test_size']} held-out test questions (text-mas: {report['settings']['text_mas_size']}). "
        f"Took {report['seconds']['total']:.0f} s on {report['machine']['cpu_count']} cores "
        f"(load average {report['load_average_before']} before, {report['load_average_after']} after); "
        f"commit {(report['machine'].get('source') or {}).get('commit', '?')}.",
        "",
        *([f"Left out to fit the time budget: {', '.join(report['settings']['left_out'])}.", ""]
          if report["settings"].get("left_out") else []),
        "Mean log-probability per answer token (higher is better) with its 95% bootstrap CI; the paired "
        "difference learned minus the method on the same questions, with a paired bootstrap 95% CI.",
        "",
        "| method | n | mean answer log-prob [95% CI] | learned minus it [95% CI] | CI excludes 0 | accuracy (decoded) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in report["methods"].items():
        a = row["answer_logprob"]
        d = row.get("learned_minus")
        acc = row.get("accuracy")
        lines.append(
            f"| {name} | {a['n']} | {a['mean']:.3f} [{a['low']:.3f}, {a['high']:.3f}] | "
            + (f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] | {'yes' if d['excludes_zero'] else 'no'}" if d else "- | -")
            + " | " + ("-" if acc is None else f"{acc['correct']}/{acc['n']}") + " |"
        )
    lines += ["", "Learning curve (train reward per step; held-out mean answer log-prob):", ""]
    lines += ["| step | train reward | held-out mean [95% CI] |", "|---|---|---|"]
    held = {h["step"]: h for h in report["curve"]["held_out"]}
    for r in report["curve"]["train"]:
        h = held.get(r["step"] + 1)
        lines.append(f"| {r['step'] + 1} | {r['reward']:.3f} | "
                     + (f"{h['mean']:.3f} [{h['low']:.3f}, {h['high']:.3f}]" if h else "") + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, max_new_tokens=160)
    parser.add_argument("--train-size", type=int, default=64)
    parser.add_argument("--test-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=8)
    parser.add_argument("--curve-size", type=int, default=12)
    parser.add_argument("--text-mas-size", type=int, default=10)
    parser.add_argument("--decode-size", type=int, default=0, help="questions decoded for accuracy by every method")
    parser.add_argument("--latent-steps", type=int, default=10)
    # Three agents, as LatentMAS's chain: prefill is compute-bound (~190 prompt tokens/s on 2
    # cores), and every method pays one prompt per agent per held-out question.
    parser.add_argument("--agent-nums", type=int, default=3, help="agents of every gcache method (gcache run's --agent-nums)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--leave-out", default="", metavar="NAMES",
                        help="comma-separated methods not to run, to fit a time budget (e.g. mesh,layered,random); "
                             "recorded in the results")
    args = parser.parse_args()
    setup(args)
    if args.smoke:
        args.train_size, args.test_size, args.steps, args.batch_size = 4, 3, 2, 2
        args.eval_every, args.curve_size, args.text_mas_size, args.decode_size, args.latent_steps = 1, 2, 1, 1, 2
    load_before = load_average()
    machine = machine_info()
    started = time.perf_counter()
    train_items = load_items("gsm8k", "train", limit=args.train_size)
    test_items = load_items("gsm8k", "test", limit=args.test_size)
    flags = method_flags(args)
    left_out = [name.strip() for name in args.leave_out.split(",") if name.strip()]
    unknown = [name for name in left_out if name not in flags or name == "learned"]
    if unknown:
        raise SystemExit(f"--leave-out: expected names among {', '.join(n for n in flags if n != 'learned')}, got {', '.join(unknown)}")
    flags = {name: f for name, f in flags.items() if name not in left_out}
    args.left_out = left_out
    memo = Rollouts()  # the latent methods' shared rollouts, cleared after each batch
    pipelines, local = build_pipelines(flags, rollouts=memo)
    learned = pipelines["learned"]
    train_rewards, held, train_seconds = train(learned, train_items, test_items[: args.curve_size], args, memo)
    measured = {name: p for name, p in pipelines.items() if name != "text-mas"}
    per_method, seconds, reuse = held_out(measured, test_items, args.batch_size, memo)
    seconds["train"] = train_seconds
    curve_ids = [item.id for item in test_items[: args.curve_size]]
    held.append(held_out_point({q: per_method["learned"][q] for q in curve_ids if q in per_method["learned"]}, args.steps))
    if "text-mas" in pipelines:
        # Its agents' messages are text: they write in full (the judger only reads).
        t = time.perf_counter()
        items = test_items[: args.text_mas_size]
        pipeline = pipelines["text-mas"]
        per_method["text-mas"] = {
            r["id"]: r["answer_logprob"]
            for i in range(0, len(items), args.batch_size)
            for r in pipeline.evaluate(items[i : i + args.batch_size], decode=False)
            if r["answer_logprob"] is not None
        }
        seconds["text-mas"] = time.perf_counter() - t
    for name, values in per_method.items():
        print(f"{name}: {mean_ci(list(values.values()))} ({seconds[name]:.0f} s)", flush=True)
    methods = compare(per_method)
    if args.decode_size:
        for name, pipeline in pipelines.items():
            recs = decoded(pipeline, test_items[: args.decode_size], args.batch_size)
            methods[name]["accuracy"] = {"correct": sum(r["correct"] for r in recs.values()), "n": len(recs)}
    edges = learned.evaluate(test_items[:1], decode=False)[0]["edges"]
    seconds["total"] = time.perf_counter() - started
    report = {
        **report_header(local, args, machine, load_before),
        "settings": {k: getattr(args, k) for k in ("train_size", "test_size", "steps", "batch_size", "eval_every",
                                                     "curve_size", "text_mas_size", "decode_size", "latent_steps", "agent_nums", "lr",
                                                     "left_out")},
        "flags": flags,
        "methods": methods,
        "per_question": per_method,
        "curve": {"train": train_rewards, "held_out": held},
        "learned_edges": edges,
        "rollouts": reuse,
        "seconds": seconds,
    }
    out = Path(args.out)
    write_json(out / "learning.json", report)
    (out / "learning.md").write_text(markdown(report))
    plot_learning_curve(
        [{"step": r["step"] + 1, "reward": r["reward"]} for r in train_rewards], out / "learning.png",
        title="gsm8k / gcache (likelihood reward)", held_out=held,
    )
    print_table(
        "held-out answer log-probability",
        ("method", "n", "mean", "low", "high", "learned minus", "low", "high"),
        [(n, r["answer_logprob"]["n"], r["answer_logprob"]["mean"], r["answer_logprob"]["low"], r["answer_logprob"]["high"],
          *((r["learned_minus"]["mean"], r["learned_minus"]["low"], r["learned_minus"]["high"]) if "learned_minus" in r else (None,) * 3))
         for n, r in methods.items()],
    )
    print(f"wrote {out / 'learning.json'}, learning.md, learning.png in {seconds['total']:.0f} s")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
