"""Runs that outgrow one process: data-parallel training and evaluation under torchrun.

``torchrun --nproc-per-node N -m gcache_cli run TASK ...`` (or ``gcache run --nproc N``, which
launches the same thing on one machine: gcache.io.runner.launcher) starts N ranks. Each loads the model on its own device
(``cuda:LOCAL_RANK`` under ``--device cuda``, else the CPU with its share of the cores) and joins
one process group (nccl on GPUs, gloo on CPUs; every collective waits at most
``GCACHE_DIST_TIMEOUT`` seconds, 1800 by default, so a rank that hangs ends the job).

Rank 0 leads: it runs the one-process experiment (gcache.io.runner.experiment) unchanged, through a
``TeamPipeline`` that answers each batch with every rank: it broadcasts the batch, each rank
answers its share ``items[rank::world]``, and the records come back to rank 0 in the batch's
order. Rank 0 alone writes results.jsonl (fsync'ed appends), checkpoints and summary.json, so
the run folder and ``--resume`` are exactly those of one process; the other ranks follow
commands and never touch the folder (nodes need no shared file system). A training step
all-gathers the batch's rewards and sums the learned parts' gradients over the ranks
(gcache.core.train.Shard): every rank takes the one-process step on the whole batch.

Failures end the job on every rank with one line: a rank whose share raises reports its error
in the next exchange, and every rank stops with "rank R of W: cause"; a rank that dies or
hangs ends the others' collectives with an error (gloo notices a closed connection at once,
any backend the timeout).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from gcache.core.optim import tree_leaves, tree_map
from gcache.core.train import Shard
from gcache.io.runner.config import RunConfig, flag
from gcache.io.runner.experiment import RunEnded

log = logging.getLogger(__name__)

TIMEOUT_VAR = "GCACHE_DIST_TIMEOUT"  # seconds a collective waits for the other ranks
DEFAULT_TIMEOUT = 1800.0
# Settings a rank may choose for itself (its node's cores); every other one must agree.
PER_RANK_SETTINGS = ("threads",)
# Exit status of a rank that lost contact with the others (a rank died or hung), as sysexits' EX_TEMPFAIL.
LOST = 75


class RankFailed(RunEnded):
    """Every rank stops: ``message`` says which rank failed and why (rank 0 prints it)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class LaunchError(ValueError):
    """A bad launch that every rank detects alike (flags that differ, more ranks than questions)."""


class LostRank(RunEnded):
    """A collective failed: another rank died, or hung past the timeout."""


# ------------------------------------------------------------------ the world of this process


@dataclass(frozen=True)
class World:
    """Where this process stands in a torchrun job."""

    rank: int  # 0 .. size - 1, over every node
    size: int  # the number of ranks (WORLD_SIZE)
    local_rank: int  # 0 .. local_size - 1, on this node
    local_size: int  # ranks on this node (LOCAL_WORLD_SIZE)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.size}"


