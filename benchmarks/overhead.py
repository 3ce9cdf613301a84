"""Overhead of the learned parts of gcache (topology policy, fusion, optimizer) against the model's time.

    python benchmarks/overhead.py            # embedded SmolLM2-135M: 2 train steps of 2, then 4 test questions
    python benchmarks/overhead.py --smoke --out /tmp/x    # tiny random model (CI)

A gcache run (default flags of `gcache run`: 4 agents, full topology with a learned
spatial policy, learned fuser, 10 latent steps) trains for ``--train-steps`` steps and
evaluates ``--n`` test questions. The library is not edited: this script wraps its
functions with timers for the duration of the run, and every timer counts its own
(exclusive) time, nested timed calls excluded:

- policy: ``LearnedGraph.plan`` (question embedding by the sentence encoder included,
  also reported alone as ``question_embedding_ms``)
- fusion: ``gcache.core.fusion.fuse``, where the runner fuses incoming caches and
  inside the fuser objective
- update: the core's ``train_step`` (REINFORCE loss, baseline, Adam) outside the fuser
  objective and ``torch.autograd.grad``
- model: ``rollout`` and ``generate`` of the latent core, the fuser objective's forward
  (``gcache.core.train.fuser_objective`` outside fusion) and ``torch.autograd.grad`` in the
  update, whose graph runs back through the frozen model
- other: the rest of ``train_step`` / ``evaluate`` (chat encoding, stacking, scoring)

Reported per question of the run (train and test questions together, and each phase
alone); ``fraction`` = (policy + fusion + update) / total. Writes <out>/overhead.json.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import _common as common
import torch

LEARNED = ("policy", "embedding", "fusion", "update")
MODEL = ("model", "fuser_objective", "backward")


@contextlib.contextmanager
def instrumented(timers: common.Timers):
    """Wrap the library's functions with timers for the block (restored afterwards)."""
    from gcache.core import objectives, train
    from gcache.io.models import generation
    from gcache.io.runner import communication, learner, planner
    from gcache.io.runner.pipeline import Pipeline
    from gcache.io.runner.planner import LearnedGraph

    grad = torch.autograd.grad

    def timed_grad(*a, **k):
        if not timers.inside("update"):
            return grad(*a, **k)
        with timers.timed("backward"):
            return grad(*a, **k)

    patches = [
        (LearnedGraph, "plan", timers.wrap(LearnedGraph.plan, "policy")),
        (planner, "embed_texts", timers.wrap(planner.embed_texts, "embedding")),
        (communication, "fuse", timers.wrap(communication.fuse, "fusion")),
        (objectives, "fuse", timers.wrap(objectives.fuse, "fusion")),
        (communication, "rollout", timers.wrap(communication.rollout, "model")),
        (generation, "generate", timers.wrap(generation.generate, "model")),
        (train, "fuser_objective", timers.wrap(train.fuser_objective, "fuser_objective")),
        (learner, "train_step", timers.wrap(learner.train_step, "update")),
        (torch.autograd, "grad", timed_grad),
        (Pipeline, "train_step", timers.wrap(Pipeline.train_step, "other")),
        (Pipeline, "evaluate", timers.wrap(Pipeline.evaluate, "other")),
    ]
    with contextlib.ExitStack() as stack:
        for target, name, replacement in patches:
            stack.enter_context(common.patched(target, name, replacement))
        yield


