"""`gcache report RUN` and `gcache compare RUN...`: tables of finished runs, the learning curve and the learned topology."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer
from rich.console import Console
from rich.table import Table

from gcache.io.records.report import (
    curve_table,
    edge_matrix,
    edge_table,
    learning_curve,
    plot_learning_curve,
    plot_topology,
    records_table,
)
from gcache.io.records.runlog import read_records
from gcache.io.records.stats import format_interval
from gcache.io.runner.experiment import ending_line, load_summary
from gcache_cli.main import app, fail


@app.command("report")
def report(
    run: Path = typer.Argument(..., help="A run folder (runs/NAME)."),
    png: bool = typer.Option(
        True, "--png/--no-png", help="Write RUN/topology.png (learned edge probabilities) and RUN/learning_curve.png."
    ),
) -> None:
    """Print a run's summary and per-phase table, its learning curve and its learned graph; plot both."""
    try:
        summary = load_summary(run)
    except ValueError as e:
        raise fail(str(e)) from None
    records = read_records(run / "results.jsonl")
    console = Console()
    console.print(records_table(summary, records))
    ending = ending_line(summary)
    if ending:
        console.print(ending, markup=False, highlight=False, soft_wrap=True)
    curve = learning_curve(records)
    if curve:
        console.print(curve_table(curve))
        if png:
            path = plot_learning_curve(curve, run / "learning_curve.png", title=f"{summary['task']} / {summary['method']}")
            console.print(f"learning curve: {path}")
    names, probs, counts = edge_matrix(records, phase="eval")
    if names:
        console.print(edge_table(names, probs, counts))
    if names and png:
        path = plot_topology(names, probs, counts, run / "topology.png", title=f"{summary['task']} / {summary['method']}")
        console.print(f"learned edge probabilities: {path}")
    elif png:
        console.print("no edges recorded (single agent or fixed topology): no topology.png")


@app.command("compare")
def compare(runs: List[Path] = typer.Argument(..., help="Run folders to put side by side.")) -> None:
    """Print methods side by side: accuracy, mean answer log-probability [95% CI], tokens, seconds, errors, retries."""
    table = Table(title="gcache compare")
    columns = ("run", "task", "method", "mode", "n", "accuracy", "answer logprob [95% CI]", "prompt tok", "latent tok",
               "generated tok", "s / question", "errors", "retries")
    for col in columns:
        table.add_column(col, justify="right" if col not in ("run", "task", "method", "mode") else "left")
    for run in runs:
        try:
            s = load_summary(run)
        except ValueError as e:
            raise fail(str(e)) from None
        n = s.get("n") or 0
        t = s.get("tokens") or {}
        secs = s.get("seconds")
        acc = s.get("accuracy")
        table.add_row(
            run.name, str(s.get("task")), str(s.get("method")), str(s.get("generation_mode")), str(n),
            "-" if acc is None else f"{acc:.3f}", format_interval(s.get("answer_logprob")),
            str(t.get("prompt", "-")), str(t.get("latent", "-")), str(t.get("generated", "-")),
            "-" if not n or secs is None else f"{secs / n:.2f}",
            str(s.get("errors", "-")),
            str(s.get("retries", "-")),
        )
    Console().print(table)
