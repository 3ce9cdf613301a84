"""Faults that end well, end to end on the tiny model against the loopback API server:
an outage stops the run early with one line and exit status 4, ``--resume`` then answers
exactly the missing and errored questions, a failed training step is redone from the same
parameters and seed, kill -9 in the middle of a retry loses nothing, and a run without
errors ends as before (exit 0)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from _openai_server import OpenAIServer, Reply, isolated_api_env
from safetensors.torch import load_file
from typer.testing import CliRunner

from gcache.io.records.report import records_table
from gcache.io.records.runlog import PARAMS, STATE, read_records
from gcache.io.runner.config import api_config, resume_command, with_api_settings
from gcache_cli.main import app

KEY = "sk-faults-5e4d3c2b1a09f8e7"
OK, DOWN = Reply("ok"), Reply("drop")


@pytest.fixture
def api_env(tmp_path, monkeypatch):
    """No API setting from the developer's shell or .env; a key, as an API run needs one."""
    return isolated_api_env(monkeypatch, tmp_path, KEY)


def _hybrid(server: OpenAIServer, out: Path, *flags: str) -> list[str]:
    """`gcache run` arguments: latent-mas on the tiny model, the judger's answer from the loopback API,
    one question per batch (so one API request per question), six questions."""
    return [
        "run", "gsm8k", "--method", "latent-mas", "--generation-mode", "hybrid", "--model", "tiny-llama",
        "--latent-steps", "2", "--max-new-tokens", "6", "--batch-size", "1", "--limit", "6",
        "--api-model", "loopback", "--base-url", server.base_url, "--api-max-retries", "0", "--out", str(out), *flags,
    ]  # fmt: skip


def _gcache(args: list[str]):
    return CliRunner().invoke(app, args)


def _continue_command(output: str, marker: str) -> list[str]:
    """The `gcache run ... --resume` arguments the run's last line gives after ``marker``."""
    (line,) = [ln for ln in output.splitlines() if marker in ln]
    words = shlex.split(line.split(marker, 1)[1])
    assert words[:2] == ["gcache", "run"] and words[-1] == "--resume"
    return words[1:]


