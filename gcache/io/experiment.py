"""The experiment harness behind `gcache run`: train, checkpoint, evaluate, resume, summarise.

Phases:
- train (methods with learned parts): ``num_iterations`` batches drawn from the train split in
  a seeded order; after each batch one optimizer step, then the records of that batch are
  appended and the learned parameters checkpointed to ``params.safetensors``.
- eval: the test split with the deterministic topology and no gradient, one record per question.

Resume: the checkpoint holds the number of finished steps; a step that was cut short is run
again from the same parameters and seed, and only its missing records are appended, so
results.jsonl never holds a line twice and loses none.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gcache.io.config import API_HTTP_FLAGS, RunConfig, api_config, with_api_settings
from gcache.io.runlog import CONFIG, SUMMARY, RunLog, read_records, summarize, write_json_atomic

log = logging.getLogger(__name__)


def check_before_loading(config: RunConfig) -> None:
    """Every check that needs no model: task name, API settings of API modes, the run folder.

    Raises ValueError with one clear line, before anything slow happens.
    """
    from gcache.io.tasks import TASKS

    if config.task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {config.task!r}")
    if config.generation_mode != "local":
        from gcache.io.apiconfig import require_api

        require_api(config.generation_mode, api_config(config))
    out = config.out_dir
    if (out / "results.jsonl").exists() and not config.resume:
        raise ValueError(f"--out: {out} already holds results; pass --resume to continue it or choose another --out")
    if config.resume and (out / CONFIG).exists():
        import json

        saved = json.loads((out / CONFIG).read_text())
        changed = {
            k: (saved.get(k), v)
            for k, v in config.to_dict().items()
            if k not in ("resume", "out", "device", "threads", "dtype", *API_HTTP_FLAGS) and saved.get(k) != v
        }
        if changed:
            diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"--resume: the settings differ from the run in {out} ({diff})")


def split_items(config: RunConfig) -> tuple[list, list]:
    """The train items (seeded order, ``train_size`` of them) and the selected test items."""
    from gcache.io.tasks import load_items

    train: list = []
    if config.learns and config.num_iterations > 0 and config.params is None:
        train = load_items(config.task, "train", seed=config.seed)
        if config.train_size is not None:
            train = train[: config.train_size]
    test = load_items(config.task, "test", limit=config.limit, question_id=config.question_id, seed=config.seed)
    return train, test


def train_batches(train: Sequence, config: RunConfig) -> list[list]:
    """``num_iterations`` batches of ``batch_size`` train items, cycling through a seeded shuffle."""
    if not train:
        return []
    order = list(range(len(train)))
    random.Random(config.seed).shuffle(order)
    batches, k = [], 0
    for _ in range(config.num_iterations):
        batch = []
        for _ in range(config.batch_size):
            batch.append(train[order[k % len(order)]])
            k += 1
        batches.append(batch)
    return batches


def run_experiment(config: RunConfig, *, console: Console | None = None, build=None) -> dict:
    """Run the whole experiment of ``config`` and return its summary (also in summary.json).

    ``build(config)`` makes the pipeline (default ``build_pipeline``; under torchrun, rank 0's
    ``gcache.io.distributed.TeamPipeline``, whose ``ranks`` answer each batch together).
    """
    from gcache.io.pipeline import build_pipeline

    console = console or Console(stderr=True)
    started = time.perf_counter()
    config = with_api_settings(config)
    out = config.out_dir
    runlog = RunLog.open(out, resume=config.resume)
    write_json_atomic(out / CONFIG, config.to_dict())
    train, test = split_items(config)
    pipeline = (build or build_pipeline)(config)
    if config.params is not None:
        pipeline.load(Path(config.params))

    batches = train_batches(train, config)
    step = pipeline.restore(out) if config.resume else 0
    if batches and step < len(batches):
        _train(pipeline, batches, step, runlog, out, console)

    _evaluate(pipeline, test, runlog, config, console)
    summary = _summary(config, runlog, time.perf_counter() - started, pipeline)
    write_json_atomic(out / SUMMARY, summary)
    console.print(_summary_line(summary))
    return summary


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _train(pipeline, batches, start: int, runlog: RunLog, out: Path, console: Console) -> None:
    rewards: list[float] = [float(r["correct"]) for r in runlog.phase_records("train")]
    with _progress(console) as bar:
        task = bar.add_task("train", total=len(batches), completed=start, status="")
        for step in range(start, len(batches)):
            records = pipeline.train_step(batches[step], step)
            for record in records:
                if not runlog.is_done("train", record["id"]):
                    runlog.append(record)
                rewards.append(float(record["correct"]))
            pipeline.checkpoint(out, step + 1)
            recent = rewards[-4 * len(batches[step]) :]
            bar.update(task, advance=1, status=f"reward {sum(recent) / max(len(recent), 1):.2f}")


def _evaluate(pipeline, test, runlog: RunLog, config: RunConfig, console: Console) -> None:
    todo = [item for item in test if not runlog.is_done("eval", item.id)]
    done = runlog.phase_records("eval")
    correct = sum(bool(r["correct"]) for r in done)
    with _progress(console) as bar:
        task = bar.add_task("eval", total=len(test), completed=len(test) - len(todo), status="")
        size = config.batch_size * pipeline.ranks  # each rank answers batch_size questions at once
        for i in range(0, len(todo), size):
            for record in pipeline.evaluate(todo[i : i + size]):
                runlog.append(record)
                done.append(record)
                correct += bool(record["correct"])
                bar.update(task, advance=1, status=f"accuracy {correct / len(done):.3f}")


def _summary(config: RunConfig, runlog: RunLog, wall: float, pipeline) -> dict:
    evals = summarize(runlog.phase_records("eval"))
    trains = summarize(runlog.phase_records("train"))
    return {
        "task": config.task,
        "method": config.method,
        "generation_mode": config.generation_mode,
        "model": config.model,
        "n": evals["n"],
        "accuracy": evals["accuracy"],
        "tokens": evals["tokens"],
        "api_tokens": pipeline.api_tokens(),
        "wall_seconds": wall,
        "seconds": evals["seconds"],
        "errors": evals["errors"],
        "train": trains,
        "config": config.to_dict(),
    }


def _summary_line(summary: dict) -> str:
    acc = summary["accuracy"]
    t = summary["tokens"]
    return (
        f"[bold]{summary['task']} / {summary['method']} ({summary['generation_mode']})[/]: "
        f"accuracy {acc if acc is None else f'{acc:.3f}'} on {summary['n']} questions, "
        f"tokens prompt {t['prompt']} / latent {t['latent']} / generated {t['generated']}, "
        f"{summary['wall_seconds']:.1f} s, errors {summary['errors']}"
    )


def load_summary(folder: Path) -> dict:
    """summary.json of a run, or one computed from its results.jsonl when the run did not finish."""
    folder = Path(folder)
    path = folder / SUMMARY
    if path.exists():
        import json

        return json.loads(path.read_text())
    records = read_records(folder / "results.jsonl")
    if not records:
        raise ValueError(f"run: {folder} holds no summary.json and no results.jsonl")
    s = summarize(r for r in records if r["phase"] == "eval")
    return {"task": "?", "method": folder.name, "generation_mode": "?", "wall_seconds": None, **s}


__all__ = ["check_before_loading", "run_experiment", "load_summary"]
