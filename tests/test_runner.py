"""End to end: `gcache run` on the tiny random model for every task and method, resume after
kill -9, determinism, and one clear error per bad flag combination."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _openai_server import OpenAIServer, Reply, isolated_api_env
from typer.testing import CliRunner

from gcache.io.models.apiconfig import ApiConfig
from gcache.io.records.runlog import read_records
from gcache.io.runner.config import METHODS, api_config, build_config
from gcache.io.runner.experiment import check_before_loading, run_experiment
from gcache.io.tasks.datasets import TASKS
from gcache_cli.main import app

TINY = dict(model="tiny-llama", max_new_tokens=6, latent_steps=2, batch_size=2)


def _config(tmp_path: Path, task: str, method: str, **extra):
    flags = {"task": task, "method": method, "out": str(tmp_path / f"{task}-{method}"), **TINY, **extra}
    if method in ("single", "latent-mas"):
        flags.pop("latent_steps") if method == "single" else None
    if method in ("single", "text-mas"):
        flags.pop("latent_steps", None)
    if method in ("gcache", "text-mas"):
        flags.setdefault("num_iterations", 1)
        flags.setdefault("train_size", 2)
        flags.setdefault("num_agents", 3)
    return build_config(flags)


def _check_run(folder: Path, n_eval: int, n_train: int) -> list[dict]:
    records = read_records(folder / "results.jsonl")
    evals = [r for r in records if r["phase"] == "eval"]
    trains = [r for r in records if r["phase"] == "train"]
    assert len(evals) == n_eval and len(trains) == n_train
    assert len({(r["phase"], r["id"]) for r in records}) == len(records)
    for r in records:
        assert r["error"] is None, r["error"]
        assert r["tokens"]["prompt"] > 0
        # Training on the answer's likelihood (the default reward) does not decode the judger:
        # its lines say so with correct None (accuracy "not decoded"), not a wrong answer.
        decoded = r["correct"] is not None
        assert isinstance(r["correct"], bool) or r["phase"] == "train"
        assert decoded or (r["score_note"] or "").startswith("not decoded")
        assert r["tokens"]["generated"] > 0 or not decoded
        assert r["trace"], "every answer has a per-agent trace"
        roles = {t["role"] for t in r["trace"]}
        assert r["decision_inputs"] and all(a.split(":", 1)[1] in roles for a in r["decision_inputs"])
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["n"] == n_eval and summary["config"]["method"] in METHODS
    return records


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_end_to_end_on_gsm8k(tmp_path, method):
    config = _config(tmp_path, "gsm8k", method, limit=2)
    summary = run_experiment(config)
    n_train = 2 if config.learns else 0
    records = _check_run(config.out_dir, 2, n_train)
    latent = [r["tokens"]["latent"] for r in records]
    if method in ("latent-mas", "gcache"):
        assert all(n > 0 for n in latent), "latent methods run latent steps"
    else:
        assert all(n == 0 for n in latent), "text methods run none"
    assert summary["accuracy"] is not None


@pytest.mark.parametrize("task, family", [("gsm8k", "math"), ("medqa", "medicine"), ("mbppplus", "code")])
@pytest.mark.parametrize("method", ["single", "latent-mas"])
def test_stop_at_answer_reaches_local_decoding(tmp_path, monkeypatch, task, family, method):
    import gcache.io.runner.pipeline as pipeline_module
    from gcache.io.runner.pipeline import build_pipeline
    from gcache.io.tasks.datasets import load_items

    stops, families = [], []
    real, real_stop = pipeline_module.generate_answer, pipeline_module.answer_stop
    monkeypatch.setattr(pipeline_module, "answer_stop", lambda local, f: families.append(f) or real_stop(local, f))

    def spy(mode, conversations, decoding, **kwargs):
        stops.append(decoding.stop)
        return real(mode, conversations, decoding, **kwargs)

    monkeypatch.setattr(pipeline_module, "generate_answer", spy)
    item = load_items(task, "test", limit=1)
    build_pipeline(_config(tmp_path, task, method)).evaluate(item)
    on = len(stops)
    build_pipeline(_config(tmp_path, task, method, stop_at_answer=False)).evaluate(item)
    assert on >= 1 and all(callable(s) for s in stops[:on]), "on for the first run's every decode"
    assert len(stops) == 2 * on and all(s is None for s in stops[on:]), "off for the second's"
    assert families == [family], "the rule of the task's family, built once per run"


def test_stop_at_answer_flag_parses(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(
        "gcache.io.runner.experiment.run_experiment", lambda config: seen.setdefault("config", config) and {"status": "complete"}
    )
    for flag, want in (([], True), (["--no-stop-at-answer"], False), (["--stop-at-answer"], True)):
        seen.clear()
        out = CliRunner().invoke(app, ["run", "gsm8k", "--model", "tiny-llama", "--out", str(tmp_path / "r"), *flag])
        assert out.exit_code == 0, out.output
        assert seen["config"].stop_at_answer is want


@pytest.mark.parametrize("task", [t for t in TASKS if t != "gsm8k"])
def test_every_task_runs_end_to_end(tmp_path, task):
    for method in ("gcache", "text-mas"):
        config = _config(tmp_path, task, method, limit=1, num_iterations=1, batch_size=1, train_size=1)
        run_experiment(config)
        _check_run(config.out_dir, 1, 1)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_same_seed_same_topologies_and_answers(tmp_path, temperature):
    a = _config(tmp_path / "a", "gsm8k", "gcache", limit=2, seed=3, temperature=temperature)
    b = _config(tmp_path / "b", "gsm8k", "gcache", limit=2, seed=3, temperature=temperature)
    run_experiment(a)
    run_experiment(b)
    ra, rb = read_records(a.out_dir / "results.jsonl"), read_records(b.out_dir / "results.jsonl")
    strip = lambda r: {k: r[k] for k in ("id", "phase", "edges", "answer", "prediction", "tokens")}  # noqa: E731
    assert [strip(r) for r in ra] == [strip(r) for r in rb]


def test_decision_rules_run(tmp_path):
    for decision in ("direct", "vote"):
        config = _config(tmp_path / decision, "gsm8k", "gcache", limit=1, decision=decision, num_iterations=1)
        run_experiment(config)
        _check_run(config.out_dir, 1, 2)
    config = _config(tmp_path / "code", "humaneval", "gcache", limit=1, decision="code", num_iterations=0)
    run_experiment(config)
    _check_run(config.out_dir, 1, 0)


def test_code_decision_lets_the_sinks_write_and_the_others_think(tmp_path):
    config = _config(tmp_path, "humaneval", "gcache", limit=1, decision="code", num_iterations=0,
                     topology="chain", optimize_spatial=False)  # fmt: skip
    run_experiment(config)
    record = read_records(config.out_dir / "results.jsonl")[-1]
    assert record["tokens"]["latent"] == 2 * config.latent_steps, "the two agents before the sink think"
    writers = [t["node"] for t in record["trace"] if t["text"] is not None and t["node"] != "decision"]
    assert writers == ["r0:a2"], "only the chain's sink writes a candidate program"


def test_two_rounds_with_temporal_edges(tmp_path):
    config = _config(tmp_path, "gsm8k", "gcache", limit=1, num_rounds=2, optimize_temporal=True)
    run_experiment(config)
    records = _check_run(config.out_dir, 1, 2)
    assert any(e["kind"] == "temporal" for e in records[-1]["edges"])
    assert any(t["node"].startswith("r1:") for t in records[-1]["trace"])


def test_resume_after_kill_loses_and_duplicates_nothing(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "gcache_cli", "run", "gsm8k", "--method", "latent-mas", "--model", "tiny-llama",
        "--limit", "6", "--batch-size", "1", "--max-new-tokens", "24", "--latent-steps", "2", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if results.exists() and len(read_records(results)) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = read_records(results)
    assert 1 <= len(before) < 6, "the kill must land midway"
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = read_records(results)
    ids = [r["id"] for r in after]
    assert len(ids) == 6 and len(set(ids)) == 6
    assert after[: len(before)] == before, "finished lines are kept as they were"


BAD_FLAGS = [
    (["--method", "single", "--latent-steps", "3"], "--latent-steps does not apply to --method single"),
    (["--method", "latent-mas", "--topology", "star"], "--topology does not apply to --method latent-mas"),
    (["--method", "text-mas", "--fusion", "learned"], "--fusion does not apply to --method text-mas"),
    (["--method", "gcache", "--generation-mode", "api"], "api is the text-only mode"),
    (["--method", "single", "--generation-mode", "hybrid"], "--generation-mode hybrid does not apply"),
    (["--topology", "ring"], "--topology: expected one of"),
    (["--latent-steps", "-1"], "--latent-steps: expected a value >= 0"),
    (["--decision", "code"], "--decision code runs programs"),
    (["--optimize-temporal"], "needs --num-rounds >= 2"),
    (["--question-id", "1", "--limit", "2"], "do not combine"),
    (["--method", "text-mas", "--generation-mode", "api"], "API"),
    (["--api-timeout", "0"], "--api-timeout: expected a positive number of seconds"),
    (["--api-max-retries", "-1"], "--api-max-retries: expected a value >= 0"),
    (["--api-concurrency", "0"], "--api-concurrency: expected a value >= 1"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS)
def test_bad_flag_combinations_fail_with_one_clear_line(tmp_path, flags, message, monkeypatch):
    for var in ("API_KEY", "BASE_URL", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", "gsm8k", *flags, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    text = result.output
    assert message in text, text
    assert "Traceback" not in text
    assert not (tmp_path / "x" / "results.jsonl").exists()


def test_unknown_task_is_refused(tmp_path):
    result = CliRunner().invoke(app, ["run", "gsm9k", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "gsm9k" in result.output


def test_report_and_compare_read_finished_runs(tmp_path):
    a = _config(tmp_path / "a", "gsm8k", "gcache", limit=2)
    b = _config(tmp_path / "b", "gsm8k", "single", limit=2)
    run_experiment(a)
    run_experiment(b)
    runner = CliRunner(env={"COLUMNS": "200"})
    result = runner.invoke(app, ["report", str(a.out_dir)])
    assert result.exit_code == 0, result.output
    assert "eval" in result.output and "train" in result.output
    png = a.out_dir / "topology.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = runner.invoke(app, ["compare", str(a.out_dir), str(b.out_dir)])
    assert result.exit_code == 0, result.output
    assert "gcache" in result.output and "single" in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "no summary.json" in result.output


def test_checkpoint_restores_the_learned_parts_and_the_step(tmp_path):
    import gcache
    from gcache.io.runner.pipeline import build_pipeline

    config = _config(tmp_path, "gsm8k", "gcache", limit=1, num_iterations=2)
    run_experiment(config)
    trained = build_pipeline(config)
    fresh = [t.clone() for t in gcache.tree_leaves(trained.learner.params)]
    assert trained.restore(config.out_dir) == 2
    restored = gcache.tree_leaves(trained.learner.params)
    assert not all(torch.equal(a, b) for a, b in zip(fresh, restored)), "two Adam steps moved the parameters"
    assert int(trained.learner.state.opt_state.count) == 2
    assert int(trained.learner.state.baseline.count) == 2


# --------------------------------------------------------------------------- API flags

KEY = "sk-live-9f8e7d6c5b4a39281706"


@pytest.fixture
def api_env(tmp_path, monkeypatch):
    """No API setting from the developer's shell or .env; a key, as an API run needs one."""
    return isolated_api_env(monkeypatch, tmp_path, KEY)


