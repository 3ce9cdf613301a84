"""`gcache inspect RUN`: rerun chosen questions of a latent run and show what its agents thought and its judger read."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from gcache_cli.main import app, fail


@app.command("inspect")
def inspect(
    run: Path = typer.Argument(..., help="A run folder of a latent method (gcache, latent-mas)."),
    question: Optional[List[str]] = typer.Option(
        None, "--question", "-q", help="A test question id (gsm8k/test/3, or 3); repeat for several (default: the run's first)."
    ),
    top_k: int = typer.Option(5, help="Tokens shown per latent step."),
    out: Optional[Path] = typer.Option(None, help="Folder for inspect.json and inspect.png (default: RUN)."),
    png: bool = typer.Option(True, "--png/--no-png", help="Write inspect.png (attention by source, latent tokens)."),
) -> None:
    """Rerun questions deterministically with the run's config and parameters (no training) and show, per agent and
    latent step, the nearest vocabulary tokens; the fusion weights; the edges; the judger's attention per source."""
    # Loads torch and transformers (seconds): imported when the command runs, not when the CLI parses flags.
    from gcache.io.records.inspect_view import answer_line, plot_inspection, question_tables
    from gcache.io.records.runlog import write_json_atomic
    from gcache.io.runner.inspection import INSPECTION, inspect_run, to_json

    console = Console()
    try:
        data = to_json(inspect_run(run, question, top_k=top_k))
    except ValueError as e:
        raise fail(str(e)) from None
    folder = out or run
    folder.mkdir(parents=True, exist_ok=True)
    for q in data["questions"]:
        for table in question_tables(q):
            console.print(table)
        console.print(answer_line(q), markup=False, highlight=False, soft_wrap=True)
    write_json_atomic(folder / INSPECTION, data)
    console.print(f"data: {folder / INSPECTION}")
    if png:
        console.print(f"picture: {plot_inspection(data, folder / 'inspect.png')}")


__all__ = ["inspect"]
