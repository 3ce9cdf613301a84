"""The experiment harness behind `gcache run`: train, checkpoint, evaluate, resume, summarise.

Phases:
- train (methods with learned parts): ``num_iterations`` batches drawn from the train split in
  a seeded order; after each batch one optimizer step, then the records of that batch are
  appended and the learned parameters checkpointed to ``params.safetensors``.
- eval: the test split with the deterministic topology and no gradient, one record per question.

Resume: the checkpoint holds the number of finished steps; a step that was cut short is run
again from the same parameters and seed, and only its missing records are appended. A
question whose latest line holds an error (API, sandbox, model) is answered again and its
new line appended (``retry_errors``, on by default); one answered without error never is.

Faults: a training step that failed (any of its records holds an error) makes no update and
is not checkpointed; the run stops there, and ``--resume`` redoes that step from the same
parameters and seed (with ``retry_errors`` off, the step is skipped and training goes on, as
before). When the API client holds its endpoint for down (its circuit breaker, see
``gcache.io.models.api``), the run stops after the batch at hand. Either way the summary's
``status`` is "stopped"; a run that answered every test question is "complete", one that
finished with errored questions "errors". An exception that escapes the work itself (a
numerical error in a training step, a model error) ends the run with ``RunFailed``, which says
where it happened; the lines already written stay, and ``--resume`` continues from them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from pathlib import Path
from typing import Callable, Protocol, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from gcache.io.models.apiconfig import require_api
from gcache.io.records.report import learning_line
from gcache.io.records.runlog import CONFIG, RESULTS, SUMMARY, RunLog, read_records, summarize, write_json_atomic
from gcache.io.records.stats import format_interval
from gcache.io.runner.config import API_HTTP_FLAGS, RunConfig, api_config, resume_command, routing_options, with_api_settings
from gcache.io.tasks.datasets import TASKS, load_items

log = logging.getLogger(__name__)

# What a record's error starts with when the client refused to call an endpoint held for down
# (the pipeline records errors as "TypeName: message"); such a question was never tried.


def check_before_loading(config: RunConfig) -> None:
    """Every check that needs no model: task name, API settings of API modes, the run folder.

    Raises ValueError with one clear line, before anything slow happens.
    """
    if config.task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {config.task!r}")
    if config.generation_mode != "local":
        require_api(config.generation_mode, api_config(config))
    out = config.out_dir
    if (out / "results.jsonl").exists() and not config.resume:
        raise ValueError(f"--out: {out} already holds results; pass --resume to continue it or choose another --out")
    if config.resume and (out / CONFIG).exists():
        saved = json.loads((out / CONFIG).read_text())
        how = ("resume", "retry_errors", "out", "device", "threads", "dtype", "compile", *API_HTTP_FLAGS)
        # A setting the saved config lacks was added since that run: it ran with the setting's default.
        defaults = RunConfig().to_dict()
        changed = {
            k: (saved.get(k, defaults[k]), v) for k, v in config.to_dict().items()
            if k not in how and saved.get(k, defaults[k]) != v
        }  # fmt: skip
        if changed:
            diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"--resume: the settings differ from the run in {out} ({diff})")


def split_items(config: RunConfig) -> tuple[list, list]:
    """The train items (seeded order, ``train_size`` of them) and the selected test items."""
    train: list = []
    routing = routing_options(config) if config.task == "routing" else None
    if config.learns and config.num_iterations > 0 and config.params is None:
        train = load_items(config.task, "train", seed=config.seed, routing=routing)
        if config.train_size is not None:
            train = train[: config.train_size]
    test = load_items(config.task, "test", limit=config.limit, question_id=config.question_id, seed=config.seed,
                      routing=routing)  # fmt: skip
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


class RunPipeline(Protocol):
    """What the experiment drives: gcache.io.runner.pipeline.Pipeline in one process, rank 0's
    gcache.io.runner.distributed.TeamPipeline under torchrun."""

    ranks: int  # processes answering each batch together

    def train_step(self, items: Sequence, step: int) -> list[dict]: ...
    def evaluate(self, items: Sequence) -> list[dict]: ...
    def checkpoint(self, out: Path, step: int) -> None: ...
    def restore(self, out: Path) -> int: ...
    def load(self, path: Path) -> None: ...
    def api_tokens(self) -> dict: ...

    @property
    def outage(self) -> str | None:
        """Why the API endpoint is held for down (the run stops), or None."""
        ...


class RunFailed(RuntimeError):
    """The work of a run raised (not a bad setting: those are ValueErrors before any work)."""


class RunEnded(Exception):
    """Ends the run as a whole, said by the handler of its own kind (a team of ranks stopping
    together); passes through the work's error handling unchanged."""


