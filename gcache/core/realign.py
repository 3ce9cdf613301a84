"""Realignment: map a last hidden state back into the input-embedding space.

A latent step feeds the model's last hidden state h (what lm_head reads) back as
the next input embedding. h lives in the output space; W_a maps it to the input
space by least squares over the vocabulary, W_out @ W_a ~= W_in, solved with a
small ridge term for stability:

    W_a = solve(W_out^T W_out + reg * I, W_out^T W_in)           # [d, d]

and the result is rescaled to the mean norm of the input embeddings, so that a
latent input looks, in scale, like a token embedding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Realign(NamedTuple):
    """Parameters of the realignment; float32, on the model's device."""

    matrix: Tensor  # [d, d]
    target_norm: Tensor  # [] float32


def _check_embedding(w: Tensor, name: str) -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"{name}: expected a tensor [V, d], got {type(w).__name__}")
    if w.dim() != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty embedding matrix [V, d], got shape {tuple(w.shape)}")


def realign_params(w_in: Tensor, w_out: Tensor, reg: float = 1e-5) -> Realign:
    """W_a = solve(W_out^T W_out + reg*I, W_out^T W_in) and the mean row norm of W_in, in float32.

    w_in: [V, d] input embeddings; w_out: [V, d] output embeddings (lm_head weight).
    Raises ValueError on shapes that are not [V, d] alike or on a negative reg.
    """
    _check_embedding(w_in, "w_in")
    _check_embedding(w_out, "w_out")
    if w_in.shape != w_out.shape:
        raise ValueError(f"w_in and w_out: expected the same shape [V, d], got {tuple(w_in.shape)} and {tuple(w_out.shape)}")
    if reg < 0:
        raise ValueError(f"reg: expected a non-negative ridge term, got {reg}")
    with torch.no_grad():
        wi = w_in.detach().to(torch.float32)
        wo = w_out.detach().to(torch.float32)
        d = wi.shape[1]
        gram = wo.T @ wo + reg * torch.eye(d, dtype=torch.float32, device=wo.device)  # [d, d]
        matrix = torch.linalg.solve(gram, wo.T @ wi)  # [d, d]
        target_norm = wi.norm(dim=1).mean()
    return Realign(matrix, target_norm)


def identity_realign(w_in: Tensor) -> Realign:
    """Rescaling only: W_a = I and the mean row norm of w_in [V, d]."""
    _check_embedding(w_in, "w_in")
    with torch.no_grad():
        wi = w_in.detach().to(torch.float32)
        matrix = torch.eye(wi.shape[1], dtype=torch.float32, device=wi.device)
        target_norm = wi.norm(dim=1).mean()
    return Realign(matrix, target_norm)


def apply_realign(params: Realign, h: Tensor) -> Tensor:
    """h @ W_a rescaled to the target norm along the last axis; h: [..., d] -> [..., d], h's dtype.

    The product runs in float32 (the matrix's dtype) whatever h's dtype is; a zero
    vector stays zero. Raises ValueError when h's last axis is not d.
    """
    d = params.matrix.shape[0]
    if h.shape[-1] != d:
        raise ValueError(f"h: expected last axis of size d = {d}, got shape {tuple(h.shape)}")
    x = h.to(params.matrix.dtype) @ params.matrix  # [..., d]
    scale = params.target_norm / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (x * scale).to(h.dtype)
