"""bf16 numerics that must not lose what float32 keeps: the answer's log-probability and fusion.

Checked on the CPU with a tiny random model and random caches in bf16; the same code runs on a
GPU (benchmarks/gpu_check.py compares CUDA with the CPU).
"""

from __future__ import annotations

import copy

import torch

from gcache.core.cache import KVCache
from gcache.core.fusion import fuse
from gcache.core.latent import prefill, sequence_logprob
from gcache.io.models.hf import model_fns
from gcache.io.models.local import tiny_model


def _bf16_fns():
    model = copy.deepcopy(tiny_model("qwen3", tie_word_embeddings=False).model).to(torch.bfloat16)
    with torch.no_grad():  # logits of 16-32, as a trained model's, where bf16's spacing is 0.125-0.25
        model.lm_head.weight.mul_(8.0)
    return model, model_fns(model)


def test_selected_logits_are_computed_in_float32():
    model, fns = _bf16_fns()
    assert fns.float_logits is not None
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = prefill(fns, ids, torch.ones_like(ids, dtype=torch.bool)).hidden.reshape(-1, fns.hidden_size)
        exact = hidden.double() @ model.lm_head.weight.double().T  # [N, V]
        new = fns.float_logits(hidden)
        old = fns.logits(hidden).float()
    assert new.dtype == torch.float32 and new.shape == exact.shape
    assert exact.abs().max() > 8  # large enough for bf16's rounding to show
    new_err, old_err = (new.double() - exact).abs().max(), (old.double() - exact).abs().max()
    assert new_err < 1e-3 < old_err, (new_err, old_err)


def test_sequence_logprob_scores_with_float32_logits():
    model, fns = _bf16_fns()
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    target = torch.zeros_like(mask)
    target[:, 5:] = True
    with torch.no_grad():
        got = sequence_logprob(fns, None, ids, mask, target)  # [B]
        hidden = prefill(fns, ids, mask).hidden[:, 4:-1]  # [B, 4, d], the positions predicting targets
        logp = torch.log_softmax(hidden.double() @ model.lm_head.weight.double().T, dim=-1)
        want = logp.gather(-1, ids[:, 5:, None]).squeeze(-1).sum(dim=1)
        rounded = torch.log_softmax(fns.logits(hidden).double(), dim=-1).gather(-1, ids[:, 5:, None]).squeeze(-1).sum(1)
    assert (got.double() - want).abs().max() < 1e-3
    assert (rounded - want).abs().max() > 10 * (got.double() - want).abs().max()


def test_sequence_logprob_keeps_its_gradient_through_the_cache():
    _, fns = _bf16_fns()
    ids = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        pre = prefill(fns, ids[:, :3], mask[:, :3])
        cache = fns.from_state(pre.state, pre.mask, pre.next_pos)
    keys = cache.keys.clone().requires_grad_(True)
    target = torch.zeros_like(mask)
    target[:, 4:] = True  # positions 1 and 2 of the part read on the cache
    logp = sequence_logprob(fns, cache._replace(keys=keys), ids[:, 3:], mask[:, 3:], target[:, 3:])
    logp.sum().backward()
    assert keys.grad is not None and bool(keys.grad.abs().sum() > 0)


def test_fusion_mixes_in_float32_and_rounds_once():
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 2, 5, 4)  # [L, B, H, T, D]
    caches = [
        KVCache(torch.randn(shape, generator=g).to(torch.bfloat16) * 20, torch.randn(shape, generator=g).to(torch.bfloat16),
                torch.ones(3, 5, dtype=torch.bool), torch.full((3,), 5))
        for _ in range(3)
    ]  # fmt: skip
    weights = torch.tensor([0.3, 0.3, 0.4])
    fused = fuse(None, caches, weights, mode="weighted")
    w = (weights / weights.sum()).double()
    exact = sum(w[i] * c.keys.double() for i, c in enumerate(caches))
    assert fused.keys.dtype == torch.bfloat16
    # Rounded once from float32 sums: within half a bf16 step of the exact mixture (ties may go
    # either way after the float32 sum's own rounding).
    step = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
    assert bool(((fused.keys.double() - exact).abs() <= 0.5001 * step).all())
    # An equal mixture of one cache is that cache: the coefficients sum to 1 before any rounding.
    same = fuse(None, [caches[0]] * 3, torch.tensor([1.0, 1.0, 1.0]), mode="weighted")
    assert torch.equal(same.keys, caches[0].keys)
