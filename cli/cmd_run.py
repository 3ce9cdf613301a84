"""`gcache run TASK`: train (methods with learned parts), then evaluate, into runs/NAME."""

from __future__ import annotations

import os
from typing import Optional

import typer

from gcache.io.models.apiconfig import SETTING_VARS, ApiConfig
from gcache.io.runner import distributed, experiment, launcher
from gcache.io.runner.config import RunConfig, build_config, flag_args
from gcache_cli.main import app, fail

_D = RunConfig()  # defaults shown in --help
_A = ApiConfig()

# How `gcache run` ends (also in its --help and the README); 2 is a bad flag (main.fail), 130 Ctrl-C.
EXIT_STATUS = {"complete": 0, "errors": 3, "stopped": 4}
RUN_FAILED = 5  # the work raised (a numerical or model error): not bad usage


@app.command("run")
def run(
    task: str = typer.Argument(..., help="gsm8k, gpqa, medqa, humaneval, mbppplus or routing (generated from the seed)."),
    method: Optional[str] = typer.Option(None, help=f"single, text-mas, latent-mas or gcache (default: {_D.method})."),
    generation_mode: Optional[str] = typer.Option(
        None, help="local, api_hint, hybrid or api (text only) (default: local)."
    ),
    latent_steps: Optional[int] = typer.Option(None, help=f"Latent steps per agent (default: {_D.latent_steps})."),
    latent_only: Optional[bool] = typer.Option(
        None, "--latent-only/--full-cache", help="Pass only the latent positions to successors, or the whole cache (default: full-cache; "
        "latent-only caches carry nothing measurable on the embedded model)."
    ),
    sink_positions: Optional[int] = typer.Option(
        None, help="With --latent-only, also pass each agent's first positions (the attention sink) (default: 4)."
    ),
    agents: Optional[str] = typer.Option(None, help="diverse or uniform agent roles (default: diverse)."),
    num_agents: Optional[int] = typer.Option(None, "--agent-nums", help=f"Number of agents (default: {_D.num_agents})."),
    topology: Optional[str] = typer.Option(
        None, help="full, chain, star, mesh, layered, random or debate (default: full)."
    ),
    optimize_spatial: Optional[bool] = typer.Option(
        None, "--optimize-spatial/--no-optimize-spatial", help="Learn the edges within a round (default: on)."
    ),
    optimize_temporal: Optional[bool] = typer.Option(
        None, "--optimize-temporal/--no-optimize-temporal", help="Learn the edges between rounds (default: off)."
    ),
    learn_decision_inputs: Optional[bool] = typer.Option(
        None, "--learn-decision-inputs/--fixed-decision-inputs",
        help="The policy also chooses whose caches the decision node reads (default: fixed, all agents or the sinks).",
    ),
    num_rounds: Optional[int] = typer.Option(None, help="Rounds of communication (default: 1)."),
    decision: Optional[str] = typer.Option(None, help="refer, direct, vote or code (default: refer)."),
    fusion: Optional[str] = typer.Option(None, help="concat, weighted or learned (gcache default: learned)."),
    train_size: Optional[int] = typer.Option(None, help="Questions of the train split to draw batches from (default: all)."),
    batch_size: Optional[int] = typer.Option(None, help=f"Questions per batch (default: {_D.batch_size})."),
    num_iterations: Optional[int] = typer.Option(
        None, help=f"Training batches (0: evaluate only) (default: {_D.num_iterations})."
    ),
    lr: Optional[float] = typer.Option(None, help=f"Adam learning rate (default: {_D.lr})."),
    reward: Optional[str] = typer.Option(
        None,
        help="The policy's reward: accuracy (1 if the decoded answer is right), likelihood (the reference answer's "
        "mean log-probability per token under the decision context; trains without decoding) or mixed "
        f"(accuracy + exp(log-probability)) or margin (routing only: the gold number's log-probability minus the "
        f"best distractor's) (default: {_D.reward}; margin for routing; accuracy with --generation-mode api).",
    ),
    edge_cost: Optional[float] = typer.Option(
        None,
        help="Cost per sampled edge between agents: the policy is trained on reward - edge_cost * edges, "
        "so it keeps only the edges that pay (default: 0).",
    ),
    routing_variant: Optional[str] = typer.Option(
        None, help="routing worlds: topics (one keeper per topic) or unreliable (plus a rumor monger claiming the "
        "asked topic with a wrong number) (default: topics)."
    ),
    limit: Optional[int] = typer.Option(None, help="Evaluate on the first N test questions (default: all)."),
    question_id: Optional[int] = typer.Option(None, help="Evaluate on this one test question only."),
    model: Optional[str] = typer.Option(None, help=f"smollm2-135m, a Hugging Face id or a local path (default: {_D.model})."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N or auto (default: cpu)."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: chosen per device)."),
    weights: Optional[str] = typer.Option(
        None, help="Weight-only precision of the local model's linears: fp32, bf16, int8, or int8-decode (fp32 for "
        "prompts and latent steps, an int8 copy for decoding steps) (default: fp32; see README)."
    ),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: torch's)."),
    compile: Optional[bool] = typer.Option(
        None, "--compile/--no-compile",
        help="Decode with a static-cache step under torch.compile (compiled on first use; pays on a GPU, "
        "not on a 2-core CPU: see README) (default: off).",
    ),
    api_model: Optional[str] = typer.Option(None, help="Model name at the OpenAI-compatible endpoint."),
    base_url: Optional[str] = typer.Option(None, help="OpenAI-compatible base URL (else BASE_URL / OPENAI_BASE_URL / .env)."),
    api_timeout: Optional[float] = typer.Option(
        None, help=f"Seconds per API request attempt (else {SETTING_VARS['timeout'][0]} / .env; default: {_A.timeout:g})."
    ),
    api_max_retries: Optional[int] = typer.Option(
        None,
        help=f"Retries of an API request after a 429, 5xx, timeout or connection error "
        f"(else {SETTING_VARS['max_retries'][0]} / .env; default: {_A.max_retries}).",
    ),
    api_concurrency: Optional[int] = typer.Option(
        None,
        help=f"API requests in flight at once (else {SETTING_VARS['max_concurrency'][0]} / .env; "
        f"default: {_A.max_concurrency}).",
    ),
    api_outage_after: Optional[int] = typer.Option(
        None,
        help=f"Stop the run once this many API requests in a row failed with a connection error or a timeout "
        f"(each after its retries; 0: never) (else {SETTING_VARS['outage_after'][0]} / .env; "
        f"default: {_A.outage_after}).",
    ),
    max_new_tokens: Optional[int] = typer.Option(None, help=f"Tokens each decoding agent may write (default: {_D.max_new_tokens})."),
    stop_at_answer: Optional[bool] = typer.Option(
        None, "--stop-at-answer/--no-stop-at-answer",
        help="End local decoding once the final answer line (#### N, Answer: X, a closed code block) is written (default: on).",
    ),
    temperature: Optional[float] = typer.Option(None, help="0 decodes greedily (default: 0)."),
    seed: Optional[int] = typer.Option(None, help="Seed of every random draw (default: 0)."),
    out: Optional[str] = typer.Option(None, help="Run folder (default: runs/TASK-METHOD)."),
    resume: bool = typer.Option(
        False, "--resume",
        help="Continue the run in --out: answer the questions not yet answered and those whose latest line holds an error.",
    ),
    retry_errors: Optional[bool] = typer.Option(
        None, "--retry-errors/--no-retry-errors",
        help="On --resume, answer again the questions that ended with an error; a failed training step stops "
        "the run, to be redone on --resume (--no-retry-errors: errored questions count as finished, "
        "a failed training step is skipped) (default: on).",
    ),
    params: Optional[str] = typer.Option(None, help="Load learned parameters (params.safetensors) and evaluate only."),
    nproc: Optional[int] = typer.Option(
        None, help="Run as N data-parallel processes on this machine (torchrun's launcher; see README 'Scaling out')."
    ),
) -> None:
    """Train (methods with learned parts) and evaluate one method on one task.

    Exit status: 0 every test question answered; 2 bad usage (one line names the flag);
    3 the run finished but some questions hold an error (retry them with --resume);
    4 the run stopped early (the API endpoint is down, or a training step failed; the last
    line gives the --resume command that continues it); 5 the run's work raised an error (a
    numerical or model error, named in one line; --resume continues); 130 interrupted.

    Under torchrun (`torchrun --nproc-per-node N -m gcache_cli run TASK ...`) each process
    answers a share of every batch; rank 0 writes the run folder.
    """
    explicit = {k: v for k, v in locals().items() if v is not None and k not in ("resume", "nproc")}
    explicit["resume"] = resume
    try:
        world = distributed.detect()
        config = build_config(explicit)
        if world is None:
            experiment.check_before_loading(config)  # under torchrun, rank 0 checks once every rank has joined
        if nproc is not None and (nproc < 1 or world is not None):
            raise ValueError(
                f"--nproc: expected a positive number, got {nproc}" if nproc < 1
                else "--nproc launches torchrun itself: leave it out when torchrun starts gcache"
            )
    except ValueError as e:
        raise fail(str(e)) from None
    if nproc is not None and nproc > 1:
        raise typer.Exit(launcher.launch(nproc, run_args(task, explicit), threads=config.threads))
    if world is not None:
        summary = _run_rank(config, world)
        raise typer.Exit(EXIT_STATUS[summary["status"]] if summary is not None else 0)
    try:
        summary = experiment.run_experiment(config)
    except experiment.RunFailed as e:
        raise fail(str(e), RUN_FAILED) from None
    except ValueError as e:
        raise fail(str(e)) from None
    except KeyboardInterrupt:
        typer.secho(
            f"interrupted: finished questions are in {config.out_dir}/results.jsonl; continue with --resume",
            err=True,
        )
        raise typer.Exit(130) from None
    raise typer.Exit(EXIT_STATUS[summary["status"]])