@pytest.fixture
def runs(monkeypatch):
    """The configs `gcache run` hands to run_experiment, which here loads nothing and runs nothing."""
    seen: list = []
    monkeypatch.setattr(
        "gcache.io.runner.experiment.run_experiment", lambda config: seen.append(config) or {"status": "complete"}
    )
    return seen


def _run_api(tmp_path, *flags: str, base_url: str = "http://127.0.0.1:9/v1"):
    args = ["run", "gsm8k", "--method", "text-mas", "--generation-mode", "api", "--api-model", "m", "--base-url", base_url]
    return CliRunner().invoke(app, [*args, *flags, "--out", str(tmp_path / "x")])


def test_api_flags_reach_the_openai_client(tmp_path, api_env, runs):
    import asyncio

    from gcache.io.models.api import ApiClient

    result = _run_api(tmp_path, "--api-timeout", "2.5", "--api-max-retries", "0", "--api-concurrency", "3")
    assert result.exit_code == 0, result.output
    (config,) = runs
    api = api_config(config)
    assert (api.timeout, api.max_retries, api.max_concurrency) == (2.5, 0, 3)

    async def sdk_settings():
        client = ApiClient(api)
        sdk, _ = client._state()
        settings = (sdk.timeout, sdk.max_retries, sdk.base_url, sdk.api_key)
        await client.aclose()
        return settings

    # The SDK times each attempt; its own retries stay off (ApiClient retries, max_retries times).
    assert asyncio.run(sdk_settings()) == (2.5, 0, "http://127.0.0.1:9/v1/", KEY)


