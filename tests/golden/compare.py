"""How a run is compared with its golden file: discrete fields exactly, floating-point fields
by their largest difference, one number per kind of value.

Used by tests/test_golden.py (which asserts each difference against its tolerance) and by
tests/golden/spread.py (which measures the differences that other float32 kernels cause, and
those that planted bugs cause, to set and check the tolerances).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from gcache.io.records.runlog import read_records
from gcache.io.runner.config import build_config
from gcache.io.runner.experiment import run_experiment

GOLDEN = Path(__file__).parent
EXACT = ("id", "phase", "answer", "prediction", "correct", "tokens")
EDGE_EXACT = ("src", "dst", "kind", "taken")
KINDS = ("log_prob", "edge_p", "params")  # the floating-point values, one largest difference each
# Bugs a golden comparison must catch: flag changes, or (None) a patch of the fusion.
PLANTED = {"sink-positions+1": {"sink_positions": 5}, "lr+1%": {"lr": 0.101}, "fusion-weight-term-dropped": None}


def drop_fusion_weight_term(fusion) -> None:
    """Plants a bug in ``fusion`` (the gcache.core.fusion module): every mixing fuse takes the plain
    mean of its inputs, the gated weighted term dropped (as if every gate were 0)."""
    mix = fusion._mix
    fusion._mix = lambda caches, w, g, present: mix(caches, w, torch.zeros_like(g), present)


def golden_flags(flags: dict) -> dict:
    """The recorded flags, with the defaults of the recording code named where they changed since:
    the reward where the method learns (accuracy, its only reward then) and gcache's latent-only
    caches (full caches became the default)."""
    flags = {"reward": "accuracy", **flags} if flags["method"] in ("gcache", "text-mas") else dict(flags)
    return {"latent_only": True, **flags} if flags["method"] == "gcache" else flags


def golden_files() -> list[str]:
    """The golden files' names (spread.json, the measurements, is not one)."""
    return sorted(p.name for p in GOLDEN.glob("*.json") if p.name != "spread.json")


def load(name: str) -> dict:
    return json.loads((GOLDEN / name).read_text())


def run(golden: dict, out: Path, threads: int = 1, **changes) -> tuple[list[dict], dict[str, list[float]]]:
    """Runs the golden file's configuration (``changes`` override flags) -> (records, parameters)."""
    config = build_config({"task": "gsm8k", "out": str(out), **golden_flags(golden["flags"]), **changes})
    torch.set_num_threads(threads)
    run_experiment(config)
    records = read_records(config.out_dir / "results.jsonl")
    params_file = config.out_dir / "params.safetensors"
    params = {k: v.flatten().tolist() for k, v in load_file(params_file).items()} if params_file.exists() else {}
    return records, params


def mismatches(golden: dict, records: list[dict], params: dict) -> list[str]:
    """Every discrete difference (ids, answers, predictions, tokens, the edges' structure and which
    were taken, parameter names and sizes), one line each; [] when there is none."""
    want = golden["records"]
    if [r["id"] for r in records] != [r["id"] for r in want]:
        return [f"ids {[r['id'] for r in records]} != {[r['id'] for r in want]}"]
    out = []
    for g, w in zip(records, want):
        out += [f"{w['id']}: {k} {g[k]!r} != {w[k]!r}" for k in EXACT if g[k] != w[k]]
        edges = [{k: e[k] for k in EDGE_EXACT} for e in g["edges"]]
        if edges != [{k: e[k] for k in EDGE_EXACT} for e in w["edges"]]:
            out.append(f"{w['id']}: edges {edges}")
    sizes = {k: len(v) for k, v in params.items()}
    if sizes != {k: len(v) for k, v in golden["params"].items()}:
        out.append(f"parameters {sizes}")
    return out


def _relative(a: float, b: float) -> float:
    if math.isinf(a) or math.isinf(b):
        return 0.0 if a == b else math.inf
    return abs(a - b) / max(1.0, abs(b))


def differences(golden: dict, records: list[dict], params: dict) -> dict[str, float]:
    """The largest difference of each kind of floating-point value (call after ``mismatches``
    found none): ``log_prob`` relative to max(1, |golden|), ``edge_p`` and ``params`` absolute."""
    pairs = list(zip(records, golden["records"]))
    log_prob = [_relative(g["log_prob"], w["log_prob"]) for g, w in pairs]
    edge_p = [abs(ge["p"] - we["p"]) for g, w in pairs for ge, we in zip(g["edges"], w["edges"])]
    param = [abs(a - b) for k, v in golden["params"].items() for a, b in zip(params.get(k, ()), v)]
    return {"log_prob": max(log_prob, default=0.0), "edge_p": max(edge_p, default=0.0),
            "params": max(param, default=0.0)}  # fmt: skip


def worst_parameter(golden: dict, params: dict) -> str:
    """The name of the parameter tensor with the largest difference (for failure messages)."""
    diff = {k: max((abs(a - b) for a, b in zip(params.get(k, ()), v)), default=0.0) for k, v in golden["params"].items()}
    return max(diff, key=diff.get) if diff else "-"
