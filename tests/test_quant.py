"""Weight-only bf16 / int8 linears (gcache.io.models.quant) on tiny random models.

References: the float32 model itself (outputs close within a stated tolerance), a
weight-only variant run row by row against the same variant batched, the stop rule
of plain fp32 decoding, and a brute-force bound on the int8 round trip.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gcache.core.latent import Decoding, generate, rollout
from gcache.io.models.local import tiny_model
from gcache.io.models.quant import WeightOnlyLinear, dequantize_int8, quantize_int8, quantize_linears, weight_bytes
from tests._latent_helpers import QUESTIONS, batch_drift, conversations

VARIANTS = ("bf16", "int8")
# Relative error (max |diff| / max |fp32|) of one linear: bf16 keeps 8 bits of mantissa
# (relative rounding 2^-9 per weight and activation), int8 per-channel half a step of
# max|w|/127; measured on the tiny models' lm_head: bf16 0.4%, int8 0.8%.
LINEAR_RTOL = {"bf16": 0.01, "int8": 0.02}
# The same for the last hidden state of a whole prefill of the tiny models (2 layers of large
# random weights, whose attention amplifies rounding): measured bf16 1-5%, int8 2-6%.
HIDDEN_RTOL = {"bf16": 0.1, "int8": 0.1}
# Batched and row-by-row runs of one variant differ only by summation order inside the
# kernels. Both variants round each linear's output to bf16, so a different order now and then
# flips that rounding by one bf16 step (up to 1/16 at the caches' scale of ~8), and later
# layers and latent steps carry the flip on. Measured by tests/quant_spread.py on the tiny
# models (8 seeds each, llama and qwen3, default and AVX2-only oneDNN/MKL, 1 and 2 threads, on
# a Xeon with AMX): most runs are bit-identical; the rest have at most 0.93% of the cache
# elements beyond the float32 tolerance BATCH_TOL, and every element within 0.081 * (1 +
# |value|). The bounds below are 3x that spread; a planted bug (the batched rows attend to
# their padding) moves 41% of the elements, by up to 2.6-5.1 * (1 + |value|). The generated
# tokens must be equal.
BATCH_TOL = 2e-3
FLIP_SHARE = 0.03
FLIP_TOL = 0.25


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def fp32(arch):
    return tiny_model(arch, seed=0)


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request, arch):
    return request.param, tiny_model(arch, seed=0, weights=request.param)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 40), scale=st.floats(1e-4, 1e3), seed=st.integers(0, 2**16))
def test_int8_round_trip_error_is_bounded_per_channel(rows, cols, scale, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    w[0] = 0.0  # an all-zero channel survives exactly
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (rows,) and int(q.abs().max()) <= 127
    err = (dequantize_int8(q, s) - w).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-5)).all())
    assert torch.equal(dequantize_int8(q, s)[0], torch.zeros(cols))
    # each non-zero channel uses the full range: its largest weight maps to +-127
    assert bool((q[1:].abs().amax(dim=1) == 127).all()) if rows > 1 else True


def test_weight_only_linear_matches_float32_within_its_rounding():
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 96, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, 64, generator=gen) * 0.1)
        linear.bias.copy_(torch.randn(96, generator=gen))
    x = torch.randn(3, 5, 64, generator=gen)
    with torch.no_grad():
        want = linear(x)
    for weights, rtol in LINEAR_RTOL.items():
        layer = WeightOnlyLinear.from_linear(linear, weights)
        got = layer(x)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert float((got - want).abs().max()) <= rtol * float(want.abs().max()), weights
        assert not any(True for _ in layer.parameters())  # buffers only: nothing to train
    with pytest.raises(ValueError, match="weights"):
        WeightOnlyLinear.from_linear(linear, "fp8")


def test_variants_swap_every_linear_and_hold_fewer_bytes(fp32, variant):
    weights, lm = variant
    swapped = [m for m in lm.model.modules() if isinstance(m, WeightOnlyLinear)]
    plain = [m for m in lm.model.modules() if type(m) is nn.Linear]
    assert swapped and not plain and all(m.weights == weights for m in swapped)
    assert lm.weights == weights and lm.dtype == torch.float32  # activations and the KV-cache stay float32
    ratio = weight_bytes(lm.model) / weight_bytes(fp32.model)
    assert ratio < (0.51 if weights == "bf16" else 0.27), ratio
    # the realignment is computed from the float32 embeddings, before the swap
    assert torch.equal(lm.realign.matrix, fp32.realign.matrix)
    assert lm.model.get_input_embeddings().weight.dtype == torch.float32


def test_variant_outputs_are_close_to_float32(fp32, variant):
    weights, lm = variant
    ids, mask = fp32.encode_chat(conversations())
    # one prefill (no latent steps: on the tiny models' large random weights latent feedback
    # amplifies any rounding chaotically, which says nothing about the embedded model)
    want = rollout(fp32.fns, fp32.realign, ids, mask, latent_steps=0)
    got = rollout(lm.fns, lm.realign, ids, mask, latent_steps=0)
    scale = float(want.hidden.abs().max())
    assert float((got.hidden - want.hidden).abs().max()) <= HIDDEN_RTOL[weights] * scale
    assert got.cache.keys.dtype == torch.float32
    logits_fp32 = fp32.fns.logits(want.hidden)
    logits = lm.fns.logits(want.hidden)
    assert float((logits - logits_fp32).abs().max()) <= LINEAR_RTOL[weights] * float(logits_fp32.abs().max())


def test_variant_batched_equals_one_by_one(variant):
    _, lm = variant
    ids, mask = lm.encode_chat(conversations())
    g = generate(lm.fns, ids, mask, Decoding(6), eos_token_ids=lm.eos_token_ids)
    r = rollout(lm.fns, lm.realign, ids, mask, latent_steps=2)
    alone = []
    for b, q in enumerate(QUESTIONS):
        ids1, mask1 = lm.encode_chat(conversations([q]))
        g1 = generate(lm.fns, ids1, mask1, Decoding(6), eos_token_ids=lm.eos_token_ids)
        n = int(g1.lengths[0])
        assert int(g.lengths[b]) == n and g.tokens[b, :n].tolist() == g1.tokens[0, :n].tolist()
        alone.append(rollout(lm.fns, lm.realign, ids1, mask1, latent_steps=2).cache)
    worst, share = batch_drift(r.cache, alone, BATCH_TOL)
    assert worst <= FLIP_TOL, worst
    assert share <= FLIP_SHARE, share


def test_variant_keeps_the_stop_rule_sampling_and_finished_row_removal(variant):
    _, lm = variant
    ids, mask = lm.encode_chat(conversations())
    free = generate(lm.fns, ids, mask, Decoding(8), eos_token_ids=[])
    ends = [2, None, 5]

    def stop(tokens, running):
        n = tokens.shape[1]
        return torch.tensor([e is not None and n == e + 1 for e in ends])

    g = generate(lm.fns, ids, mask, Decoding(8, stop=stop), eos_token_ids=[], pad_token_id=7)
    assert g.lengths.tolist() == [3, 8, 6] and g.stopped.tolist() == [True, False, True]
    for b, n in enumerate(g.lengths.tolist()):
        assert g.tokens[b, :n].tolist() == free.tokens[b, :n].tolist()
    sampled = [generate(lm.fns, ids, mask, Decoding(8, temperature=1.0, seed=s), eos_token_ids=[]) for s in (1, 1, 2)]
    assert torch.equal(sampled[0].tokens, sampled[1].tokens) and not torch.equal(sampled[0].tokens, sampled[2].tokens)


def test_quantize_linears_refuses_unknown_weights_and_fp32_swaps_nothing(fp32):
    assert quantize_linears(fp32.model, "fp32") == 0
    with pytest.raises(ValueError, match="weights: expected one of"):
        quantize_linears(fp32.model, "int4")
    with pytest.raises(ValueError, match="weights"):
        tiny_model("llama", weights="fp16")


def test_weights_is_a_run_setting_and_a_cli_flag(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from gcache.io.runner.config import build_config
    from gcache_cli.main import app

    assert build_config({}).weights == "fp32" and build_config({"weights": "int8"}).weights == "int8"
    with pytest.raises(ValueError, match="--weights: expected one of fp32, bf16, int8"):
        build_config({"weights": "fp16"})
    seen = {}
    def fake_run(config, **kwargs):
        seen["config"] = config
        return {"status": "complete"}

    monkeypatch.setattr("gcache.io.runner.experiment.run_experiment", fake_run)
    out = CliRunner().invoke(app, ["run", "gsm8k", "--model", "tiny-llama", "--out", str(tmp_path / "r"), "--weights", "bf16"])
    assert out.exit_code == 0, out.output
    assert seen["config"].weights == "bf16"
    bad = CliRunner().invoke(app, ["run", "gsm8k", "--model", "tiny-llama", "--out", str(tmp_path / "s"), "--weights", "int4"])
    assert bad.exit_code == 2 and "--weights" in bad.output and "Traceback" not in bad.output
