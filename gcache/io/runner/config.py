"""The configuration of one experiment run, and the rules that say which flags a method takes.

One name per idea: each field here is a `gcache run` flag (``latent_steps`` is
``--latent-steps``), a key of ``summary.json["config"]`` and a word of the README.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from gcache.core.fusion import MODES as FUSIONS
from gcache.core.rewards import REWARDS
from gcache.core.topology import MODES as TOPOLOGIES
from gcache.io.models.apiconfig import GENERATION_MODES, ApiConfig, resolve_api_config
from gcache.io.models.quant import MODEL_WEIGHTS
from gcache.io.runner.decision import NAMES as DECISIONS
from gcache.io.runner.prompts import AGENT_SETS
from gcache.io.tasks.contracts import contract
from gcache.io.tasks.datasets import TASKS
from gcache.io.tasks.routing import RoutingOptions

METHODS = ("single", "text-mas", "latent-mas", "gcache")
# Seeded random models with the embedded tokenizer, for smoke tests (``--model tiny-llama``).
TINY_MODELS = {"tiny-llama": "llama", "tiny-qwen3": "qwen3"}

# The flags each method accepts beyond the common ones (task, model, decoding, data selection, output).
_METHOD_FLAGS: dict[str, set[str]] = {
    "single": set(),
    "text-mas": {
        "agents", "num_agents", "topology", "optimize_spatial", "optimize_temporal", "num_rounds",
        "decision", "train_size", "num_iterations", "lr", "params", "reward", "learn_decision_inputs", "edge_cost",
    },
    "latent-mas": {"latent_steps", "latent_only", "sink_positions"},
    "gcache": {
        "latent_steps", "latent_only", "sink_positions", "agents", "num_agents", "topology", "optimize_spatial",
        "optimize_temporal", "num_rounds", "decision", "fusion", "train_size", "num_iterations",
        "lr", "params", "reward", "learn_decision_inputs", "edge_cost",
    },
}
_COMMON_FLAGS = {
    "task", "method", "generation_mode", "batch_size", "limit", "question_id", "model", "device",
    "dtype", "weights", "threads", "compile", "api_model", "base_url", "api_timeout", "api_max_retries", "api_concurrency",
    "api_outage_after", "max_new_tokens", "temperature", "seed", "out", "resume", "retry_errors", "stop_at_answer",
    "routing_variant",
}
# How the run talks to the API, not what it computes: a resumed run may change them.
API_HTTP_FLAGS = ("api_timeout", "api_max_retries", "api_concurrency", "api_outage_after")
_MODES_BY_METHOD = {
    "single": ("local", "api"),
    "text-mas": ("local", "api"),
    "latent-mas": ("local", "api_hint", "hybrid"),
    "gcache": ("local", "api_hint", "hybrid"),
}


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a run computes. Defaults are those of `gcache run`."""

    task: str = "gsm8k"
    method: str = "gcache"
    generation_mode: str = "local"
    latent_steps: int = 10
    # Full caches: on the embedded model latent-only caches carry nothing measurable and full ones
    # carry an agent's facts (benchmarks/results/routing_carry.md; README, "What carries information").
    latent_only: bool = False
    sink_positions: int = 4
    agents: str = "diverse"
    num_agents: int = 4  # the CLI's --agent-nums (the prototype's flag name)
    topology: str = "full"
    optimize_spatial: bool = True
    optimize_temporal: bool = False
    # The policy also chooses which agents' caches the decision node reads (wiring "learned",
    # gcache.core.topology); off: the decision rule's fixed wiring (all agents, or the sinks).
    learn_decision_inputs: bool = False
    num_rounds: int = 1
    decision: str = "refer"
    fusion: str = "learned"
    train_size: int | None = None
    batch_size: int = 4
    num_iterations: int = 10
    lr: float = 0.1
    # The policy's reward: accuracy, likelihood or mixed (gcache.core.rewards). likelihood by
    # default (the README says why); accuracy where no local model reads likelihoods (api mode).
    reward: str = "likelihood"
    # Charged per sampled edge between agents: the policy is trained on reward - edge_cost * edges
    # (G-Designer's sparsity pressure; gcache.core.reinforce.penalize_edges). 0: no charge.
    edge_cost: float = 0.0
    limit: int | None = None
    question_id: int | None = None
    model: str = "smollm2-135m"
    device: str = "cpu"
    dtype: str | None = None
    weights: str = "fp32"
    threads: int | None = None
    compile: bool = False  # decode with the static-cache step under torch.compile (the README says where it pays)
    api_model: str | None = None
    base_url: str | None = None
    # None: GCACHE_API_TIMEOUT / _MAX_RETRIES / _CONCURRENCY / _OUTAGE_AFTER (environment or .env),
    # else ApiConfig's default.
    api_timeout: float | None = None
    api_max_retries: int | None = None
    api_concurrency: int | None = None
    api_outage_after: int | None = None
    max_new_tokens: int = 256
    stop_at_answer: bool = True
    temperature: float = 0.0
    seed: int = 0
    out: str | None = None
    resume: bool = False
    retry_errors: bool = True  # --resume answers again the questions whose latest line holds an error
    params: str | None = None
    routing_variant: str = "topics"  # the routing task's worlds (gcache.io.tasks.routing.VARIANTS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def learns(self) -> bool:
        """Whether the method has learned parts that a training phase updates."""
        if self.method == "gcache":
            return self.learns_graph or self.fusion in ("weighted", "learned")
        if self.method == "text-mas":
            return self.learns_graph
        return False

    @property
    def learns_graph(self) -> bool:
        """Whether a policy chooses the graph: its edges, or the decision node's inputs."""
        return self.optimize_spatial or self.optimize_temporal or self.learn_decision_inputs

    @property
    def latent(self) -> bool:
        return self.method in ("latent-mas", "gcache")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / f"{self.task}-{self.method}"


