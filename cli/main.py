"""`gcache` command: one typer app; each sub-command lives in its own module of this package."""

from __future__ import annotations

import logging
import os

import typer

app = typer.Typer(
    name="gcache",
    help="Multi-agent LLM reasoning through KV-caches along a learned communication graph.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # transformers draws a progress bar per weight load; gcache shows its own progress.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print one clear error line and return the Exit to raise (no traceback for user mistakes)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


# Sub-commands register themselves on `app` when their module is imported.
from gcache_cli import commands as _commands  # noqa: E402,F401
