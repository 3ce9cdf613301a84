"""The API client against a scripted loopback server: retries, timeouts, bad answers, concurrency,
and the circuit breaker that holds a dead endpoint for down.

No model is needed: the server answers with a word-count echo unless a scripted fault comes first.
Backoff is set to a few milliseconds so that retries cost no time.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from _openai_server import OpenAIServer, Reply

from gcache.io.models.api import (
    ApiClient,
    ApiConfig,
    ApiConnectionError,
    ApiError,
    ApiOutageError,
    ApiResponseError,
    ApiStatusError,
    ApiTimeoutError,
    Completion,
)

KEY = "sk-test-fault-0123456789"
MESSAGES = [{"role": "user", "content": "what is two plus two"}]


def _config(server: OpenAIServer, **settings) -> ApiConfig:
    settings = {"max_retries": 2, "backoff": 0.005, "max_backoff": 0.02, "timeout": 5.0, **settings}
    return ApiConfig(model="loopback", base_url=server.base_url, api_key=KEY, **settings)


def _complete(config: ApiConfig, messages=MESSAGES, max_tokens: int = 8) -> Completion:
    async def go() -> Completion:
        async with ApiClient(config) as api:
            return await api.complete(messages, max_tokens=max_tokens)

    return asyncio.run(go())


def test_a_429_is_retried_once_then_the_answer_comes():
    with OpenAIServer(script=[Reply("status", 429)]) as server:
        done = _complete(_config(server))
    assert done.attempts == 2
    assert len(server.requests) == 2
    assert done.text == "echo: what is two plus two"
    assert (done.prompt_tokens, done.completion_tokens) == (5, 6)


@pytest.mark.parametrize("status", [500, 502, 503, 408])
def test_transient_statuses_are_retried(status):
    with OpenAIServer(script=[Reply("status", status)]) as server:
        done = _complete(_config(server))
    assert done.attempts == 2 and len(server.requests) == 2


def test_500_three_times_is_a_clear_error_after_the_retries():
    with OpenAIServer(script=[Reply("status", 500)] * 3) as server:
        with pytest.raises(ApiStatusError) as caught:
            _complete(_config(server, max_retries=2))
    err = caught.value
    assert len(server.requests) == 3
    assert err.status_code == 500 and err.attempts == 3
    message = str(err)
    assert "HTTP 500" in message and server.base_url in message and "after 3 attempts" in message
    assert "\n" not in message


def test_a_client_error_is_not_retried():
    with OpenAIServer(script=[Reply("status", 400, body='{"error": {"message": "bad max_tokens"}}')]) as server:
        with pytest.raises(ApiStatusError) as caught:
            _complete(_config(server))
    assert len(server.requests) == 1
    assert caught.value.status_code == 400 and "bad max_tokens" in str(caught.value)


def test_a_hang_past_the_timeout_is_a_clear_timeout_error():
    with OpenAIServer(script=[Reply("hang"), Reply("hang")], hang_s=5.0) as server:
        start = time.monotonic()
        with pytest.raises(ApiTimeoutError) as caught:
            _complete(_config(server, timeout=0.5, max_retries=1))
        elapsed = time.monotonic() - start
    assert len(server.requests) == 2  # the first attempt and one retry
    assert "no answer within 0.5 s" in str(caught.value) and caught.value.attempts == 2
    assert elapsed < 5.0  # the client gave up, the server's hang did not end it


def test_a_hang_then_an_answer_succeeds_on_retry():
    with OpenAIServer(script=[Reply("hang")], hang_s=5.0) as server:
        done = _complete(_config(server, timeout=0.5, max_retries=1))
    assert done.attempts == 2 and done.text.startswith("echo:")


@pytest.mark.parametrize(
    "reply, words",
    [
        (Reply("malformed"), "not chat-completions JSON"),
        (Reply("empty_choices"), "no choices"),
        (Reply("no_content"), "no text content"),
    ],
)
def test_a_bad_answer_is_a_clear_error_without_retry(reply, words):
    with OpenAIServer(script=[reply]) as server:
        with pytest.raises(ApiResponseError) as caught:
            _complete(_config(server))
    assert len(server.requests) == 1
    assert words in str(caught.value) and server.base_url in str(caught.value)


def test_an_unreachable_endpoint_is_a_connection_error():
    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ApiConfig(
        model="m", base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=1, backoff=0.005, timeout=2.0
    )
    with pytest.raises(ApiConnectionError) as caught:
        _complete(config)
    assert "could not connect" in str(caught.value) and caught.value.attempts == 2


def test_retry_after_from_the_server_replaces_the_backoff():
    slow = {"backoff": 30.0, "max_backoff": 30.0}  # a wait the test would notice
    with OpenAIServer(script=[Reply("status", 429, headers=(("retry-after-ms", "20"),))]) as server:
        start = time.monotonic()
        done = _complete(_config(server, **slow))
    assert done.attempts == 2 and time.monotonic() - start < 10.0


def test_the_concurrency_limit_bounds_requests_in_flight():
    conversations = [[{"role": "user", "content": f"question {i}"}] for i in range(6)]

    async def go(config: ApiConfig) -> list[Completion]:
        async with ApiClient(config) as api:
            return await api.complete_many(conversations, max_tokens=4)

    with OpenAIServer(latency_s=0.15) as server:
        done = asyncio.run(go(_config(server, max_concurrency=2)))
    assert server.max_in_flight == 2
    assert [c.text for c in done] == [f"echo: question {i}" for i in range(6)]  # in input order


def test_complete_many_raises_the_failure_after_every_request_ended():
    conversations = [[{"role": "user", "content": f"q{i}"}] for i in range(3)]
    async def go(config: ApiConfig) -> list[Completion]:
        async with ApiClient(config) as api:
            return await api.complete_many(conversations, max_tokens=4)

    with OpenAIServer(script=[Reply("status", 400)], latency_s=0.05) as server:
        with pytest.raises(ApiStatusError):
            asyncio.run(go(_config(server, max_concurrency=1)))
        assert len(server.requests) == 3


def test_one_client_serves_several_event_loops():
    async def once(api: ApiClient) -> Completion:
        try:
            return await api.complete(MESSAGES, max_tokens=4)
        finally:
            await api.aclose()  # the connections belong to this loop

    with OpenAIServer() as server:
        api = ApiClient(_config(server))
        first = asyncio.run(once(api))
        second = asyncio.run(once(api))
    assert first == second
    assert api.totals["requests"] == 2 and api.totals["completion_tokens"] == 2 * first.completion_tokens


def test_the_key_is_sent_as_a_bearer_token():
    with OpenAIServer(api_key=KEY) as server:
        _complete(_config(server))
    assert server.auth_headers == [f"Bearer {KEY}"]


def test_request_fields_reach_the_server():
    with OpenAIServer() as server:
        _complete(_config(server), max_tokens=7)
    (request,) = server.requests
    assert request["model"] == "loopback" and request["max_tokens"] == 7 and request["temperature"] == 0.0
    assert request["messages"] == MESSAGES


@pytest.mark.parametrize(
    "kwargs, word",
    [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 4, "temperature": -1.0}, "temperature")],
)
def test_bad_request_arguments_are_value_errors(kwargs, word):
    api = ApiClient(ApiConfig(model="m", base_url="http://127.0.0.1:9/v1", api_key=KEY))
    with pytest.raises(ValueError, match=word):
        asyncio.run(api.complete(MESSAGES, **kwargs))


@pytest.mark.parametrize("messages", ["just a string", [], [{"role": "user"}], [("user", "hi")]])
def test_malformed_conversations_are_type_errors(messages):
    api = ApiClient(ApiConfig(model="m", base_url="http://127.0.0.1:9/v1", api_key=KEY))
    with pytest.raises(TypeError, match="messages"):
        asyncio.run(api.complete(messages, max_tokens=4))


# --------------------------------------------------------------------------- circuit breaker


def _requests(api: ApiClient, n: int) -> list[object]:
    """n requests one after the other on one client; each one's Completion or ApiError."""

    async def go() -> list[object]:
        out: list[object] = []
        for _ in range(n):
            try:
                out.append(await api.complete(MESSAGES, max_tokens=4))
            except ApiError as err:
                out.append(err)
        await api.aclose()
        return out

    return asyncio.run(go())


