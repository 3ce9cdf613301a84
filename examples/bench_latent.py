"""Microbenchmark one latent step against one decode step with torch.utils.benchmark,
across dtypes and thread counts.

Both statements start from the same prefilled cache of ``cache_len`` positions
(``fns.to_state`` wraps it without copying, and a step never writes into it, so
every repetition sees the same length). A latent step is the backbone forward of
one realigned hidden state; a decode step is the backbone forward of one token
embedding plus the lm_head. ``torch.utils.benchmark`` sets the thread count per
measurement, repeats until ``min_run_time`` has passed, and ``Compare`` prints
medians side by side. Quote ratios measured in one run, not absolute times from
a busy machine.

    python examples/bench_latent.py           # embedded SmolLM2-135M, float32 vs bfloat16, 1 and 2 threads
    python examples/bench_latent.py --smoke   # tiny random model, very short runs
"""

import argparse
import copy
import json

import torch
from torch.utils import benchmark

import gcache
from gcache.io.models.local import from_hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random model, very short runs")
    parser.add_argument("--cache-len", type=int, default=256)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--json", help="also write the medians (ms) to this file")
    args = parser.parse_args()
    cache_len, min_run_time = (32, 0.05) if args.smoke else (args.cache_len, args.min_run_time)

    base = gcache.tiny_model() if args.smoke else None
    results, medians = [], {}
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        if args.smoke:  # the same tiny model's weights in another dtype
            lm = from_hf(base.name, copy.deepcopy(base.model).to(dtype), base.tokenizer)
        else:
            lm = gcache.load_model(dtype=dtype_name)
        ids = torch.randint(100, 1000, (1, cache_len), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            pre = gcache.rollout(lm.fns, lm.realign, ids, torch.ones_like(ids, dtype=torch.bool), latent_steps=0)
        env = {
            "gcache": gcache,
            "lm": lm,
            "cache": pre.cache,  # [L, 1, H, cache_len, D]
            "hidden": pre.hidden.to(dtype),  # [1, d]
            "token": ids[:, -1:],  # [1, 1]
        }
        stmts = {
            "latent_step": "gcache.latent_step(lm.fns, lm.realign, hidden, lm.fns.to_state(cache), None, None)",
            "decode_step": "lm.fns.logits(lm.fns.forward(lm.fns.embed(token), None, None, lm.fns.to_state(cache))[0])",
        }
        for threads in args.threads:
            for label, stmt in stmts.items():
                timer = benchmark.Timer(
                    stmt=f"with torch.no_grad(): {stmt}",
                    globals={**env, "torch": torch},
                    label=f"one step on a cache of {cache_len} positions ({lm.name})",
                    sub_label=label,
                    description=dtype_name,
                    num_threads=threads,
                )
                m = timer.blocked_autorange(min_run_time=min_run_time)
                results.append(m)
                medians[f"{label}/{dtype_name}/{threads}t"] = round(m.median * 1e3, 3)
    compare = benchmark.Compare(results)
    compare.trim_significant_figures()
    compare.print()
    print(json.dumps({"median_ms": medians}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cache_len": cache_len, "median_ms": medians}, f, indent=2)


if __name__ == "__main__":
    main()
