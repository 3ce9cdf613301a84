"""A seed study of benchmarks/routing.py: one row per result file, and whether each met the goals.

    python benchmarks/routing_seeds.py benchmarks/results/routing_unreliable_seed*.json \
        --out benchmarks/results --name routing_unreliable_seeds

Reads only the result files (no model). Per result: its seed, commit and held-out worlds; the
learned graph + fuser's mean margin [95% CI]; the oracle graph's; the best fixed graph among those
the result compared (chain, star, mesh, layered, random, full (untrained)) and latent-mas; learned
minus each with its paired 95% CI; routing accuracy; the learned graph's edges between agents; the
policy's similarity weight and decision bias; the training seconds. The goals (issue 24, on
``unreliable``): the learned graph beats every compared fixed graph and latent-mas with the paired
CI above 0 (``beats_fixed``), comes within 0.1 nats of the oracle (learned minus oracle >= -0.1,
``near_oracle``), and routes at least 0.9 of the worlds (``routes``). A result that compared fewer
methods (``--methods``) is judged on those it compared, and says which.

Writes <out>/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import write_json

FIXED = ("chain", "star", "mesh", "layered", "random", "full (untrained)", "latent-mas")
NEAR_ORACLE = 0.1  # nats of margin (issue 24's goal)
ROUTES = 0.9  # routing accuracy (issue 24's goal)


def row(path: Path) -> dict:
    """One result's summary (raises ValueError naming the file when it is not a routing result)."""
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: expected a routing result (JSON), could not read it: {e}") from None
    if "methods" not in report or "learned" not in report.get("methods", {}):
        raise ValueError(f"{path}: expected a routing result (benchmarks/routing.py), found no learned method")
    methods = report["methods"]
    fixed = [m for m in FIXED if m in methods]
    best = max(fixed, key=lambda m: methods[m]["margin"]["mean"]) if fixed else None
    minus = {m: methods[m]["learned_minus_margin"] for m in [*fixed, "oracle"] if m in methods}
    worst = min(fixed, key=lambda m: minus[m]["low"]) if fixed else None
    routing = report["routing_accuracy"]
    diag = report.get("diagnosis") or {}
    oracle = minus.get("oracle")
    return {
        "file": path.name, "seed": report["flags"]["learned"]["seed"], "variant": report["settings"]["variant"],
        "commit": (report["machine"].get("source") or {}).get("commit"), "worlds": methods["learned"]["n"],
        "compared": fixed, "learned": methods["learned"]["margin"],
        "oracle": methods["oracle"]["margin"] if "oracle" in methods else None,
        "best_fixed": None if best is None else {"method": best, **methods[best]["margin"]},
        "learned_minus": minus, "weakest_fixed": worst,
        "routing": routing, "agent_edges": methods["learned"]["agent_edges"],
        "decision_similarity": diag.get("decision_similarity"), "decision_bias": diag.get("decision_bias"),
        "train_seconds": report["seconds"].get("train"), "cpu": report["machine"].get("cpu", {}).get("model"),
        "beats_fixed": bool(fixed) and all(minus[m]["low"] > 0 for m in fixed),
        "near_oracle": None if oracle is None else oracle["mean"] >= -NEAR_ORACLE,
        "routes": routing["accuracy"] >= ROUTES,
    }  # fmt: skip


def markdown(rows: list[dict], command: str) -> str:
    def ci(d: dict | None) -> str:
        return "-" if d is None else f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"

    yes = lambda b: "-" if b is None else ("yes" if b else "**no**")  # noqa: E731
    lines = [f"# Routing seed study ({len(rows)} results)", "", f"Command: `{command}`.", "",
             "Margins [95% CI]; learned minus the compared fixed graph (or latent-mas) with the lowest paired "
             "CI, and minus the oracle, paired [95% CI]; best fixed: the best of the N compared. Goals: beats every compared fixed graph (paired CI above 0), within "
             f"{NEAR_ORACLE} of the oracle, routing >= {ROUTES}.", "",
             "| seed | commit | worlds | learned | oracle | best fixed | learned minus fixed (weakest CI) "
             "| minus oracle | routing | edges | similarity / bias | beats fixed | near oracle | routes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        best = r["best_fixed"]
        worst = r["weakest_fixed"]
        lines.append("| " + " | ".join([
            str(r["seed"]), (r["commit"] or "?")[:7], str(r["worlds"]), ci(r["learned"]), ci(r["oracle"]),
            "-" if best is None else f"{best['method']} {best['mean']:+.2f} (of {len(r['compared'])})",
            "-" if worst is None else f"{worst}: {ci(r['learned_minus'][worst])}",
            ci(r["learned_minus"].get("oracle")), f"{r['routing']['correct']}/{r['routing']['n']}",
            f"{r['agent_edges']:.2f}",
            "-" if r["decision_similarity"] is None else f"{r['decision_similarity']:+.2f} / {r['decision_bias']:+.2f}",
            yes(r["beats_fixed"]), yes(r["near_oracle"]), yes(r["routes"]),
        ]) + " |")  # fmt: skip
    met = sum(r["beats_fixed"] and r["near_oracle"] is not False and r["routes"] for r in rows)
    lines += ["", f"Every goal met on {met} of {len(rows)} results."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="routing_<variant>.json files of benchmarks/routing.py")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="routing_seeds", help="the written files' name, without extension")
    args = parser.parse_args()
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        sys.exit(f"results: no such file {', '.join(missing)}")
    rows = []
    for path in args.results:
        try:
            rows.append(row(path))
        except KeyError as e:
            sys.exit(f"results: {path}: expected a routing result (benchmarks/routing.py), it lacks {e}")
        except ValueError as e:
            sys.exit(f"results: {e}")
    command = " ".join(["python", "benchmarks/routing_seeds.py", *sys.argv[1:]])
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"{args.name}.json", {"command": command, "rows": rows})
    (args.out / f"{args.name}.md").write_text(markdown(rows, command))
    print(markdown(rows, command))


if __name__ == "__main__":
    main()