def test_api_flags_win_over_the_environment_which_fills_in_the_rest(tmp_path, api_env, runs):
    api_env.setenv("GCACHE_API_TIMEOUT", "9")
    api_env.setenv("GCACHE_API_CONCURRENCY", "5")
    (tmp_path / ".env").write_text("GCACHE_API_MAX_RETRIES=1\nGCACHE_API_TIMEOUT=7\n")
    assert _run_api(tmp_path, "--api-timeout", "2.5").exit_code == 0
    assert _run_api(tmp_path).exit_code == 0
    flagged, plain = (api_config(c) for c in runs)
    assert (flagged.timeout, flagged.max_retries, flagged.max_concurrency) == (2.5, 1, 5)
    assert (plain.timeout, plain.max_retries, plain.max_concurrency) == (9.0, 1, 5)
    (tmp_path / ".env").unlink()
    for var in ("GCACHE_API_TIMEOUT", "GCACHE_API_CONCURRENCY"):
        api_env.delenv(var)
    assert _run_api(tmp_path).exit_code == 0
    default = api_config(runs[-1])
    assert (default.timeout, default.max_retries, default.max_concurrency) == (60.0, 3, 8) == (
        ApiConfig().timeout, ApiConfig().max_retries, ApiConfig().max_concurrency
    )