def _history(lines: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Lines per question, after checking that no question was answered twice without an error
    in between: every line of a question but its last holds an error."""
    by: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in lines:
        by[(r["phase"], r["id"])].append(r)
    for key, rs in by.items():
        assert all(r["error"] is not None for r in rs[:-1]), f"{key} answered twice: {[r['error'] for r in rs]}"
    return by


def test_an_outage_mid_run_stops_early_then_resume_answers_exactly_what_is_left(tmp_path, api_env):
    out = tmp_path / "run"
    # Two answers, then the endpoint drops every connection: three failed requests in a row trip the breaker.
    with OpenAIServer(script=[OK, OK, DOWN, DOWN, DOWN]) as server:
        first = _gcache(_hybrid(server, out, "--api-outage-after", "3"))
        assert first.exit_code == 4, first.output
        assert len(server.requests) == 5, "the sixth question was never sent"
        lines = read_records(out / "results.jsonl")
        before = (out / "results.jsonl").read_bytes()
        assert [r["error"] is None for r in lines] == [True, True, False, False, False]
        assert all(r["error"].startswith("ApiConnectionError:") for r in lines[2:])
        (stop,) = [ln for ln in first.output.splitlines() if ln.startswith("stopped early")]
        assert "3 requests in a row failed" in stop and "4 of 6 test questions still to answer" in stop
        assert KEY not in first.output
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["status"], summary["remaining"], summary["errors"]) == ("stopped", 4, 3)

        # The endpoint is back: the printed command answers the three errored and the one missing question.
        again = _gcache(_continue_command(first.output, "continue with: "))
        assert again.exit_code == 0, again.output
        assert len(server.requests) == 5 + 4
    after = read_records(out / "results.jsonl")
    assert (out / "results.jsonl").read_bytes().startswith(before), "results.jsonl is append-only"
    assert len(after) == 9
    by = _history(after)
    assert len(by) == 6 and all(rs[-1]["error"] is None for rs in by.values())
    assert sorted(len(rs) for rs in by.values()) == [1, 1, 1, 2, 2, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["n"], summary["errors"], summary["retries"]) == ("complete", 6, 0, 3)
    assert "retries 3" in again.output
    table = records_table(summary, after)
    cells = {c.header: c._cells for c in table.columns}
    assert (cells["n"], cells["errors"], cells["retries"]) == (["6"], ["0"], ["3"])
    compare = CliRunner().invoke(app, ["compare", str(out)], env={"COLUMNS": "200"})
    assert compare.exit_code == 0, compare.output
    header, row = [ln for ln in compare.output.splitlines() if ln.startswith(("┃", "│"))]
    assert header.split("┃")[-2].strip() == "retries" and row.split("│")[-2].strip() == "3"


def test_report_says_how_a_stopped_run_continues(tmp_path, api_env):
    out = tmp_path / "run"
    with OpenAIServer(script=[DOWN] * 3) as server:
        first = _gcache(_hybrid(server, out, "--api-outage-after", "3", "--limit", "3"))
    assert first.exit_code == 4, first.output
    report = _gcache(["report", str(out), "--no-png"])
    assert report.exit_code == 0, report.output
    assert "stopped early" in report.output and "continue with: gcache run gsm8k --method latent-mas" in report.output


def test_errored_questions_end_with_status_3_and_only_resume_retries_them(tmp_path, api_env):
    out = tmp_path / "run"
    with OpenAIServer(script=[OK, DOWN, OK, DOWN, OK, OK]) as server:  # never three failures in a row
        first = _gcache(_hybrid(server, out, "--api-outage-after", "3"))
        assert first.exit_code == 3, first.output
        command = _continue_command(first.output, "2 of 6 test questions errored; retry them with: ")
        assert len(read_records(out / "results.jsonl")) == 6

        kept = _gcache(_hybrid(server, out, "--api-outage-after", "3", "--resume", "--no-retry-errors"))
        assert kept.exit_code == 3, kept.output
        assert len(server.requests) == 6 and len(read_records(out / "results.jsonl")) == 6, "errors kept as answers"

        again = _gcache(command)
        assert again.exit_code == 0, again.output
        assert len(server.requests) == 8
        done = _gcache(command)  # nothing left: a resumed finished run asks nothing and succeeds
        assert done.exit_code == 0 and len(server.requests) == 8
    by = _history(read_records(out / "results.jsonl"))
    assert len(by) == 6 and sum(len(rs) for rs in by.values()) == 8


def test_a_run_without_errors_ends_as_before(tmp_path, api_env):
    out = tmp_path / "run"
    with OpenAIServer() as server:
        result = _gcache(_hybrid(server, out))
        assert len(server.requests) == 6
    assert result.exit_code == 0, result.output
    assert "stopped" not in result.output and "errored" not in result.output and "retry them" not in result.output
    lines = read_records(out / "results.jsonl")
    assert len(lines) == 6 and all(r["error"] is None for r in lines)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["remaining"], summary["errors"], summary["retries"]) == ("complete", 0, 0, 0)


def _training(server: OpenAIServer, out: Path) -> list[str]:
    """gcache with two training steps of two questions (one API request per question and step)."""
    return [
        "run", "gsm8k", "--method", "gcache", "--generation-mode", "hybrid", "--model", "tiny-llama",
        "--latent-steps", "2", "--max-new-tokens", "6", "--batch-size", "2", "--agent-nums", "3",
        "--num-iterations", "2", "--train-size", "2", "--limit", "2", "--api-model", "loopback",
        "--base-url", server.base_url, "--api-max-retries", "0", "--out", str(out),
        "--reward", "accuracy",  # the judger decodes through the API in every training step
    ]  # fmt: skip


@pytest.mark.slow
def test_a_failed_training_step_is_redone_on_resume_from_the_same_parameters_and_seed(tmp_path, api_env):
    with OpenAIServer() as server:
        reference = _gcache(_training(server, tmp_path / "reference"))
    assert reference.exit_code == 0, reference.output

    out = tmp_path / "run"
    with OpenAIServer(script=[OK, OK, DOWN, DOWN]) as server:  # step 1 answers, step 2's requests fail
        first = _gcache(_training(server, out))
        assert first.exit_code == 4, first.output
        assert "training step 2 of 2 failed (ApiConnectionError" in first.output
        assert int(load_file(out / STATE)["step"]) == 1, "the failed step is not checkpointed as finished"
        assert not [r for r in read_records(out / "results.jsonl") if r["phase"] == "eval"]
        again = _gcache([*_training(server, out), "--resume"])
    assert again.exit_code == 0, again.output

    want, got = load_file(tmp_path / "reference" / PARAMS), load_file(out / PARAMS)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    by = _history(read_records(out / "results.jsonl"))
    reference_lines = {(r["phase"], r["id"]): r for r in read_records(tmp_path / "reference" / "results.jsonl")}
    assert by.keys() == reference_lines.keys()
    for key, rs in by.items():
        same = ("edges", "answer", "correct")
        assert {k: rs[-1][k] for k in same} == {k: reference_lines[key][k] for k in same}, key
        # The graph's log-probability from the same parameters and features: a float32 matmul may
        # round its last bit differently from one process state to another (2e-7 seen).
        assert rs[-1]["log_prob"] == pytest.approx(reference_lines[key]["log_prob"], abs=1e-5), key
    assert sorted(len(rs) for key, rs in by.items() if key[0] == "train") == [1, 1, 2, 2]


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_retry_then_resume_loses_and_repeats_nothing(tmp_path, api_env):
    out, log = tmp_path / "run", tmp_path / "stderr.log"
    with OpenAIServer() as server:
        args = _hybrid(server, out, "--api-max-retries", "50", "--api-outage-after", "0", "--api-timeout", "5")
        cmd = [sys.executable, "-m", "gcache_cli", *args]
        with log.open("wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        results = out / "results.jsonl"
        deadline = time.monotonic() + 240
        try:
            while time.monotonic() < deadline and not (results.exists() and len(read_records(results)) >= 2):
                assert proc.poll() is None, log.read_text()
                time.sleep(0.05)
            server.stop()  # the outage: connections are refused
            while time.monotonic() < deadline and "retry 2 of 50" not in log.read_text():
                time.sleep(0.05)
            assert "could not connect" in log.read_text(), "the kill must land while gcache retries"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        before = read_records(results)
        assert 2 <= len(before) < 6 and all(r["error"] is None for r in before)
        server.start()  # back, on the same port
        done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = read_records(results)
    assert after[: len(before)] == before
    by = _history(after)
    assert len(after) == 6 and len(by) == 6 and all(len(rs) == 1 for rs in by.values())


# --------------------------------------------------------------------------- flags


@pytest.fixture
def runs(monkeypatch):
    """The configs `gcache run` hands to run_experiment, which here loads nothing and runs nothing."""
    seen: list = []
    monkeypatch.setattr("gcache.io.runner.experiment.run_experiment", lambda config: seen.append(config) or {"status": "complete"})
    return seen


@pytest.mark.parametrize(
    "flags",
    [
        ["--method", "gcache", "--generation-mode", "hybrid", "--full-cache", "--no-optimize-spatial", "--lr", "0.05",
         "--limit", "3", "--api-model", "m", "--base-url", "http://127.0.0.1:9/v1", "--api-outage-after", "5"],
        ["--method", "latent-mas", "--latent-only", "--no-stop-at-answer", "--temperature", "0.7", "--seed", "4",
         "--no-retry-errors", "--question-id", "3"],
        ["--method", "single", "--out", "a dir/with spaces"],
        # api mode has its own default reward (accuracy): the command must not name one for single
        ["--method", "single", "--generation-mode", "api", "--api-model", "m", "--base-url", "http://127.0.0.1:9/v1"],
        ["--method", "text-mas", "--generation-mode", "api", "--api-model", "m", "--base-url", "http://127.0.0.1:9/v1"],
        ["--method", "text-mas", "--reward", "mixed", "--train-size", "2"],
    ],
)  # fmt: skip
def test_the_resume_command_continues_the_same_run(tmp_path, api_env, runs, flags):
    assert _gcache(["run", "gsm8k", *flags]).exit_code == 0
    config = with_api_settings(runs[-1])
    command = shlex.split(resume_command(config))
    assert command[:2] == ["gcache", "run"] and "--no-retry-errors" not in command
    result = _gcache(command[1:])
    assert result.exit_code == 0, result.output
    resumed = with_api_settings(runs[-1])
    assert resumed.out_dir == config.out_dir
    assert resumed.to_dict() == {**config.to_dict(), "resume": True, "retry_errors": True, "out": str(config.out_dir)}


def test_api_outage_after_reaches_the_client_and_is_checked(tmp_path, api_env, runs):
    assert _gcache(["run", "gsm8k", "--method", "single", "--generation-mode", "api", "--api-model", "m",
                    "--base-url", "http://127.0.0.1:9/v1", "--api-outage-after", "7"]).exit_code == 0  # fmt: skip
    assert api_config(runs[-1]).outage_after == 7
    api_env.setenv("GCACHE_API_OUTAGE_AFTER", "2")
    assert _gcache(["run", "gsm8k", "--method", "single", "--generation-mode", "api", "--api-model", "m",
                    "--base-url", "http://127.0.0.1:9/v1"]).exit_code == 0  # fmt: skip
    assert api_config(runs[-1]).outage_after == 2
    bad = _gcache(["run", "gsm8k", "--api-outage-after", "-1"])
    assert bad.exit_code == 2 and "--api-outage-after: expected a value >= 0, got -1" in bad.output


def test_an_error_inside_the_work_is_one_line_with_its_own_status_not_bad_usage(tmp_path, monkeypatch):
    """A numerical error raised inside a training step (planted in the core's step) ends the run
    with status 5 and one line naming the phase and the cause; the lines written before it stay."""
    import gcache.io.runner.learner as learner_module

    calls = []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("reinforce_loss: rewards must be finite, got nan")
        return real(*args, **kwargs)

    real = learner_module.train_step
    monkeypatch.setattr(learner_module, "train_step", failing_step)
    out = tmp_path / "run"
    result = _gcache(["run", "gsm8k", "--method", "gcache", "--model", "tiny-llama", "--max-new-tokens", "4",
                      "--latent-steps", "1", "--agent-nums", "2", "--batch-size", "2", "--train-size", "4",
                      "--num-iterations", "2", "--limit", "2", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 5, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training failed: ValueError: reinforce_loss: rewards must be finite" in errors[0]
    assert "--resume" in errors[0]
    assert len(read_records(out / "results.jsonl")) == 2  # the first step's lines are kept
