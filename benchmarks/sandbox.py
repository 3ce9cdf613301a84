"""Seconds per scored candidate in the code sandbox: canonical solutions through `tasks.score`.

    python benchmarks/sandbox.py                              # 25 HumanEval + 25 MBPP+ canonical solutions
    python benchmarks/sandbox.py --baseline /tmp/gcache-old   # and the same against another checkout, alternating
    python benchmarks/sandbox.py --smoke                      # 2 + 2 candidates, one round (CI; writes to a temp file)

Each candidate is scored alone (`score(item, reply)`, one sandboxed child at a time), so the
figure is the latency of one candidate: child start-up, containment, the tests, tear-down.
With ``--baseline DIR`` (a checkout of an older gcache, e.g. ``git archive <rev> | tar -x -C DIR``)
the two trees are measured in alternating rounds, each round in a fresh interpreter of its own
tree, so both see the same machine load; the ratio is the median of per-candidate ratios of
the per-candidate medians. Results go to benchmarks/results/sandbox.json (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent


def candidates(per_task: int) -> list[tuple[str, str, int]]:
    """(task, split, row) of the first `per_task` test items of HumanEval and MBPP+."""
    from gcache.io.tasks.datasets import load_items

    return [(task, "test", it.index) for task in ("humaneval", "mbppplus") for it in load_items(task, "test", limit=per_task)]


def measure_here(which: list[tuple[str, str, int]]) -> dict[str, float]:
    """Seconds of `score` per candidate (by item id), in this interpreter's gcache; raises if one is not correct."""
    from gcache.io.tasks.datasets import load_items
    from gcache.io.tasks.scoring import gold_replies, score

    items = [load_items(task, split, question_id=row)[0] for task, split, row in which]
    # MBPP+ expected outputs and imports load once per process; not part of a candidate's cost.
    score(items[-1], gold_replies(items[-1])[0])
    seconds = {}
    for item in items:
        start = time.perf_counter()
        verdict = score(item, gold_replies(item)[0])
        seconds[item.id] = time.perf_counter() - start
        if not verdict.correct:
            raise RuntimeError(f"{item.id}: the canonical solution was not scored correct: {verdict.error}")
    return seconds


def measure_in(tree: Path, which: list[tuple[str, str, int]]) -> dict[str, float]:
    """measure_here run by a fresh interpreter that imports gcache from `tree`."""
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{ROOT}")
    code = "import json, sys; import sandbox as b; print(json.dumps(b.measure_here(json.loads(sys.argv[1]))))"
    done = subprocess.run([sys.executable, "-c", code, json.dumps(which)], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"measuring in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(rounds: list[dict[str, float]]) -> dict:
    """Per-candidate medians over rounds, and their median and total per task."""
    ids = list(rounds[0])
    per = {i: statistics.median(r[i] for r in rounds) for i in ids}
    out = {"per_candidate_s": {i: round(s, 4) for i, s in per.items()},
           "median_s": round(statistics.median(per.values()), 4), "total_s": round(sum(per.values()), 3)}
    for prefix, task in (("HumanEval/", "humaneval"), ("Mbpp/", "mbppplus")):
        mine = [s for i, s in per.items() if i.startswith(prefix)]
        if mine:
            out[f"{task}_median_s"] = round(statistics.median(mine), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-task", type=int, default=25, help="canonical solutions per task (HumanEval, MBPP+)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (median per candidate)")
    parser.add_argument("--baseline", type=Path, default=None, help="another gcache checkout to measure side by side")
    parser.add_argument("--smoke", action="store_true", help="2 + 2 candidates, one round")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "sandbox.json", help="JSON file written")
    args = parser.parse_args()
    # _common imports torch (seconds); the measuring interpreters import this module and need none of it.
    from _common import machine_info, write_json

    if args.smoke:
        args.per_task, args.rounds = 2, 1
        if args.out == ROOT / "results" / "sandbox.json":  # never overwrite the measured results
            args.out = Path(tempfile.gettempdir()) / "gcache_benchmarks_smoke" / "sandbox.json"
    which = candidates(args.per_task)
    trees = {"current": REPO} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for name in order:
            rounds[name].append(measure_in(trees[name], which))
            print(f"round {r + 1}/{args.rounds} {name}: median {statistics.median(rounds[name][-1].values()):.3f} s",
                  flush=True)
    report = {"smoke": args.smoke, "candidates": len(which), "rounds": args.rounds, "machine": machine_info(),
              "trees": {name: str(path) for name, path in trees.items()},
              "results": {name: summary(rs) for name, rs in rounds.items()}}
    if "baseline" in rounds:
        now, before = report["results"]["current"]["per_candidate_s"], report["results"]["baseline"]["per_candidate_s"]
        report["ratio_current_over_baseline"] = round(statistics.median(now[i] / before[i] for i in now), 3)
        report["ratio_of_totals"] = round(report["results"]["current"]["total_s"] / report["results"]["baseline"]["total_s"], 3)
        print(f"per-candidate ratio current/baseline: {report['ratio_current_over_baseline']} "
              f"(totals {report['ratio_of_totals']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    print(json.dumps({k: v for k, v in report["results"]["current"].items() if k != "per_candidate_s"}))


if __name__ == "__main__":
    main()