@pytest.mark.parametrize(
    "flags, env, message",
    [
        (["--api-timeout", "0"], {}, "--api-timeout: expected a positive number of seconds, got 0.0"),
        (["--api-timeout", "-1"], {}, "--api-timeout: expected a positive number of seconds, got -1.0"),
        (["--api-timeout", "inf"], {}, "--api-timeout: expected a positive number of seconds, got inf"),
        (["--api-timeout", "soon"], {}, "Invalid value for '--api-timeout'"),
        (["--api-max-retries", "-1"], {}, "--api-max-retries: expected a value >= 0, got -1"),
        (["--api-max-retries", "1.5"], {}, "Invalid value for '--api-max-retries'"),
        (["--api-concurrency", "0"], {}, "--api-concurrency: expected a value >= 1, got 0"),
        (["--api-concurrency", "x"], {}, "Invalid value for '--api-concurrency'"),
        ([], {"GCACHE_API_TIMEOUT": "soon"}, "GCACHE_API_TIMEOUT (in the environment): expected a number, got 'soon'"),
        ([], {"GCACHE_API_CONCURRENCY": "0"}, "GCACHE_API_CONCURRENCY (in the environment): expected an integer >= 1"),
    ],
)
def test_a_bad_api_setting_fails_naming_it_before_any_model_loads(tmp_path, api_env, runs, flags, env, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    api_env.setattr("gcache.io.models.local.load_model", no_loading)
    api_env.setattr("gcache.io.runner.pipeline.load_local", no_loading)
    for var, value in env.items():
        api_env.setenv(var, value)
    result = _run_api(tmp_path, *flags)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
    assert runs == [] and not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "flags, env, requests",
    [
        (["--api-max-retries", "0"], {}, 1),
        ([], {"GCACHE_API_MAX_RETRIES": "1"}, 2),
        (["--api-max-retries", "0"], {"GCACHE_API_MAX_RETRIES": "1"}, 1),
    ],
)
def test_api_max_retries_bounds_the_requests_a_failing_server_sees(tmp_path, api_env, flags, env, requests):
    for var, value in env.items():
        api_env.setenv(var, value)
    out = tmp_path / "x"
    with OpenAIServer(script=[Reply("status", 500)] * 4) as server:
        args = ["run", "gsm8k", "--method", "single", "--generation-mode", "api", "--api-model", "m"]
        args += ["--base-url", server.base_url, "--question-id", "0", "--out", str(out), *flags]
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 3, result.output  # finished with an errored question
    assert len(server.requests) == requests
    (record,) = read_records(out / "results.jsonl")
    assert "HTTP 500" in record["error"]
    # The run records the HTTP settings its client used (whichever tier set them), never the key.
    expected = {"api_timeout": 60.0, "api_max_retries": requests - 1, "api_concurrency": 8}
    for name in ("config.json", "summary.json"):
        text = (out / name).read_text()
        saved = json.loads(text)
        saved = saved.get("config", saved)
        assert {k: saved[k] for k in expected} == expected, name
        assert KEY not in text


