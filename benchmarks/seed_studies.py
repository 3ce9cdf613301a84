"""Seed studies of the statistical tests: how often each claim holds on seeds the tests do not use.

    python benchmarks/seed_studies.py                                  # every study, seeds 100-119
    python benchmarks/seed_studies.py --only reinforce_estimator --seeds 100 101

Each study calls the function its test asserts on (``frequency_fit`` in tests/test_topology.py,
``estimator_agreement`` in tests/test_reinforce.py, ...) with seed s in place of the test's own,
and checks each of the test's thresholds. What a seed changes is written in each study's
``seed_means``. Writes benchmarks/results/seed_studies.json (the machine, the commit, per study:
each seed's statistics, and per threshold how many seeds held, the worst value and its seed),
keeping the studies not run this time, and prints each threshold's rate. The controlled
learning tests have their own study (benchmarks/controlled_seeds.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import operator
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from _common import RESULTS, machine_info

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent))  # the test modules import their helpers as tests._name

import test_fusion_training as fusion_tests
import test_latent as latent_tests
import test_reinforce as reinforce_tests
import test_stats as stats_tests
import test_topology as topology_tests

OUT = RESULTS / "seed_studies.json"
OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}

log = logging.getLogger("seed_studies")


class Check(NamedTuple):
    """One threshold: ``statistic op threshold``; ``asserted`` False for a claim measured to show
    why the test asserts another (one draw's p-value where the test asserts a median of three)."""

    statistic: str
    op: str
    threshold: float
    asserted: bool = True


class Study(NamedTuple):
    test: str  # the test's node id
    seed_means: str  # what seed s sets in place of the test's own seeds
    run: Callable[[int], dict[str, float]]  # seed -> statistics
    checks: tuple[Check, ...]


# ---------------------------------------------------------------------------- the studies


def _p_values(p_values: list[float], prefix: str) -> dict[str, float]:
    return {f"{prefix}first": p_values[0], f"{prefix}min": min(p_values), f"{prefix}median": statistics.median(p_values)}


SAMPLE_SEEDS = "sample seeds 1000 + s, 2000 + s, 3000 + s"


def _frequencies(seed: int) -> dict[str, float]:
    out = {}
    for mode in topology_tests.tp.MODES:
        p_values = topology_tests.frequency_fit(mode, seed, seed, (1000 + seed, 2000 + seed, 3000 + seed))[0]
        out.update(_p_values(p_values, f"p_value_{mode}_"))
    return out


def _dag_marginal(seed: int) -> dict[str, float]:
    return _p_values(topology_tests.dag_marginal_fit(seed, (1000 + seed, 2000 + seed, 3000 + seed)), "p_value_")


def _learning(steps: int, lr: float) -> Callable[[int], dict[str, float]]:
    return lambda seed: topology_tests.policy_learning(seed, steps=steps, lr=lr)


def _estimator(seed: int) -> dict[str, float]:
    got = reinforce_tests.estimator_agreement(seed)
    return {**got, "norm_ratio_error": abs(got["norm_ratio"] - 1.0)}


def _baselines(seed: int) -> dict[str, float]:
    none = [reinforce_tests.baseline_learning(s, "none") for s in (seed, seed + 1, seed + 2)]
    return {"rise_running": reinforce_tests.baseline_learning(seed, "running"), "rise_none": none[0],
            "rise_none_median_of_three": statistics.median(none)}  # fmt: skip


def _fuser(seed: int) -> dict[str, float]:
    lm = fusion_tests.tiny_model(seed=seed, initializer_range=0.2)
    got = fusion_tests.fuser_learning(lm, fusion_tests.informed_task(lm, range(16)),
                                      fusion_tests.informed_task(lm, range(100, 116)))  # fmt: skip
    return {"ratio": got["ratio"], "before": got["before"], "after": got["after"],
            "informed_preferred": float(got["preferred"] == 0), "silent_moved": float(got["silent_moved"])}  # fmt: skip


@functools.cache
def _embedded_model():
    return fusion_tests.load_model("smollm2-135m", dtype="float32")


def _embedded_fuser(seed: int) -> dict[str, float]:
    got = fusion_tests.embedded_fuser_learning(_embedded_model(), range(4 * seed, 4 * seed + 4),
                                               range(4 * seed + 50, 4 * seed + 54))  # fmt: skip
    return {"fall": got["fall"], "before": got["before"], "after": got["after"],
            "informed_preferred": float(got["preferred"] == 0)}  # fmt: skip


def _nucleus(seed: int) -> dict[str, float]:
    return {"max_error": float((latent_tests.nucleus_frequencies(seed) - latent_tests.NUCLEUS_WANT).abs().max())}


def _normal_theory(seed: int) -> dict[str, float]:
    got = stats_tests.normal_theory_fit(seed)
    return {**got, "width_error": abs(got["width_ratio"] - 1.0) / max(got["width_ratio"], 1.0)}


def _levels(seed: int) -> dict[str, float]:
    narrow, wide = stats_tests.level_widths(seed)
    return {"low_gap": narrow.low - wide.low, "high_gap": wide.high - narrow.high}


def _pairing(seed: int) -> dict[str, float]:
    got = stats_tests.pairing(seed)
    return {"paired_low": got["paired"].low, "unpaired_overlap": got["b"].high - got["a"].low}


TOPOLOGY_SEEDS = "make_task(s) and train(s): the task's embeddings, the policy's init and the draws"
STUDIES: dict[str, Study] = {
    "topology_frequencies": Study(
        "tests/test_topology.py::test_sampled_frequencies_match_exact_probabilities",
        f"mask_seed s, logits_seed s, {SAMPLE_SEEDS} (the test: 7, 3, and 11, 12, 13)", _frequencies,
        tuple(Check(f"p_value_{mode}_median", ">", 1e-3) for mode in topology_tests.tp.MODES)
        + tuple(Check(f"p_value_{mode}_{which}", ">", 1e-3, asserted=False)
                for mode in topology_tests.tp.MODES for which in ("first", "min"))),
    "topology_dag_marginal": Study(
        "tests/test_topology.py::test_dag_marginal_frequencies_in_full_mode",
        f"logits_seed s, {SAMPLE_SEEDS} (the test: 5, and 2, 3, 4)", _dag_marginal,
        (Check("p_value_median", ">", 1e-3), Check("p_value_first", ">", 1e-3, asserted=False),
         Check("p_value_min", ">", 1e-3, asserted=False))),
    "topology_learning": Study(
        "tests/test_topology.py::test_training_learns_whom_to_listen_to_at_the_product_lr",
        f"{TOPOLOGY_SEEDS} (the test: 0, 1, 2); 40 steps at lr 0.1", _learning(40, topology_tests.PRODUCT_LR),
        (Check("start", "<", 0.5), Check("end", ">=", 0.9), Check("max_prob", ">", 0.95))),
    "topology_learning_smaller_lr": Study(
        "tests/test_topology.py::test_training_learns_at_a_smaller_lr",
        f"{TOPOLOGY_SEEDS} (the test: 0); 60 steps at lr 0.1 / 3", _learning(60, topology_tests.PRODUCT_LR / 3),
        (Check("start", "<", 0.5), Check("end", ">=", 0.9))),
    "reinforce_estimator": Study(
        "tests/test_reinforce.py::test_estimator_is_unbiased_against_the_exact_gradient",
        "make_task(s) and the generator of the policy's init and the draws (the test: 0)", _estimator,
        (Check("cosine", ">", 0.95), Check("norm_ratio_error", "<=", 0.15))),
    "reinforce_baselines": Study(
        "tests/test_reinforce.py::test_training_improves_with_every_baseline",
        f"{TOPOLOGY_SEEDS} (the test: 0); 30 steps at lr 0.1, mode mesh; the median over seeds s, s + 1, s + 2 "
        "(the test: 0, 1, 2)", _baselines,
        (Check("rise_running", ">", 0.3), Check("rise_none_median_of_three", ">", 0.3),
         Check("rise_none", ">", 0.3, asserted=False))),
    "fuser_learning": Study(
        "tests/test_fusion_training.py::test_training_lowers_the_heldout_objective_and_leaves_the_model_alone",
        "tiny_model(seed=s, initializer_range=0.2): the random model, hence the informed targets (the test: 0)",
        _fuser, (Check("ratio", "<", 0.85), Check("informed_preferred", ">=", 1.0), Check("silent_moved", "<=", 0.0))),
    "fuser_learning_embedded": Study(
        "tests/test_fusion_training.py::test_training_on_the_embedded_model_raises_the_heldout_likelihood_of_true_answers",
        "the questions: train range(4s, 4s + 4), held out range(4s + 50, 4s + 54) (the test: s = 0); "
        "nothing else is random", _embedded_fuser, (Check("fall", ">", 0.1), Check("informed_preferred", ">=", 1.0))),
    "nucleus_frequencies": Study(
        "tests/test_latent.py::test_sample_nucleus_by_enumeration",
        "the generator of the 4000 draws (the test: 0)", _nucleus, (Check("max_error", "<=", 0.03),)),
    "stats_normal_theory": Study(
        "tests/test_stats.py::test_on_a_large_normal_sample_it_agrees_with_normal_theory",
        "random.Random(s) draws the sample (the test: 0)", _normal_theory,
        (Check("width_error", "<=", 0.1), Check("centre_offset", "<=", 0.1))),
    "stats_coverage": Study(
        "tests/test_stats.py::test_it_covers_the_true_mean_of_a_skewed_distribution_about_95_percent_of_the_time",
        "random.Random(s) draws the 1000 samples (the test: 0)", lambda seed: {"rate": stats_tests.coverage(seed)},
        (Check("rate", ">=", 0.89), Check("rate", "<=", 0.985))),
    "stats_levels": Study(
        "tests/test_stats.py::test_a_wider_level_gives_a_wider_interval",
        "random.Random(s) draws the sample (the test: 2)", _levels,
        (Check("low_gap", ">", 0.0), Check("high_gap", ">", 0.0))),
    "stats_pairing": Study(
        "tests/test_stats.py::test_pairing_removes_the_spread_between_questions",
        "random.Random(s) draws difficulties and noise (the test: 4)", _pairing,
        (Check("paired_low", ">", 0.0), Check("unpaired_overlap", ">", 0.0))),
}  # fmt: skip


# ---------------------------------------------------------------------------- running


def summarize(check: Check, runs: list[dict]) -> dict:
    """How many runs hold ``check``, and the worst value (the one nearest failing, or failing most)."""
    values = [(r[check.statistic], r["seed"]) for r in runs]
    worst_value, worst_seed = (min if check.op in (">", ">=") else max)(values)
    held = sum(OPS[check.op](v, check.threshold) for v, _ in values)
    return {**check._asdict(), "held": held, "of": len(values), "worst": worst_value, "worst_seed": worst_seed}


def study(name: str, seeds: list[int]) -> dict:
    """Runs study ``name`` on every seed: its runs (statistics and seconds) and each check's rate."""
    spec = STUDIES[name]
    runs = []
    started = time.perf_counter()
    for seed in seeds:
        t = time.perf_counter()
        runs.append({"seed": seed, **spec.run(seed), "seconds": round(time.perf_counter() - t, 2)})
    checks = [summarize(c, runs) for c in spec.checks]
    return {"test": spec.test, "seed_means": spec.seed_means, "seeds": seeds, "runs": runs, "checks": checks,
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(STUDIES), default=sorted(STUDIES),
                        help="the studies to run (default: all)")  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(100, 120)))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result["machine"] = machine_info()
    studies = result.setdefault("studies", {})
    for name in args.only:
        studies[name] = study(name, args.seeds)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        for c in studies[name]["checks"]:
            log.info("%-28s %-28s %-2s %-6g held %2d/%d  worst %.4g (seed %d)%s", name, c["statistic"], c["op"],
                     c["threshold"], c["held"], c["of"], c["worst"], c["worst_seed"],
                     "" if c["asserted"] else "  (not asserted)")  # fmt: skip
        log.info("%-30s %.1f s", name, studies[name]["seconds"])


if __name__ == "__main__":
    main()
