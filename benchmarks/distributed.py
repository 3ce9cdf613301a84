"""Data parallelism on one machine: 2 ranks x 1 thread against 1 process x 2 threads.

    python benchmarks/distributed.py               # embedded SmolLM2-135M, 8 GSM8K questions, latent-mas
    python benchmarks/distributed.py --smoke --out /tmp/x   # tiny random model, 4 questions (CI)

Both runs are the real command (`gcache run gsm8k --method latent-mas ... --batch-size 1`), one
as one process with ``--threads 2``, one as ``--nproc 2 --threads 1``, on the same questions,
alternated ``--reps`` times so drift of a shared machine hits both. Wall time includes process
start and model loading (once per rank); the steady rate is measured from the file: the time
between the first and the last complete round of lines in results.jsonl (a round: one line
per rank), over the questions answered in between (polled every 20 ms), so start-up cancels. The answers (every results.jsonl field but timings)
must be the same. Also written: what a training step all-reduces (the learned parts of
``--method gcache`` with this model: policy and fuser parameters, float32), and the expected
scaling on GPUs, on paper.

Writes <out>/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as common

ROOT = Path(__file__).resolve().parents[1]


def run_once(args: argparse.Namespace, nproc: int, folder: Path) -> dict:
    """One `gcache run`: wall seconds, seconds to the first line, the steady rate, and its lines."""
    cmd = [
        sys.executable, "-m", "gcache_cli", "run", "gsm8k", "--method", "latent-mas", "--model", args.model,
        "--limit", str(args.questions), "--batch-size", "1", "--latent-steps", str(args.latent_steps),
        "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed), "--out", str(folder),
        "--threads", str(2 // nproc if nproc <= 2 else 1),
    ]  # fmt: skip
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    if not args.stop_at_answer:
        cmd.append("--no-stop-at-answer")
    results = folder / "results.jsonl"
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    events: list[tuple[float, int]] = []  # (seconds since start, lines) whenever the count changed
    try:
        while proc.poll() is None:
            n = _count(results)
            if n and (not events or events[-1][1] != n):
                events.append((time.perf_counter() - started, n))
            time.sleep(0.02)
    finally:
        if proc.poll() is None:  # interrupted: its ranks die with it (gcache run --nproc sees to that)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall = time.perf_counter() - started
    stderr = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    n = _count(results)
    if not events or events[-1][1] != n:
        events.append((wall, n))
    # Rank 0 appends a round's lines one after the other: count whole rounds only.
    rounds = [(t, k) for t, k in events if k % nproc == 0 or k == n]
    (t0, n0), (t1, n1) = rounds[0], rounds[-1]
    return {
        "wall_seconds": wall,
        "seconds_to_first_line": t0,
        "steady_questions_per_second": (n1 - n0) / (t1 - t0) if t1 > t0 and n1 > n0 else None,
        "questions_per_second": n / wall,
        "lines": _lines(results),
    }


def _count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


# Float fields computed in a batched forward: a rank answering its share alone and one process
# answering the whole batch agree on them only to float rounding (compared to LIKELIHOOD_TOL).
LIKELIHOOD_FIELDS = ("answer_logprob", "reward")
LIKELIHOOD_TOL = 1e-4


def _lines(path: Path) -> list[dict]:
    out = []
    for raw in path.read_text().splitlines():
        r = json.loads(raw)
        r.pop("seconds")
        for t in r["trace"]:
            t.pop("seconds")
        out.append(r)
    return sorted(out, key=lambda r: r["id"])


def _same(a: list[dict], b: list[dict]) -> bool:
    """The same lines: every field equal, the likelihoods within LIKELIHOOD_TOL."""
    def strip(r: dict) -> dict:
        return {k: v for k, v in r.items() if k not in LIKELIHOOD_FIELDS}

    def close(x, y) -> bool:
        return x == y or (x is not None and y is not None and abs(x - y) <= LIKELIHOOD_TOL)

    return len(a) == len(b) and all(
        strip(x) == strip(y) and all(close(x.get(k), y.get(k)) for k in LIKELIHOOD_FIELDS) for x, y in zip(a, b)
    )


def allreduce_bytes(model: str) -> dict:
    """What one training step of ``--method gcache`` all-reduces with this model: every learned
    parameter's gradient, float32, in one flat buffer."""
    from gcache.core.optim import tree_leaves
    from gcache.io.runner.config import build_config
    from gcache.io.runner.pipeline import build_pipeline

    pipeline = build_pipeline(build_config({"task": "gsm8k", "method": "gcache", "model": model}))
    parts = {k: sum(t.numel() for t in tree_leaves(v)) for k, v in pipeline.learner.params.items()}
    return {"parameters": parts, "bytes_per_step": 4 * sum(parts.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, max_new_tokens=64)
    parser.add_argument("--questions", type=int, default=8, help="GSM8K test questions (default: 8)")
    parser.add_argument("--latent-steps", type=int, default=4, help="latent steps per thinking agent (default: 4)")
    parser.add_argument("--reps", type=int, default=2, help="alternated repetitions of both runs (default: 2)")
    args = parser.parse_args()
    common.setup(args)
    if args.smoke:
        args.questions, args.reps, args.latent_steps = 4, 1, 2
    machine = common.machine_info()
    load_before = common.load_average()
    runs: dict[str, list[dict]] = {"1 process x 2 threads": [], "2 ranks x 1 thread": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            order = list(runs) if rep % 2 == 0 else list(reversed(runs))
            for name in order:
                nproc = 1 if name.startswith("1") else 2
                runs[name].append(run_once(args, nproc, Path(tmp) / f"{rep}-{nproc}"))
    reference = runs["1 process x 2 threads"][0]["lines"]
    same = all(_same(r["lines"], reference) for rs in runs.values() for r in rs)
    summary = {}
    for name, rs in runs.items():
        steady = [r["steady_questions_per_second"] for r in rs if r["steady_questions_per_second"] is not None]
        summary[name] = {
            "wall_seconds": [round(r["wall_seconds"], 2) for r in rs],
            "seconds_to_first_line": [round(r["seconds_to_first_line"], 2) for r in rs],
            "questions_per_second": round(statistics.median(r["questions_per_second"] for r in rs), 4),
            "steady_questions_per_second": round(statistics.median(steady), 4) if steady else None,
        }
    one, two = summary["1 process x 2 threads"], summary["2 ranks x 1 thread"]
    ratio = lambda a, b: round(a / b, 3) if a and b else None  # noqa: E731
    report = {
        "model": args.model,
        "questions": args.questions,
        "settings": {"method": "latent-mas", "batch_size": 1, "latent_steps": args.latent_steps,
                     "max_new_tokens": args.max_new_tokens, "reps": args.reps, "stop_at_answer": args.stop_at_answer},
        "smoke": args.smoke,
        "machine": machine,
        "load_average_before": load_before,
        "load_average_after": common.load_average(),
        "runs": summary,
        "same_answers": same,
        "speedup_two_ranks": {
            "questions_per_second": ratio(two["questions_per_second"], one["questions_per_second"]),
            "steady_questions_per_second": ratio(two["steady_questions_per_second"], one["steady_questions_per_second"]),
        },
        "allreduce_per_training_step": allreduce_bytes(args.model),
        "on_gpus": (
            "Per rank: the whole model on its GPU, its share of each batch (questions answered independently: "
            "latent rollouts, fusion, decoding), scoring. Communicated per evaluation batch: the batch's items "
            "(broadcast from rank 0) and the records (all-gathered, a few KB per question); per training step "
            "also the rewards (B floats) and one all-reduce of the learned parameters' gradients "
            "(allreduce_per_training_step, float32). Both are negligible next to seconds of decoding per "
            "question, so questions/s should scale close to linearly with GPUs until rank 0's writing "
            "(an fsync per line) or the slowest rank of each batch (ranks wait for each other once per "
            "batch) dominates; larger --batch-size lowers the latter."
        ),
    }
    out = args.out / "distributed.json"
    common.write_json(out, report)
    common.print_table(
        f"gcache run, {args.questions} GSM8K questions, {args.model} (answers the same: {same})",
        ["run", "wall s", "questions/s", "steady questions/s"],
        [[name, statistics.median(s["wall_seconds"]), s["questions_per_second"], s["steady_questions_per_second"]]
         for name, s in summary.items()],  # fmt: skip
    )
    print(f"wrote {out}")
    if not same:
        raise SystemExit("the answers differ between 1 process and 2 ranks")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
