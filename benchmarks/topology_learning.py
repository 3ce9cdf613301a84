"""Learning the communication topology on the synthetic "whom to listen to" task (no LLM).

Trains the GCN policy by REINFORCE + Adam (default lr 0.1, the product's and the
seed system's) with and without a baseline, for several seeds, and writes
benchmarks/results/topology_learning.json:

    steps, seeds, with_baseline / without_baseline / running_baseline:
        final_expected_reward [per seed], expected_reward_curve [per seed],
        grad_variance (trace of the covariance of one batch's gradient estimate at
        the initial policy, mean over seeds), grad_mean_sq_norm, and the same after
        --mid-training-steps steps (grad_variance_mid_training)
    smaller_lr: the same training (batch baseline) at --compare-lr (default: a third of --lr)
    torch version, machine info

The expected reward is exact (the probability of a right answer, by enumerating
every graph). The task is described in tests/_topology_helpers.py.

    python benchmarks/topology_learning.py            # full run (a few minutes on 2 shared cores)
    python benchmarks/topology_learning.py --lr 0.03  # another learning rate
    python benchmarks/topology_learning.py --smoke    # a few steps, for CI
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import machine_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import _topology_helpers as helpers  # noqa: E402

from gcache.core import reinforce  # noqa: E402
from gcache.core import topology as tp  # noqa: E402

log = logging.getLogger("topology_learning")

VARIANTS = {"with_baseline": "batch", "without_baseline": "none", "running_baseline": "running"}


def gradient_variance(task: helpers.SyntheticTask, seed: int, *, baseline: str, batch_size: int,
                      estimates: int, noise: float, lr: float, trained_steps: int = 0) -> tuple[float, float]:
    """Trace of the covariance, and squared norm of the mean, of `estimates` independent
    one-batch REINFORCE gradients (question 0) at the policy after `trained_steps` steps
    of training with the batch baseline (0: the initial policy)."""
    features = helpers.task_features(task)[0]
    params = helpers.train(seed, task, steps=trained_steps, batch_size=batch_size, lr=lr, baseline="batch",
                           noise=noise).params
    sample_gen = torch.Generator().manual_seed(10_000 + seed)
    flat = []
    for _ in range(estimates):
        topology, rewards = helpers.sample_rewards(params, task, features, batch_size, noise, sample_gen)
        b = reinforce.batch_baseline(rewards) if baseline == "batch" else 0.0
        grads = helpers.policy_gradient(params, task, features, topology, rewards, b)
        flat.append(torch.cat([grad.flatten() for grad in grads]))
    stacked = torch.stack(flat).double()
    return float(stacked.var(0).sum()), float(stacked.mean(0).square().sum())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.1, help="Adam learning rate (the product's default)")
    parser.add_argument("--compare-lr", type=float, default=None,
                        help="also train (batch baseline) at this smaller lr (default: a third of --lr)")
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--mode", default="full", choices=tp.MODES)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--variance-estimates", type=int, default=64)
    parser.add_argument("--mid-training-steps", type=int, default=10,
                        help="also measure the gradient variance after this many training steps")
    parser.add_argument("--smoke", action="store_true", help="a few steps and one seed (CI)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "topology_learning.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.seeds, args.variance_estimates, args.eval_every = 3, args.seeds[:1], 4, 1
        args.mid_training_steps = 2
    if args.compare_lr is None:
        args.compare_lr = args.lr / 3
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    result: dict = {
        "task": "whom_to_listen_to",
        "num_agents": 4,
        "mode": args.mode,
        "steps": args.steps,
        "seeds": args.seeds,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "reward_noise_std": args.noise,
        "eval_every": args.eval_every,
        "smoke": args.smoke,
        "torch": torch.__version__,
        "machine": machine_info(),
    }
    step_seconds: list[float] = []
    for key, baseline in VARIANTS.items():
        finals, curves, initial = [], [], []
        for seed in args.seeds:
            task = helpers.make_task(seed, mode=args.mode)
            start = time.perf_counter()
            run = helpers.train(seed, task, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                baseline=baseline, noise=args.noise, eval_every=args.eval_every)
            step_seconds.append((time.perf_counter() - start) / max(args.steps, 1))
            initial.append(run.expected_rewards[0])
            finals.append(run.expected_rewards[-1])
            curves.append([round(r, 4) for r in run.expected_rewards])
            log.info("%s seed %d: expected reward %.3f -> %.3f", key, seed, initial[-1], finals[-1])
        entry = {"baseline": baseline, "initial_expected_reward": initial, "final_expected_reward": finals,
                 "expected_reward_curve": curves}
        if baseline != "running":  # at the initial policy the running baseline is still 0: same as "none"
            for suffix, trained in (("", 0), ("_mid_training", args.mid_training_steps)):
                variances = [gradient_variance(helpers.make_task(s, mode=args.mode), s, baseline=baseline,
                                               batch_size=args.batch_size, estimates=args.variance_estimates,
                                               noise=args.noise, lr=args.lr, trained_steps=trained)
                             for s in args.seeds]
                entry[f"grad_variance{suffix}"] = statistics.mean(v for v, _ in variances)
                entry[f"grad_variance{suffix}_per_seed"] = [v for v, _ in variances]
                entry[f"grad_mean_sq_norm{suffix}"] = statistics.mean(m for _, m in variances)
        result[key] = entry
    smaller = []
    for seed in args.seeds:
        run = helpers.train(seed, helpers.make_task(seed, mode=args.mode), steps=args.steps,
                            batch_size=args.batch_size, lr=args.compare_lr, baseline="batch", noise=args.noise)
        smaller.append(run.expected_rewards[-1])
        log.info("smaller lr %g seed %d: expected reward %.3f -> %.3f", args.compare_lr, seed,
                 run.expected_rewards[0], smaller[-1])
    result["smaller_lr"] = {"lr": args.compare_lr, "baseline": "batch", "final_expected_reward": smaller}
    result["median_seconds_per_step"] = statistics.median(step_seconds)
    with_var = result["with_baseline"]["grad_variance"]
    without_var = result["without_baseline"]["grad_variance"]
    result["grad_variance_ratio_without_over_with"] = without_var / with_var if with_var > 0 else None
    with_mid = result["with_baseline"]["grad_variance_mid_training"]
    without_mid = result["without_baseline"]["grad_variance_mid_training"]
    result["grad_variance_mid_training_ratio_without_over_with"] = without_mid / with_mid if with_mid > 0 else None
    result["mid_training_steps"] = args.mid_training_steps
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", args.out)
    return result


if __name__ == "__main__":
    main()
