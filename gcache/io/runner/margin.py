"""The contrastive margin of an answer: how much more likely the gold answer is than the best
distractor, read from one decision context in one forward.

For an item whose ``meta["distractors"]`` lists wrong answers (the routing task's other stated
numbers, ``gcache.io.tasks.routing``), the margin is the gold answer's mean log-probability per token
minus the highest of the distractors', every answer teacher-forced after the answer line's prefix
exactly as ``gcache.io.runner.answers`` reads the gold one. > 0: the context favours the right answer
over every wrong one it could have taken from the agents.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from torch import Tensor

from gcache.core import cache as kv
from gcache.io.runner.answers import answer_logprobs
from gcache.io.models.local import LocalModel
from gcache.io.tasks.datasets import Item

__all__ = ["answer_scores", "has_distractors"]


def has_distractors(item: Item) -> bool:
    """Whether the item names wrong answers to contrast the gold one with."""
    return bool((item.meta or {}).get("distractors"))


def answer_scores(
    local: LocalModel, conversations: Sequence[list[dict]], caches: Sequence[kv.KVCache | None], items: Sequence[Item],
) -> tuple[Tensor, list[float | None]]:  # fmt: skip
    """Per row, the gold answer's mean log-probability per token ([B], as ``answers.answer_logprobs``)
    and the contrastive margin (None for an item without distractors): the gold's value minus the
    highest distractor's, all rows (gold and distractors, every item) in one forward.

    Differentiable like ``answer_logprobs``; raises ValueError when the counts differ, and its errors."""
    if len(items) != len(conversations) or len(items) != len(caches):
        raise ValueError(
            f"items: expected one item per conversation and cache ({len(conversations)}, {len(caches)}), got {len(items)}"
        )
    rows_conv, rows_cache, rows_item, spans = [], [], [], []
    for conv, cache, item in zip(conversations, caches, items):
        answers = (item.gold, *((item.meta or {}).get("distractors", ()) if has_distractors(item) else ()))
        start = len(rows_item)
        for i, answer in enumerate(answers):
            rows_conv.append(conv)
            rows_cache.append(cache)
            rows_item.append(item if i == 0 else replace(item, gold=str(answer)))
        spans.append((start, len(rows_item)))
    values = answer_logprobs(local, rows_conv, rows_cache, rows_item)  # [sum over items of 1 + distractors]
    gold = values[[start for start, _ in spans]]  # [B]
    margins: list[float | None] = [
        None if end - start == 1 else float(values[start] - values[start + 1 : end].max()) for start, end in spans
    ]
    return gold, margins