# The routing task's default reward (README, "Routing: what carries information").
ROUTING_REWARD = "margin"

# LatentMAS's sequential chain: three thinking agents, then the judger decodes.
LATENT_MAS_DEFAULTS = dict(num_agents=3, topology="chain", optimize_spatial=False, fusion="concat", latent_only=False)


def build_config(explicit: dict[str, Any]) -> RunConfig:
    """A RunConfig from the flags a user gave explicitly (others take the method's defaults).

    Raises ValueError naming the flag when a value is out of range or a flag does not apply
    to the chosen method (it would otherwise be silently ignored).
    """
    known = {f.name for f in fields(RunConfig)}
    unknown = set(explicit) - known
    if unknown:
        raise ValueError(f"unknown settings: {sorted(unknown)}")
    method = explicit.get("method", RunConfig.method)
    _choice("method", method, METHODS)
    allowed = _COMMON_FLAGS | _METHOD_FLAGS[method]
    refused = sorted(k for k in explicit if k not in allowed)
    if refused:
        flags = ", ".join(flag(k) for k in refused)
        raise ValueError(f"{flags} does not apply to --method {method}")

    base = RunConfig(method=method)
    if method == "latent-mas":
        base = replace(base, **LATENT_MAS_DEFAULTS, num_iterations=0)
    elif method == "single":
        # One agent answers directly: no judger re-reads its answer (LatentMAS's single baseline).
        base = replace(base, num_agents=1, num_iterations=0, optimize_spatial=False, fusion="concat", decision="direct")
    elif method == "text-mas":
        base = replace(base, fusion="concat")
    if explicit.get("generation_mode") == "api":
        base = replace(base, reward="accuracy")  # text only: no local model to read a likelihood
    elif explicit.get("task") == "routing" and method != "single":
        base = replace(base, reward=ROUTING_REWARD)
        if method == "gcache":  # which agent to read depends on the question (README, "Does gcache learn to route?")
            base = replace(base, learn_decision_inputs=True)
    config = replace(base, **explicit)
    validate(config, explicit)
    return config