def detect(environ: Mapping[str, str] | None = None) -> World | None:
    """The torchrun world of this process (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), or None
    outside torchrun or in a world of one. Raises ValueError naming a variable that is malformed."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None

    def read(name: str, default: int | None = None) -> int:
        text = env.get(name)
        if text is None and default is not None:
            return default
        try:
            return int(text)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected an integer (torchrun sets it), got {text!r}") from None

    size = read("WORLD_SIZE")
    if size < 1:
        raise ValueError(f"WORLD_SIZE: expected a value >= 1, got {size}")
    rank = read("RANK")
    local_rank = read("LOCAL_RANK", rank)
    local_size = read("LOCAL_WORLD_SIZE", size)
    if not 0 <= rank < size:
        raise ValueError(f"RANK: expected a value in [0, {size}) (WORLD_SIZE {size}), got {rank}")
    if not 0 <= local_rank < local_size <= size:
        raise ValueError(f"LOCAL_RANK / LOCAL_WORLD_SIZE: expected 0 <= {local_rank} < {local_size} <= {size}")
    return None if size == 1 else World(rank, size, local_rank, local_size)


def rank_device(device: str, world: World) -> str:
    """The device of a rank: ``cuda`` -> ``cuda:LOCAL_RANK``; ``cpu`` and ``cuda:N`` as given.

    Raises ValueError for ``auto`` with several ranks on a node (each would spread its model
    over every GPU of the node) and for ``cuda:N`` there (every rank would land on GPU N): run
    one rank per node, or use ``--device cuda``.
    """
    if device == "cuda":
        return f"cuda:{world.local_rank}"
    if device.startswith("cuda:") and world.local_size > 1:
        raise LaunchError(
            f"--device {device} puts every rank of this node's {world.local_size} on the same GPU: "
            "use --device cuda (rank r of a node on cuda:r) or run one rank per node (--nproc-per-node 1)"
        )
    if device == "auto" and world.local_size > 1:
        raise LaunchError(
            f"--device auto spreads one model over every GPU of a node, and this node runs {world.local_size} "
            "ranks: run one rank per node (--nproc-per-node 1) or use --device cuda (one GPU per rank)"
        )
    return device


def rank_threads(threads: int | None, world: World, cpus: int | None = None) -> int:
    """torch CPU threads of a rank: ``--threads`` when given, else the node's cores shared out."""
    if threads is not None:
        return threads
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // world.local_size)


def collective_timeout(environ: Mapping[str, str] | None = None) -> datetime.timedelta:
    """How long a collective waits: ``GCACHE_DIST_TIMEOUT`` seconds, else 1800. Raises ValueError on a bad value."""
    env = os.environ if environ is None else environ
    text = env.get(TIMEOUT_VAR)
    if text is None:
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT)
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{TIMEOUT_VAR}: expected a positive number of seconds, got {text!r}")
    return datetime.timedelta(seconds=seconds)


# ------------------------------------------------------------------ sharding


def shard(items: Sequence, rank: int, size: int) -> list:
    """A rank's share of a batch: every ``size``-th item from position ``rank`` (disjoint, covering)."""
    return list(items[rank::size])


def interleave(parts: Sequence[Sequence]) -> list:
    """The inverse of ``shard``: the ranks' shares (in rank order) back in the batch's order."""
    size = len(parts)
    out: list = [None] * sum(len(p) for p in parts)
    for rank, part in enumerate(parts):
        if len(part) != len(range(rank, len(out), size)):
            raise ValueError(f"parts: rank {rank} holds {len(part)} items, not its share of {len(out)}")
        out[rank::size] = list(part)
    return out


