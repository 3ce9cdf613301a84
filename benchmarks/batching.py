"""Batching: latent rollouts plus decoding for 1, 4 and 8 questions at once, against one by one.

    python benchmarks/batching.py            # embedded SmolLM2-135M, float32, greedy, 8 questions
    python benchmarks/batching.py --smoke --out /tmp/x    # tiny random model (CI)

The method is latent-mas (three thinkers' latent rollouts, then the judger decodes), run
by ``Pipeline.evaluate`` on batches of ``b`` questions: every wave is one left-padded
batched forward. The same ``max(batches)`` GSM8K test questions are answered at every
batch size, ``--reps`` times with the order of batch sizes rotating, after a warm-up;
questions per second is the question count over the wall time of one pass, median over
repetitions. Answers at batch b must equal, question by question, the answers decoded
one question at a time (greedy, float32). Where the time goes is recorded per batch size
(``core``): seconds in the latent core's prefills, latent steps and decoding loops, and the
decoding loop's steps (a batch decodes until its longest answer ends). Writes
<out>/batching.json.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import _common as common

BATCHES = (1, 4, 8)


@contextlib.contextmanager
def core_timers(timers: common.Timers, steps: dict):
    """Time the latent core's prefills, latent steps and decoding loops (exclusive) for the block.

    rollout and generate look ``prefill`` and ``latent_step`` up in their module at call
    time, so wrapping the module's names reaches every call. ``steps["decode"]`` counts the
    decoding loop's iterations (batched rows advance together, so a batch costs its longest row).
    """
    from gcache.core import latent
    from gcache.io.models import generation

    generate = generation.generate  # the shell's decoding calls the core's generate through this name

    def counted_generate(*a, **k):
        with timers.timed("decode"):
            out = generate(*a, **k)
        steps["decode"] = steps.get("decode", 0) + int(out.tokens.shape[1])
        return out

    with contextlib.ExitStack() as stack:
        stack.enter_context(common.patched(latent, "prefill", timers.wrap(latent.prefill, "prefill")))
        stack.enter_context(common.patched(latent, "latent_step", timers.wrap(latent.latent_step, "latent_steps")))
        stack.enter_context(common.patched(generation, "generate", counted_generate))
        yield


def one_pass(pipeline, items, batch: int) -> tuple[float, dict, dict, dict]:
    """Wall seconds to answer ``items`` in batches of ``batch``; answers and records by question id;
    seconds in prefill, latent steps and decoding (prefill excluded) and the decoding loop's steps."""
    answers, records = {}, {}
    timers, steps = common.Timers(), {}
    with core_timers(timers, steps):
        start = time.perf_counter()
        for i in range(0, len(items), batch):
            for record in pipeline.evaluate(items[i : i + batch]):
                answers[record["id"]] = record["answer"]
                records[record["id"]] = record
        wall = time.perf_counter() - start
    split = {f"{k}_seconds": round(v, 3) for k, v in timers.seconds.items()}
    split["decode_loop_steps"] = steps.get("decode", 0)
    return wall, answers, records, split


def split_seconds(records: dict) -> dict:
    """Seconds spent in latent nodes and in decoding nodes (node seconds are per row of their wave)."""
    think = decode = 0.0
    for r in records.values():
        for node in r["trace"]:
            if node["text"] is None:
                think += float(node["seconds"])
            else:
                decode += float(node["seconds"])
    return {"think_seconds": round(think, 3), "decode_seconds": round(decode, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, max_new_tokens=128)
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="batch sizes (1 is always run)")
    parser.add_argument("--latent-steps", type=int, default=10, help="latent steps per thinking agent")
    parser.add_argument("--reps", type=int, default=3, help="passes per batch size (median taken)")
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "float32"
    common.setup(args)
    if args.smoke:
        args.batches, args.reps = [1, 2], 1
    batches = sorted(set(args.batches) | {1})
    if batches[0] < 1 or args.reps < 1:
        parser.error("--batches and --reps: expected values >= 1")
    load_before = common.load_average()
    machine = common.machine_info()  # before the library is imported: the code measured is the code recorded
    started = time.perf_counter()

    from gcache.io.tasks.datasets import load_items

    n = max(batches)
    items = load_items("gsm8k", "test", limit=n + 1, seed=args.seed)
    warm_item, items = items[-1], items[:n]
    flags = dict(common.base_flags(args), method="latent-mas", latent_steps=args.latent_steps)
    pipelines, local = common.build_pipelines({"latent-mas": flags})
    pipeline = pipelines["latent-mas"]
    with common.short_decoding(pipeline, 8):
        pipeline.evaluate([warm_item])
        pipeline.evaluate([warm_item] * max(batches))  # the largest batch's shapes, once

    seconds: dict[int, list[float]] = {b: [] for b in batches}
    answers: dict[int, list[dict]] = {b: [] for b in batches}
    records: dict[int, dict] = {}
    splits: dict[int, list[dict]] = {b: [] for b in batches}
    with common.progress() as bar:
        task = bar.add_task("batching", total=args.reps * len(batches), status="")
        for rep in range(args.reps):
            for b in batches[rep % len(batches):] + batches[: rep % len(batches)]:
                bar.update(task, status=f"batch {b}, pass {rep + 1}")
                wall, ans, recs, split = one_pass(pipeline, items, b)
                seconds[b].append(wall)
                answers[b].append(ans)
                records[b] = recs
                splits[b].append(split)
                bar.advance(task)

    reference = answers[1][0]
    results = []
    base_qps = len(items) / common.median(seconds[1])
    for b in batches:
        qps = len(items) / common.median(seconds[b])
        same = [a[i.id] == reference[i.id] for a in answers[b] for i in items]
        results.append({
            "batch": b,
            "questions_per_s": round(qps, 4),
            "equal_to_unbatched": all(same),
            "equal_answers": f"{sum(same)}/{len(same)}",
            "speedup_vs_batch_1": round(qps / base_qps, 3),
            "seconds_median": round(common.median(seconds[b]), 3),
            "seconds": [round(s, 3) for s in seconds[b]],
            "generated_tokens": sum(r["tokens"]["generated"] for r in records[b].values()),
            **split_seconds(records[b]),
            # where the time goes (medians over passes): batching pays off in latent and decoding
            # steps, not in prefill, which is compute-bound already for one prompt
            "core": {k: common.median([sp.get(k, 0) for sp in splits[b]])
                     for k in ("prefill_seconds", "latent_steps_seconds", "decode_seconds", "decode_loop_steps")},
        })
    report = {
        **common.report_header(local, args, machine, load_before),
        "settings": {"method": "latent-mas", "task": "gsm8k", "questions": len(items), "reps": args.reps,
                     "max_new_tokens": args.max_new_tokens, "latent_steps": args.latent_steps,
                     "temperature": 0.0, "padding": "left", "seed": args.seed},
        "results": results,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    common.print_table(
        f"batching: latent-mas on {len(items)} GSM8K questions, {local.name} {report['dtype']}, "
        f"{report['threads']} threads",
        ["batch", "questions/s", "x batch 1", "s (median)", "equal to unbatched", "prefill s", "latent steps s",
         "decode s", "decode steps"],
        [[r["batch"], r["questions_per_s"], r["speedup_vs_batch_1"], r["seconds_median"],
          f"{r['equal_to_unbatched']} ({r['equal_answers']})", r["core"]["prefill_seconds"],
          r["core"]["latent_steps_seconds"], r["core"]["decode_seconds"], r["core"]["decode_loop_steps"]]
         for r in results],
    )
    common.write_json(args.out / "batching.json", report)
    print(f"wrote {args.out / 'batching.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
