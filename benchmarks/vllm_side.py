"""vLLM's side of decode.py's side-by-side section; runs in vLLM's own virtual environment.

    <vllm-venv>/bin/python benchmarks/vllm_side.py --model DIR --prompts prompts.json \
        --dtype float32 --rows 1 8 --tokens 128 --reps 3

Made by ``benchmarks/vllm_cpu_env.sh``; decode.py calls it, a user need not. It imports
nothing of gcache (vLLM pins its own transformers). ``prompts.json`` holds token ids (the chat
template already applied by decode.py, so both sides read the same tokens). For each row count
the first ``rows`` prompts are generated as one batch with vLLM's offline engine, greedy,
exactly ``--tokens`` new tokens (end of sequence ignored), after one warm-up batch; the wall
time of ``LLM.generate`` (prefill included) is taken ``--reps`` times. Prints one JSON object:
per row count the seconds of each repetition and the tokens each row got.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a transformers model folder (config, weights, tokenizer)")
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    with open(args.prompts) as f:
        prompts = json.load(f)
    if max(args.rows) > len(prompts):
        raise SystemExit(f"--rows: expected at most {len(prompts)} rows (the prompts given), got {max(args.rows)}")

    import vllm
    from vllm import LLM, SamplingParams

    longest = max(len(p) for p in prompts) + args.tokens
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=longest + 16, seed=0,
              max_num_seqs=max(args.rows), enforce_eager=False)  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    out = {"vllm": vllm.__version__, "dtype": args.dtype, "tokens": args.tokens, "rows": {}}
    for rows in args.rows:
        batch = [{"prompt_token_ids": p} for p in prompts[:rows]]
        llm.generate(batch, params, use_tqdm=False)  # warm-up
        seconds, got = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            done = llm.generate(batch, params, use_tqdm=False)
            seconds.append(time.perf_counter() - t0)
            got = [list(d.outputs[0].token_ids) for d in done]
        out["rows"][str(rows)] = {"seconds": seconds, "new_tokens": [len(g) for g in got], "token_ids": got}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
