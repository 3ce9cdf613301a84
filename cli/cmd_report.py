"""`gcache report RUN` and `gcache compare RUN...`: tables of finished runs, the learning curve and the learned topology.

``--format text`` (the default) prints rich tables folded to the terminal's width (every number in
full at 80 columns); ``json``, ``markdown`` and ``csv`` print the same rows for scripts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from gcache.io.records.report import (
    COMPARE_COLUMNS,
    COMPARE_FIELDS,
    CURVE_COLUMNS,
    EDGE_COLUMNS,
    PHASE_COLUMNS,
    PHASE_FIELDS,
    compare_row,
    csv_text,
    edge_matrix,
    edge_rows,
    fit_tables,
    learning_curve,
    markdown_table,
    phase_rows,
    plot_learning_curve,
    plot_topology,
    run_title,
    topology_plan,
)
from gcache.io.records.runlog import read_records
from gcache.io.runner.experiment import ending_line, load_summary
from gcache_cli.main import app, fail

FORMATS = ("text", "json", "markdown", "csv")
_FORMAT_HELP = "text (tables folded to the terminal's width), json, markdown or csv"


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise fail(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    return fmt


def _summary(run: Path) -> dict:
    try:
        return load_summary(run)
    except ValueError as e:
        raise fail(str(e)) from None


@app.command("report")
def report(
    run: Path = typer.Argument(..., help="A run folder (runs/NAME)."),
    fmt: str = typer.Option("text", "--format", help=f"{_FORMAT_HELP}; csv holds the per-phase table only."),
    png: Optional[bool] = typer.Option(
        None, "--png/--no-png",
        help="Write RUN/topology.png (the graph's edge probabilities) and RUN/learning_curve.png "
             "(default: with --format text).",
    ),  # fmt: skip
) -> None:
    """Print a run's summary and per-phase table, its learning curve and its graph; plot both."""
    fmt = _check_format(fmt)
    summary = _summary(run)
    records = read_records(run / "results.jsonl")
    rows, ending, curve = phase_rows(records), ending_line(summary), learning_curve(records)
    names, probs, counts = edge_matrix(records, phase="eval")
    edges = edge_rows(names, probs, counts)
    if fmt == "json":
        doc = {"run": str(run), "summary": summary, "phases": rows, "ending": ending, "curve": curve, "edges": edges}
        typer.echo(json.dumps(doc, indent=2))
    elif fmt == "csv":
        typer.echo(csv_text(PHASE_FIELDS, rows), nl=False)
    elif fmt == "markdown":
        parts = [f"## {run_title(summary)}", markdown_table(PHASE_COLUMNS, rows)]
        parts += [ending] if ending else []
        parts += ["### learning curve (train)", markdown_table(CURVE_COLUMNS, curve)] if curve else []
        parts += ["### graph (eval): edge probabilities", markdown_table(EDGE_COLUMNS, edges)] if edges else []
        typer.echo("\n\n".join(parts))
    else:
        console = Console()
        for table in fit_tables(PHASE_COLUMNS, rows, console.width, title=run_title(summary)):
            console.print(table)
        if ending:
            console.print(ending, markup=False, highlight=False, soft_wrap=True)
        if curve:
            for table in fit_tables(CURVE_COLUMNS, curve, console.width, title="learning curve (train)"):
                console.print(table)
        if edges:
            for table in fit_tables(EDGE_COLUMNS, edges, console.width, keys=2, title="graph (eval): edge probabilities"):
                console.print(table)
    if png if png is not None else fmt == "text":
        _plots(run, summary, records, curve)


def _plots(run: Path, summary: dict, records: list[dict], curve: list[dict]) -> None:
    title = f"{summary['task']} / {summary['method']}"
    if curve:
        path = plot_learning_curve(curve, run / "learning_curve.png", title=title)
        typer.echo(f"learning curve: {path}", err=True)
    plan = topology_plan(records, phase="eval")
    if plan.names:
        path = plot_topology(plan, run / "topology.png", title=title)
        typer.echo(f"graph: {path}", err=True)
    else:
        typer.echo("no edges recorded (single agent): no topology.png", err=True)


@app.command("compare")
def compare(
    runs: List[Path] = typer.Argument(..., help="Run folders to put side by side."),
    fmt: str = typer.Option("text", "--format", help=_FORMAT_HELP + "."),
) -> None:
    """Print methods side by side: accuracy, mean answer log-probability and its 95% CI, tokens,
    seconds per question, errors, retries."""
    fmt = _check_format(fmt)
    rows = [compare_row(run.name, _summary(run)) for run in runs]
    if fmt == "json":
        typer.echo(json.dumps(rows, indent=2))
    elif fmt == "csv":
        typer.echo(csv_text(COMPARE_FIELDS, rows), nl=False)
    elif fmt == "markdown":
        typer.echo(markdown_table(COMPARE_COLUMNS, rows))
    else:
        console = Console()
        for table in fit_tables(COMPARE_COLUMNS, rows, console.width, title="gcache compare"):
            console.print(table)
