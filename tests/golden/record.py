"""Record (or check) golden runs: what the runner computes, frozen before a refactor.

    python tests/golden/record.py            # write tests/golden/*.json from the current code
    python tests/golden/record.py --embedded # also the embedded-model runs (slow, ~minutes)

tests/test_golden.py re-runs the same configurations and compares: answers, predictions,
tokens and edges exactly; log-probabilities and learned parameters to 1e-5.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from compare import golden_flags  # tests/golden is not a package: run this file as a script

from gcache.io.records.runlog import read_records
from gcache.io.runner.config import build_config
from gcache.io.runner.experiment import run_experiment

HERE = Path(__file__).parent
TINY = dict(model="tiny-llama", max_new_tokens=8, latent_steps=2, batch_size=2, limit=2, seed=5)
# Every method on GSM8K; the learning ones train two steps on four train questions.
RUNS: dict[str, dict] = {
    "tiny-single": dict(method="single", **{k: v for k, v in TINY.items() if k != "latent_steps"}),
    "tiny-text-mas": dict(
        method="text-mas", num_agents=3, train_size=4, num_iterations=2,
        **{k: v for k, v in TINY.items() if k != "latent_steps"},
    ),
    "tiny-latent-mas": dict(method="latent-mas", **TINY),
    "tiny-gcache": dict(method="gcache", num_agents=3, train_size=4, num_iterations=2, **TINY),
    "tiny-gcache-weighted-2rounds": dict(
        method="gcache", num_agents=3, train_size=4, num_iterations=2, fusion="weighted", num_rounds=2,
        optimize_temporal=True, latent_only=False, **TINY,
    ),
    "tiny-gcache-vote": dict(method="gcache", num_agents=3, train_size=2, num_iterations=1, decision="vote", **TINY),
    "tiny-gcache-direct": dict(method="gcache", num_agents=3, train_size=2, num_iterations=1, decision="direct", **TINY),
    "tiny-text-mas-vote": dict(
        method="text-mas", num_agents=3, num_iterations=0, decision="vote",
        **{k: v for k, v in TINY.items() if k != "latent_steps"},
    ),
}
EMBEDDED: dict[str, dict] = {
    "smollm2-latent-mas": dict(method="latent-mas", limit=3, max_new_tokens=64),
    "smollm2-gcache": dict(method="gcache", limit=3, train_size=4, num_iterations=2, batch_size=2, max_new_tokens=64),
}
# Both this file and test_golden.py run the flags through compare.golden_flags, which names the
# defaults of the code that recorded them where they changed since (--reward accuracy, latent-only).
KEEP = ("id", "phase", "answer", "prediction", "correct", "tokens", "edges", "log_prob")


def run(name: str, flags: dict, folder: Path) -> dict:
    """The records (KEEP fields) and learned parameters of one run, as JSON-ready values."""
    config = build_config({"task": "gsm8k", "out": str(folder / name), **golden_flags(flags)})
    run_experiment(config)
    records = [{k: r.get(k) for k in KEEP} for r in read_records(config.out_dir / "results.jsonl")]
    params_file = config.out_dir / "params.safetensors"
    params = {k: v.flatten().tolist() for k, v in sorted(load_file(params_file).items())} if params_file.exists() else {}
    return {"flags": flags, "records": records, "params": params}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--embedded", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = dict(RUNS, **(EMBEDDED if args.embedded else {}))
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in runs.items():
            golden = run(name, flags, Path(tmp))
            (HERE / f"{name}.json").write_text(json.dumps(golden) + "\n")
            print(name, len(golden["records"]), "records", file=sys.stderr)


if __name__ == "__main__":
    main()
