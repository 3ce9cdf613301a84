"""Runs under torch.distributed (gloo, 2 processes on this machine): the same results.jsonl and
summary as one process, the same training step, resume after a killed rank, and one clear line
for a bad launch or a failing rank. Every process a test starts is killed when it ends."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from _distributed_helpers import HERE, Ranks, free_port, gcache_run, rank_env, rank_pids, train_steps
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

from gcache.io.records.runlog import read_records
from gcache.io.runner.config import build_config
from gcache.io.runner.distributed import (
    World,
    config_differences,
    detect,
    interleave,
    rank_device,
    rank_threads,
    shard,
)
from gcache.io.runner.experiment import run_experiment
from gcache_cli.cmd_run import run_args
from gcache_cli.main import app

TINY = ["--model", "tiny-llama", "--batch-size", "1"]
TIMEOUT = 240  # seconds a launched job may take on a loaded 2-core machine


def _flags(args: list[str]) -> dict:
    """The RunConfig settings of `gcache run` arguments (the task first)."""
    out: dict = {"task": args[0]}
    it = iter(args[1:])
    for a in it:
        if a in ("--latent-only", "--full-cache"):  # the switches these tests use
            out["latent_only"] = a == "--latent-only"
            continue
        key = a[2:].replace("-", "_")
        out["num_agents" if key == "agent_nums" else key] = next(it)
    for k in ("max_new_tokens", "batch_size", "limit", "latent_steps", "num_iterations", "train_size", "agent_nums", "num_agents"):
        if k in out:
            out[k] = int(out[k])
    return out


def _comparable(record: dict) -> dict:
    """A record without its timings (which differ between any two runs), its likelihoods and losses
    rounded: a rank's forward over its share and one process's over the whole batch agree to float
    rounding (a step's losses are the sum of the ranks' shares)."""
    r = {k: v for k, v in record.items() if k != "seconds"}
    r["trace"] = [{k: v for k, v in t.items() if k != "seconds"} for t in record["trace"]]
    for k in ("answer_logprob", "reward", "policy_loss", "fuser_loss"):
        if r.get(k) is not None:
            r[k] = round(r[k], 3)
    return r


def _lines(folder: Path) -> list[dict]:
    return sorted((_comparable(r) for r in read_records(folder / "results.jsonl")), key=lambda r: (r["phase"], r["id"]))


def _summary(folder: Path) -> dict:
    s = json.loads((folder / "summary.json").read_text())
    for k in ("wall_seconds", "seconds"):
        s.pop(k)
    s["train"].pop("seconds", None)
    assert s["config"].pop("out") == str(folder)
    s["resume_command"] = s["resume_command"].replace(str(folder), "OUT")
    if s.get("answer_logprob"):
        s["answer_logprob"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in s["answer_logprob"].items()}
    return s


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _launch(args: list[str], nproc: int = 2) -> tuple[int, str]:
    with Ranks() as ranks:
        ranks.start(gcache_run(*args, "--nproc", str(nproc)), env={**os.environ, "GCACHE_DIST_TIMEOUT": "120"})
        [(code, _, stderr)] = ranks.wait(TIMEOUT)
    return code, stderr


# ------------------------------------------------------------------ pieces, in one process


def test_detect_reads_what_torchrun_sets():
    assert detect({}) is None
    assert detect({"WORLD_SIZE": "1", "RANK": "0"}) is None, "a world of one is a plain run"
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert detect(env) == World(3, 4, 1, 2)
    for bad, name in [({**env, "RANK": "4"}, "RANK"), ({**env, "WORLD_SIZE": "x"}, "WORLD_SIZE"),
                      ({**env, "LOCAL_RANK": "2"}, "LOCAL_RANK")]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            detect(bad)


@given(st.lists(st.integers(), max_size=30), st.integers(1, 7))
def test_shards_are_disjoint_cover_the_batch_and_interleave_back(items, size):
    parts = [shard(items, r, size) for r in range(size)]
    assert sorted(x for p in parts for x in p) == sorted(items)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1, "shares differ by one question at most"
    assert interleave(parts) == items


def test_each_rank_gets_its_device_and_a_share_of_the_cores():
    two = World(1, 4, 1, 2)
    assert rank_device("cuda", two) == "cuda:1" and rank_device("cpu", two) == "cpu"
    assert rank_device("cuda:1", World(1, 2, 0, 1)) == "cuda:1", "one rank per node: an explicit device is the user's choice"
    with pytest.raises(ValueError, match="--device cuda:0 puts every rank"):
        rank_device("cuda:0", two)  # every rank of the node would load its model on GPU 0
    assert rank_device("auto", World(1, 2, 0, 1)) == "auto", "auto spreads a model over a node's GPUs, one rank per node"
    with pytest.raises(ValueError, match="--device auto"):
        rank_device("auto", two)
    assert rank_threads(None, two, cpus=16) == 8 and rank_threads(None, World(0, 8, 0, 8), cpus=2) == 1
    assert rank_threads(3, two, cpus=16) == 3


def test_a_rank_aborted_by_nccl_says_why():
    """Under nccl a collective timeout aborts the process (SIGABRT) rather than raising LostRank."""
    import signal
    from types import SimpleNamespace

    from gcache.io.runner.launcher import _failure_line

    line, code = _failure_line({1: SimpleNamespace(exitcode=-signal.SIGABRT, pid=7)}, 2)
    assert "SIGABRT" in line and "nccl" in line and "GCACHE_DIST_TIMEOUT" in line and code == 128 + signal.SIGABRT
    line, _ = _failure_line({1: SimpleNamespace(exitcode=-signal.SIGKILL, pid=7)}, 2)
    assert "nccl" not in line


def test_differing_settings_are_named_with_their_ranks():
    a = build_config({"task": "gsm8k", "limit": 4}).to_dict()
    b = {**a, "limit": 6}
    said = config_differences([a, a, b])
    assert "--limit" in said and "ranks 0, 1: 4" in said and "rank 2: 6" in said
    assert config_differences([a, {**a, "threads": 3}]) is None, "threads are per node"
    assert config_differences([a, a]) is None


def test_launched_ranks_parse_the_same_settings(monkeypatch):
    """`gcache run --nproc` hands each rank the arguments of the settings given: they parse back alike."""
    explicit = {"task": "gsm8k", "method": "gcache", "latent_only": False, "optimize_spatial": False,
                "stop_at_answer": False, "lr": 0.05, "num_agents": 3, "limit": 5, "resume": True, "out": "x"}  # fmt: skip
    seen = []
    monkeypatch.setattr("gcache_cli.cmd_run.distributed.detect", lambda: None)
    monkeypatch.setattr("gcache.io.runner.experiment.check_before_loading", lambda config: None)
    monkeypatch.setattr("gcache.io.runner.experiment.run_experiment", lambda config: seen.append(config) or {"status": "complete"})
    result = CliRunner().invoke(app, ["run", *run_args("gsm8k", explicit)])
    assert result.exit_code == 0, result.output
    assert seen == [build_config(explicit)]


# ------------------------------------------------------------------ the training step, 2 ranks


def test_a_training_step_on_two_ranks_equals_one_process_on_the_batch(tmp_path):
    """Two steps (the first with the leave-one-out baseline, the second with the running one) on
    three questions: ranks hold 2 and 1 of them (and of the fuser examples)."""
    port = free_port()
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    with Ranks() as ranks:
        for rank in range(2):
            ranks.start([sys.executable, str(HERE / "_distributed_helpers.py"), str(tmp_path)], rank_env(rank, 2, port, **env))
        for code, _, stderr in ranks.wait(TIMEOUT):
            assert code == 0, stderr
    one = train_steps(None)
    zero, first = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(a, b) for a, b in zip(zero, first)), "ranks hold the same parameters bit for bit"
    moved = max(float((a - b).abs().max()) for a, b in zip(one, train_steps(None, steps=0)))
    assert moved > 1e-3, "the steps move the parameters"
    assert max(float((a - b).abs().max()) for a, b in zip(zero, one)) <= 1e-6


# ------------------------------------------------------------------ whole runs


def test_evaluation_on_two_ranks_writes_the_lines_of_one_process(tmp_path):
    args = ["gsm8k", "--method", "latent-mas", *TINY, "--max-new-tokens", "8", "--latent-steps", "2", "--limit", "5"]
    run_experiment(build_config({**_flags(args), "out": str(tmp_path / "one")}))
    code, stderr = _launch([*args, "--out", str(tmp_path / "two")])
    assert code == 0, stderr
    assert _lines(tmp_path / "two") == _lines(tmp_path / "one")
    assert _summary(tmp_path / "two") == _summary(tmp_path / "one")


def test_training_on_two_ranks_takes_the_steps_of_one_process(tmp_path):
    args = ["gsm8k", "--method", "gcache", "--model", "tiny-llama", "--max-new-tokens", "6", "--latent-steps", "2",
            "--agent-nums", "3", "--batch-size", "2", "--train-size", "4", "--num-iterations", "2", "--limit", "2",
            # Likelihood rewards agree only to float rounding between a rank's share and the whole
            # batch, and so would the policy's edge probabilities after a step; 0/1 rewards are exact.
            # Latent-only caches: a full cache holds its inputs' padded prompts, whose float bits
            # differ between a batch of two and a rank's one, and reach the lines' log-probabilities.
            "--reward", "accuracy", "--latent-only"]  # fmt: skip
    run_experiment(build_config({**_flags(args), "out": str(tmp_path / "one")}))
    code, stderr = _launch([*args, "--out", str(tmp_path / "two")])
    assert code == 0, stderr
    assert _lines(tmp_path / "two") == _lines(tmp_path / "one")
    # One process rolls the batch's two questions out together, each rank one alone: their caches
    # (the fuser's inputs) differ in the last float bits, so the parameters agree to 1e-5 here;
    # on the same inputs the step agrees to 1e-6 (the test above).
    one, two = (load_file(tmp_path / name / "params.safetensors") for name in ("one", "two"))
    assert one.keys() == two.keys() and one
    for k in one:
        assert float((one[k] - two[k]).abs().max()) <= 1e-5, k


def test_training_on_the_likelihood_reward_on_two_ranks_takes_the_steps_of_one_process(tmp_path):
    """The default reward: one process reads the judged rows' rewards from the step's own fuser
    forward, a team measures them apart on each rank; the lines, the losses and the parameters
    agree to float rounding (edge probabilities after a step included)."""
    args = ["gsm8k", "--method", "gcache", "--model", "tiny-llama", "--max-new-tokens", "6", "--latent-steps", "2",
            "--agent-nums", "3", "--batch-size", "2", "--train-size", "4", "--num-iterations", "2", "--limit", "2",
            "--reward", "likelihood", "--latent-only"]  # fmt: skip (latent-only: see the test above)
    run_experiment(build_config({**_flags(args), "out": str(tmp_path / "one")}))
    code, stderr = _launch([*args, "--out", str(tmp_path / "two")])
    assert code == 0, stderr

    def close(a, b) -> bool:  # equal, floats within 1e-4 (the steps' float rounding differs by ~1e-6)
        if isinstance(a, float) and isinstance(b, float):
            return math.isclose(a, b, abs_tol=1e-4)
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
        return a == b

    one, two = _lines(tmp_path / "one"), _lines(tmp_path / "two")
    trains = [r for r in one if r["phase"] == "train"]
    assert trains and all(r["correct"] is None and r["reward"] is not None for r in trains)
    assert close(two, one)
    # Adam scales each update by the gradient's running size, so an element whose gradient is
    # near 0 and differs in its last bits moves visibly (2.1e-4 and 1.6e-3 seen, in weights up to
    # ~50): each parameter tensor is compared as a whole, relative to its norm. Measured: 1.2e-5 of
    # the norm (policy.mlp_weight_1) under AVX2 kernels (MKL_ENABLE_INSTRUCTIONS=AVX2,
    # ONEDNN_MAX_CPU_ISA=AVX2) on an AVX-512 EPYC, below 1e-5 with its default kernels; the bound is
    # 1e-4, where a step that differed (Adam moves every entry by ~lr = 0.1) is off by orders more.
    first, second = (load_file(tmp_path / name / "params.safetensors") for name in ("one", "two"))
    assert first.keys() == second.keys() and first
    for k in first:
        assert float((first[k] - second[k]).norm()) <= 1e-4 * max(float(first[k].norm()), 1.0), k


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for_lines(job, results: Path, n: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and job.poll() is None:
        if results.exists() and len(read_records(results)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} lines in {results} (the job ended with {job.poll()})")


def test_a_killed_rank_ends_the_job_and_resume_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "run"
    args = ["gsm8k", "--method", "latent-mas", *TINY, "--max-new-tokens", "24", "--latent-steps", "2",
            "--limit", "8", "--out", str(out)]  # fmt: skip
    results = out / "results.jsonl"
    with Ranks() as ranks:
        job = ranks.start(gcache_run(*args, "--nproc", "2"), env={**os.environ, "GCACHE_DIST_TIMEOUT": "120"})
        _wait_for_lines(job, results, 2)
        pids = rank_pids(job.pid)
        assert 1 in pids, f"rank 1 is running ({pids})"
        os.kill(pids[1], signal.SIGKILL)
        [(code, _, stderr)] = ranks.wait(60)
    before = read_records(results)
    assert code != 0 and 2 <= len(before) < 8, "the kill must land midway"
    lines = _errors(stderr)
    assert len(lines) == 1 and "rank 1 of 2" in lines[0] and "SIGKILL" in lines[0], stderr
    assert not any(_alive(pid) for pid in pids.values()), "no rank is left behind"
    code, stderr = _launch([*args, "--resume"])
    assert code == 0, stderr
    after = read_records(results)
    ids = [r["id"] for r in after]
    assert len(ids) == 8 and len(set(ids)) == 8 and json.loads((out / "summary.json").read_text())["n"] == 8
    assert after[: len(before)] == before, "finished lines are kept as they were"


@pytest.mark.slow
def test_a_killed_job_leaves_no_rank_and_resumes_in_one_process(tmp_path):
    """kill -9 of `gcache run --nproc 2` itself: its ranks (in sessions of their own) die with it."""
    out = tmp_path / "run"
    args = ["gsm8k", "--method", "latent-mas", *TINY, "--max-new-tokens", "24", "--latent-steps", "2",
            "--limit", "6", "--out", str(out)]  # fmt: skip
    with Ranks() as ranks:
        job = ranks.start(gcache_run(*args, "--nproc", "2"))
        _wait_for_lines(job, out / "results.jsonl", 2)
        pids = rank_pids(job.pid)
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(pids) == 2 and not any(_alive(p) for p in pids.values()), "the ranks die with their launcher"
    before = read_records(out / "results.jsonl")
    assert 2 <= len(before) < 6
    run_experiment(build_config({**_flags(args[:-2]), "out": str(out), "resume": True}))
    after = read_records(out / "results.jsonl")
    assert len({r["id"] for r in after}) == len(after) == 6 and after[: len(before)] == before


def test_more_ranks_than_questions_is_one_clear_line(tmp_path):
    code, stderr = _launch(["gsm8k", "--method", "single", *TINY, "--max-new-tokens", "4", "--limit", "1", "--out", str(tmp_path / "r")])
    assert code == 2
    assert _errors(stderr) == [
        "error: the run has 1 test question for 2 ranks: launch at most 1 rank (--nproc-per-node x --nnodes) "
        "or select more questions"
    ], stderr
    assert not (tmp_path / "r" / "results.jsonl").exists()


def test_ranks_launched_with_different_flags_stop_with_one_line_naming_them(tmp_path):
    port = free_port()
    base = ["gsm8k", "--method", "single", *TINY, "--max-new-tokens", "4", "--limit", "2", "--out", str(tmp_path / "r")]
    with Ranks() as ranks:
        ranks.start(gcache_run(*base), rank_env(0, 2, port))
        ranks.start(gcache_run(*base, "--seed", "3"), rank_env(1, 2, port))
        (code0, _, err0), (code1, _, err1) = ranks.wait(TIMEOUT)
    assert (code0, code1) == (2, 2)
    assert _errors(err0) == [
        "error: the ranks were launched with different --seed (rank 0: 0; rank 1: 3): "
        "launch every rank with the same flags, code and data"
    ], err0
    assert _errors(err1) == [], "rank 0 alone says it"


def test_a_failing_rank_ends_the_job_with_one_line_naming_it(tmp_path):
    """Rank 1's share raises (a bug, a full disk, ...): every rank stops at the next exchange."""
    patch = tmp_path / "patch"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(
        "import gcache.io.runner.pipeline as p\n"
        "def broken(self, items):\n    raise RuntimeError('disk on fire')\n"
        "p.Pipeline.evaluate = broken\n"
    )
    port = free_port()
    args = gcache_run("gsm8k", "--method", "single", *TINY, "--max-new-tokens", "4", "--limit", "4", "--out", str(tmp_path / "r"))
    with Ranks() as ranks:
        ranks.start(args, rank_env(0, 2, port))
        path = os.pathsep.join([str(patch), os.environ.get("PYTHONPATH", "")])
        ranks.start(args, rank_env(1, 2, port, PYTHONPATH=path))
        (code0, _, err0), (code1, _, err1) = ranks.wait(TIMEOUT)
    assert (code0, code1) == (1, 1)
    assert _errors(err0) == ["error: rank 1 of 2: RuntimeError: disk on fire"], err0
    assert _errors(err1) == []


@pytest.mark.slow
def test_embedded_model_on_two_ranks_writes_the_lines_of_one_process(tmp_path):
    args = ["gsm8k", "--method", "latent-mas", "--max-new-tokens", "12", "--batch-size", "1", "--latent-steps", "2",
            "--limit", "2"]  # fmt: skip
    run_experiment(build_config({**_flags(args), "out": str(tmp_path / "one")}))
    code, stderr = _launch([*args, "--out", str(tmp_path / "two")])
    assert code == 0, stderr
    assert _lines(tmp_path / "two") == _lines(tmp_path / "one")
