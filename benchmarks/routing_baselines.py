"""Re-evaluate the baselines of a routing result, keeping its learned method's values.

    python benchmarks/routing_baselines.py benchmarks/results/routing_topics.json --test-size 80
    python benchmarks/routing_baselines.py RESULT.json --smoke --out /tmp/x   # tiny model (CI)

A routing result (benchmarks/routing.py) holds every method's per-question values on its held-out
worlds. The baselines (the fixed topologies, full (untrained), latent-mas, the oracle graph) do not
depend on training, so when their settings change (as when the fixed graphs read an untrained
policy's decision inputs instead of their sinks, fixed in routing.py) they can be evaluated again
without retraining: this script rebuilds them with routing.py's current ``method_flags`` on the
result's first ``--test-size`` worlds (same variant, seed and agents), takes the learned method's
per-question values from the result file, and recomputes every comparison (``routing.compare``).
Writes <out>/<result name>_baselines.json. The learned method's rows keep the result's commit
(``source``); the baselines are this run's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _common import add_common_args, build_pipelines, load_average, machine_info, print_table, report_header, setup, write_json
from routing import OracleGraph, compare, held_out, method_flags

from gcache.io.runner.communication import Rollouts
from gcache.io.tasks.routing import RoutingOptions, load_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, max_new_tokens=16)
    parser.add_argument("result", type=Path, help="a routing_<variant>.json written by benchmarks/routing.py")
    parser.add_argument("--test-size", type=int, default=None, help="the result's first N held-out worlds (default: all)")
    args = parser.parse_args()
    setup(args)
    if not args.result.is_file():
        sys.exit(f"result: no such file {args.result}")
    source = json.loads(args.result.read_text())
    s = source["settings"]
    learned = source["per_question"]["learned"]
    ids = list(learned)[: args.test_size or len(learned)]
    if args.smoke:
        ids = ids[:2]
    run = argparse.Namespace(**{**vars(args), "variant": s["variant"], "agent_nums": s["agent_nums"],
                                "latent_steps": s["latent_steps"], "lr": s["lr"], "batch_size": s["batch_size"],
                                "edge_cost": s.get("edge_cost", 0.0),
                                "fixed_decision_inputs": s.get("fixed_decision_inputs", False)})
    load_before, machine, started = load_average(), machine_info(), time.perf_counter()
    seed = source["flags"]["learned"]["seed"]
    run.seed = seed
    items = load_items("test", limit=len(ids), seed=seed, options=RoutingOptions(run.variant, run.agent_nums))
    if [item.id for item in items] != ids:
        sys.exit(f"result: its worlds are not the ones seed {seed} generates (expected {ids[:2]}..., got "
                 f"{[i.id for i in items[:2]]}...)")
    flags = {k: v for k, v in method_flags(run).items() if k != "learned"}
    memo = Rollouts()
    pipelines, local = build_pipelines(flags, rollouts=memo)
    pipelines["oracle"].planner = OracleGraph(run.agent_nums)
    per_method, seconds, _ = held_out(pipelines, items, run.batch_size, memo)
    methods = compare({"learned": {q: learned[q] for q in ids}, **per_method})
    report = {
        **report_header(local, args, machine, load_before),
        "command": " ".join(["python", "benchmarks/routing_baselines.py", *sys.argv[1:]]),
        "source": {"file": str(args.result), "commit": (source["machine"].get("source") or {}).get("commit"),
                   "command": source.get("command")},
        "settings": {**s, "test_size": len(ids)},
        "flags": flags,
        "methods": methods,
        "per_question": per_method,
        "seconds": {**{k: round(v, 1) for k, v in seconds.items()}, "total": round(time.perf_counter() - started, 1)},
    }  # fmt: skip
    out = Path(args.out) / f"{args.result.stem}_baselines.json"
    write_json(out, report)
    rows = [(n, r["n"], r["margin"]["mean"], *((r["learned_minus_margin"]["mean"], r["learned_minus_margin"]["low"],
             r["learned_minus_margin"]["high"]) if "learned_minus_margin" in r else (None,) * 3), r["prompt_tokens"],
             r["agent_edges"], r["decision_inputs"]) for n, r in methods.items()]  # fmt: skip
    print_table(f"{args.result.name}: baselines again, learned from the file",
                ("method", "n", "margin", "learned minus", "low", "high", "prompt tokens", "edges", "inputs"), rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
