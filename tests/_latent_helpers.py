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


def batch_drift(batched: KVCache, alone: list[KVCache], tol: float) -> tuple[float, float]:
    """How far a batched run's caches are from each row's run alone, over their real positions.

    Returns the largest |batched - alone| / (1 + |alone|) (allclose's test with atol = rtol) and
    the share of elements above ``tol`` by that measure; ``alone[b]`` is row b's one-row cache.
    """
    worst, beyond = 0.0, []
    for b, single in enumerate(alone):
        for got, want in zip(real_positions(batched, b), real_positions(single, 0)):
            ratio = (got - want).abs() / (1 + want.abs())
            worst = max(worst, float(ratio.max()))
            beyond.append((ratio > tol).float().flatten())
    return worst, float(torch.cat(beyond).mean())


def hf_logits(model, input_ids: Tensor) -> Tensor:
    """The full transformers model's logits [B, S, V] for unpadded prompts (the reference)."""
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def latent_embedding_by_hand(model, hidden: Tensor, reg: float = 1e-5) -> Tensor:
    """The next latent input embedding [B, d] for last hidden states [B, d], from the formula alone.

    W_a = solve(W_out^T W_out + reg I, W_out^T W_in) over the model's own embeddings, then
    h W_a rescaled to the mean row norm of W_in; in float32 (the core's precision: latent
    steps feed rounding back, so a float64 reference drifts ~2e-4 from it in 4 steps),
    without gcache.core.realign.
    """
    w_in = model.get_input_embeddings().weight.detach().float()  # [V, d]
    w_out = model.get_output_embeddings().weight.detach().float()  # [V, d]
    eye = torch.eye(w_in.shape[1])
    w_a = torch.linalg.solve(w_out.T @ w_out + reg * eye, w_out.T @ w_in)  # [d, d]
    x = hidden.float() @ w_a  # [B, d]
    target = w_in.norm(dim=1).mean()
    return (x * (target / x.norm(dim=-1, keepdim=True))).to(hidden.dtype)


def hf_latent_reference(model, input_ids: Tensor, latent_steps: int) -> tuple[Tensor, Tensor]:
    """LatentMAS-style latent steps with the full model and hidden_states[-1], for one unpadded row.

    Each step's input is ``latent_embedding_by_hand`` of the last hidden state.
    Returns (last hidden state [1, d] after the last step, the keys of layer 0 [1, H, T, D]).
    """
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True, output_hidden_states=True)
        cache, h = out.cache, out.hidden_states[-1][:, -1]
        for _ in range(latent_steps):
            e = latent_embedding_by_hand(model, h)[:, None]
            out = model(inputs_embeds=e, cache=cache, use_cache=True, output_hidden_states=True)
            cache, h = out.cache, out.hidden_states[-1][:, -1]
    return h, cache.layers[0].keys
