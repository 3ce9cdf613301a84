"""Helpers for the latent-core tests: prompts, and references computed with transformers directly."""

from __future__ import annotations

import torch
from torch import Tensor

from gcache.core.cache import KVCache

# Three prompts of clearly different lengths, so a batch of them is left padded.
QUESTIONS = (
    "What is 2+2?",
    "Hi",
    "Name three colours of the rainbow and say which one has the longest wavelength.",
)


def conversations(questions=QUESTIONS) -> list[list[dict]]:
    return [[{"role": "user", "content": q}] for q in questions]


def real_positions(cache: KVCache, row: int) -> tuple[Tensor, Tensor]:
    """Keys and values [L, H, T_real, D] of one row at its real (unmasked) positions."""
    keep = cache.mask[row]
    return cache.keys[:, row][:, :, keep], cache.values[:, row][:, :, keep]


def hf_logits(model, input_ids: Tensor) -> Tensor:
    """The full transformers model's logits [B, S, V] for unpadded prompts (the reference)."""
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def hf_latent_reference(model, realign, input_ids: Tensor, latent_steps: int) -> tuple[Tensor, Tensor]:
    """LatentMAS-style latent steps with the full model and hidden_states[-1], for one unpadded row.

    Returns (last hidden state [1, d] after the last step, the keys of layer 0 [1, H, T, D]).
    """
    from gcache.core.realign import apply_realign

    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True, output_hidden_states=True)
        cache, h = out.cache, out.hidden_states[-1][:, -1]
        for _ in range(latent_steps):
            e = apply_realign(realign, h)[:, None]
            out = model(inputs_embeds=e, cache=cache, use_cache=True, output_hidden_states=True)
            cache, h = out.cache, out.hidden_states[-1][:, -1]
    return h, cache.layers[0].keys
