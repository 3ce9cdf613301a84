"""Measure how far batched and row-by-row runs of the bf16 / int8 variants drift apart.

    python tests/quant_spread.py                      # this process's kernels and 1 thread
    MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 python tests/quant_spread.py --threads 2

Prints, per architecture, variant and tiny-model seed, the largest |batched - one by one| /
(1 + |value|) over the caches' real positions and the share of elements beyond the float32
tolerance; tests/test_quant.py's FLIP_TOL and FLIP_SHARE are 3x the largest seen.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gcache.core.latent import rollout  # noqa: E402
from gcache.io.models.local import tiny_model  # noqa: E402
from tests._latent_helpers import QUESTIONS, batch_drift, conversations  # noqa: E402
from tests.test_quant import BATCH_TOL  # noqa: E402


def spread(arch: str, weights: str, seed: int) -> tuple[float, float]:
    lm = tiny_model(arch, seed=seed, weights=weights)
    ids, mask = lm.encode_chat(conversations())
    batched = rollout(lm.fns, lm.realign, ids, mask, latent_steps=2)
    alone = [rollout(lm.fns, lm.realign, *lm.encode_chat(conversations([q])), latent_steps=2).cache for q in QUESTIONS]
    return batch_drift(batched.cache, alone, BATCH_TOL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("arch   weights seed  max_ratio  share_beyond_float32_tol")
    for arch in ("llama", "qwen3"):
        for weights in ("bf16", "int8"):
            for seed in range(args.seeds):
                worst, share = spread(arch, weights, seed)
                print(f"{arch:6} {weights:7} {seed:4}  {worst:9.3g}  {share:.4f}")


if __name__ == "__main__":
    main()
