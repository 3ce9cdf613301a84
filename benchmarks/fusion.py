"""Cache fusion time against one decode step of the receiver on the fused cache.

    python benchmarks/fusion.py            # embedded model; k = 2, 4, 8 predecessors; 10 and 200 positions
    python benchmarks/fusion.py --smoke    # tiny random model, few repetitions (CI; writes to a temp file)

For every number of predecessors k, cache length and mode (concat, weighted, learned), k caches
of the model's shape ([L, 1, H, cache_len, D], the model's dtype) are fused, and one decode step
is run on the fused cache: a token read at the cache's next position with the explicit mask and
positions a receiver passes, through the backbone and lm_head. A concat cache holds
k * cache_len positions, so its decode step reads a longer cache. The two sides alternate (the
order rotating every repetition) after a warm-up; medians are written, in ms, to
benchmarks/results/fusion.json. The target is fuse_ms < decode_step_ms.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import add_micro_args, machine_info, micro_setup

from gcache.core.cache import KVCache
from gcache.core.fusion import MODES, FuserConfig, fuse, init_fuser

log = logging.getLogger("benchmarks.fusion")
ROOT = Path(__file__).resolve().parent
KS = (2, 4, 8)
LENGTHS = (10, 200)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_caches(fns, k: int, cache_len: int, generator: torch.Generator) -> list[KVCache]:
    """k caches of the model's shape; their contents do not change the cost of fusing or reading them."""
    shape = (fns.num_layers, 1, fns.num_kv_heads, cache_len, fns.head_dim)
    out = []
    for i in range(k):
        keys = torch.randn(shape, generator=generator).to(device=fns.device, dtype=fns.dtype)
        values = torch.randn(shape, generator=generator).to(device=fns.device, dtype=fns.dtype)
        mask = torch.ones(1, cache_len, dtype=torch.bool, device=fns.device)
        # latent-only caches of agents whose prompts differ in length end at different positions
        next_pos = torch.tensor([cache_len + 7 * i], device=fns.device)
        out.append(KVCache(keys, values, mask, next_pos))
    return out


def measure(lm, k: int, cache_len: int, mode: str, reps: int, warmup: int, generator: torch.Generator) -> dict:
    """Medians in ms of fuse() and of one decode step on the fused cache."""
    fns, device = lm.fns, lm.device
    caches = random_caches(fns, k, cache_len, generator)
    params = init_fuser(FuserConfig(fns.num_layers, max(k, 1), mode=mode))
    params = type(params)(*(t.to(device) for t in params))
    weights = (torch.rand(k, generator=generator) * 0.8 + 0.1).to(device)
    sources = list(range(k))
    fused = fuse(params, caches, weights, mode=mode, sources=sources)
    token = torch.tensor([[lm.pad_token_id]], device=device)
    mask = torch.cat([fused.mask, fused.mask.new_ones(1, 1)], dim=1)  # [1, T + 1]
    positions = fused.next_pos[:, None]  # [1, 1]

    def fuse_once():
        fuse(params, caches, weights, mode=mode, sources=sources)

    def decode_once():
        state = fns.to_state(fused)  # views of the fused cache: the forward appends to its own copy
        hidden, _ = fns.forward(fns.embed(token), mask, positions, state)
        fns.logits(hidden[:, -1])

    sides = {"fuse": fuse_once, "decode": decode_once}
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for i in range(warmup + reps):
        for name in names[i % 2 :] + names[: i % 2]:
            _sync(device)
            start = time.perf_counter()
            sides[name]()
            _sync(device)
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    fuse_ms, decode_ms = statistics.median(times["fuse"]), statistics.median(times["decode"])
    return {
        "k": k,
        "cache_len": cache_len,
        "mode": mode,
        "fused_len": fused.seq_len,
        "fuse_ms": fuse_ms,
        "decode_step_ms": decode_ms,
        "ratio": fuse_ms / decode_ms,
        "reps": reps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_micro_args(parser, reps=15)
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS), help="numbers of predecessors")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="positions per cache")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default: benchmarks/results/fusion.json; with --smoke a temp file)")
    args = parser.parse_args(argv)
    lm, reps, warmup = micro_setup(args)
    if args.smoke:
        out = args.out or Path(tempfile.gettempdir()) / "gcache_fusion_smoke.json"
    else:
        out = args.out or ROOT / "results" / "fusion.json"
    generator = torch.Generator().manual_seed(args.seed)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    configs = [(k, n, m) for k in args.ks for n in args.lengths for m in args.modes]
    results = []
    from rich.progress import Progress

    with torch.inference_mode(), Progress(transient=True) as progress:
        task = progress.add_task("fusion", total=len(configs))
        for k, n, mode in configs:
            r = measure(lm, k, n, mode, reps, warmup, generator)
            log.info("k %d  cache_len %4d  %-8s  fuse %7.3f ms  decode step %7.2f ms  ratio %.3f",
                     k, n, mode, r["fuse_ms"], r["decode_step_ms"], r["ratio"])
            results.append(r)
            progress.advance(task)
    report = {
        "model": lm.name,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device": str(lm.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "machine": {**machine_info(), "load_average_start": load_start},
        "smoke": args.smoke,
        "all_below_one_decode_step": all(r["fuse_ms"] < r["decode_step_ms"] for r in results),
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
