"""The reference answer a decision node should write, and how likely the model finds it.

**Answer target** (``answer_target``), per task family: the answer line the decision prompts ask
for (``gcache.io.runner.prompts.answer_format``), split into the prefix the line starts with and the
reference answer after it.

=====================  ==================  ==================================================
family                 prefix              answer
=====================  ==================  ==================================================
math (gsm8k)           ``"#### "``         the gold number as the loader normalised it
                                           (``extract.format_number``: "18", "-5", "2.5")
science, medicine      ``"Answer: "``      the gold letter (A-D)
code (humaneval,       ``"```python\\n"``  the complete reference program (HumanEval: the
mbppplus)                                  prompt and its canonical body; MBPP+: the canonical
                                           solution), trailing whitespace dropped, then
                                           ``"\\n```"`` closing the block
=====================  ==================  ==================================================

``prefix + answer`` is a reply the scorer accepts as correct (the tests check it on every task).

**Tokens** (``answer_tokens``). ``prefix + answer`` is tokenized as one text, without special
tokens, as the model would write the line; the prefix tokens are the longest run of leading
tokens that spells a prefix of the prefix text, and every later token is an answer token. So a
token holding a character of the answer counts, even when it also holds the prefix's last space
(" B" in "Answer: B", " -" in "#### -3"), and a token of the prefix alone does not (the " "
before the digits in "#### 42", which SmolLM2 writes as its own token: counting it would add a
near-certain token to every answer and dilute the measure). The decision context's tokens end
at the chat template's generation prompt, so context, prefix and answer tokenized apart give
the tokens of the whole text (the tests check it on every shipped task with the embedded
tokenizer). The answer is capped at its first ``MAX_ANSWER_TOKENS`` tokens, so a long
program's likelihood stays bounded in cost. No end-of-sequence token is appended.

**Answer log-probability** (``answer_logprobs``): the mean, over the answer tokens, of
``log p(token | decision context, prefix, earlier answer tokens)``, teacher-forced through the
frozen model in one batched forward (no decoding). The decision context is exactly what the
decision node decodes from: its chat messages, encoded with the chat template and the generation
prompt as ``gcache.io.models.generation.generate_local`` encodes them, read on top of its (fused) cache
for latent methods (gcache, latent-mas), on no cache for text methods (text-mas: the judger's
prompt holds the agents' texts; single: the one agent's prompt). It is <= 0; the higher, the
closer the context brings the model to the right answer, whether or not greedy decoding would
reach it. Where the node decoded locally, the decode has already read the context: the answer
line is read on top of what it kept (``answer_logprobs_shared``'s ``reads``), not the prompt again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import Tensor

from gcache.core import cache as kv
from gcache.core.latent import prefill
from gcache.core.objectives import AnswerBatch, answer_batch
from gcache.core.objectives import answer_logprobs as _answer_logprobs
from gcache.io.models.local import LocalModel, encode_chat
from gcache.io.runner.communication import stack_contexts
from gcache.io.tasks.contracts import CONTRACTS, contract
from gcache.io.tasks.datasets import Item

MAX_ANSWER_TOKENS = 256

PREFIXES = {family: c.prefix for family, c in CONTRACTS.items()}  # read from the answer contracts


@dataclass(frozen=True)
class AnswerTarget:
    """The answer line a decision node should write: ``prefix`` (given in the context) and
    ``answer`` (scored)."""

    prefix: str
    answer: str


def answer_target(item: Item) -> AnswerTarget:
    """The prefix and reference answer of ``item``'s answer line (table in the module docstring).

    Raises TypeError when item is not an Item, ValueError for an unknown task or an empty gold.
    """
    if not isinstance(item, Item):
        raise TypeError(f"item: expected a gcache.io.tasks.datasets.Item, got {type(item).__name__}")
    answer = contract(item.task)
    return AnswerTarget(answer.prefix, answer.reference(item))


def answer_tokens(tokenizer: Any, target: AnswerTarget) -> tuple[list[int], list[int]]:
    """(prefix tokens, answer tokens) of a target's line, split as the module docstring says; the
    answer capped at MAX_ANSWER_TOKENS tokens.

    Raises ValueError when no token holds a character of the answer."""
    ids = list(tokenizer(target.prefix + target.answer, add_special_tokens=False)["input_ids"])
    # Prefixes are a few tokens long: grow the run one token at a time while it still spells
    # the start of the prefix text.
    cut = 0
    while cut < len(ids) and target.prefix.startswith(tokenizer.decode(ids[: cut + 1])):
        cut += 1
    answer_ids = ids[cut:][:MAX_ANSWER_TOKENS]
    if not answer_ids:
        raise ValueError(f"target.answer: expected text that has tokens, got {target.answer!r}")
    return ids[:cut], answer_ids


def _check_rows(conversations: Sequence[Any], items: Sequence[Item], caches: Sequence[Any] | None = None) -> None:
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ValueError(f"conversations: expected a non-empty list of conversations, got {conversations!r:.80}")
    if len(items) != len(conversations):
        raise ValueError(f"items: expected one item per conversation ({len(conversations)}), got {len(items)}")
    if caches is not None and len(caches) != len(conversations):
        raise ValueError(f"caches: expected one cache (or None) per conversation ({len(conversations)}), got {len(caches)}")


def answer_inputs(local: LocalModel, conversations: Sequence[list[dict]], items: Sequence[Item]) -> AnswerBatch:
    """The teacher-forced rows of ``answer_logprobs``: per row, the decision context's tokens
    (chat template + generation prompt), the prefix, then the answer tokens as targets;
    left-padded with the model's pad token.

    Raises ValueError when the counts differ, and the errors of ``encode_chat`` and
    ``answer_target``."""
    _check_rows(conversations, items)
    ids, mask = encode_chat(local, list(conversations), add_generation_prompt=True)  # [B, S], [B, S]
    prompts, answers = [], []
    for b, item in enumerate(items):
        prefix_ids, answer_ids = answer_tokens(local.tokenizer, answer_target(item))
        prompts.append(ids[b][mask[b]].tolist() + prefix_ids)
        answers.append(answer_ids)
    batch = answer_batch(prompts, answers, pad_token_id=local.pad_token_id)
    return AnswerBatch(*(t.to(local.device) for t in batch))


def answer_logprobs(
    local: LocalModel,
    conversations: Sequence[list[dict]],
    caches: Sequence[kv.KVCache | None],
    items: Sequence[Item],
) -> Tensor:  # [B]
    """Per row, the reference answer's mean log-probability per token under the decision context
    (row b's conversation read on top of ``caches[b]``, None for no cache): one batched forward.

    Differentiable with respect to the caches' keys and values (a fuser's parameters behind them
    get gradients from ``-answer_logprobs(...).mean()``, the fuser objective, in that same forward);
    wrap the call in ``torch.no_grad()`` to only measure. Raises ValueError when the counts
    differ or a cache holds several rows, and the errors of ``answer_inputs``, ``stack_rows`` and
    the core's ``answer_logprobs``.
    """
    _check_rows(conversations, items, caches)
    for i, c in enumerate(caches):
        if c is not None and c.batch_size != 1:
            raise ValueError(f"caches[{i}]: expected a cache of one row, got {c.batch_size} rows")
    batch = answer_inputs(local, conversations, items)
    return _answer_logprobs(local.fns, stack_contexts(local, caches), batch)


def answer_logprobs_shared(
    local: LocalModel,
    conversations: Sequence[list[dict]],
    caches: Sequence[kv.KVCache | None],
    items: Sequence[Item],
    contexts: Sequence[int],
    *,
    reads: Sequence[kv.KVCache | None] | None = None,
) -> Tensor:  # [R]
    """Per answer row r, ``items[r]``'s reference answer's mean log-probability per token under the
    decision context ``contexts[r]`` (conversation and cache), as ``answer_logprobs`` reads it, with
    each context's prompt read once however many answers are scored on it.

    Two forwards: every context's prompt but its last token on top of its cache, then per row that
    last token, the prefix and the answer on top of its context's result (so even an answer whose
    first token swallows the prefix has a predicting position). The values equal
    ``answer_logprobs`` over the rows' repeated contexts up to float rounding (the tests compare).
    Where every context is scored once, this is ``answer_logprobs`` (one forward, nothing to share).
    Differentiable like ``answer_logprobs``.

    ``reads``: per context, its prompt but the last token already read on top of its cache, as the
    local decode read it (``gcache.io.models.generation.LocalText.read``). When every context has
    one, the first forward is skipped: only the answer lines are read, on top of them (not
    differentiable with respect to ``caches`` then: the reads were computed apart). Raises
    ValueError when the counts differ, a context index is out of range, a cache or read holds
    several rows, or a read does not end where its context's prompt but the last token does."""
    _check_rows(conversations, conversations, caches)
    if len(contexts) != len(items) or not items:
        raise ValueError(f"contexts: expected one context index per item ({len(items)}, at least one), got {len(contexts)}")
    if any(not 0 <= c < len(conversations) for c in contexts):
        raise ValueError(f"contexts: expected indices in [0, {len(conversations)}), got {list(contexts)}")
    for i, c in enumerate(caches):
        if c is not None and c.batch_size != 1:
            raise ValueError(f"caches[{i}]: expected a cache of one row, got {c.batch_size} rows")
    ids, mask = encode_chat(local, list(conversations), add_generation_prompt=True)  # [C, S]
    fns = local.fns
    if reads is not None and all(r is not None for r in _checked_reads(reads, caches, mask)):
        shared = stack_contexts(local, reads)  # [C] rows, left-padded
    # Nothing to share when each context is scored once (then the values are answer_logprobs' exactly),
    # and a context of one token has nothing to read first.
    elif len(set(contexts)) == len(contexts) or int(mask.sum(dim=1).min()) < 2:
        return answer_logprobs(local, [conversations[c] for c in contexts], [caches[c] for c in contexts], items)
    else:
        pre = prefill(fns, ids[:, :-1], mask[:, :-1], cache=stack_contexts(local, caches))
        shared = fns.from_state(pre.state, pre.mask, pre.next_pos)  # [C] rows, left-padded
    tails, answers = [], []
    for c, item in zip(contexts, items):
        prefix_ids, answer_ids = answer_tokens(local.tokenizer, answer_target(item))
        tails.append([int(ids[c, -1])] + prefix_ids)  # left padding: every context ends in the last column
        answers.append(answer_ids)
    batch = AnswerBatch(*(t.to(local.device) for t in answer_batch(tails, answers, pad_token_id=local.pad_token_id)))
    return _answer_logprobs(fns, kv.select_rows(shared, list(contexts)), batch)


