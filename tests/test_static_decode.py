"""The static-cache decode step (gcache.core.latent.StaticFns, gcache.io.models.hf.static_fns): a
cache preallocated to the decoding's bound, every step the same shapes. It must decode what
the dynamic path decodes (tokens, lengths, the cache it returns) under padding, an incoming
cache, EOS, the stop rule and sampling, and never write into its inputs."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from gcache.core.latent import Decoding, decode_tokens, generate, prefill, rollout
from gcache.io.models.hf import bucket_capacity, static_fns
from gcache.io.models.local import tiny_model
from gcache.io.runner.config import build_config
from gcache.io.runner.pipeline import load_local
from tests._latent_helpers import QUESTIONS, conversations, real_positions

TOL = 2e-4  # the static step attends over masked spare columns: the same sums in another blocking


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny(request):
    return tiny_model(request.param, seed=0)


def _static(lm):
    return lm.fns._replace(static=static_fns(lm.model))


def _same(a, b) -> None:
    """Two Generations agree: tokens, lengths, stop flags, and the cache's real positions."""
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.lengths, b.lengths) and torch.equal(a.stopped, b.stopped)
    assert torch.equal(a.cache.next_pos, b.cache.next_pos)
    for row in range(a.tokens.shape[0]):
        for got, want in zip(real_positions(a.cache, row), real_positions(b.cache, row)):
            assert got.shape == want.shape
            assert torch.allclose(got, want, atol=TOL, rtol=TOL), float((got - want).abs().max())


def test_static_decoding_equals_dynamic_on_a_padded_batch_with_eos(tiny):
    ids, mask = tiny.encode_chat(conversations())  # three prompts of different lengths
    free = generate(tiny.fns, ids, mask, Decoding(10), eos_token_ids=[])
    eos = [int(free.tokens[0, 1]), int(free.tokens[1, 3])]  # rows 0 and 1 end early, row 2 runs on
    for decoding in (Decoding(10), Decoding(0), Decoding(1)):
        _same(generate(_static(tiny), ids, mask, decoding, eos_token_ids=eos),
              generate(tiny.fns, ids, mask, decoding, eos_token_ids=eos))


def test_static_decoding_equals_dynamic_on_an_incoming_cache_and_leaves_it_intact(tiny):
    ids, mask = tiny.encode_chat(conversations())
    head = rollout(tiny.fns, tiny.realign, ids, mask, latent_steps=3).cache
    before = [t.clone() for t in head]
    q_ids, q_mask = tiny.encode_chat(conversations(list(reversed(QUESTIONS))))
    a = generate(_static(tiny), q_ids, q_mask, Decoding(7), cache=head, eos_token_ids=tiny.eos_token_ids)
    b = generate(tiny.fns, q_ids, q_mask, Decoding(7), cache=head, eos_token_ids=tiny.eos_token_ids)
    _same(a, b)
    for got, want in zip(head, before):
        assert torch.equal(got, want)


def test_static_decoding_keeps_the_stop_rule_and_seeded_sampling(tiny):
    ids, mask = tiny.encode_chat(conversations())

    def stop(tokens, running):
        n = tokens.shape[1]
        return torch.tensor([n == 3, False, n == 6])

    greedy = Decoding(8, stop=stop)
    _same(generate(_static(tiny), ids, mask, greedy, eos_token_ids=[]), generate(tiny.fns, ids, mask, greedy, eos_token_ids=[]))
    sampled = Decoding(8, temperature=1.0, top_p=0.9, seed=5)
    _same(generate(_static(tiny), ids, mask, sampled, eos_token_ids=[]), generate(tiny.fns, ids, mask, sampled, eos_token_ids=[]))