def source_hash() -> str:
    """A digest of gcache's own source files (the CLI's included): ranks must run the same code."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[2]  # the gcache package
    cli = sys.modules.get("gcache_cli")
    folders = [root] + ([Path(cli.__file__).parent] if cli is not None and cli.__file__ else [])
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            digest.update(path.relative_to(folder).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def config_differences(configs: Sequence[Mapping[str, Any]]) -> str | None:
    """The first setting on which the ranks' configs differ, said in one line, or None.

    ``configs[r]`` is rank r's; settings in ``PER_RANK_SETTINGS`` may differ.
    """
    first = configs[0]
    for key in first:
        if key in PER_RANK_SETTINGS:
            continue
        values = [c.get(key) for c in configs]
        if any(v != values[0] for v in values):
            groups: dict[str, list[int]] = {}
            for rank, v in enumerate(values):
                groups.setdefault(repr(v), []).append(rank)
            said = "; ".join(f"rank{'s' if len(r) > 1 else ''} {_ranks(r)}: {v}" for v, r in groups.items())
            name = "the gcache source" if key == "source" else flag(key)
            return (
                f"the ranks were launched with different {name} ({said}): "
                "launch every rank with the same flags, code and data"
            )
    return None


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks)) if len(ranks) < 6 else f"{ranks[0]}..{ranks[-1]} ({len(ranks)})"


# ------------------------------------------------------------------ the team


def _flatten(tree: Any) -> Tensor:
    leaves = tree_leaves(tree)
    return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in leaves]) if leaves else torch.zeros(0)


def _unflatten(flat: Tensor, like: Any) -> Any:
    offset = 0

    def take(t: Tensor) -> Tensor:
        nonlocal offset
        n = t.numel()
        out = flat[offset : offset + n].reshape(t.shape).to(dtype=t.dtype, device=t.device)
        offset += n
        return out

    return tree_map(take, like)


class Team:
    """This rank's view of the job: its world, the process group and the exchanges of gcache's protocol."""

    def __init__(self, world: World, device: torch.device) -> None:
        self.world = world
        self.device = device  # where collective tensors live: the rank's GPU under nccl, else the CPU
        # Which collective the followers wait in, as the leader knows it ("setup", "command", None):
        # when the leader fails on its own, it joins them there to say so.
        self.waiting: str | None = "setup"

    # the collectives; a failure of the group (a rank died, or the timeout passed) is a LostRank

    def _collective(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (dist.DistError, RuntimeError) as e:
            self.waiting = None
            raise LostRank(
                f"{self.world}: lost contact with the other ranks ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                f"a rank died or hung past {TIMEOUT_VAR}"
            ) from None

    def all_gather(self, obj: Any) -> list:
        out: list = [None] * self.world.size
        self._collective(lambda: dist.all_gather_object(out, obj))
        return out

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        self._collective(lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def reduce(self, tree: Any) -> Any:
        """The sum over the ranks of a tree of tensors (one all-reduce of all its leaves, in float32)."""
        flat = _flatten(tree).to(self.device)
        self._collective(lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM))
        return _unflatten(flat.cpu() if self.device.type != "cpu" else flat, tree)

    # the protocol

    def exchange(self, value: Any, error: BaseException | None = None) -> list:
        """Every rank's ``value``, or, when any rank brings an ``error``, RankFailed on every rank
        naming the first such rank (its own line for a LaunchError)."""
        mine = (False, _describe(error)) if error is not None else (True, value)
        gathered = self.all_gather(mine)
        for rank, (ok, payload) in enumerate(gathered):
            if not ok:
                self.waiting = None
                text, code, launch = payload
                raise RankFailed(text if launch else f"rank {rank} of {self.world.size}: {text}", code)
        return [payload for _, payload in gathered]

    def agree(self, fn: Callable[[], Any]) -> list:
        """Run ``fn`` here and exchange its result: every rank's, or RankFailed everywhere if one raised."""
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - reported to every rank, which all stop
            return self.exchange(None, e)
        return self.exchange(value)

    def settle(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` here and return its result once every rank's call returned (RankFailed
        everywhere if one raised); only the outcome travels."""
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - reported to every rank, which all stop
            self.exchange(None, e)
            raise  # not reached: exchange raised RankFailed
        self.exchange(None)
        return value

    def share(self, rewards: Tensor, num_examples: int, failed: bool) -> tuple[Tensor, Shard, bool]:
        """A training step's agreement (gcache.io.runner.learner.Team): the batch's rewards in its order
        (each rank holds ``batch[rank::size]``), this rank's ``Shard`` and whether any share failed."""
        parts = self.exchange((rewards.tolist(), int(num_examples), bool(failed)))
        batch = torch.tensor(interleave([p[0] for p in parts]), dtype=rewards.dtype)
        rows = torch.arange(self.world.rank, batch.shape[0], self.world.size)
        total = sum(p[1] for p in parts)
        return batch, Shard(rows, total, self.reduce), any(p[2] for p in parts)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _describe(error: BaseException) -> tuple[str, int, bool]:
    """(one line, exit status, whether it is a launch error) of an exception."""
    if isinstance(error, RankFailed):
        return str(error), error.code, True
    user = isinstance(error, (ValueError, TypeError, FileNotFoundError))
    text = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
    return text.splitlines()[0] if text else type(error).__name__, 2 if user else 1, isinstance(error, LaunchError)


def start(config: RunConfig, world: World, *, num_questions: Callable[[], int]) -> Team:
    """Join the job's process group and agree on the run: every rank's settings and code must be
    the same, each rank's device must make sense, and there must be a test question per rank.

    ``num_questions`` counts the run's test questions (called on rank 0 only). Raises RankFailed
    (on every rank alike) on a bad launch, ValueError on a bad GCACHE_DIST_TIMEOUT.
    """
    timeout = collective_timeout()
    gpu = config.device != "cpu" and torch.cuda.is_available()
    here = torch.device("cpu")
    if gpu:
        here = torch.device("cuda", world.local_rank if config.device in ("cuda", "auto") else torch.device(config.device).index or 0)
        torch.cuda.set_device(here)
    torch.set_num_threads(rank_threads(config.threads, world))
    team = Team(world, here)
    team._collective(lambda: dist.init_process_group("nccl" if gpu else "gloo", timeout=timeout))
    try:  # a launch refused here ends the process group too: left open, gloo's threads abort the exit
        try:
            rank_device(config.device, world)
            count = num_questions() if world.leader else None
        except Exception as e:  # noqa: BLE001 - said by every rank
            team.exchange(None, e)
        configs = team.exchange(({**config.to_dict(), "source": source_hash()}, count))
        differs = config_differences([c for c, _ in configs])
        if differs is not None:
            raise RankFailed(differs, 2)
        count = configs[0][1]
        if count < world.size:
            raise RankFailed(
                f"the run has {count} test question{'s' if count != 1 else ''} for {world.size} ranks: "
                f"launch at most {count} rank{'s' if count != 1 else ''} (--nproc-per-node x --nnodes) or select more questions",
                2,
            )
    except BaseException:
        team.close()
        raise
    log.info("%s on %s, %d threads, backend %s", world, here, torch.get_num_threads(), dist.get_backend())
    return team


def rank_config(config: RunConfig, world: World) -> RunConfig:
    """The settings a rank builds its pipeline with: its own device and share of the CPU threads."""
    return replace(config, device=rank_device(config.device, world), threads=rank_threads(config.threads, world))


# ------------------------------------------------------------------ rank 0's pipeline, the others' loop


def _answer_eval(pipeline, items: Sequence) -> tuple[list[dict], str | None]:
    return (pipeline.evaluate(items) if items else []), pipeline.outage


def _answer_train(pipeline, items: Sequence, step: int) -> tuple[list[dict], str | None]:
    return pipeline.train_step(items, step), pipeline.outage


class TeamPipeline:
    """Rank 0's pipeline: the one-process interface (gcache.io.runner.experiment.RunPipeline, as
    gcache.io.runner.pipeline.Pipeline), every batch answered by all ranks. The other ranks run ``follow``."""

    def __init__(self, team: Team, local) -> None:
        self.team, self.local = team, local
        self.ranks = team.world.size
        self._outage: str | None = None
        self._sync_state()

    def _command(self, *command: Any) -> None:
        self.team.broadcast(command)

    def _sync_state(self) -> None:
        learner = self.local.learner
        self._command("state", None if learner is None else learner.state)

    def evaluate(self, items: Sequence) -> list[dict]:
        items = list(items)
        self._command("eval", items)
        mine = shard(items, 0, self.ranks)
        return self._records(self.team.agree(lambda: _answer_eval(self.local, mine)))

    def train_step(self, items: Sequence, step: int) -> list[dict]:
        items = list(items)
        self._command("train", items, step)
        mine = shard(items, 0, self.ranks)
        return self._records(self.team.agree(lambda: _answer_train(self.local, mine, step)))

    def _records(self, parts: list[tuple[list[dict], str | None]]) -> list[dict]:
        """The ranks' records in the batch's order; notes the first outage a rank's API client reports."""
        self._outage = self._outage or next((o for _, o in parts if o is not None), None)
        return interleave([records for records, _ in parts])

    def api_tokens(self) -> dict:
        self._command("api_tokens")
        usage = self.team.agree(self.local.api_tokens)
        return {k: sum(u.get(k, 0) for u in usage) for k in usage[0]}

    def checkpoint(self, out: Path, step: int) -> None:
        self.local.checkpoint(out, step)

    def restore(self, out: Path) -> int:
        step = self.local.restore(out)
        self._sync_state()
        return step

    def load(self, path: Path) -> None:
        self.local.load(path)
        self._sync_state()

    @property
    def outage(self) -> str | None:
        """Why any rank's API client holds its endpoint for down, or None (then the run stops,
        as one process's would)."""
        return self._outage

    @property
    def learner(self):
        return self.local.learner

    def stop(self, error: BaseException | None = None) -> None:
        """Tell the followers the run is over (with rank 0's error, if it failed on its own)."""
        self._command("stop", None if error is None else _describe(error))
        self.team.waiting = None


def follow(team: Team, pipeline) -> None:
    """A follower's life: answer its share of each batch rank 0 sends, until it says stop.

    Raises RankFailed when rank 0 stopped on an error (rank 0 says it), LostRank when rank 0 is gone.
    """
    while True:
        kind, *args = team.broadcast()
        if kind == "stop":
            if args[0] is not None:
                text, code, _ = args[0]
                raise RankFailed(f"rank 0 of {team.world.size}: {text}", code)
            return
        if kind == "state":
            if pipeline.learner is not None:
                pipeline.learner.state = args[0]
        elif kind == "eval":
            mine = shard(args[0], team.world.rank, team.world.size)
            team.agree(lambda: _answer_eval(pipeline, mine))
        elif kind == "train":
            mine = shard(args[0], team.world.rank, team.world.size)
            team.agree(lambda: _answer_train(pipeline, mine, args[1]))
        elif kind == "api_tokens":
            team.agree(pipeline.api_tokens)
        else:
            raise RuntimeError(f"follow: unknown command {kind!r} from rank 0")


# ------------------------------------------------------------------ a rank's life, and the launcher


def run(config: RunConfig, world: World, *, console=None) -> dict | None:
    """This rank's part of ``gcache run`` under torchrun: rank 0 runs the experiment and returns
    its summary, the others answer their shares and return None.

    Raises RankFailed (rank 0 says why; the others stay quiet), LostRank, and on rank 0 the
    experiment's own errors.
    """
    # experiment and pipeline load transformers (~3 s): imported once a rank starts, as the CLI does.
    from gcache.io.runner.experiment import check_before_loading, run_experiment, split_items
    from gcache.io.runner.pipeline import build_pipeline

    team = start(config, world, num_questions=lambda: len(split_items(config)[1]))
    try:
        if not world.leader:
            follow(team, team.settle(lambda: build_pipeline(rank_config(config, world), team=team)))
            return None
        lead: list[TeamPipeline] = []

        def build(cfg: RunConfig) -> TeamPipeline:
            local = team.settle(lambda: build_pipeline(rank_config(cfg, world), team=team))
            team.waiting = "command"
            lead.append(TeamPipeline(team, local))
            return lead[0]

        try:
            check_before_loading(config)
            summary = run_experiment(config, console=console, build=build)
        except BaseException as e:
            _tell_followers(team, lead, e)
            raise
        lead[0].stop()
        return summary
    finally:
        team.close()


def _tell_followers(team: Team, lead: list[TeamPipeline], error: BaseException) -> None:
    """Rank 0 failed on its own: join the followers where they wait, so that they stop too."""
    try:
        if team.waiting == "setup":
            team.exchange(None, error)
        elif team.waiting == "command" and lead:
            lead[0].stop(error)
    except (RankFailed, LostRank):
        pass  # they know now (or are gone); rank 0 reports its own error


__all__ = [
    "LOST",
    "LaunchError",
    "LostRank",
    "RankFailed",
    "Team",
    "TeamPipeline",
    "World",
    "collective_timeout",
    "config_differences",
    "detect",
    "follow",
    "interleave",
    "rank_config",
    "rank_device",
    "rank_threads",
    "run",
    "shard",
    "source_hash",
    "start",
]