def test_k_connection_failures_in_a_row_trip_the_breaker_and_later_requests_are_refused_unsent():
    with OpenAIServer(script=[Reply("drop")] * 20) as server:
        api = ApiClient(_config(server, max_retries=1, outage_after=3))
        results = _requests(api, 6)
    kinds = [type(r) for r in results]
    assert kinds == [ApiConnectionError] * 3 + [ApiOutageError] * 3
    assert len(server.requests) == 3 * 2, "three requests of two attempts each; none after the breaker tripped"
    assert isinstance(api.outage, ApiOutageError)
    message = str(results[-1])
    assert "3 requests in a row failed" in message and "could not connect" in message and server.base_url in message
    assert "\n" not in message and KEY not in message
    assert results[-1].attempts == 0


def test_timeouts_count_toward_the_breaker():
    with OpenAIServer(script=[Reply("hang")] * 4, hang_s=5.0) as server:
        api = ApiClient(_config(server, max_retries=0, timeout=0.3, outage_after=2))
        results = _requests(api, 3)
    assert [type(r) for r in results] == [ApiTimeoutError, ApiTimeoutError, ApiOutageError]
    assert len(server.requests) == 2


def test_an_answer_between_failures_resets_the_count():
    script = [Reply("drop"), Reply("drop"), Reply("ok"), Reply("drop"), Reply("drop"), Reply("ok")]
    with OpenAIServer(script=script) as server:
        api = ApiClient(_config(server, max_retries=0, outage_after=3))
        results = _requests(api, 6)
    assert [type(r).__name__ for r in results] == ["ApiConnectionError"] * 2 + ["Completion"] + ["ApiConnectionError"] * 2 + ["Completion"]
    assert api.outage is None and len(server.requests) == 6


