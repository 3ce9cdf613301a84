"""Helpers of tests/test_distributed.py: launching ranks by hand (env://, gloo on 127.0.0.1) and a
rank's side of the training-step equivalence (run as a script: ``python _distributed_helpers.py OUT``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, size: int, port: int, **extra: str) -> dict[str, str]:
    """What torchrun sets for a rank, on one node."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(
        RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", GCACHE_DIST_TIMEOUT="120", **extra,
    )  # fmt: skip
    return env


class Ranks:
    """Processes started in their own session each, all killed (with their children) on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def wait(self, timeout: float) -> list[tuple[int, str, str]]:
        """(exit status, stdout, stderr) of every process; kills them all past ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        out = []
        for proc in self.procs:
            try:
                stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"{proc.args} still ran after {timeout} s (a hang)") from None
            out.append((proc.returncode, stdout, stderr))
        return out

    def kill(self) -> None:
        """SIGKILL every process started and every descendant (torchrun starts ranks in sessions of their own)."""
        for proc in self.procs:
            for pid in [proc.pid, *descendants(proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()

    def __enter__(self) -> "Ranks":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def descendants(pid: int) -> list[int]:
    """Every living descendant of ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def rank_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the ranks a launcher started (their RANK read from /proc)."""
    found = {}
    for pid in descendants(launcher):
        try:
            environ = (Path("/proc") / str(pid) / "environ").read_text().split("\0")
        except OSError:
            continue
        env = dict(kv.split("=", 1) for kv in environ if "=" in kv)
        if "RANK" in env:
            found[int(env["RANK"])] = pid
    return found


def gcache_run(*args: str) -> list[str]:
    return [sys.executable, "-m", "gcache_cli", "run", *args]


# ------------------------------------------------------------------ a rank's training steps


def train_steps(out: Path | None, steps: int = 2) -> list[torch.Tensor]:
    """Two training steps on test_train's batch of three questions: on the whole batch in one
    process (``RANK`` unset), or on this rank's share, gradients summed over the ranks."""
    from test_train import _batch

    from gcache.core.optim import adam, tree_leaves
    from gcache.core.reinforce import init_baseline
    from gcache.core.train import FuserBatch, PolicyBatch, TrainState, train_step
    from gcache.io.models.local import tiny_model
    from gcache.io.runner.distributed import Team, detect, shard

    lm = tiny_model("llama", seed=1)
    params, policy, fuser = _batch(lm)
    rewards = [torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 1.0])]
    opt = adam(0.05)
    state = TrainState(params, opt.init(params), init_baseline())
    world = detect()
    team = None
    if world is not None:
        torch.distributed.init_process_group("gloo")
        team = Team(world, torch.device("cpu"))
        rank, size = world.rank, world.size
        policy = PolicyBatch(
            tuple(shard(policy.features, rank, size)), tuple(shard(policy.topologies, rank, size)),
            policy.role_adjacency, policy.mask, policy.config,
        )  # fmt: skip
        fuser = FuserBatch(fuser.fns, fuser.mode, tuple(shard(fuser.examples, rank, size)))
    for step in range(steps):
        r, share = rewards[step], None
        if team is not None:
            r, share, failed = team.share(r[team.world.rank :: team.world.size], len(fuser.examples), False)
            assert not failed
        state, _ = train_step(state, opt, r, policy=policy, fuser=fuser, shard=share)
    leaves = [t.detach().clone() for t in tree_leaves(state.params)]
    if out is not None:
        torch.save(leaves, Path(out) / f"rank{world.rank if world else 0}.pt")
    if team is not None:
        team.close()
    return leaves


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    train_steps(Path(sys.argv[1]))
