"""The fuser's training objective: how likely the frozen model finds the reference answer when it
reads the fused cache (teacher forcing, as Cache-to-Cache trains its fuser).

For a batch of questions, each row holds the receiving node's prompt followed by the reference
answer (GSM8K's gold solution, a canonical program, the correct option's text); ``target_mask``
marks the answer tokens. The loss is the negative log-likelihood per answer token, averaged over
rows::

    loss = -mean_b [ sum_s target[b, s] * log p(x[b, s] | fused cache, x[b, :s]) / sum_s target[b, s] ]

Per-row normalisation keeps a long reference answer from outweighing a short one. The model's
weights are the caller's to freeze; the graph runs through the fused cache's keys and values into
the fuser's parameters (and into the edge weights when they require grad, in the ``learned`` mode).

The fuser is trained by the core's one training step (``gcache.core.train.train_step`` with a
``FuserBatch``), which takes gradients with respect to the learned parameters only.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from gcache.core.cache import KVCache
from gcache.core.fusion import EdgeWeights, FuserParams, Mode, Sources, fuse
from gcache.core.latent import ModelFns, sequence_logprob


class AnswerBatch(NamedTuple):
    """Prompt + reference answer per row, left-padded."""

    input_ids: Tensor  # [B, S] long
    attention_mask: Tensor  # [B, S] bool
    target_mask: Tensor  # [B, S] bool, True on the answer tokens


def answer_batch(
    prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], *, pad_token_id: int
) -> AnswerBatch:
    """Left-padded rows ``prompt + answer`` with the answer tokens marked as targets.

    Raises ValueError when the counts differ, a prompt is empty (its first answer token would
    have no predicting position) or an answer is empty.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"answers: expected one answer per prompt ({len(prompts)} prompts), got {len(answers)}")
    if not prompts:
        raise ValueError("prompts: expected at least one row, got none")
    for b, (p, a) in enumerate(zip(prompts, answers)):
        if len(p) == 0:
            raise ValueError(f"prompts[{b}]: expected at least one token before the answer, got none")
        if len(a) == 0:
            raise ValueError(f"answers[{b}]: expected at least one answer token, got none")
    width = max(len(p) + len(a) for p, a in zip(prompts, answers))
    B = len(prompts)
    input_ids = torch.full((B, width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros(B, width, dtype=torch.bool)
    target_mask = torch.zeros(B, width, dtype=torch.bool)
    for b, (p, a) in enumerate(zip(prompts, answers)):
        row = list(p) + list(a)
        start = width - len(row)
        input_ids[b, start:] = torch.tensor(row, dtype=torch.long)
        attention_mask[b, start:] = True
        target_mask[b, start + len(p) :] = True
    return AnswerBatch(input_ids, attention_mask, target_mask)


def answer_logprobs(fns: ModelFns, cache: KVCache | None, batch: AnswerBatch) -> Tensor:  # [B]
    """Per row, the mean log-probability per target token, read on top of ``cache`` row by row:
    ``sum_s target[b, s] * log p(x[b, s] | cache[b], x[b, :s]) / sum_s target[b, s]``.

    One teacher-forced forward, no decoding; differentiable w.r.t. cache.keys/values. Raises
    ValueError when a row has no target, and the ValueErrors of ``sequence_logprob`` (bad masks,
    targets on padding or at position 0, a mismatched cache)."""
    target = batch.target_mask.to(torch.bool)
    count = target.sum(dim=1)  # [B]
    if bool((count == 0).any()):
        rows = (count == 0).nonzero().flatten().tolist()
        raise ValueError(f"target_mask: expected at least one target token in every row, rows {rows} have none")
    logprob = sequence_logprob(fns, cache, batch.input_ids, batch.attention_mask, target)  # [B]
    return logprob / count.to(logprob.dtype)


def answer_nll(fns: ModelFns, cache: KVCache | None, batch: AnswerBatch) -> Tensor:
    """Mean over rows of the per-token negative log-likelihood of the targets: ``-answer_logprobs``
    averaged over the batch (a scalar; differentiable w.r.t. cache.keys/values). Raises the
    ValueErrors of ``answer_logprobs``."""
    return -answer_logprobs(fns, cache, batch).mean()


def fuser_loss(
    params: FuserParams | None,
    fns: ModelFns,
    caches: Sequence[KVCache],
    edge_weights: EdgeWeights | Sequence[float],
    batch: AnswerBatch,
    *,
    mode: Mode,
    sources: Sources | Sequence[int] | None = None,
) -> Tensor:
    """The fuser's objective for one receiving node: ``answer_nll`` of the reference answers read
    on top of ``fuse(params, caches, edge_weights, mode=mode, sources=sources)``.

    caches: the k predecessors' caches, [L, B, H, T_i, D] with B the batch's rows.
    Returns a scalar. Raises the ValueErrors of ``fuse`` and ``answer_nll``.
    """
    fused = fuse(params, caches, edge_weights, mode=mode, sources=sources)
    return answer_nll(fns, fused, batch)


__all__ = [
    "AnswerBatch",
    "answer_batch",
    "answer_logprobs",
    "answer_nll",
    "fuser_loss",
]
