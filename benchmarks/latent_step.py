"""One gcache latent step against one bare transformers forward of one input embedding, same cache.

    python benchmarks/latent_step.py            # embedded model, cache lengths 128, 512, 2048
    python benchmarks/latent_step.py --smoke    # tiny random model, few repetitions (CI)

Both sides run on the same DynamicCache of ``cache_len`` positions, interleaved
(the order rotating every repetition) after a warm-up, and the cache is cropped back
after every call so each repetition sees the same length. The "bare" call is
``model.model(inputs_embeds=e, cache=c, use_cache=True)`` with no mask and no
positions, the least a latent step can cost. gcache's step is what ``rollout``
runs on an unpadded cache (the realignment product, then the same forward);
the step with an explicit 2D mask and positions, which rollout runs for padded
batches and sliced caches, is timed as ``gcache_masked_ms``. For reference, the full
``LlamaForCausalLM`` forward with all hidden states (what LatentMAS runs per
latent step) is timed too. Medians are written to benchmarks/results/latent_step.json.
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
from _common import add_micro_args, machine_info, micro_setup

from gcache.core.latent import latent_step, prefill
from gcache.io.models.hf import backbone
from gcache.io.models.local import load_model

log = logging.getLogger("benchmarks.latent_step")
ROOT = Path(__file__).resolve().parent
LENGTHS = (128, 512, 2048)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(lm, cache_len: int, reps: int, warmup: int, generator: torch.Generator) -> dict:
    """Medians in ms of the gcache latent step, the bare backbone forward and the full forward."""
    fns, device = lm.fns, lm.device
    ids = torch.randint(0, lm.model.config.vocab_size, (1, cache_len), generator=generator).to(device)
    pre = prefill(fns, ids, torch.ones_like(ids, dtype=torch.bool))
    state, hidden = pre.state, pre.hidden[:, -1]
    mask = torch.ones(1, cache_len + 1, dtype=torch.bool, device=device)
    pos = pre.next_pos[:, None]
    embeds = torch.randn(1, 1, fns.hidden_size, generator=generator).to(device=device, dtype=lm.dtype)
    body = backbone(lm.model)

    # What rollout passes per step on an unpadded cache whose positions continue at its length.
    dense = bool(pre.mask.all()) and bool((pre.next_pos == cache_len).all())
    assert dense

    def gcache_step():
        latent_step(fns, lm.realign, hidden, state, None, None)

    def gcache_masked_step():
        latent_step(fns, lm.realign, hidden, state, mask, pos)

    def bare_step():
        body(inputs_embeds=embeds, cache=state, use_cache=True)

    def full_step():
        lm.model(inputs_embeds=embeds, cache=state, use_cache=True, output_hidden_states=True)

    steps = {"gcache": gcache_step, "bare": bare_step, "gcache_masked": gcache_masked_step, "full": full_step}
    times: dict[str, list[float]] = {k: [] for k in steps}
    names = list(steps)
    for i in range(warmup + reps):
        # Rotate the order so that no side always runs first (or right after the slow full forward).
        for name in names[i % len(names) :] + names[: i % len(names)]:
            fn = steps[name]
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            elapsed = (time.perf_counter() - start) * 1000
            state.crop(-1)
            if i >= warmup:
                times[name].append(elapsed)
    assert state.get_seq_length() == cache_len
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "cache_len": cache_len,
        "gcache_ms": med["gcache"],
        "bare_ms": med["bare"],
        "ratio": med["gcache"] / med["bare"],
        "gcache_masked_ms": med["gcache_masked"],
        "masked_ratio": med["gcache_masked"] / med["bare"],
        "full_forward_ms": med["full"],
        "reps": reps,
    }


def measure_dtypes(model: str, dtypes: list[str], cache_len: int, rows: list[int], reps: int, warmup: int,
                   generator: torch.Generator) -> list[dict]:
    """Per dtype and batch size, dtypes interleaved, medians: one greedy decode step (full forward
    of one token per row, lm_head included) on a cache of ``cache_len`` positions, and one prefill
    of ``cache_len`` tokens per row (fewer repetitions: it is long). The measurement behind the
    CPU default dtype."""
    lms = {d: load_model(model, device="cpu", dtype=d) for d in dtypes}
    out = []
    for n in rows:
        ids = torch.randint(0, 49152, (n, cache_len), generator=generator)
        mask = torch.ones_like(ids, dtype=torch.bool)
        token = torch.randint(0, 49152, (n, 1), generator=generator)
        states = {d: prefill(lm.fns, ids, mask).state for d, lm in lms.items()}
        decode: dict[str, list[float]] = {d: [] for d in dtypes}
        fill: dict[str, list[float]] = {d: [] for d in dtypes}
        for i in range(warmup + reps):
            for d in dtypes[i % len(dtypes) :] + dtypes[: i % len(dtypes)]:
                start = time.perf_counter()
                lms[d].model(input_ids=token, cache=states[d], use_cache=True).logits[:, -1].argmax(-1)
                elapsed = (time.perf_counter() - start) * 1000
                states[d].crop(-1)
                if i >= warmup:
                    decode[d].append(elapsed)
                if i < warmup or i - warmup < max(3, reps // 4):
                    start = time.perf_counter()
                    prefill(lms[d].fns, ids, mask)
                    elapsed = (time.perf_counter() - start) * 1000
                    if i >= warmup:
                        fill[d].append(elapsed / n)
        out += [{"dtype": d, "rows": n, "cache_len": cache_len, "decode_ms": statistics.median(decode[d]),
                 "prefill_ms_per_row": statistics.median(fill[d]), "reps": reps} for d in dtypes]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_micro_args(parser, reps=20)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--decode-dtypes", nargs="*", default=None, metavar="DTYPE",
                        help="also time one decode step and one prefill per dtype on CPU (e.g. float32 bfloat16)")
    parser.add_argument("--dtype-rows", type=int, nargs="+", default=[1, 8], help="batch sizes of --decode-dtypes")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "latent_step.json")
    args = parser.parse_args(argv)
    lm, reps, warmup = micro_setup(args)
    generator = torch.Generator().manual_seed(args.seed)
    results = []
    with torch.inference_mode():
        for n in args.lengths:
            r = measure(lm, n, reps, warmup, generator)
            log.info("cache_len %5d  gcache %7.2f ms  bare %7.2f ms  ratio %.3f  "
                     "(explicit mask+positions %7.2f ms, ratio %.3f)  full forward %7.2f ms",
                     n, r["gcache_ms"], r["bare_ms"], r["ratio"], r["gcache_masked_ms"], r["masked_ratio"],
                     r["full_forward_ms"])
            results.append(r)
    decode = []
    if args.decode_dtypes and not args.smoke:
        with torch.inference_mode():
            decode = measure_dtypes(args.model, args.decode_dtypes, 256, args.dtype_rows, reps, warmup, generator)
        for r in decode:
            log.info("%-8s rows %d cache_len %d  decode step %7.2f ms  prefill %7.2f ms/row", r["dtype"], r["rows"],
                     r["cache_len"], r["decode_ms"], r["prefill_ms_per_row"])
    report = {
        "model": lm.name,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device": str(lm.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "machine": machine_info(),
        "smoke": args.smoke,
        "results": results,
    }
    if decode:
        report["decode"] = decode
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
