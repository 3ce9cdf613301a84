"""End to end: single, text-mas, latent-mas and gcache on the same GSM8K test questions.

    python benchmarks/e2e.py                 # embedded SmolLM2-135M, 10 questions, 256 new tokens
    python benchmarks/e2e.py --profile       # also cProfile one question per method (in the JSON)
    python benchmarks/e2e.py --smoke --out /tmp/x   # tiny random model, two questions (CI)

Every method runs in local mode on one shared copy of the model, with the same
``max_new_tokens`` for every decoding agent; text-mas and gcache use the same number of
agents (``--agent-nums``, 4) and the same untrained policy, whose deterministic topology
(every edge with p > 1/2 in the most likely order) is therefore the same graph for both;
``--params`` evaluates gcache with trained parameters instead. latent-mas is LatentMAS's
chain of three thinkers and a judger. The methods run interleaved question by question
(the order rotating per question) after a warm-up, so drift of a shared machine hits
them alike. Per method: wall seconds per question (median and total, measured around
``Pipeline.evaluate``), generated tokens, prompt + latent tokens processed, accuracy, and
memory: the peak RSS while the method ran and the peak increase over the RSS at the start
of each of its questions (sampled every 5 ms in-process, after handing freed heap pages
back to the OS, so methods stay interleaved). Speed-ups are medians of the per-question
ratios text-mas seconds / method seconds (paired, the same question back to back); token
reductions are 1 - generated(method) / generated(text-mas) over all questions.

Writes <out>/e2e.json and <out>/e2e.md (the table the README shows).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import _common as common

METHODS = ("single", "text-mas", "latent-mas", "gcache")
BASELINE = "text-mas"
# Functions whose cumulative time explains where a question's seconds go (file suffix, name).
PROFILE_KEYS = {
    "latent rollout": ("gcache/core/latent.py", "rollout"),
    "decoding (generate)": ("gcache/core/latent.py", "generate"),
    "prefill": ("gcache/core/latent.py", "prefill"),
    "model forward": ("gcache/io/models/hf.py", "forward"),
    "lm_head (logits)": ("gcache/io/models/hf.py", "logits"),
    "chat encoding": ("gcache/io/models/local.py", "encode_chat"),
    "fusion": ("gcache/core/fusion.py", "fuse"),
    "topology (plan)": ("gcache/io/runner/planner.py", "plan"),
    "scoring": ("gcache/io/tasks/", "score_many"),
    "answer log-probability": ("gcache/io/runner/margin.py", "answer_scores"),
}


def flag_sets(args: argparse.Namespace) -> dict[str, dict]:
    base = common.base_flags(args)
    sets = {
        "single": dict(base, method="single"),
        "text-mas": dict(base, method="text-mas", num_agents=args.num_agents),
        "latent-mas": dict(base, method="latent-mas", latent_steps=args.latent_steps),
        "gcache": dict(base, method="gcache", num_agents=args.num_agents, latent_steps=args.latent_steps),
    }
    if args.params is not None:
        sets["gcache"]["params"] = str(args.params)
    return {m: sets[m] for m in args.methods}


def node_kind(node: dict) -> str:
    """'think' for a latent node, 'decode' for one that wrote text."""
    return "think" if node["tokens"].get("latent", 0) and node.get("text") is None else "decode"


def summarize(name: str, runs: list[dict]) -> dict:
    """Per-method figures over its questions (``runs``: seconds, record, memory window)."""
    seconds = [r["seconds"] for r in runs]
    tokens = {k: sum(r["record"]["tokens"][k] for r in runs) for k in ("prompt", "latent", "generated")}
    by_kind = {"think": 0.0, "decode": 0.0}
    for r in runs:
        for node in r["record"]["trace"]:
            by_kind[node_kind(node)] += float(node["seconds"])
    peaks = [r["peak"] for r in runs if r["peak"] is not None]
    deltas = [r["delta"] for r in runs if r["delta"] is not None]
    return {
        "accuracy": sum(r["record"]["correct"] for r in runs) / len(runs),
        "correct": sum(r["record"]["correct"] for r in runs),
        "seconds_total": round(sum(seconds), 3),
        "seconds_median": round(common.median(seconds), 3),
        "generated_tokens": tokens["generated"],
        "processed_tokens": tokens["prompt"] + tokens["latent"],
        "prompt_tokens": tokens["prompt"],
        "latent_tokens": tokens["latent"],
        "peak_rss_mb": common.mb(max(peaks)) if peaks else None,
        "peak_rss_delta_mb": common.mb(max(deltas)) if deltas else None,
        "think_seconds": round(by_kind["think"], 3),
        "decode_seconds": round(by_kind["decode"], 3),
        "decode_ms_per_generated_token": (round(1000 * by_kind["decode"] / tokens["generated"], 2)
                                          if tokens["generated"] else None),
        "decoding_agents_per_question": common.median(
            [sum(node_kind(n) == "decode" for n in r["record"]["trace"]) for r in runs]),
        "errors": sum(r["record"]["error"] is not None for r in runs),
    }


def profile_one(pipeline, item, top: int = 12) -> dict:
    """cProfile of one question: cumulative seconds of the key functions and the top functions by self time."""
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    pipeline.evaluate([item])
    prof.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(prof, stream=io.StringIO())
    keys = {}
    for label, (suffix, fn) in PROFILE_KEYS.items():
        cum = sum(v[3] for (path, _, name), v in stats.stats.items() if name == fn and path.endswith(suffix))
        if cum:
            keys[label] = round(cum, 3)
    self_time = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return {
        "wall_seconds": round(wall, 3),
        "cumulative_seconds": keys,
        "top_self_seconds": [
            {"function": f"{Path(path).name}:{line}:{name}", "calls": v[1], "self_s": round(v[2], 3),
             "cumulative_s": round(v[3], 3)}
            for (path, line, name), v in self_time
        ],
    }


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        *([] if report.get("complete", True) else ["**Partial run** (cut short; the questions finished so far).", ""]),
        f"GSM8K, {report['n']} test questions, model {report['model']} ({report['dtype']}), "
        f"{report['threads']} threads, max_new_tokens {s['max_new_tokens']}, {s['num_agents']} agents "
        f"(text-mas, gcache), latent_steps {s['latent_steps']}; gcache topology: {s['gcache_policy']}. "
        f"Median over questions; speed-up = median of paired per-question ratios to text-mas.",
        "",
        "| method | accuracy | s / question (median) | s total | generated tokens | prompt + latent tokens "
        "| peak RSS MB (+ increase) | speed-up vs text-mas | fewer generated tokens vs text-mas |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["methods"].items():
        speed = report["speedup_vs_text_mas"].get(name)
        red = report["token_reduction_vs_text_mas"].get(name)
        lines.append(
            f"| {name} | {m['accuracy']:.2f} ({m['correct']}/{report['n']}) | {m['seconds_median']:.1f} "
            f"| {m['seconds_total']:.1f} | {m['generated_tokens']} | {m['processed_tokens']} "
            f"| {common.fmt(m['peak_rss_mb'])} (+{common.fmt(m['peak_rss_delta_mb'])}) "
            f"| {'-' if speed is None else f'{speed:.2f}x'} | {'-' if red is None else f'{100 * red:.0f}%'} |"
        )
    lines += ["", f"Measured {report['date']} on {report['machine']['processor']}, "
              f"{report['machine']['cpu_count']} CPUs, load average before {report['load_average_before']}, "
              f"after {report['load_average_after']}.", ""]
    return "\n".join(lines)


def build_report(runs: dict[str, list[dict]], items: list, *, complete: bool, args, local, names, load_before,
                 machine, started) -> dict:
    """The JSON report over the questions every method has answered so far."""
    runs = {name: r[: len(items)] for name, r in runs.items()}
    methods = {name: summarize(name, runs[name]) for name in names}
    speedup, reduction, speedup_total = {}, {}, {}
    if BASELINE in runs:
        base = runs[BASELINE]
        base_gen = methods[BASELINE]["generated_tokens"]
        for name in names:
            ratios = [b["seconds"] / r["seconds"] for b, r in zip(base, runs[name])]
            speedup[name] = round(common.median(ratios), 3)
            speedup_total[name] = round(methods[BASELINE]["seconds_total"] / methods[name]["seconds_total"], 3)
            if base_gen:
                reduction[name] = round(1 - methods[name]["generated_tokens"] / base_gen, 4)
    first = {name: runs[name][0]["record"] for name in names}
    return {
        **common.report_header(local, args, machine, load_before),
        "n": len(items),
        "complete": complete,
        "settings": {
            "task": "gsm8k",
            "max_new_tokens": args.max_new_tokens,
            "num_agents": args.num_agents,
            "latent_steps": args.latent_steps,
            "seed": args.seed,
            "temperature": 0.0,
            "generation_mode": "local",
            "gcache_policy": (f"trained parameters from {args.params}" if args.params is not None else
                              "untrained policy, deterministic topology (edges with p > 1/2)"),
            "edges": {name: [f"{e['src']}->{e['dst']}" for e in first[name]["edges"] if e["taken"]] for name in names},
            "memory": "in-process RSS sampled every 5 ms; peak_rss_mb is the highest RSS while the method ran "
                      "(shared model and other pipelines included), peak_rss_delta_mb the largest increase over "
                      "the RSS at the start of one of its questions",
            "speedup": "median over questions of text-mas seconds / method seconds (paired)",
        },
        "methods": methods,
        "speedup_vs_text_mas": speedup,
        "speedup_total_vs_text_mas": speedup_total,
        "token_reduction_vs_text_mas": reduction,
        "per_question": [
            {"id": item.id, **{name: {"seconds": round(runs[name][q]["seconds"], 3),
                                      "generated": runs[name][q]["record"]["tokens"]["generated"],
                                      "correct": runs[name][q]["record"]["correct"],
                                      "prediction": runs[name][q]["record"]["prediction"],
                                      "answer": (runs[name][q]["record"]["answer"] or "")[:300]}
                 for name in names}, "gold": item.gold}
            for q, item in enumerate(items)
        ],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def write(report: dict, out: Path) -> None:
    common.write_json(out / "e2e.json", report)
    (out / "e2e.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, max_new_tokens=256)
    parser.add_argument("-n", "--n", type=int, default=10, help="GSM8K test questions (the first n of the seeded split)")
    parser.add_argument("--agent-nums", dest="num_agents", type=int, default=4, help="agents of text-mas and gcache")
    parser.add_argument("--latent-steps", type=int, default=10, help="latent steps per thinking agent")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--params", type=Path, default=None, help="trained gcache params.safetensors (default: untrained policy)")
    parser.add_argument("--profile", action="store_true", help="cProfile one question per method after the run")
    args = parser.parse_args(argv)
    common.setup(args)
    if args.smoke:
        args.n = min(args.n, 2)
    if args.n < 1:
        parser.error(f"--n: expected a value >= 1, got {args.n}")
    load_before = common.load_average()
    machine = common.machine_info()  # before the library is imported: the code measured is the code recorded
    started = time.perf_counter()

    from gcache.io.tasks.datasets import load_items

    items = load_items("gsm8k", "test", limit=args.n + 1, seed=args.seed)
    warm_item, items = items[-1], items[: args.n]
    pipelines, local = common.build_pipelines(flag_sets(args))
    if args.params is not None and "gcache" in pipelines:
        pipelines["gcache"].load(args.params)
    common.warm_up(pipelines, warm_item)

    names = list(pipelines)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    context = {"args": args, "local": local, "names": names, "load_before": load_before, "machine": machine,
               "started": started}
    with common.RssSampler() as sampler, common.progress() as bar:
        task = bar.add_task("e2e", total=len(items) * len(names), status="")
        for q, item in enumerate(items):
            for name in names[q % len(names):] + names[: q % len(names)]:
                bar.update(task, status=f"{item.id} {name}")
                with sampler.window() as mem:
                    t0 = time.perf_counter()
                    record = pipelines[name].evaluate([item])[0]
                    seconds = time.perf_counter() - t0
                runs[name].append({"item": item.id, "seconds": seconds, "record": record,
                                   "peak": mem.peak, "delta": mem.delta})
                bar.advance(task)
            # Written after every question, so a run cut short still leaves its finished questions.
            write(build_report(runs, items[: q + 1], complete=q + 1 == len(items), **context), args.out)

    report = build_report(runs, items, complete=True, **context)
    if args.profile:
        report["profile_one_question"] = {name: profile_one(pipelines[name], items[0]) for name in names}
    methods, speedup, reduction = report["methods"], report["speedup_vs_text_mas"], report["token_reduction_vs_text_mas"]
    common.print_table(
        f"e2e: GSM8K x{len(items)}, {local.name} {report['dtype']}, {report['threads']} threads",
        ["method", "accuracy", "s/q median", "s total", "generated", "prompt+latent", "peak RSS MB", "+RSS MB",
         "speed-up", "token cut"],
        [[name, m["accuracy"], m["seconds_median"], m["seconds_total"], m["generated_tokens"],
          m["processed_tokens"], m["peak_rss_mb"], m["peak_rss_delta_mb"], speedup.get(name),
          reduction.get(name)] for name, m in methods.items()],
    )
    for name, p in report.get("profile_one_question", {}).items():
        common.print_table(f"profile, one question: {name} ({p['wall_seconds']} s)", ["function", "cumulative s"],
                           list(p["cumulative_seconds"].items()))
    write(report, args.out)
    print(f"wrote {args.out / 'e2e.json'} and {args.out / 'e2e.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
