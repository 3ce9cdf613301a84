"""`gcache selftest TASK`: run gold answers through the real extraction and sandbox.

For code tasks the canonical solutions run in the sandbox against the tests; for the other
tasks the gold answer, written in five common styles, goes through the extractor. It is how a
user checks that a machine scores correctly. Exits 1 when the pass rate is below 100%.
"""

from __future__ import annotations

import time
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from gcache_cli.main import app, fail


@app.command("selftest")
def selftest(
    task: str = typer.Argument(..., help="gsm8k | gpqa | medqa | humaneval | mbppplus | all"),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=1, help="Only the first N items of each task."),
    split: str = typer.Option("all", "--split", help="test | train | all"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Sandboxed children at a time (default: CPU count)."),
    show: int = typer.Option(5, "--show", min=0, help="How many failures to list."),
) -> None:
    """Score the gold answers of TASK through extraction and the sandbox; print the pass rate."""
    from gcache.io.tasks.datasets import TASKS, load_items
    from gcache.io.tasks.scoring import gold_replies, score_many

    names = list(TASKS) if task == "all" else [task]
    if task != "all" and task not in TASKS:
        raise fail(f"unknown task {task!r}: expected one of {', '.join(TASKS)} or all")
    if split not in ("test", "train", "all"):
        raise fail(f"--split must be test, train or all, got {split!r}")
    console = Console()
    table = Table(title="gcache selftest")
    for column in ("task", "items", "checks", "passed", "pass rate", "seconds"):
        table.add_column(column, justify="left" if column == "task" else "right")
    failures: list[str] = []
    all_pass = True
    for name in names:
        splits = ["train", "test"] if split == "all" else [split]
        try:
            items = [it for s in splits for it in load_items(name, s)]
        except ValueError as e:
            raise fail(str(e)) from None
        if limit is not None:
            items = items[:limit]
        pairs = [(it, reply) for it in items for reply in gold_replies(it)]
        start = time.perf_counter()
        with Progress(TextColumn(f"{name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            bar = progress.add_task(name, total=len(pairs))
            verdicts = score_many([p[0] for p in pairs], [p[1] for p in pairs], workers=workers,
                                  progress=lambda _i: progress.advance(bar))
            progress.update(bar, completed=len(pairs))
        seconds = time.perf_counter() - start
        passed = sum(v.correct for v in verdicts)
        rate = passed / len(pairs) if pairs else 0.0
        all_pass = all_pass and bool(pairs) and passed == len(pairs)
        table.add_row(name, str(len(items)), str(len(pairs)), str(passed), f"{100 * rate:.1f}%", f"{seconds:.1f}")
        for (item, reply), verdict in zip(pairs, verdicts):
            if not verdict.correct and len(failures) < show:
                failures.append(f"{item.id}: predicted {verdict.prediction!r:.40} gold {item.gold!r:.40} "
                                f"({verdict.error or 'wrong answer'})")
    console.print(table)
    for line in failures:
        console.print(f"[red]FAIL[/red] {line}", markup=True, highlight=False)
    if not all_pass:
        raise typer.Exit(1)