def run_experiment(
    config: RunConfig, *, console: Console | None = None, build: Callable[[RunConfig], RunPipeline] | None = None
) -> dict:
    """Run the whole experiment of ``config`` and return its summary (also in summary.json).

    The summary's ``status`` says how the run ended: "complete" (every test question answered
    without error), "errors" (finished, some test questions hold an error) or "stopped" (a
    training step failed or the API endpoint is down; ``stopped`` says why); ``resume_command``
    continues it. Raises ValueError for bad settings (before any question is answered) and
    ``RunFailed`` when the work itself raises. ``build(config)`` makes the pipeline (default ``build_pipeline``; under
    torchrun, rank 0's ``gcache.io.runner.distributed.TeamPipeline``, whose ``ranks`` answer each batch together).
    """
    # Loads torch and transformers (~3 s): imported when a run starts, not when the CLI parses flags.
    from gcache.io.runner.pipeline import build_pipeline

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
    stopped = None
    with _failing("training", out):
        if batches and step < len(batches):
            stopped = _train(pipeline, batches, step, runlog, config, console)
    if stopped is None:
        with _failing("evaluation", out):
            stopped = _evaluate(pipeline, test, runlog, config, console)
    summary = _summary(config, runlog, test, time.perf_counter() - started, pipeline, stopped)
    write_json_atomic(out / SUMMARY, summary)
    learned = learning_line(runlog.records)
    if learned:
        console.print(learned, markup=False, highlight=False, soft_wrap=True)
    console.print(_summary_line(summary))
    ending = ending_line(summary)
    if ending:
        console.print(ending, markup=False, highlight=False, soft_wrap=True)
    return summary


@contextlib.contextmanager
def _failing(phase: str, out: Path):
    """Any exception of the work of ``phase`` as a ``RunFailed`` naming the phase and the cause."""
    try:
        yield
    except RunEnded:
        raise
    except Exception as e:  # noqa: BLE001 - said in one line; the lines written so far are kept
        raise RunFailed(
            f"{phase} failed: {type(e).__name__}: {e} (the finished questions are in {out / RESULTS}; "
            "continue with --resume)"
        ) from e


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


def _to_do(runlog: RunLog, config: RunConfig, phase: str, qid: str) -> bool:
    """Whether a question still needs a line: it has none, or (retrying errors) its latest holds one."""
    return not runlog.is_done(phase, qid) if config.retry_errors else not runlog.has(phase, qid)


def _append_new(runlog: RunLog, config: RunConfig, records: list[dict]) -> None:
    """Append the records a question still needs; those the client refused to send (the
    endpoint was held for down) are left out: such a question was not tried and stays to do."""
    for record in records:
        if record.get("refused"):
            continue
        if _to_do(runlog, config, record["phase"], record["id"]):
            runlog.append(record)


def _train(pipeline: RunPipeline, batches, start: int, runlog: RunLog, config: RunConfig, console: Console) -> str | None:
    """Run the training steps from ``start``; returns why training stopped early, or None."""
    rewards = [v for v in map(_reward, runlog.phase_records("train")) if v is not None]
    with _progress(console) as bar:
        task = bar.add_task("train", total=len(batches), completed=start, status="")
        for step in range(start, len(batches)):
            records = pipeline.train_step(batches[step], step)
            _append_new(runlog, config, records)
            outage = pipeline.outage
            if outage is not None:
                return outage
            failed = next((r["error"] for r in records if r["error"] is not None), None)
            if failed is not None and config.retry_errors:
                return f"training step {step + 1} of {len(batches)} failed ({failed})"
            pipeline.checkpoint(config.out_dir, step + 1)
            now = [v for v in map(_reward, records) if v is not None]
            rewards += now
            recent = rewards[-4 * len(batches[step]) :]
            status = f"reward {sum(now) / max(len(now), 1):.3f} (last 4 steps {sum(recent) / max(len(recent), 1):.3f})"
            bar.update(task, advance=1, status=status)
    return None


