"""LLM backends (the local model, an OpenAI-compatible API) and the four generation modes.

A decision node turns a question (one chat conversation per batch row) and,
optionally, the KV-cache fused from its predecessors into a final answer:

- ``local``: the local model decodes from the cache (batched, left-padded rows).
- ``api_hint``: the API gets the conversation with a one-sentence hint
  prepended to the last user message, describing the cache's *size* (agents,
  positions, latent steps). The hint carries none of the cache's content: APIs
  take text only. The mode is kept because it is a row of the seed's results.
- ``hybrid``: the local model decodes a draft from the cache; the API answers
  with that draft in its context (the only API mode in which the cache's
  content reaches the API, through the draft's words).
- ``api``: the conversation only, no cache (the text baseline).

The API client is the official ``openai.AsyncOpenAI``: it sets the timeout of
each attempt and carries the key; retries are done here, not by the SDK
(``max_retries=0`` there), because the SDK's backoff base is a module constant
and tests need a short one. Retried: HTTP 408, 409, 429 and 5xx, timeouts and
connection errors, with exponential backoff (``ApiConfig.backoff`` doubled per
retry, capped at ``max_backoff``) or the server's Retry-After. A semaphore per
client bounds the requests in flight (``max_concurrency``). Every failure ends
as an :class:`ApiError` whose message names the endpoint and the cause and
never holds the key (the SDK's exception, which may, is not chained).

Circuit breaker: when ``ApiConfig.outage_after`` requests in a row end in a
connection error or a timeout (each after its retries), the client holds the
endpoint for down: ``ApiClient.outage`` is set, and every later request, and
every pending retry, fails at once with :class:`ApiOutageError` instead of
waiting through its own timeouts. Any answer from the server (a success, a 429,
a 4xx, a 5xx) resets the count: a server that answers is not down, and rate
limits back off as before.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
from typing import Any, Callable, NamedTuple, Sequence

import torch

from gcache.core.cache import KVCache
from gcache.core.latent import Decoding, generate
from gcache.io.apiconfig import (
    API_MODES,
    GENERATION_MODES,
    LOCAL_MODES,
    ApiConfig,
    GenerationMode,
    check_mode,
    missing_api_settings,
    require_api,
    resolve_api_config,
)
from gcache.io.extract import answer_complete
from gcache.io.models import LocalModel, decode_text, encode_chat

__all__ = [
    "GENERATION_MODES",
    "GenerationMode",
    "ApiConfig",
    "resolve_api_config",
    "require_api",
    "ApiError",
    "ApiStatusError",
    "ApiTimeoutError",
    "ApiConnectionError",
    "ApiResponseError",
    "ApiOutageError",
    "Completion",
    "ApiClient",
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

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
Conversation = Sequence[Message]

_RETRY_STATUSES = frozenset({408, 409, 429})
_MAX_RETRY_AFTER_S = 60.0


# --------------------------------------------------------------------------- errors


class ApiError(RuntimeError):
    """An API call failed for good (after any retries). The message never contains the key."""

    def __init__(self, message: str, *, attempts: int = 1) -> None:
        super().__init__(message)
        self.attempts = attempts


class ApiStatusError(ApiError):
    """The server answered with an HTTP error status (``status_code``)."""

    def __init__(self, message: str, *, status_code: int, attempts: int = 1) -> None:
        super().__init__(message, attempts=attempts)
        self.status_code = status_code


class ApiTimeoutError(ApiError):
    """No answer within the timeout, on every attempt."""


class ApiConnectionError(ApiError):
    """The endpoint could not be reached, on every attempt."""


class ApiResponseError(ApiError):
    """The server answered 200 with something that is not a usable chat completion."""


class ApiOutageError(ApiError):
    """The client holds the endpoint for down (its circuit breaker tripped) and sent no request."""


# --------------------------------------------------------------------------- client


class Completion(NamedTuple):
    """One chat completion: its text and the token usage the server reported (0 where it reported none)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    attempts: int = 1


def _retry_after(headers: Any) -> float | None:
    """Seconds a response's Retry-After(-ms) header asks to wait, when numeric and sane."""
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            continue
        if 0 <= seconds <= _MAX_RETRY_AFTER_S:
            return seconds
    return None


def _server_message(body: object, fallback: str) -> str:
    """The human part of an error body ({"error": {"message": ...}} or a string), on one line, cut short."""
    message = None
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
    elif isinstance(body, str):
        message = body
    text = " ".join(str(message if message else fallback).split())
    return text[:300]


