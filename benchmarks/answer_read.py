"""The decision node's answer log-probability, read on what its decode kept against read afresh.

    python benchmarks/answer_read.py --threads 2      # embedded SmolLM2-135M, 5 GSM8K questions
    python benchmarks/answer_read.py --smoke          # tiny random model, two questions (CI)

For latent-mas and gcache (full caches, 4 agents, untrained policy) each question is answered
once with a short decode (``--max-new-tokens``; the read of the context does not depend on the
answer's length). Then the answer log-probability and margin are measured both ways on that
question's decision context, alternating, ``--reps`` times each: ``fresh`` reads the judger's
prompt again on top of its fused cache (as before), ``read`` reads only the answer line on top
of the prompt the decode had read (``gcache.io.runner.answers.answer_logprobs_shared``'s
``reads``). Per method: median seconds per question of each, their ratio (median of the
per-question ratios, paired), and the largest difference between the two values.

Writes <out>/answer_read.json.
"""

from __future__ import annotations

import argparse
import time

import _common as common
import torch

METHODS = ("latent-mas", "gcache")


def flag_sets(args: argparse.Namespace) -> dict[str, dict]:
    base = common.base_flags(args)
    return {
        "latent-mas": dict(base, method="latent-mas", latent_steps=args.latent_steps),
        "gcache": dict(base, method="gcache", num_agents=4, latent_steps=args.latent_steps, num_iterations=0),
    }


def measure(pipeline, local, item, reps: int) -> dict:
    """One question: its decision context decoded once, then both reads timed ``reps`` times each."""
    from gcache.io.runner.margin import answer_scores

    plan = pipeline._plan(item, train=False, seed=0)
    (out,) = pipeline._answer([plan], step=0, decode=True)
    context = out.context
    if context is None or context.read is None:
        raise SystemExit(f"{item.id}: the decode kept no read of its context (API mode, or another decode step?)")
    times: dict[str, list[float]] = {"fresh": [], "read": []}
    values = {}
    with torch.no_grad():
        for _ in range(reps):
            for way, reads in (("fresh", None), ("read", [context.read])):
                t0 = time.perf_counter()
                lp, _ = answer_scores(local, [context.conversation], [context.cache], [item], reads=reads)
                times[way].append(time.perf_counter() - t0)
                values[way] = float(lp[0])
    return {
        "item": item.id,
        "context_positions": (0 if context.cache is None else int(context.cache.mask.sum())) + out.decision.tokens["prompt"],
        "fresh_s": common.median(times["fresh"]),
        "read_s": common.median(times["read"]),
        "difference": abs(values["fresh"] - values["read"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, max_new_tokens=16)
    parser.add_argument("-n", "--n", type=int, default=5, help="GSM8K test questions")
    parser.add_argument("--latent-steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5, help="timed reads per way and question (median taken)")
    args = parser.parse_args(argv)
    common.setup(args)
    if args.smoke:
        args.n, args.reps = min(args.n, 2), 2
    if args.n < 1 or args.reps < 1:
        parser.error(f"--n, --reps: expected values >= 1, got {args.n}, {args.reps}")
    load_before = common.load_average()
    machine = common.machine_info()
    started = time.perf_counter()

    from gcache.io.tasks.datasets import load_items

    items = load_items("gsm8k", "test", limit=args.n + 1, seed=args.seed)
    pipelines, local = common.build_pipelines(flag_sets(args))
    for pipeline in pipelines.values():
        measure(pipeline, local, items[-1], 1)  # warm-up
    rows = {name: [measure(p, local, item, args.reps) for item in items[: args.n]] for name, p in pipelines.items()}
    methods = {
        name: {
            "fresh_s_median": common.rounded(common.median([r["fresh_s"] for r in runs]), 4),
            "read_s_median": common.rounded(common.median([r["read_s"] for r in runs]), 4),
            "fresh_over_read": common.rounded(common.median([r["fresh_s"] / r["read_s"] for r in runs]), 2),
            "max_difference": max(r["difference"] for r in runs),
        }
        for name, runs in rows.items()
    }
    report = {
        **common.report_header(local, args, machine, load_before),
        "settings": {"n": args.n, "reps": args.reps, "latent_steps": args.latent_steps,
                     "max_new_tokens": args.max_new_tokens, "agents": {"gcache": 4, "latent-mas": 3}},
        "methods": methods,
        "per_question": rows,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    common.write_json(args.out / "answer_read.json", report)
    common.print_table(
        "answer log-probability per question: fresh read vs on the decode's read",
        ["method", "fresh s", "read s", "fresh / read", "max |difference|"],
        [[n, m["fresh_s_median"], m["read_s_median"], m["fresh_over_read"], f"{m['max_difference']:.1e}"]
         for n, m in methods.items()],
    )  # fmt: skip
    print(f"wrote {args.out / 'answer_read.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