def _reward(record: dict) -> float | None:
    """A train line's reward (lines written before rewards were recorded: its accuracy; None
    where it has neither, as a failed line under the likelihood reward)."""
    value = record.get("reward")
    if value is None:
        return None if record.get("correct") is None else float(record["correct"])
    return float(value)


def _evaluate(pipeline: RunPipeline, test, runlog: RunLog, config: RunConfig, console: Console) -> str | None:
    """Answer the test questions still to do; returns why evaluation stopped early, or None."""
    todo = [item for item in test if _to_do(runlog, config, "eval", item.id)]
    answered = len(test) - len(todo)
    with _progress(console) as bar:
        task = bar.add_task("eval", total=len(test), completed=answered, status="")
        size = config.batch_size * pipeline.ranks  # each rank answers batch_size questions at once
        for i in range(0, len(todo), size):
            records = pipeline.evaluate(todo[i : i + size])
            _append_new(runlog, config, records)
            outage = pipeline.outage
            if outage is not None:
                return outage
            s = summarize(runlog.phase_records("eval"))
            bar.update(task, advance=len(records), status=f"accuracy {'not decoded' if s['accuracy'] is None else format(s['accuracy'], '.3f')}, errors {s['errors']}")
    return None


def _summary(config: RunConfig, runlog: RunLog, test: Sequence, wall: float, pipeline: RunPipeline, stopped: str | None) -> dict:
    evals = summarize(runlog.phase_records("eval"))
    trains = summarize(runlog.phase_records("train"))
    remaining = sum(not runlog.is_done("eval", item.id) for item in test)
    if stopped is not None:
        status = "stopped"
    elif evals["errors"]:
        status = "errors"
    else:
        status = "complete"
    return {
        "task": config.task,
        "method": config.method,
        "generation_mode": config.generation_mode,
        "model": config.model,
        "status": status,
        "stopped": stopped,
        "n": evals["n"],
        "total": len(test),
        "remaining": remaining,
        "accuracy": evals["accuracy"],
        "answer_logprob": evals["answer_logprob"],
        "margin": evals["margin"],
        "tokens": evals["tokens"],
        "api_tokens": pipeline.api_tokens(),
        "wall_seconds": wall,
        "seconds": evals["seconds"],
        "errors": evals["errors"],
        "retries": evals["retries"],
        "train": trains,
        "resume_command": resume_command(config),
        "config": config.to_dict(),
    }


def _summary_line(summary: dict) -> str:
    acc = summary["accuracy"]
    t = summary["tokens"]
    return (
        f"[bold]{summary['task']} / {summary['method']} ({summary['generation_mode']})[/]: "
        f"accuracy {acc if acc is None else f'{acc:.3f}'} on {summary['n']} questions, "
        f"mean answer log-prob {format_interval(summary.get('answer_logprob'))}, "
        + (f"mean margin {format_interval(summary['margin'])}, " if summary.get("margin") else "")
        + f"tokens prompt {t['prompt']} / latent {t['latent']} / generated {t['generated']}, "
        f"{summary['wall_seconds']:.1f} s, errors {summary['errors']}, retries {summary['retries']}"
    )


def ending_line(summary: dict) -> str | None:
    """One line for a run that did not answer everything: what happened, what is left, how to go on."""
    if "status" not in summary:  # a summary.json written before runs had one
        return None
    left = f"{summary['remaining']} of {summary['total']} test questions"
    if summary["status"] == "stopped":
        return f"stopped early: {summary['stopped']}; {left} still to answer; continue with: {summary['resume_command']}"
    if summary["status"] == "errors":
        return f"{summary['errors']} of {summary['total']} test questions errored; retry them with: {summary['resume_command']}"
    return None


def load_summary(folder: Path) -> dict:
    """summary.json of a run, or one computed from its results.jsonl when the run did not finish."""
    folder = Path(folder)
    path = folder / SUMMARY
    if path.exists():
        return json.loads(path.read_text())
    records = read_records(folder / "results.jsonl")
    if not records:
        raise ValueError(f"run: {folder} holds no summary.json and no results.jsonl")
    s = summarize(r for r in records if r["phase"] == "eval")
    return {"task": "?", "method": folder.name, "generation_mode": "?", "wall_seconds": None, **s}


__all__ = ["check_before_loading", "run_experiment", "load_summary", "ending_line"]