class ApiClient:
    """An OpenAI-compatible chat-completions client with retries, a concurrency limit and usage totals.

    Use as ``async with ApiClient(config) as api: await api.complete(messages, max_tokens=...)``
    (or call :meth:`aclose`). The client may be used from several ``asyncio.run`` calls one
    after the other: the SDK client and the semaphore are made per event loop.
    Raises ValueError when ``config`` lacks a base URL, key or model.
    """

    def __init__(self, config: ApiConfig) -> None:
        missing = missing_api_settings(config)
        if missing:
            raise ValueError(f"config: the API client has no {'; no '.join(missing)}")
        self.config = config
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._semaphore: asyncio.Semaphore | None = None
        self._warned_no_usage = False
        self.totals = {"requests": 0, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self.failures_in_a_row = 0  # requests ended by a connection error or a timeout since the last answer
        self.outage: ApiOutageError | None = None  # set once the endpoint is held for down; then every request fails

    def __repr__(self) -> str:
        return f"ApiClient({self.config!r})"

    def _state(self) -> tuple[Any, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            import openai  # here, not at the top: ~2.3 s to import (measured), and local runs never need it

            # A client from a finished loop holds connections bound to that loop: start afresh.
            self._client = openai.AsyncOpenAI(
                api_key=self.config.api_key,
                base_url=self.config.base_url,
                timeout=self.config.timeout,
                max_retries=0,
            )
            self._semaphore = asyncio.Semaphore(self.config.max_concurrency)
            self._loop = loop
        assert self._semaphore is not None
        return self._client, self._semaphore

    async def aclose(self) -> None:
        """Close the HTTP connections of the current event loop's SDK client."""
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.close()
        self._client, self._semaphore, self._loop = None, None, None

    async def __aenter__(self) -> "ApiClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _fail(self, cls: type[ApiError], what: str, attempts: int, **extra: Any) -> ApiError:
        where = self.config.scrub(str(self.config.base_url))
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return cls(self.config.scrub(f"API at {where}: {what}{tries}"), attempts=attempts, **extra)

    def _give_up(self, cls: type[ApiError], what: str, attempts: int, **extra: Any) -> ApiError:
        """The error that ends a request; counts it toward the circuit breaker (see the module docstring)."""
        err = self._fail(cls, what, attempts, **extra)
        if not issubclass(cls, (ApiConnectionError, ApiTimeoutError)):
            self.failures_in_a_row = 0
            return err
        self.failures_in_a_row += 1
        limit = self.config.outage_after
        if limit and self.failures_in_a_row >= limit and self.outage is None:
            tries = f" after {attempts} attempts" if attempts > 1 else ""
            self.outage = self._fail(
                ApiOutageError, f"held for down: {self.failures_in_a_row} requests in a row failed, the last: {what}{tries}", 1
            )
            log.warning("%s", self.outage)
        return err

    def _refused(self) -> ApiOutageError:
        """A fresh copy of the outage error (one instance raised twice would chain its tracebacks)."""
        assert self.outage is not None
        return ApiOutageError(str(self.outage), attempts=0)

    def _backoff(self, retry: int, headers: Any = None) -> float:
        server = _retry_after(headers)
        if server is not None:
            return server
        delay = min(self.config.backoff * 2.0**retry, self.config.max_backoff)
        return delay * (1.0 - 0.25 * random.random())  # jitter, so parallel retries do not fall in step

    async def complete(
        self,
        messages: Conversation,
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float | None = None,
    ) -> Completion:
        """The model's reply to one conversation. Raises ValueError on bad arguments, ApiError on failure."""
        import openai  # see _state: imported by the first API call, not by local runs

        messages = _check_conversation(messages, "messages")
        if max_tokens < 1:
            raise ValueError(f"max_tokens: expected a positive integer, got {max_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature: expected a non-negative number, got {temperature!r}")
        request: dict[str, Any] = {
            "model": self.config.model,
            "messages": messages,
            "max_tokens": int(max_tokens),
            "temperature": float(temperature),
        }
        if top_p is not None:
            request["top_p"] = float(top_p)

        client, semaphore = self._state()
        async with semaphore:
            attempt = 0
            while True:
                if self.outage is not None:  # also stops a retry once another request tripped the breaker
                    raise self._refused()
                attempt += 1
                self.totals["requests"] += 1
                headers = None
                try:
                    log.debug("chat completion: model %s, %d messages, attempt %d", self.config.model, len(messages), attempt)
                    response = await client.chat.completions.create(**request)
                    self.failures_in_a_row = 0
                    break
                except openai.APIStatusError as err:
                    status = err.status_code
                    cause = f"HTTP {status} ({_server_message(err.body, err.message)})"
                    if status not in _RETRY_STATUSES and status < 500:
                        raise self._give_up(ApiStatusError, f"answered {cause}", attempt, status_code=status) from None
                    if attempt > self.config.max_retries:
                        raise self._give_up(ApiStatusError, f"answered {cause}", attempt, status_code=status) from None
                    headers = err.response.headers
                except openai.APITimeoutError:
                    cause = f"no answer within {self.config.timeout:g} s"
                    if attempt > self.config.max_retries:
                        raise self._give_up(ApiTimeoutError, cause, attempt) from None
                except openai.APIConnectionError as err:
                    cause = f"could not connect ({type(err.__cause__ or err).__name__})"
                    if attempt > self.config.max_retries:
                        raise self._give_up(ApiConnectionError, cause, attempt) from None
                except (json.JSONDecodeError, openai.APIResponseValidationError) as err:
                    what = f"sent a response that is not chat-completions JSON ({type(err).__name__}: {err})"
                    raise self._give_up(ApiResponseError, what, attempt) from None
                delay = self._backoff(attempt - 1, headers)
                self.totals["retries"] += 1
                log.warning(
                    "%s",
                    self.config.scrub(
                        f"API {cause}; retry {attempt} of {self.config.max_retries} in {delay:.2f} s"
                    ),
                )
                await asyncio.sleep(delay)
        return self._read(response, attempt)

    def _read(self, response: Any, attempts: int) -> Completion:
        choices = getattr(response, "choices", None)
        if not choices:
            raise self._fail(ApiResponseError, "sent a completion with no choices", attempts)
        message = getattr(choices[0], "message", None)
        content = getattr(message, "content", None)
        if not isinstance(content, str):
            reason = getattr(choices[0], "finish_reason", None)
            raise self._fail(ApiResponseError, f"sent a choice with no text content (finish_reason {reason!r})", attempts)
        usage = getattr(response, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        if usage is None and not self._warned_no_usage:
            self._warned_no_usage = True
            log.warning("the API reports no token usage: its token counts are recorded as 0")
        self.totals["prompt_tokens"] += prompt_tokens
        self.totals["completion_tokens"] += completion_tokens
        return Completion(content, prompt_tokens, completion_tokens, attempts)

    async def complete_many(
        self,
        conversations: Sequence[Conversation],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float | None = None,
    ) -> list[Completion]:
        """Replies to several conversations, in their order, at most ``max_concurrency`` in flight.

        Every request runs to its end before the first failure (as an ApiError) is raised,
        so no request is left running in the background.
        """
        results = await asyncio.gather(
            *(self.complete(c, max_tokens=max_tokens, temperature=temperature, top_p=top_p) for c in conversations),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)  # type: ignore[arg-type]


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


def _check_conversation(messages: Conversation, name: str) -> list[Message]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise TypeError(f"{name}: expected a non-empty list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TypeError(f"{name}[{i}]: expected a dict with str 'role' and 'content', got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def with_cache_hint(messages: Conversation, hint: str) -> list[Message]:
    """The conversation with ``hint`` prepended to its last user message (a new list; the input is kept).

    Raises TypeError on a malformed conversation, ValueError when it has no user message.
    """
    out = _check_conversation(messages, "messages")
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
    out = _check_conversation(messages, "messages")
    return out + [{"role": "assistant", "content": draft}, {"role": "user", "content": HYBRID_INSTRUCTION}]


# --------------------------------------------------------------------------- local


class LocalText(NamedTuple):
    """Text the local model decoded for one row, with its token counts."""

    text: str
    prompt_tokens: int  # tokens of this row's prompt fed to the model (padding excluded)
    latent_tokens: int  # latent steps run in this call: 0 (rollouts count their own)
    generated_tokens: int  # tokens of the answer, EOS excluded (the latent core's Generation.lengths)


@functools.lru_cache(maxsize=8)
def _newline_token_ids(tokenizer: Any) -> torch.Tensor:
    """Ids of the tokens whose text holds a line break (decoded once per tokenizer, ~0.5 s for 49k)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return torch.tensor([i for i, t in enumerate(texts) if "\n" in t], dtype=torch.long)


def answer_stop(local: LocalModel, family: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``stop`` rule for ``Decoding.stop``: a row ends once its text holds a complete
    final answer in the task family's format (``extract.answer_complete``: a
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
    rows = [_check_conversation(c, f"conversations[{i}]") for i, c in enumerate(conversations)]
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
    return [LocalText(t, int(p), 0, int(n)) for t, p, n in zip(texts, prompt_tokens, lengths)]


# --------------------------------------------------------------------------- modes


class Answer(NamedTuple):
    """A decision node's answer for one row, with the tokens it cost.

    tokens: {"prompt", "latent", "generated"} on the local model (zeros when it was not used;
    "latent" is 0 since decoding runs no latent steps, kept so that node records sum alike);
    api_tokens: {"prompt", "completion"} as the API reported them (zeros when it was not called);
    draft: the local model's draft in hybrid mode, else None.
    """

    text: str
    tokens: dict[str, int]
    api_tokens: dict[str, int]
    draft: str | None = None


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
        return [Answer(d.text, _local_tokens(d), _no_api()) for d in generate_local(local, rows, decoding, cache=cache)]
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
    return [Answer(c.text, _local_tokens(d), _api_tokens(c), draft=d.text) for c, d in zip(done, drafts)]


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
