"""The four generation modes: how a decision node turns a question (one chat conversation
per batch row) and, optionally, the KV-cache fused from its predecessors into an answer:

- ``local``: the local model decodes from the cache (batched, left-padded rows).
- ``api_hint``: the API gets the conversation with a one-sentence hint
  prepended to the last user message, describing the cache's *size* (agents,
  positions, latent steps). The hint carries none of the cache's content: APIs
  take text only. The mode is kept because it is a row of the seed's results.
- ``hybrid``: the local model decodes a draft from the cache; the API answers
  with that draft in its context (the only API mode in which the cache's
  content reaches the API, through the draft's words).
- ``api``: the conversation only, no cache (the text baseline).

The API calls go through `gcache.io.models.api.ApiClient`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch

from gcache.core import cache as kv
from gcache.core.cache import KVCache
from gcache.core.latent import Decoding, Generation, generate
from gcache.io.models.api import ApiClient, Completion, Conversation, Message, check_conversation
from gcache.io.models.apiconfig import API_MODES, GENERATION_MODES, LOCAL_MODES, GenerationMode, check_mode
from gcache.io.models.local import LocalModel, decode_text, encode_chat
from gcache.io.tasks.contracts import answer_complete

__all__ = [
    "GENERATION_MODES",
    "GenerationMode",
    "CacheInfo",
    "describe_cache_hint",
    "with_cache_hint",
    "with_draft",
    "LocalText",
    "generate_local",
    "answer_stop",
    "Answer",
    "generate_answer",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- prompts


class CacheInfo(NamedTuple):
    """What the api_hint sentence says about a cache: its size, never its content."""

    num_agents: int  # agents whose caches were fused into it
    cache_len: int  # positions it holds (real ones, padding excluded)
    latent_steps: int  # latent steps each agent ran


def describe_cache_hint(num_agents: int, cache_len: int, latent_steps: int) -> str:
    """The api_hint sentence: the cache's size in words. It says nothing of what the cache holds.

    Raises ValueError on a negative count.
    """
    for name, value in (("num_agents", num_agents), ("cache_len", cache_len), ("latent_steps", latent_steps)):
        if value < 0:
            raise ValueError(f"{name}: expected a non-negative count, got {value!r}")
    agents = "agent" if num_agents == 1 else "agents"
    return (
        f"[Cached reasoning from {num_agents} {agents}: a KV-cache of {cache_len} positions, "
        f"{latent_steps} latent steps per agent.]"
    )


def with_cache_hint(messages: Conversation, hint: str) -> list[Message]:
    """The conversation with ``hint`` prepended to its last user message (a new list; the input is kept).

    Raises TypeError on a malformed conversation, ValueError when it has no user message.
    """
    out = check_conversation(messages, "messages")
    for m in reversed(out):
        if m["role"] == "user":
            m["content"] = f"{hint}\n\n{m['content']}"
            return out
    raise ValueError("messages: expected at least one message with role 'user', got none")


HYBRID_INSTRUCTION = (
    "The answer above is a draft by a small local model that read the other agents' reasoning "
    "directly from their KV-caches. Check it, correct any mistake, and give your own final answer "
    "in the format asked for."
)


def with_draft(messages: Conversation, draft: str) -> list[Message]:
    """The conversation followed by the local draft (as the assistant's turn) and a request to check it.

    Roles keep alternating user / assistant / user, which strict chat templates require.
    Raises TypeError on a malformed conversation.
    """
    out = check_conversation(messages, "messages")
    return out + [{"role": "assistant", "content": draft}, {"role": "user", "content": HYBRID_INSTRUCTION}]


# --------------------------------------------------------------------------- local


@dataclass(frozen=True)
class LocalText:
    """Text the local model decoded for one row, with its token counts (and, not compared, what
    the decode read of the row's context)."""

    text: str
    prompt_tokens: int  # tokens of this row's prompt fed to the model (padding excluded)
    latent_tokens: int  # latent steps run in this call: 0 (rollouts count their own)
    generated_tokens: int  # tokens of the answer, EOS excluded (the latent core's Generation.lengths)
    # [L, 1, H, T, D] the cache and the prompt but its last token, as the decode read them
    read: KVCache | None = field(default=None, compare=False, repr=False)


@functools.lru_cache(maxsize=8)
def _newline_token_ids(tokenizer: Any) -> torch.Tensor:
    """Ids of the tokens whose text holds a line break (decoded once per tokenizer, ~0.5 s for 49k)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return torch.tensor([i for i, t in enumerate(texts) if "\n" in t], dtype=torch.long)


def answer_stop(local: LocalModel, family: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``stop`` rule for ``Decoding.stop``: a row ends once its text holds a complete
    final answer in the task family's format (``contracts.answer_complete``: a
    ``#### <number>`` line, an "Answer: X" line, a closed code block with a ``def``).

    Answers are complete only at a line break, so a row's text is decoded only at steps
    whose token holds one; other steps cost one ``isin``. Raises ValueError on an unknown family.
    """
    answer_complete(family, "")  # an unknown family fails here, before decoding starts
    newlines = _newline_token_ids(local.tokenizer).to(local.device)

    def stop(tokens: torch.Tensor, running: torch.Tensor) -> torch.Tensor:
        done = torch.zeros_like(running)
        check = running & torch.isin(tokens[:, -1], newlines)
        for b in check.nonzero().flatten().tolist():
            text = local.tokenizer.decode(tokens[b].tolist(), skip_special_tokens=True)
            done[b] = answer_complete(family, text)
        return done

    return stop


def _check_decoding(decoding: Any) -> Decoding:
    """A Decoding that decodes at least one token (an answer of none is no answer)."""
    if not isinstance(decoding, Decoding):
        raise TypeError(f"decoding: expected a gcache Decoding, got {type(decoding).__name__}")
    if decoding.max_new_tokens < 1:
        raise ValueError(f"decoding.max_new_tokens: expected a positive integer, got {decoding.max_new_tokens!r}")
    return decoding


def generate_local(
    local: LocalModel,
    conversations: Sequence[Conversation],
    decoding: Decoding,
    *,
    cache: KVCache | None = None,
) -> list[LocalText]:
    """Decode one answer per conversation with the local model, on top of ``cache`` when given.

    The conversations are encoded with the chat template and left-padded into one batch;
    ``cache`` ([L, B, H, T, D] with B = len(conversations)) holds what each row's prompt
    follows; the latent core's ``generate`` reads the prompt on it and decodes as
    ``decoding`` says (greedy at temperature 0, else sampled from its seed; its ``stop``
    rule, e.g. ``answer_stop(local, family)``, ends a row once its answer is complete).
    Latent steps are the rollout's business (their tokens are counted there), so
    ``latent_tokens`` is 0 here. Raises ValueError/TypeError on bad arguments (a cache
    whose rows do not match, a decoding of no tokens).
    """
    rows = [check_conversation(c, f"conversations[{i}]") for i, c in enumerate(conversations)]
    if not rows:
        raise ValueError("conversations: expected at least one conversation, got none")
    _check_decoding(decoding)
    if cache is not None and cache.batch_size != len(rows):
        raise ValueError(
            f"cache: expected one row per conversation ({len(rows)}), got a cache of {cache.batch_size} rows"
        )
    input_ids, attention_mask = encode_chat(local, rows, add_generation_prompt=True)  # [B, S], [B, S]
    gen = generate(
        local.fns, input_ids, attention_mask, decoding,
        cache=cache, eos_token_ids=local.eos_token_ids, pad_token_id=local.pad_token_id,
    )  # fmt: skip
    texts = decode_text(local, gen.tokens, gen.lengths)
    prompt_tokens = attention_mask.sum(-1).tolist()
    lengths = gen.lengths.tolist()
    width = (0 if cache is None else cache.seq_len) + input_ids.shape[1]
    reads = _prompt_reads(local, gen, width)
    return [LocalText(t, int(p), 0, int(n), r) for t, p, n, r in zip(texts, prompt_tokens, lengths, reads)]


def _prompt_reads(local: LocalModel, gen: Generation, width: int) -> list[KVCache | None]:
    """Per row, what the decode had read before its prompt's last token: the first ``width - 1``
    columns of the generation's cache (the incoming cache, then the prompt; decoding only appends
    after them), one row each, padding trimmed. A decision context's answer line is scored on it
    (gcache.io.runner.answers) without reading the prompt again. None for every row when another
    step decoded the answer (``fns.decoder``): its cache need not hold the prompt's exact keys."""
    rows = gen.tokens.shape[0]
    if local.fns.decoder is not None or width < 2:
        return [None] * rows
    before = kv.keep_first(gen.cache, width - 1)._replace(next_pos=gen.cache.next_pos - gen.lengths - 1)
    return [kv.trim_padding(kv.select_rows(before, [b])) for b in range(rows)]


# --------------------------------------------------------------------------- modes


@dataclass(frozen=True)
class Answer:
    """A decision node's answer for one row, with the tokens it cost.

    tokens: {"prompt", "latent", "generated"} on the local model (zeros when it was not used;
    "latent" is 0 since decoding runs no latent steps, kept so that node records sum alike);
    api_tokens: {"prompt", "completion"} as the API reported them (zeros when it was not called);
    draft: the local model's draft in hybrid mode, else None;
    read: in ``local`` and ``hybrid`` mode, the cache and the prompt but its last token as the local
    decode read them (``LocalText.read``), else None.
    """

    text: str
    tokens: dict[str, int]
    api_tokens: dict[str, int]
    draft: str | None = None
    read: KVCache | None = field(default=None, compare=False, repr=False)  # LocalText.read of the local decode


def _no_local() -> dict[str, int]:
    return {"prompt": 0, "latent": 0, "generated": 0}


def _no_api() -> dict[str, int]:
    return {"prompt": 0, "completion": 0}


def _local_tokens(t: LocalText) -> dict[str, int]:
    return {"prompt": t.prompt_tokens, "latent": t.latent_tokens, "generated": t.generated_tokens}


def _api_tokens(c: Completion) -> dict[str, int]:
    return {"prompt": c.prompt_tokens, "completion": c.completion_tokens}


def _hint_infos(cache_info: CacheInfo | Sequence[CacheInfo] | None, rows: int) -> list[CacheInfo]:
    """One CacheInfo per row from one for all rows or one per row."""
    if cache_info is None:
        raise ValueError("cache_info: mode 'api_hint' describes the cache to the API, but no CacheInfo was given")
    infos = [cache_info] * rows if isinstance(cache_info, CacheInfo) else list(cache_info)
    if len(infos) != rows or not all(isinstance(i, CacheInfo) for i in infos):
        raise ValueError(f"cache_info: expected one CacheInfo or {rows} of them, got {cache_info!r:.120}")
    return infos


def generate_answer(
    mode: str,
    conversations: Sequence[Conversation],
    decoding: Decoding,
    *,
    local: LocalModel | None = None,
    api: ApiClient | None = None,
    cache: KVCache | None = None,
    cache_info: CacheInfo | Sequence[CacheInfo] | None = None,
) -> list[Answer]:
    """One answer per conversation (batch row) in the given generation mode (see the module docstring).

    decoding: how every answer is decoded: the local model uses all of it (its ``stop`` rule,
    e.g. ``answer_stop(local, family)``, ends local decoding early, in ``local`` mode and for
    the ``hybrid`` draft); the API gets its max_new_tokens, temperature and top_p.
    local: needed by ``local`` and ``hybrid``; api: needed by ``api_hint``, ``hybrid`` and ``api``.
    cache: [L, B, H, T, D] with B = len(conversations), or None; ``api`` takes none.
    cache_info: what the ``api_hint`` sentence describes, one for all rows or one per row
    (needed by api_hint; the other modes ignore it). The local model decodes all rows as one
    batch; the API gets them as concurrent requests (up to the client's ``max_concurrency``)
    in an event loop of their own (``asyncio.run``: call this outside a running loop), and the
    client's connections are closed before returning (the client itself stays usable).
    Raises ValueError/TypeError naming what is missing or wrong, ApiError when the API fails.
    """
    mode = check_mode(mode)
    rows = list(conversations)
    if not rows:
        raise ValueError("conversations: expected at least one conversation, got none")
    _check_decoding(decoding)
    if mode in LOCAL_MODES and local is None:
        raise ValueError(f"local: mode {mode!r} decodes with the local model, but none was given")
    if mode in API_MODES and api is None:
        raise ValueError(f"api: mode {mode!r} calls the API, but no ApiClient was given")
    if mode == "api" and cache is not None:
        raise ValueError("cache: mode 'api' is the text baseline and takes no cache, but one was given")
    infos = _hint_infos(cache_info, len(rows)) if mode == "api_hint" else None

    if mode == "local":
        done = generate_local(local, rows, decoding, cache=cache)
        return [Answer(d.text, _local_tokens(d), _no_api(), read=d.read) for d in done]
    assert api is not None
    if mode == "api":
        done = asyncio.run(_complete_many(api, rows, decoding))
        return [Answer(c.text, _no_local(), _api_tokens(c)) for c in done]
    if mode == "api_hint":
        hinted = [with_cache_hint(r, describe_cache_hint(*i)) for r, i in zip(rows, infos)]
        done = asyncio.run(_complete_many(api, hinted, decoding))
        return [Answer(c.text, _no_local(), _api_tokens(c)) for c in done]
    # hybrid
    drafts = generate_local(local, rows, decoding, cache=cache)
    prompts = [with_draft(r, d.text) for r, d in zip(rows, drafts)]
    done = asyncio.run(_complete_many(api, prompts, decoding))
    return [Answer(c.text, _local_tokens(d), _api_tokens(c), draft=d.text, read=d.read) for c, d in zip(done, drafts)]


async def _complete_many(api: ApiClient, conversations: list[Conversation], decoding: Decoding) -> list[Completion]:
    """The API's replies under ``decoding``'s settings; the client's connections are closed before the loop ends."""
    top_p = None if decoding.top_p == 1.0 else decoding.top_p  # servers differ in defaults: send it only when set
    try:
        return await api.complete_many(
            conversations, max_tokens=decoding.max_new_tokens, temperature=decoding.temperature, top_p=top_p
        )
    finally:
        # This loop ends when the batch does: close its connections, so none is left bound to a dead loop.
        await api.aclose()