def per_question(seconds: dict[str, float], questions: int) -> dict:
    """Milliseconds per question by part, and the learned parts' share of the total."""
    ms = lambda keys: 1000 * sum(seconds.get(k, 0.0) for k in keys) / questions  # noqa: E731
    total = ms(list(seconds))
    learned = ms(["policy", "embedding", "fusion", "update"])
    return {
        "questions": questions,
        "policy_ms": round(ms(["policy", "embedding"]), 3),
        "question_embedding_ms": round(ms(["embedding"]), 3),
        "fusion_ms": round(ms(["fusion"]), 3),
        "update_ms": round(ms(["update"]), 3),
        "model_ms": round(ms(MODEL), 1),
        "fuser_objective_ms": round(ms(["fuser_objective", "backward"]), 1),
        "other_ms": round(ms(["other"]), 1),
        "total_ms": round(total, 1),
        "fraction": round(learned / total, 6) if total else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, max_new_tokens=128)
    parser.add_argument("--train-steps", type=int, default=2, help="training steps (batches) before evaluation")
    parser.add_argument("--batch-size", type=int, default=2, help="questions per train step and per eval batch")
    parser.add_argument("-n", "--n", type=int, default=4, help="test questions evaluated")
    parser.add_argument("--agent-nums", dest="num_agents", type=int, default=4)
    parser.add_argument("--latent-steps", type=int, default=10)
    args = parser.parse_args(argv)
    common.setup(args)
    if args.smoke:
        args.train_steps, args.batch_size, args.n = 1, 2, 2
    if min(args.train_steps, args.batch_size, args.n) < 1:
        parser.error("--train-steps, --batch-size and --n: expected values >= 1")
    load_before = common.load_average()
    machine = common.machine_info()  # before the library is imported: the code measured is the code recorded
    started = time.perf_counter()

    from gcache.io.tasks.datasets import load_items

    flags = dict(common.base_flags(args), method="gcache", num_agents=args.num_agents,
                 latent_steps=args.latent_steps, batch_size=args.batch_size)
    pipelines, local = common.build_pipelines({"gcache": flags})
    pipeline = pipelines["gcache"]
    train = load_items("gsm8k", "train", limit=args.train_steps * args.batch_size + 1, seed=args.seed)
    warm_item, train = train[-1], train[:-1]
    test = load_items("gsm8k", "test", limit=args.n, seed=args.seed)
    with common.short_decoding(pipeline, 8):
        pipeline.evaluate([warm_item])

    phases: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    timers = common.Timers()
    with instrumented(timers), common.progress() as bar:
        task = bar.add_task("overhead", total=args.train_steps + -(-args.n // args.batch_size), status="")
        for step in range(args.train_steps):
            bar.update(task, status=f"train step {step}")
            pipeline.train_step(train[step * args.batch_size : (step + 1) * args.batch_size], step)
            bar.advance(task)
        phases["train"], counts["train"] = dict(timers.seconds), len(train)
        timers.reset()
        for i in range(0, len(test), args.batch_size):
            bar.update(task, status=f"test questions {i}-{i + args.batch_size - 1}")
            pipeline.evaluate(test[i : i + args.batch_size])
            bar.advance(task)
        phases["eval"], counts["eval"] = dict(timers.seconds), len(test)

    both = {k: phases["train"].get(k, 0.0) + phases["eval"].get(k, 0.0) for k in set(phases["train"]) | set(phases["eval"])}
    overall = per_question(both, counts["train"] + counts["eval"])
    report = {
        **common.report_header(local, args, machine, load_before),
        "settings": {"method": "gcache", "task": "gsm8k", "train_steps": args.train_steps,
                     "batch_size": args.batch_size, "test_questions": args.n, "num_agents": args.num_agents,
                     "latent_steps": args.latent_steps, "max_new_tokens": args.max_new_tokens,
                     "topology": pipeline.config.topology, "fusion": pipeline.config.fusion,
                     "optimize_spatial": pipeline.config.optimize_spatial},
        **overall,
        "phases": {name: per_question(phases[name], counts[name]) for name in phases},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    rows = [[name, p["policy_ms"], p["fusion_ms"], p["update_ms"], p["model_ms"], p["other_ms"], p["total_ms"],
             f"{100 * p['fraction']:.3f}%"] for name, p in [("all", overall), *report["phases"].items()]]
    common.print_table(
        f"overhead per question: gcache, {local.name} {report['dtype']}, {report['threads']} threads",
        ["phase", "policy ms", "fusion ms", "update ms", "model ms", "other ms", "total ms", "learned share"], rows)
    common.write_json(args.out / "overhead.json", report)
    print(f"wrote {args.out / 'overhead.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
