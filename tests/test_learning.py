"""Rewards and answer likelihoods through the runner (tiny random model): every method records
``answer_logprob``, train lines their ``reward``, the likelihood reward trains without decoding,
the summary carries the mean answer log-probability, and a bad ``--reward`` is one line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gcache.core.rewards import reward
from gcache.io.records.runlog import read_records
from gcache.io.runner.config import METHODS, build_config
from gcache.io.runner.experiment import run_experiment
from gcache_cli.main import app

TINY = dict(model="tiny-llama", max_new_tokens=4, batch_size=2)


def _run(tmp_path: Path, method: str, **extra) -> tuple[list[dict], dict]:
    flags = {"task": "gsm8k", "method": method, "out": str(tmp_path / method), "limit": 2, **TINY, **extra}
    if method in ("latent-mas", "gcache"):
        flags.setdefault("latent_steps", 2)
    if method in ("gcache", "text-mas"):
        flags.setdefault("num_iterations", 1)
        flags.setdefault("train_size", 2)
        flags.setdefault("num_agents", 3)
    summary = run_experiment(build_config(flags))
    return read_records(Path(flags["out"]) / "results.jsonl"), summary


@pytest.mark.parametrize("method", METHODS)
def test_every_method_records_a_finite_answer_logprob_and_the_summary_its_mean(method, tmp_path):
    records, summary = _run(tmp_path, method)
    for r in records:
        assert isinstance(r["answer_logprob"], float) and math.isfinite(r["answer_logprob"]) and r["answer_logprob"] <= 0
        if r["phase"] == "train":  # the default reward is the answer's likelihood
            assert r["reward"] == reward("likelihood", None, r["answer_logprob"])
    evals = [r["answer_logprob"] for r in records if r["phase"] == "eval"]
    interval = summary["answer_logprob"]
    assert interval["n"] == len(evals) and math.isclose(interval["mean"], sum(evals) / len(evals))
    assert interval["low"] <= interval["mean"] <= interval["high"]


def test_the_likelihood_reward_trains_without_decoding_the_judger(tmp_path):
    records, summary = _run(tmp_path, "gcache", reward="likelihood", num_iterations=2, train_size=4)
    train = [r for r in records if r["phase"] == "train"]
    assert len(train) == 4
    for r in train:
        assert r["reward"] == reward("likelihood", None, r["answer_logprob"])
        assert r["correct"] is None  # nothing decoded: no verdict, not a wrong one
        assert r["answer"] == "" and r["prediction"] is None and r["score_note"].startswith("not decoded")
        assert r["tokens"]["generated"] == 0
        decision = [t for t in r["trace"] if t["node"] == "decision"]
        assert decision and decision[0]["text"] is None
    evals = [r for r in records if r["phase"] == "eval"]
    assert all(r["tokens"]["generated"] > 0 for r in evals)  # evaluation still decodes
    assert summary["train"]["answer_logprob"]["n"] == 4
    assert summary["train"]["accuracy"] is None  # "not decoded", not 0.0
    steps = {r["step"]: (r["policy_loss"], r.get("fuser_loss")) for r in train}
    assert len(steps) == 2 and all(math.isfinite(p) for p, _ in steps.values())  # one step's losses per line
    assert len({r["policy_loss"] for r in train if r["step"] == 0}) == 1


def test_the_mixed_reward_adds_the_answer_probability_to_accuracy(tmp_path):
    records, _ = _run(tmp_path, "gcache", reward="mixed")
    for r in (r for r in records if r["phase"] == "train"):
        # rel 1e-6: the rows the step measures record the reward it used, in float32
        assert math.isclose(r["reward"], float(r["correct"]) + math.exp(r["answer_logprob"]), rel_tol=1e-6)
        assert r["tokens"]["generated"] > 0


def test_the_default_reward_is_likelihood_and_accuracy_where_only_an_api_answers():
    assert build_config({"task": "gsm8k"}).reward == "likelihood"
    assert build_config({"task": "gsm8k", "method": "text-mas"}).reward == "likelihood"
    assert build_config({"task": "gsm8k", "method": "text-mas", "generation_mode": "api"}).reward == "accuracy"
    assert build_config({"task": "gsm8k", "method": "gcache", "generation_mode": "hybrid"}).reward == "likelihood"
    assert build_config({"task": "gsm8k", "reward": "accuracy"}).reward == "accuracy"


def test_custom_roles_replace_the_agents_and_bad_ones_are_named():
    from gcache.io.runner.pipeline import build_pipeline
    from gcache.io.runner.prompts import Role

    config = build_config({"task": "gsm8k", "method": "gcache", "num_iterations": 0, **TINY})
    roles = [Role("A", "A: first.", "You are A."), Role("B", "B: second.", "You are B.")]
    pipeline = build_pipeline(config, roles=roles)
    assert [r.name for r in pipeline.roles] == ["A", "B"] and pipeline.planner.config.num_agents == 2
    for bad in ([], ["You are A."]):
        with pytest.raises(ValueError, match="roles: expected a non-empty sequence of Role"):
            build_pipeline(config, roles=bad)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--reward", "accuarcy"], "--reward: expected one of accuracy, likelihood, mixed, margin, got 'accuarcy'"),
        (["--method", "single", "--reward", "likelihood"], "--reward does not apply to --method single"),
        (["--method", "text-mas", "--generation-mode", "api", "--reward", "likelihood"],
         "--reward likelihood reads the answer's likelihood through the local model"),
    ],
)
def test_a_bad_reward_is_one_clear_line(flags, message, tmp_path):
    result = CliRunner().invoke(app, ["run", "gsm8k", *flags, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_the_learning_benchmark_smoke_run_writes_its_json_markdown_and_curve(tmp_path):
    """benchmarks/learning.py --smoke, as CI runs it: every compared method with its interval,
    the learned-minus-method paired differences, the curve, the markdown table and the PNG."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "learning.py"), "--smoke", "--out", str(tmp_path)],
                          cwd=root, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "learning.json").read_text())
    expected = {"learned", "chain", "star", "mesh", "layered", "random", "full (untrained)", "latent-mas", "single",
                "text-mas"}
    assert set(report["methods"]) == expected
    for name, row in report["methods"].items():
        a = row["answer_logprob"]
        assert a["low"] <= a["mean"] <= a["high"] <= 0
        values = report["per_question"][name]
        assert a["n"] == len(values) and math.isclose(a["mean"], sum(values.values()) / len(values))
        if name != "learned":
            d = row["learned_minus"]
            shared = [q for q in values if q in report["per_question"]["learned"]]
            want = sum(report["per_question"]["learned"][q] - values[q] for q in shared) / len(shared)
            assert math.isclose(d["mean"], want, abs_tol=1e-9) and d["low"] <= d["mean"] <= d["high"]
    assert [r["step"] for r in report["curve"]["train"]] == list(range(report["settings"]["steps"]))
    assert report["curve"]["held_out"][0]["step"] == 0
    assert report["machine"]["source"]["commit"]
    assert "| learned |" in (tmp_path / "learning.md").read_text()
    assert (tmp_path / "learning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kind", ["likelihood", "mixed"])
