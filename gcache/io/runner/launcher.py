"""``gcache run --nproc N``: torchrun's launcher started from this process, and what the ranks
it starts need of it (die with it; say in one line how a rank ended)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Mapping, Sequence

from gcache.io.runner.distributed import LOST, TIMEOUT_VAR, World, rank_threads

__all__ = ["LAUNCHED_VAR", "die_with_launcher", "launch"]

LAUNCHED_VAR = "GCACHE_LAUNCHED"  # set by ``gcache run --nproc`` (its pid): it says how a lost rank ended


def die_with_launcher(environ: Mapping[str, str] | None = None) -> None:
    """Under ``gcache run --nproc``, end this rank when the launcher dies (kill -9 of the job
    included: torchrun starts each rank in a session of its own, out of reach of a group kill).
    Linux only (prctl PR_SET_PDEATHSIG); elsewhere nothing is done."""
    env = os.environ if environ is None else environ
    launcher = env.get(LAUNCHED_VAR)
    if not launcher or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    if str(os.getppid()) != launcher:  # it died before the call
        os.kill(os.getpid(), signal.SIGKILL)


def launch(nproc: int, args: Sequence[str], *, threads: int | None = None) -> int:
    """``gcache run ARGS`` as ``nproc`` ranks on this machine, through torchrun's launcher (what
    ``torchrun --standalone --nproc-per-node N -m gcache_cli run ARGS`` does); returns the exit status.

    A rank that ends on an error has said so itself; a rank killed by a signal is said here in one line.
    """
    # torchrun's launcher (torch.distributed.elastic) is imported only when a job is launched.
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc: expected a positive number of processes, got {nproc!r}")
    per_rank = rank_threads(threads, World(0, nproc, 0, nproc))
    os.environ.setdefault("OMP_NUM_THREADS", str(per_rank))
    os.environ[LAUNCHED_VAR] = str(os.getpid())
    parsed = get_args_parser().parse_args([
        "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
        "--rdzv-id", str(uuid.uuid4()), "--max-restarts", "0", "-m", "gcache_cli", "run", *args,
    ])  # fmt: skip
    launch_config, cmd, cmd_args = config_from_args(parsed)
    for name in list(logging.root.manager.loggerDict):  # the launcher's own reports: said here in one line
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        elastic_launch(launch_config, cmd)(*cmd_args)
    except ChildFailedError as e:
        line, code = _failure_line(e.failures, nproc)
        if line:
            print(f"error: {line}", file=sys.stderr)
        return code
    return 0


def _failure_line(failures: Mapping[int, Any], nproc: int) -> tuple[str | None, int]:
    """What to say of a launched job that failed, and its exit status. A rank that exited with an
    error status has printed its line; the launcher ends the other ranks with SIGTERM."""
    import signal

    said = sorted((r, f.exitcode) for r, f in failures.items() if f.exitcode > 0 and f.exitcode != LOST)
    if said:
        return None, said[0][1]
    killed = sorted((f.exitcode == -signal.SIGTERM, r, f) for r, f in failures.items() if f.exitcode < 0)
    if killed:
        _, rank, failure = killed[0]  # a rank killed by anything but the launcher's SIGTERM comes first
        try:
            name = signal.Signals(-failure.exitcode).name
        except ValueError:
            name = f"signal {-failure.exitcode}"
        # nccl's watchdog aborts a rank whose collective waited past the timeout instead of raising,
        # so a hung or lost peer shows up as SIGABRT, not as the lost-contact line below.
        nccl = (
            f" (under nccl, a rank whose collective waits past {TIMEOUT_VAR} seconds, because another rank died "
            "or hung, is aborted so)" if name == "SIGABRT" else ""
        )  # fmt: skip
        return (
            f"rank {rank} of {nproc} (pid {failure.pid}) was killed by {name}{nccl}; the finished questions are kept "
            "in the run folder: continue with --resume",
            128 - failure.exitcode,
        )
    rank = min(failures)
    return (
        f"rank {rank} of {nproc} lost contact with the other ranks (one hung past {TIMEOUT_VAR} seconds, "
        "or died); continue with --resume",
        LOST,
    )