def _checked_reads(
    reads: Sequence[kv.KVCache | None], caches: Sequence[kv.KVCache | None], mask: Tensor
) -> Sequence[kv.KVCache | None]:  # fmt: skip
    """``reads`` after checking each against its context: one row, ending one position before the
    context's prompt does (its cache's next position plus the prompt's tokens, minus one)."""
    if len(reads) != len(caches):
        raise ValueError(f"reads: expected one read (or None) per conversation ({len(caches)}), got {len(reads)}")
    tokens = mask.sum(dim=1).tolist()  # [C] real prompt tokens
    for i, (r, c) in enumerate(zip(reads, caches)):
        if r is None:
            continue
        start = 0 if c is None else int(c.next_pos[0])
        if r.batch_size != 1 or int(r.next_pos[0]) != start + tokens[i] - 1:
            raise ValueError(
                f"reads[{i}]: expected one row ending at position {start + tokens[i] - 1} (its context's prompt "
                f"but the last token), got {r.batch_size} rows ending at {r.next_pos.tolist()}"
            )
    return reads


__all__ = [
    "MAX_ANSWER_TOKENS",
    "PREFIXES",
    "AnswerTarget",
    "answer_inputs",
    "answer_logprobs",
    "answer_logprobs_shared",
    "answer_target",
    "answer_tokens",
]