def test_every_static_step_has_the_same_shapes(tiny):
    ids, mask = tiny.encode_chat(conversations())
    fns = _static(tiny)
    shapes = []

    def forward(embeds, attention_mask, position_ids, state):
        shapes.append((tuple(embeds.shape), tuple(attention_mask.shape), tuple(position_ids.shape)))
        return fns.static.forward(embeds, attention_mask, position_ids, state)

    free = generate(tiny.fns, ids, mask, Decoding(9), eos_token_ids=[])
    eos = [int(free.tokens[0, 1])]  # row 0 ends early: it stays in the batch
    g = generate(fns._replace(static=fns.static._replace(forward=forward)), ids, mask, Decoding(9), eos_token_ids=eos)
    assert len(shapes) == int(g.tokens.shape[1]) and len(set(shapes)) == 1
    assert shapes[0] == ((3, 1, tiny.fns.hidden_size), (3, ids.shape[1] + 9), (3, 1))


def test_a_capacity_below_the_cache_is_refused(tiny):
    ids, mask = tiny.encode_chat(conversations())
    cache = rollout(tiny.fns, tiny.realign, ids, mask, latent_steps=0).cache
    with pytest.raises(ValueError, match="capacity"):
        static_fns(tiny.model).init(cache, cache.seq_len - 1)


def test_bucket_capacities_are_few_hold_the_columns_and_waste_at_most_half():
    grid = sorted({bucket_capacity(n) for n in range(0, 20000)})
    assert grid[:6] == [256, 384, 512, 768, 1024, 1536]
    assert all(b / a in (1.5, 4 / 3) for a, b in zip(grid, grid[1:]))  # powers of two and 1.5x between them
    for n in range(0, 20000, 7):
        size = bucket_capacity(n)
        assert size >= n and (n <= 256 or size <= 1.5 * n)
        assert size == min(g for g in grid if g >= n)  # the smallest of the grid, by brute force
    with pytest.raises(ValueError, match="columns"):
        bucket_capacity(-1)


def test_rounded_capacities_and_a_reused_cache_decode_what_the_dynamic_path_decodes(tiny):
    # The compiled step's cache handling, without compiling: capacities rounded up to the grid,
    # one StaticCache per batch size and capacity refilled by every decode.
    fns = tiny.fns._replace(static=static_fns(tiny.model, reuse=True)._replace(capacity=bucket_capacity))
    ids, mask = tiny.encode_chat(conversations())
    short_ids, short_mask = tiny.encode_chat(conversations(["Hi", "Yo", "Hey there"]))
    shapes, states = [], []
    forward = fns.static.forward

    def spy(embeds, attention_mask, position_ids, state):
        shapes.append(tuple(attention_mask.shape))
        states.append(state.layers[0].keys.data_ptr())
        return forward(embeds, attention_mask, position_ids, state)

    spied = fns._replace(static=fns.static._replace(forward=spy))
    first = generate(spied, ids, mask, Decoding(7), eos_token_ids=[])
    kept = [t.clone() for t in first.cache]
    second = generate(spied, short_ids, short_mask, Decoding(5), eos_token_ids=[])
    assert set(shapes) == {(3, 256)} and len(set(states)) == 1  # one capacity, one cache, for both lengths
    _same(first, generate(tiny.fns, ids, mask, Decoding(7), eos_token_ids=[]))
    _same(second, generate(tiny.fns, short_ids, short_mask, Decoding(5), eos_token_ids=[]))
    for got, want in zip(first.cache, kept):  # the second decode wrote into the kept StaticCache, not into
        assert torch.equal(got, want)  # what the first returned
    with pytest.raises(ValueError, match="capacity"):
        generate(fns._replace(static=fns.static._replace(capacity=lambda n: n - 1)), ids, mask, Decoding(3), eos_token_ids=[])


def test_a_model_with_sliding_window_layers_is_refused_when_loaded():
    with pytest.raises(ValueError, match="full-attention"):
        tiny_model("qwen3", decode_step="static", use_sliding_window=True, sliding_window=8, max_window_layers=1)


def test_decode_step_option_builds_the_step_and_refuses_unknown_values():
    assert tiny_model("llama").fns.static is None  # dynamic by default
    assert tiny_model("llama", decode_step="static").fns.static is not None
    with pytest.raises(ValueError, match="decode_step"):
        tiny_model("llama", decode_step="fast")


