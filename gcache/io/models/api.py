"""The OpenAI-compatible API client: retries, timeouts, a concurrency bound and an outage
circuit breaker; its errors never hold the key.

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
import json
import logging
import random
from typing import Any, NamedTuple, Sequence

from gcache.io.models.apiconfig import ApiConfig, missing_api_settings, require_api, resolve_api_config

__all__ = [
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
    "Message",
    "Conversation",
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


def check_conversation(messages: Conversation, name: str) -> list[Message]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise TypeError(f"{name}: expected a non-empty list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TypeError(f"{name}[{i}]: expected a dict with str 'role' and 'content', got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


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

        messages = check_conversation(messages, "messages")
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
