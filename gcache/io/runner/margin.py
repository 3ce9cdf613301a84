"""The contrastive margin of an answer: how much more likely the gold answer is than the best
distractor, read from one decision context in one forward.

For an item whose ``meta["distractors"]`` lists wrong answers (the routing task's other stated
numbers, ``gcache.io.tasks.routing``), the margin is the gold answer's mean log-probability per token
minus the highest of the distractors', every answer teacher-forced after the answer line's prefix
exactly as ``gcache.io.runner.answers`` reads the gold one, the context's prompt read once for all
of them (``answers.answer_logprobs_shared``). > 0: the context favours the right answer
over every wrong one it could have taken from the agents.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from torch import Tensor

from gcache.core import cache as kv
from gcache.io.runner.answers import answer_logprobs_shared
from gcache.io.models.local import LocalModel
from gcache.io.tasks.datasets import Item

__all__ = ["answer_scores", "has_distractors"]


def has_distractors(item: Item) -> bool:
    """Whether the item names wrong answers to contrast the gold one with."""
    return bool((item.meta or {}).get("distractors"))


def answer_scores(
    local: LocalModel, conversations: Sequence[list[dict]], caches: Sequence[kv.KVCache | None], items: Sequence[Item],
    *, reads: Sequence[kv.KVCache | None] | None = None,
) -> tuple[Tensor, list[float | None]]:  # fmt: skip
    """Per row, the gold answer's mean log-probability per token ([B], as ``answers.answer_logprobs``)
    and the contrastive margin (None for an item without distractors): the gold's value minus the
    highest distractor's, all rows (gold and distractors, every item) in one forward; ``reads``: the
    decode's read of each context, as ``answers.answer_logprobs_shared`` takes them.

    Differentiable like ``answer_logprobs``; raises ValueError when the counts differ, and its errors."""
    if len(items) != len(conversations) or len(items) != len(caches):
        raise ValueError(
            f"items: expected one item per conversation and cache ({len(conversations)}, {len(caches)}), got {len(items)}"
        )
    rows_item, rows_context, spans = [], [], []
    for b, item in enumerate(items):
        answers = (item.gold, *((item.meta or {}).get("distractors", ()) if has_distractors(item) else ()))
        start = len(rows_item)
        for i, answer in enumerate(answers):
            rows_item.append(item if i == 0 else replace(item, gold=str(answer)))
            rows_context.append(b)
        spans.append((start, len(rows_item)))
    # Each decision context is read once, its answers on top of it: [sum over items of 1 + distractors].
    values = answer_logprobs_shared(local, conversations, caches, rows_item, rows_context, reads=reads)
    gold = values[[start for start, _ in spans]]  # [B]
    margins: list[float | None] = [
        None if end - start == 1 else float(values[start] - values[start + 1 : end].max()) for start, end in spans
    ]
    return gold, margins
