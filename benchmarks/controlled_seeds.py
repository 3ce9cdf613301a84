"""Seed study of the controlled learning tests: how often their claims hold, on seeds and
informed-agent slots they were not written against.

    python benchmarks/controlled_seeds.py                      # mesh and star, seeds 0-20
    python benchmarks/controlled_seeds.py --topologies mesh --seeds 0 1 2 --steps 8

Each run is tests/_controlled.py's ``run`` (the tests' own setup): seed s puts the informed
agent in slot s % 3, so every slot gets a third of the seeds. Runs go two at a time in
separate processes of one thread each (on 2 cores that is faster than one process of two
threads). Writes benchmarks/results/controlled_seeds.json after every run (the machine, the
commit, each run's before/after held-out answer log-probability, edge probabilities, source
logits and step rewards) and prints each claim's rate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import RESULTS, machine_info

TESTS = Path(__file__).resolve().parent.parent / "tests"
OUT = RESULTS / "controlled_seeds.json"


def one(topology: str, seed: int, steps: int) -> dict:
    """Runs one controlled run in a fresh one-thread process; its result dict."""
    code = (
        "import json, sys, torch; torch.set_num_threads(1); sys.path.insert(0, sys.argv[1]); import _controlled; "
        "print(json.dumps(_controlled.run(sys.argv[2], int(sys.argv[3]), int(sys.argv[3]) % 3, int(sys.argv[4]))))"
    )
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, str(TESTS), topology, str(seed), str(steps)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    if done.returncode:
        return {"topology": topology, "seed": seed, "error": done.stderr[-3000:]}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topologies", nargs="+", default=["mesh", "star"], choices=["mesh", "star"])
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(21)))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    result = json.loads(OUT.read_text()) if OUT.exists() else {}
    result["machine"] = machine_info()
    runs = result.setdefault("runs", [])
    jobs = [(t, s) for s in args.seeds for t in args.topologies]
    with ThreadPoolExecutor(args.workers) as pool:
        for got in pool.map(lambda job: one(job[0], job[1], args.steps), jobs):
            runs[:] = [r for r in runs if (r["topology"], r["seed"], r.get("steps")) != (got["topology"], got["seed"], got.get("steps"))]
            runs.append(got)
            OUT.write_text(json.dumps(result, indent=1) + "\n")
            print(json.dumps(got)[:400], file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