def test_a_resumed_run_may_change_the_api_http_settings_but_not_the_api_model(tmp_path, api_env):
    first = build_config({"method": "single", "generation_mode": "api", "api_model": "m", "base_url": "http://h/v1",
                          "api_max_retries": 0, "out": str(tmp_path / "x")})  # fmt: skip
    first.out_dir.mkdir()
    (first.out_dir / "config.json").write_text(json.dumps(first.to_dict()))
    check_before_loading(replace(first, resume=True, api_max_retries=5, api_timeout=1.0, api_concurrency=2))
    with pytest.raises(ValueError, match="api_model: 'm' -> 'other'"):
        check_before_loading(replace(first, resume=True, api_model="other"))


def test_a_run_saved_before_a_setting_existed_resumes_with_that_settings_default(tmp_path):
    """config.json of an older version lacks the settings added since (edge_cost): they ran at
    the default, so resuming does not see a change; a non-default value still differs."""
    first = build_config({"method": "gcache", "out": str(tmp_path / "x")})
    first.out_dir.mkdir()
    saved = {k: v for k, v in first.to_dict().items() if k != "edge_cost"}
    (first.out_dir / "config.json").write_text(json.dumps(saved))
    check_before_loading(replace(first, resume=True))
    with pytest.raises(ValueError, match="edge_cost: 0.0 -> 0.5"):
        check_before_loading(replace(first, resume=True, edge_cost=0.5))


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_weights_flag_reaches_the_runs_model(tmp_path, weights):
    from gcache.io.models.quant import WeightOnlyLinear
    from gcache.io.runner.pipeline import build_pipeline

    pipeline = build_pipeline(_config(tmp_path, "gsm8k", "latent-mas", weights=weights))
    linears = [m for m in pipeline.speaker.local.model.modules() if isinstance(m, WeightOnlyLinear)]
    assert linears, f"--weights {weights} swapped no linear layer"