def _run_rank(config: RunConfig, world: distributed.World) -> dict | None:
    """One rank of a torchrun job (rank 0 returns the summary): rank 0 prints the job's errors, one
    line each; the others stay quiet (a rank that lost contact says so, unless `gcache run --nproc`
    launched it, which does)."""
    launcher.die_with_launcher()
    try:
        return distributed.run(config, world)
    except distributed.RankFailed as e:
        raise (fail(str(e), e.code) if world.leader else typer.Exit(e.code)) from None
    except experiment.RunFailed as e:
        raise (fail(str(e), RUN_FAILED) if world.leader else typer.Exit(RUN_FAILED)) from None
    except ValueError as e:
        raise (fail(f"{e}") if world.leader else typer.Exit(2)) from None
    except distributed.LostRank as e:
        if os.environ.get(launcher.LAUNCHED_VAR):
            raise typer.Exit(distributed.LOST) from None
        raise fail(str(e), distributed.LOST) from None
    except KeyboardInterrupt:
        if world.leader:
            typer.secho(
                f"interrupted: finished questions are in {config.out_dir}/results.jsonl; continue with --resume",
                err=True,
            )
        raise typer.Exit(130) from None


def run_args(task: str, explicit: dict) -> list[str]:
    """The `gcache run` arguments that give the settings ``explicit`` (each launched rank parses them)."""
    return [task] + [a for name, value in explicit.items() if name != "task" for a in flag_args(name, value)]