@pytest.mark.parametrize("reply", [Reply("status", 429), Reply("status", 503), Reply("status", 400)])
def test_a_server_that_answers_with_an_error_status_is_not_an_outage(reply):
    with OpenAIServer(script=[reply] * 40) as server:
        api = ApiClient(_config(server, max_retries=1, outage_after=2))
        results = _requests(api, 4)
    assert all(isinstance(r, ApiStatusError) for r in results)
    assert api.outage is None
    assert len(server.requests) == 4 * (1 if reply.status == 400 else 2), "every request still tried and retried"


def test_outage_after_zero_never_trips():
    with OpenAIServer(script=[Reply("drop")] * 10) as server:
        api = ApiClient(_config(server, max_retries=0, outage_after=0))
        results = _requests(api, 5)
    assert all(isinstance(r, ApiConnectionError) for r in results) and api.outage is None


def test_a_pending_retry_stops_once_another_request_tripped_the_breaker(monkeypatch):
    conversations = [[{"role": "user", "content": f"q{i}"}] for i in range(2)]

    async def go(api: ApiClient):
        try:
            return await api.complete_many(conversations, max_tokens=4)
        finally:
            await api.aclose()

    with OpenAIServer(script=[Reply("drop")] * 10) as server:
        api = ApiClient(_config(server, max_retries=1, outage_after=1))
        # The first request to back off retries soon and fails for good, tripping the breaker
        # while the other still waits: that one must give up without its retry.
        waits = iter([0.05, 0.5])
        monkeypatch.setattr(api, "_backoff", lambda retry, headers=None: next(waits))
        with pytest.raises(ApiError):
            asyncio.run(go(api))
    assert api.outage is not None
    assert len(server.requests) == 3, "two first attempts, one retry; the refused retry was never sent"


@pytest.mark.parametrize("value", [-1, 1.5, True, "3"])
def test_outage_after_must_be_a_non_negative_integer(value):
    with pytest.raises(ValueError, match="outage_after"):
        ApiConfig(outage_after=value)