def test_compile_flag_reaches_the_runs_model(tmp_path):
    config = build_config({"task": "gsm8k", "method": "single", "model": "tiny-llama", "compile": True,
                           "out": str(tmp_path / "run")})
    assert config.compile is True
    local = load_local(config)
    assert local.fns.static is not None and local.fns.static.forward is not static_fns(local.model).forward
    assert load_local(build_config({"task": "gsm8k", "method": "single", "model": "tiny-llama"})).fns.static is None


@pytest.mark.compile
@pytest.mark.skipif(os.environ.get("GCACHE_TEST_COMPILE") != "1", reason="compiles for ~1 min: set GCACHE_TEST_COMPILE=1")
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile on CPU needs a C compiler")
def test_compiled_step_decodes_what_the_dynamic_path_decodes():
    lm = tiny_model("llama", seed=0)
    compiled = tiny_model("llama", seed=0, decode_step="compiled")
    ids, mask = lm.encode_chat(conversations())
    for n in (6, 6, 9):  # the second call reuses the compiled step, the third has another capacity
        _same(generate(compiled.fns, ids, mask, Decoding(n), eos_token_ids=[]), generate(lm.fns, ids, mask, Decoding(n), eos_token_ids=[]))


def test_int8_decode_reads_prompts_in_float32_and_decodes_with_int8_linears():
    fp32 = tiny_model("llama", seed=0)
    lm = tiny_model("llama", seed=0, weights="int8-decode")
    int8 = tiny_model("llama", seed=0, weights="int8")
    assert lm.fns.decoder is not None and lm.weights == "int8-decode"
    assert any(type(m).__name__ == "WeightOnlyLinear" for m in lm.decoder.modules())
    # the prompt model is the float32 one (unchanged), the decoder has int8 linears
    assert not any(type(m).__name__ == "WeightOnlyLinear" for m in lm.model.modules())
    ids, mask = lm.encode_chat(conversations())
    latent = rollout(lm.fns, lm.realign, ids, mask, latent_steps=2).cache
    want = rollout(fp32.fns, fp32.realign, ids, mask, latent_steps=2).cache
    assert torch.equal(latent.keys, want.keys)  # prompts and latent steps: float32's own
    seen = []

    def forward(embeds, *args):
        seen.append(embeds.shape)
        return lm.fns.decoder.forward(embeds, *args)

    spied = lm.fns._replace(decoder=lm.fns.decoder._replace(forward=forward))
    g = generate(spied, ids, mask, Decoding(5), eos_token_ids=[])
    assert len(seen) == 5  # every decoding step ran on the int8 copy
    # = float32's prefill followed by int8 decoding steps, done by hand
    pre = prefill(fp32.fns, ids, mask)
    by_hand = decode_tokens(int8.fns, pre, Decoding(5), torch.tensor([], dtype=torch.long), lm.pad_token_id)
    assert torch.equal(g.tokens, by_hand.tokens)
    with pytest.raises(ValueError, match="weights"):
        tiny_model("llama", weights="int4-decode")


class _HostReads(TorchFunctionMode):
    """Counts the reads of tensor values to the host made by gcache.core's own code (each waits for
    the device on a GPU; transformers' mask code makes its own, not counted here)."""

    READS = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        caller = sys._getframe(1).f_code.co_filename
        if getattr(func, "__name__", "") in self.READS and f"gcache{os.sep}core" in caller:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", ["dynamic", "static"])
def test_a_decoded_token_costs_one_host_read_and_a_stop_rule_one_more(tiny, path):
    # The loop's questions about the running rows (any running, how many held rows run, any going on)
    # were one read each, four per token; they are now read together. Where a CPU cannot time a
    # device sync, counting them shows it.
    ids, mask = tiny.encode_chat(conversations())
    fns = _static(tiny) if path == "static" else tiny.fns
    steps, outside_loop = 9, 3  # the prompt's checks (2) and the answer's width (1)

    def never(tokens, running):
        return torch.zeros_like(running)

    for decoding, per_token in ((Decoding(steps), 1), (Decoding(steps, stop=never), 2)):
        reads = _HostReads()
        with reads:
            g = generate(fns, ids, mask, decoding, eos_token_ids=[])
        assert g.tokens.shape[1] == steps
        assert reads.count <= per_token * steps + outside_loop, reads.count