def validate(config: RunConfig, explicit: dict[str, Any] | None = None) -> None:
    """Raise ValueError naming the first flag whose value is not acceptable."""
    explicit = explicit or {}
    _choice("generation_mode", config.generation_mode, GENERATION_MODES)
    if config.generation_mode not in _MODES_BY_METHOD[config.method]:
        hint = (
            "api is the text-only mode: use --method text-mas or single"
            if config.generation_mode == "api"
            else f"--method {config.method} has no cache to hint at or draft from"
        )
        raise ValueError(
            f"--generation-mode {config.generation_mode} does not apply to --method {config.method} "
            f"(expected one of {', '.join(_MODES_BY_METHOD[config.method])}; {hint})"
        )
    _choice("topology", config.topology, TOPOLOGIES)
    _choice("decision", config.decision, DECISIONS)
    _choice("fusion", config.fusion, FUSIONS)
    _choice("reward", config.reward, REWARDS)
    if config.reward != "accuracy" and config.generation_mode == "api":
        raise ValueError(
            f"--reward {config.reward} reads the answer's likelihood through the local model: "
            "it does not apply to --generation-mode api (text only)"
        )
    _choice("agents", config.agents, AGENT_SETS)
    _choice("weights", config.weights, MODEL_WEIGHTS)
    _at_least("latent_steps", config.latent_steps, 0)
    _at_least("sink_positions", config.sink_positions, 0)
    _at_least("num_agents", config.num_agents, 1)
    _at_least("num_rounds", config.num_rounds, 1)
    _at_least("batch_size", config.batch_size, 1)
    _at_least("num_iterations", config.num_iterations, 0)
    _at_least("max_new_tokens", config.max_new_tokens, 1)
    for name in ("train_size", "limit"):
        value = getattr(config, name)
        if value is not None:
            _at_least(name, value, 1)
    if config.question_id is not None:
        _at_least("question_id", config.question_id, 0)
    if config.api_timeout is not None and not (config.api_timeout > 0 and math.isfinite(config.api_timeout)):
        raise ValueError(f"--api-timeout: expected a positive number of seconds, got {config.api_timeout}")
    if config.api_max_retries is not None:
        _at_least("api_max_retries", config.api_max_retries, 0)
    if config.api_concurrency is not None:
        _at_least("api_concurrency", config.api_concurrency, 1)
    if config.api_outage_after is not None:
        _at_least("api_outage_after", config.api_outage_after, 0)
    if config.temperature < 0:
        raise ValueError(f"--temperature: expected a value >= 0, got {config.temperature}")
    if not config.lr > 0:
        raise ValueError(f"--lr: expected a positive learning rate, got {config.lr}")
    if not (config.edge_cost >= 0 and math.isfinite(config.edge_cost)):
        raise ValueError(f"--edge-cost: expected a finite value >= 0, got {config.edge_cost}")
    if config.edge_cost and not config.learns_graph:
        raise ValueError("--edge-cost charges the edges a policy samples: it needs a learned graph "
                         "(--optimize-spatial, --optimize-temporal or --learn-decision-inputs)")
    if "routing_variant" in explicit and config.task != "routing":
        raise ValueError(f"--routing-variant applies to the routing task, not {config.task}")
    if config.reward == "margin" and config.task != "routing":
        raise ValueError(f"--reward margin contrasts the gold answer with the question's distractors: "
                         f"only the routing task has them, not {config.task}")
    if config.task == "routing":
        if config.method == "single":
            raise ValueError("--method single: a routing world needs at least 2 agents (one informed, the others "
                             "distractors); use gcache, latent-mas or text-mas")
        routing_options(config)  # raises naming --routing-variant or --agent-nums
    if config.decision == "code" and config.task in TASKS and not contract(config.task).runs_programs:
        programs = " and ".join(t for t in TASKS if contract(t).runs_programs)
        raise ValueError(f"--decision code runs programs: it applies to {programs}, not {config.task}")
    if config.topology == "debate" and config.num_rounds < 2 and "topology" in explicit:
        raise ValueError("--topology debate exchanges messages between rounds: it needs --num-rounds >= 2")
    if config.optimize_temporal and config.num_rounds < 2:
        raise ValueError("--optimize-temporal learns edges between rounds: it needs --num-rounds >= 2")
    if config.params is not None and not Path(config.params).exists():
        raise ValueError(f"--params: no such file {config.params}")
    if config.question_id is not None and config.limit is not None:
        raise ValueError("--question-id selects one question: do not combine it with --limit")


