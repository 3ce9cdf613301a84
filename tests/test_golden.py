"""Seeded runs recorded before the runner became a composition of pure steps (tests/golden/*.json,
written by tests/golden/record.py from the earlier code) give the same answers, predictions,
tokens and edges, and the same learned parameters, today."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gcache.io.config import build_config
from gcache.io.experiment import run_experiment
from gcache.io.runlog import read_records

GOLDEN = Path(__file__).parent / "golden"
FILES = sorted(GOLDEN.glob("*.json"))
EXACT = ("id", "phase", "answer", "prediction", "correct", "tokens")


def _close(a: float, b: float, tol: float = 1e-5) -> bool:
    return (math.isinf(a) and a == b) or abs(a - b) <= tol * max(1.0, abs(b))


def golden_flags(flags: dict) -> dict:
    """The recorded flags, with the reward the recording code trained on (accuracy, its only
    reward and the default then) named where the method learns."""
    return {"reward": "accuracy", **flags} if flags["method"] in ("gcache", "text-mas") else dict(flags)


def _check(name: str, tmp_path: Path) -> None:
    golden = json.loads((GOLDEN / name).read_text())
    config = build_config({"task": "gsm8k", "out": str(tmp_path / "run"), **golden_flags(golden["flags"])})
    torch.set_num_threads(1)
    run_experiment(config)
    got = read_records(config.out_dir / "results.jsonl")
    want = golden["records"]
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for g, w in zip(got, want):
        for key in EXACT:
            assert g[key] == w[key], f"{name} {w['id']}: {key} {g[key]!r} != {w[key]!r}"
        assert _close(g["log_prob"], w["log_prob"]), f"{name} {w['id']}: log_prob"
        assert len(g["edges"]) == len(w["edges"])
        for ge, we in zip(g["edges"], w["edges"]):
            assert {k: ge[k] for k in ("src", "dst", "kind", "taken")} == {k: we[k] for k in ("src", "dst", "kind", "taken")}
            assert _close(ge["p"], we["p"]), f"{name} {w['id']}: edge {we['src']}->{we['dst']}"
    params_file = config.out_dir / "params.safetensors"
    got_params = {k: v.flatten().tolist() for k, v in load_file(params_file).items()} if params_file.exists() else {}
    assert sorted(got_params) == sorted(golden["params"])
    for key, values in golden["params"].items():
        diff = max((abs(a - b) for a, b in zip(got_params[key], values)), default=0.0)
        assert diff <= 1e-5, f"{name}: learned {key} differs by {diff:.2e}"


@pytest.mark.parametrize("name", [f.name for f in FILES if f.name.startswith("tiny-")])
def test_tiny_model_runs_match_the_golden_files(name, tmp_path):
    _check(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", [f.name for f in FILES if f.name.startswith("smollm2-")])
def test_embedded_model_runs_match_the_golden_files(name, tmp_path):
    _check(name, tmp_path)
