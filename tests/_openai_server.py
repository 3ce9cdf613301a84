"""A loopback OpenAI-compatible chat-completions server: a test fixture, not a product feature.

It speaks just enough of the protocol for gcache's client: ``POST
/v1/chat/completions`` with a JSON body, answered with
``{"choices": [{"message": {"content": ...}}], "usage": {...}}``. It binds
127.0.0.1 on a free port and serves from a thread.

Answers come from ``backend(messages, max_tokens, temperature) -> (text,
prompt_tokens, completion_tokens)`` (the embedded model in the mode tests), or,
without one, from a word-count echo. A ``script`` of :class:`Reply` items is
consumed first, one per request, to inject faults: an HTTP status, a hang,
malformed JSON, an empty choice list, a dropped connection. A hang waits on the
server's stop event, so it is bounded by ``hang_s`` and ends at once when the
server stops. A stopped server starts again on the same port (an outage that ends).
"""

from __future__ import annotations

import json
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable, NamedTuple

Backend = Callable[[list[dict], int, float], tuple[str, int, int]]


class Reply(NamedTuple):
    """One scripted answer. kind: "ok", "status", "hang", "malformed", "empty_choices", "no_content",
    "drop" (the connection is closed with no answer: the client sees a connection error)."""

    kind: str
    status: int = 200
    body: str | None = None  # for "status": the error body (may echo the key, as some providers do)
    headers: tuple[tuple[str, str], ...] = ()  # for "status": extra headers (Retry-After, say)


def echo_backend(messages: list[dict], max_tokens: int, temperature: float) -> tuple[str, int, int]:
    """Answer with the last user message's words, cut to max_tokens words; tokens counted as words."""
    prompt_words = sum(len(str(m.get("content", "")).split()) for m in messages)
    last = next((str(m.get("content", "")) for m in reversed(messages) if m.get("role") == "user"), "")
    words = ("echo: " + last).split()[:max_tokens]
    return " ".join(words), prompt_words, len(words)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # the test output stays clean
        pass

    def _send(self, status: int, body: bytes, headers: tuple[tuple[str, str], ...] = ()) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test): nothing to answer

    def do_POST(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}).encode())
            return
        try:
            request = json.loads(raw)
        except json.JSONDecodeError:
            self._send(400, json.dumps({"error": {"message": "body is not JSON"}}).encode())
            return
        auth = self.headers.get("Authorization", "")
        owner._record(request, auth)
        if owner.api_key is not None and auth != f"Bearer {owner.api_key}":
            # Like some providers, echo the key that came: the client must scrub it.
            message = f"Incorrect API key provided: {auth.removeprefix('Bearer ')}"
            self._send(401, json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode())
            return

        with owner._lock:
            owner._in_flight += 1
            owner.max_in_flight = max(owner.max_in_flight, owner._in_flight)
        try:
            if owner.latency_s:
                owner.stop_event.wait(owner.latency_s)
            self._answer(owner, request)
        finally:
            with owner._lock:
                owner._in_flight -= 1

    def _answer(self, owner: "OpenAIServer", request: dict) -> None:
        reply = owner._next_reply()
        if reply.kind == "drop":
            self.close_connection = True
            return
        if reply.kind == "status":
            body = reply.body if reply.body is not None else json.dumps({"error": {"message": f"scripted {reply.status}"}})
            self._send(reply.status, body.encode(), reply.headers)
            return
        if reply.kind == "hang":
            owner.stop_event.wait(owner.hang_s)
        if reply.kind == "malformed":
            self._send(200, b'{"choices": [{"message": {"content": "cut off')
            return
        if reply.kind == "empty_choices":
            self._send(200, json.dumps(owner._envelope(request, [], 0, 0)).encode())
            return

        messages = request.get("messages", [])
        max_tokens = int(request.get("max_tokens") or request.get("max_completion_tokens") or 16)
        temperature = float(request.get("temperature") or 0.0)
        with owner.backend_lock:  # one generation at a time: the model is shared with the test
            text, prompt_tokens, completion_tokens = owner.backend(messages, max_tokens, temperature)
        content = None if reply.kind == "no_content" else text
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        self._send(200, json.dumps(owner._envelope(request, [choice], prompt_tokens, completion_tokens)).encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "OpenAIServer"


class OpenAIServer:
    """Start with ``with OpenAIServer(...) as server:``; ``server.base_url`` ends in ``/v1``.

    api_key: when set, requests must carry ``Authorization: Bearer <api_key>`` (else 401).
    latency_s: every request waits this long before its answer; ``max_in_flight`` counts the
    most requests the server held at once.
    ``requests`` records every request body, ``auth_headers`` every Authorization header.
    """

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        script: Iterable[Reply] = (),
        api_key: str | None = None,
        hang_s: float = 3.0,
        latency_s: float = 0.0,
    ) -> None:
        self.backend = backend or echo_backend
        self.api_key = api_key
        self.hang_s = hang_s
        self.latency_s = latency_s
        self.max_in_flight = 0
        self._in_flight = 0
        self.requests: list[dict] = []
        self.auth_headers: list[str] = []
        self.stop_event = threading.Event()
        self.backend_lock = threading.Lock()
        self._script = deque(script)
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0  # after the first start, the port a restart binds again

    @property
    def base_url(self) -> str:
        assert self._port, "server never started"
        return f"http://127.0.0.1:{self._port}/v1"

    def script(self, replies: Iterable[Reply]) -> None:
        """Queue more scripted replies (after those still pending)."""
        with self._lock:
            self._script.extend(replies)

    def _next_reply(self) -> Reply:
        with self._lock:
            return self._script.popleft() if self._script else Reply("ok")

    def _record(self, request: dict, auth: str) -> None:
        with self._lock:
            self.requests.append(request)
            self.auth_headers.append(auth)

    @staticmethod
    def _envelope(request: dict, choices: list, prompt_tokens: int, completion_tokens: int) -> dict:
        return {
            "id": "chatcmpl-loopback",
            "object": "chat.completion",
            "created": 0,
            "model": request.get("model", "loopback"),
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def start(self) -> "OpenAIServer":
        self.stop_event.clear()
        self._httpd = _Server(("127.0.0.1", self._port), _Handler)
        self._port = self._httpd.server_address[1]
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()  # releases any hanging handler
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Every API setting gcache reads from the environment (or .env in the working directory).
API_VARS = (
    "API_KEY", "OPENAI_API_KEY", "BASE_URL", "OPENAI_BASE_URL", "API_MODEL", "OPENAI_MODEL",
    "GCACHE_API_TIMEOUT", "GCACHE_API_MAX_RETRIES", "GCACHE_API_CONCURRENCY", "GCACHE_API_OUTAGE_AFTER",
)  # fmt: skip


def isolated_api_env(monkeypatch, folder, key: str):
    """No API setting from the developer's shell or .env (the working directory becomes ``folder``);
    ``key`` as API_KEY, since an API run needs one. Returns the monkeypatch."""
    for var in API_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(folder)
    monkeypatch.setenv("API_KEY", key)
    return monkeypatch