def routing_options(config: RunConfig) -> RoutingOptions:
    """The routing worlds of a run: its variant, and one agent per slot of the run's graph."""
    return RoutingOptions(variant=config.routing_variant, num_agents=config.num_agents)


def api_config(config: RunConfig) -> ApiConfig:
    """The API settings of a run: its flags, then the environment, then ``.env`` (gcache.io.models.apiconfig).

    Raises ValueError naming the variable when an HTTP setting from the environment is bad.
    """
    return resolve_api_config(
        model=config.api_model,
        base_url=config.base_url,
        timeout=config.api_timeout,
        max_retries=config.api_max_retries,
        max_concurrency=config.api_concurrency,
        outage_after=config.api_outage_after,
    )


def with_api_settings(config: RunConfig) -> RunConfig:
    """``config`` with the HTTP settings its API client will use filled in (for config.json and
    summary.json); unchanged for ``local``, which calls no API."""
    if config.generation_mode == "local":
        return config
    api = api_config(config)
    return replace(
        config,
        api_timeout=api.timeout,
        api_max_retries=api.max_retries,
        api_concurrency=api.max_concurrency,
        api_outage_after=api.outage_after,
    )


# The `gcache run` switch that turns a boolean field off, where it is not --no-FLAG.
_OFF_SWITCHES = {"latent_only": "--full-cache", "learn_decision_inputs": "--fixed-decision-inputs"}


def resume_command(config: RunConfig) -> str:
    """The `gcache run` command line that continues ``config``'s run with ``--resume``.

    It names every flag whose value differs from the method's default, so the resumed
    run passes the settings check; it retries errored questions (no --no-retry-errors).
    """
    # The method's defaults for the run's task in its generation mode (api mode and the routing
    # task have their own defaults).
    base = build_config({"task": config.task, "method": config.method, "generation_mode": config.generation_mode})
    args = ["gcache", "run", config.task, "--method", config.method]
    if config.generation_mode != RunConfig.generation_mode:
        args += flag_args("generation_mode", config.generation_mode)
    skipped = ("task", "method", "generation_mode", "out", "resume", "retry_errors")
    for f in fields(RunConfig):
        name, value = f.name, getattr(config, f.name)
        if name in skipped or value == getattr(base, name):
            continue
        args += flag_args(name, value)
    args += ["--out", str(config.out_dir), "--resume"]
    return shlex.join(args)


# Fields whose flag keeps the G-Cache prototype's name.
_FLAG_NAMES = {"num_agents": "agent-nums"}


def flag(name: str) -> str:
    """The `gcache run` flag of a RunConfig field (``num_agents`` -> ``--agent-nums``)."""
    return "--" + _FLAG_NAMES.get(name, name.replace("_", "-"))


def flag_args(name: str, value: Any) -> list[str]:
    """The `gcache run` arguments that set a RunConfig field: ``--flag VALUE``, a switch, or none (None, no --resume)."""
    if value is None or (name == "resume" and not value):
        return []
    if isinstance(value, bool):
        return [flag(name) if value else _OFF_SWITCHES.get(name, "--no-" + flag(name)[2:])]
    return [flag(name), str(value)]


def _choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{flag(name)}: expected one of {', '.join(options)}, got {value!r}")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"{flag(name)}: expected a value >= {low}, got {value}")
