"""`gcache models`: list the known local models and prepare the embedded one's safetensors copy."""

from __future__ import annotations

import typer

from gcache_cli.main import app, fail


@app.command("models")
def models_command(
    prepare: bool = typer.Option(False, "--prepare", help="Convert the embedded GGUF to safetensors now (once)."),
) -> None:
    """List the known local models, where their converted copies live, and whether they are ready."""
    from gcache.io.models import local as models

    try:
        if prepare:
            models.ensure_embedded_copy()
        folder = models.embedded_copy_dir()
        gguf = models.embedded_gguf()
    except ValueError as err:
        raise fail(str(err))
    ready = (folder / "config.json").is_file()
    typer.echo(f"{models.EMBEDDED_MODEL}  (embedded, default)")
    typer.echo(f"  source: {gguf}")
    typer.echo(f"  copy:   {folder}  [{'ready' if ready else 'not converted yet: gcache models --prepare'}]")
    typer.echo(f"cache directory: {models.cache_dir()}  (GCACHE_CACHE_DIR, else XDG_CACHE_HOME/gcache)")
    typer.echo("Any local folder, .gguf file or Hugging Face id in the local HF cache works as --model too.")
