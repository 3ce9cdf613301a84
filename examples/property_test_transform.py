"""Property-test a cache transform of your own with gcache.testing's strategies.

The transform: quantize every key vector to int8 with one scale per vector
(absmax / 127) and dequantize it back, to halve a cache's memory at some loss.
Two properties are checked with hypothesis:

1. the round trip moves no key by more than half a quantization step, keeps the
   values, mask and positions, and keeps the shapes and dtype: it HOLDS;
2. "quantization never flips or zeroes a key's sign": hypothesis REFUTES it (a
   key much smaller than its vector's largest rounds to 0) and prints the shrunk
   counterexample.

    python examples/property_test_transform.py           # 300 examples per property
    python examples/property_test_transform.py --smoke   # 40
"""

import argparse
import sys

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gcache import KVCache, validate
from gcache.testing import assert_caches_close, kv_caches


def quantize_keys(cache: KVCache) -> KVCache:
    """Keys through int8 and back, one scale per [L, B, H, T] vector; values, mask, positions untouched."""
    k = cache.keys.float()  # [L, B, H, T, D]
    absmax = k.abs().amax(dim=-1, keepdim=True)  # [L, B, H, T, 1]
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))  # an all-zero vector stays zero
    q = torch.round(k / scale).clamp(-127, 127).to(torch.int8)  # [L, B, H, T, D]
    return cache._replace(keys=(q.float() * scale).to(cache.keys.dtype))


def run(name: str, test) -> bool:
    """Run one hypothesis test; print whether it held or the shrunk counterexample it found."""
    try:
        test()
    except AssertionError as err:
        print(f"[refuted] {name}")
        for note in getattr(err, "__notes__", []):
            print("    " + note.replace("\n", "\n    "))
        print(f"    error: {str(err).splitlines()[0]}")
        return False
    print(f"[holds]   {name}")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="fewer examples")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # derandomize: the same examples, hence the same counterexample, on every run.
    config = settings(max_examples=40 if args.smoke else 300, deadline=None, database=None, derandomize=True)

    @config
    @given(kv_caches(dtype=torch.float32))
    def round_trip_is_within_half_a_step(cache: KVCache) -> None:
        out = validate(quantize_keys(cache))
        half_step = cache.keys.abs().amax(dim=-1, keepdim=True) / 127 / 2  # [L, B, H, T, 1]
        assert bool(((out.keys - cache.keys).abs() <= half_step * (1 + 1e-5) + 1e-7).all())
        assert_caches_close(out._replace(keys=cache.keys), cache, atol=0.0, rtol=0.0)

    # Small caches drawn element by element, so the counterexample shows the numbers themselves.
    @config
    @given(kv_caches((1, 1, 1, st.integers(1, 4)), min_len=1, max_len=2, dtype=torch.float32,
                     elements=st.floats(-100, 100, width=32)))
    def signs_survive(cache: KVCache) -> None:
        out = quantize_keys(cache)
        assert torch.equal(torch.sign(out.keys), torch.sign(cache.keys)), (
            f"signs differ: keys {cache.keys.flatten().tolist()} -> {out.keys.flatten().tolist()}"
        )

    held = run("round trip moves each key by at most half a step", round_trip_is_within_half_a_step)
    refuted = not run("quantization keeps every key's sign", signs_survive)
    sys.exit(0 if held and refuted else 1)


if __name__ == "__main__":
    main()