def test_the_reward_is_read_from_the_fusers_own_forward_and_equals_a_separate_one(kind, monkeypatch):
    """A learned fuser on the answer line measures the likelihood reward's answers in its own
    forward: the runner's batched no-grad forward then reads no judged row, and the rewards,
    log-probabilities and the step's new parameters equal those of a step that measures apart."""
    import torch

    import gcache.io.runner.pipeline as pipeline_module
    from gcache.io.runner.learner import Learner
    from gcache.io.runner.pipeline import build_pipeline
    from gcache.io.tasks.datasets import load_items

    config = build_config({"task": "gsm8k", "method": "gcache", "num_agents": 3, "latent_steps": 2, "reward": kind,
                           **TINY})  # fmt: skip
    items = load_items("gsm8k", "train", limit=3)
    measured_rows = []
    real = pipeline_module.answer_scores

    def spy(local, conversations, caches, batch_items, **kwargs):
        measured_rows.append(len(conversations))
        return real(local, conversations, caches, batch_items, **kwargs)

    monkeypatch.setattr(pipeline_module, "answer_scores", spy)
    shared = build_pipeline(config)
    assert shared.learner.measures_answers
    together = shared.train_step(items, 0)
    assert measured_rows == []  # every judged row has a fused cache: none measured apart
    monkeypatch.setattr(Learner, "measures_answers", property(lambda self: False))
    apart_pipeline = build_pipeline(config)
    apart = apart_pipeline.train_step(items, 0)
    assert measured_rows == [len(items)]
    for a, b in zip(together, apart):
        assert math.isclose(a["answer_logprob"], b["answer_logprob"], abs_tol=1e-5)
        assert math.isclose(a["reward"], b["reward"], abs_tol=1e-5)
        # The reward recorded is the one the step used (float32), of the recorded log-probability.
        assert math.isclose(a["reward"], reward(kind, a["correct"] if kind == "mixed" else None, a["answer_logprob"]),
                            rel_tol=1e-6)  # fmt: skip
    # Adam's first moment after one step is 0.1 x the gradient (its update, sign-like where a
    # gradient is ~0, would magnify float noise): the gradients agree.
    for part in ("policy", "fuser"):
        mine, theirs = shared.learner.state.opt_state.mu[part], apart_pipeline.learner.state.opt_state.mu[part]
        for x, y in zip(mine, theirs):
            assert torch.allclose(x, y, rtol=1e-3, atol=1e-7), part
    moved = any(not torch.equal(x, y) for x, y in zip(shared.learner.params["fuser"], build_pipeline(config).learner.params["fuser"]))
    assert moved  # the step did update the fuser


@pytest.mark.parametrize("method", ["gcache", "latent-mas", "single"])
def test_a_decoded_answer_is_scored_on_the_decodes_read_and_equals_a_fresh_read(method, monkeypatch):
    """Where the judger decodes, its answer line is read on top of the decode's prompt (no fresh read
    of the context: neither the shared prefill nor the plain answer forward runs) and gives the
    values a fresh read gives when nothing is decoded."""
    from gcache.io.runner import answers
    from gcache.io.runner.pipeline import build_pipeline
    from gcache.io.tasks.datasets import load_items

    extra = {"gcache": {"latent_steps": 2, "num_agents": 3, "latent_only": False}, "latent-mas": {"latent_steps": 2}}
    flags = {"task": "gsm8k", "method": method, **TINY, "max_new_tokens": 3, **extra.get(method, {})}
    pipeline = build_pipeline(build_config(flags))
    items = load_items("gsm8k", "test", limit=3)
    fresh = [r["answer_logprob"] for r in pipeline.evaluate(items, decode=False)]
    reads = []
    for name in ("prefill", "answer_logprobs"):
        def counted(*args, _f=getattr(answers, name), _name=name, **kwargs):
            reads.append(_name)
            return _f(*args, **kwargs)
        monkeypatch.setattr(answers, name, counted)
    decoded = pipeline.evaluate(items, decode=True)
    assert all(r["tokens"]["generated"] > 0 for r in decoded) and reads == []
    assert [r["answer_logprob"] for r in decoded] == pytest.approx(fresh, abs=1e-5)
