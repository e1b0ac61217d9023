"""A loopback OpenAI-compatible chat server for tests and benchmarks.

    python tests/llm_server.py --latency 0.1 --faults 429=0.1,500=0.05 --lifetime 600

It serves ``POST /v1/chat/completions``, ``GET /v1/models`` and ``GET /stats`` on
127.0.0.1 only, for a bounded time, and can inject the faults a real endpoint
shows: 429 with Retry-After, 500, a hang past the client's timeout, a malformed
JSON body, malformed or empty content. It can also be picky as real servers are:
refuse ``max_tokens`` and ``temperature`` for reasoning models with OpenAI's own 400
answers (``reasoning_models``), or answer ``GET /v1/models`` with another status
(``models_status``: 405, 501, ...). Which fault a request gets is a pure
function of (seed, request hash, attempt number), so a run is reproducible and a
test can force a fault for, say, the first attempt of one request
(``fault_fn``). ``responder`` maps the request's messages to the answer text, so
tests of other modules can plug in realistic answers.

In a test::

    with LLMServer(latency_s=0.01, fault_rates={"429": 0.1}) as server:
        cfg = LLMConfig(backend="openai", base_url=server.url, ...)
        ...
        assert server.total_requests == 12
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raypipe.llm.base import LLMRequest

HOST = "127.0.0.1"  # never anything else: the server must not be reachable from outside

#: Faults the server can inject, by name. Other status codes ("400", "401", "503", ...)
#: can be returned through ``fault_fn``.
FAULTS = ("429", "500", "hang", "bad_json", "bad_content", "empty")

#: What ``bad_content`` answers with: output a stage's parser must reject.
BAD_CONTENTS = (
    "I'm sorry, but I can't help with that request.",
    "```\n\n```",
    "Prompt:\nDescription:",
    "lorem ipsum ((( dolor ,,, ))",
)

#: The fault mix of the writer issue's fault-tolerance test and benchmark.
STANDARD_FAULTS = {"429": 0.10, "500": 0.05, "hang": 0.02, "bad_json": 0.025, "bad_content": 0.025}


def request_hash(body: dict[str, Any]) -> str:
    """Stable hash of a request body: the same request on every attempt."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def default_responder(messages: list[dict[str, Any]]) -> str:
    """A deterministic answer that names the last user message (so answers differ)."""
    last = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
    digest = hashlib.sha256(str(last).encode()).hexdigest()[:12]
    return f"answer {digest}: {str(last)[:60]}"


def _estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


@dataclass
class _Event:
    """One chat request as the server saw it."""

    time: float
    hash: str
    attempt: int  # 0 for the first time this request hash arrived
    fault: str | None  # "unsupported_param" for a refused reasoning-model parameter
    query: str = ""  # the request URL's query string (e.g. "api-key=...")
    authorization: str = ""  # the Authorization header sent
    user_agent: str = ""  # who sent it: raypipe's own streams, or the openai SDK


class LLMServer:
    """OpenAI-compatible chat server on 127.0.0.1 with injectable latency and faults.

    Args:
        latency_s: time each chat request takes before its answer (or fault).
        fault_rates: fault name (see ``FAULTS``) -> probability per attempt.
        fault_fn: ``(request_hash, attempt, body) -> fault | None``, asked first: a fault
            name, any HTTP status as a string (``"401"``), ``"ok"`` for no fault, or None
            to leave the choice to ``fault_rates``.
        retry_after: value of the ``Retry-After`` header on 429s (seconds, or an HTTP
            date); None sends none.
        retry_after_ms: value of the ``retry-after-ms`` header on 429s; None sends none.
        hang_s: how long a ``hang`` holds the request before closing it unanswered.
        responder: ``messages -> content text`` for successful answers.
        api_key: the bearer token clients must send; None accepts any.
        models: ids listed by ``GET /v1/models``; empty: the route answers 404.
        models_status: when set, ``GET /v1/models`` answers this HTTP status instead
            (405 and 501 are what servers without the route send).
        reasoning_models: model names that behave like OpenAI's reasoning models: a
            request with ``max_tokens``, or a ``temperature`` other than 1, gets
            OpenAI's 400 answer (``max_completion_tokens`` is accepted).
        refuse: which of ``max_tokens`` and ``temperature`` those models refuse.
        lifetime_s: the server shuts itself down after this many seconds.
        seed: seeds fault selection.
        token_s: streamed answers (``"stream": true``) send their text a word at a time,
            one every ``token_s`` seconds (the slow-stream mode).
        stall_s: a streamed answer for which ``stall_fn(hash, attempt)`` is true stops
            for this long after its first word (then goes on).
        stall_fn: ``(request_hash, attempt) -> bool``; None = no stalls.
        stream_fault_fn: ``(request_hash, attempt) -> fault | None`` for a streamed answer
            after its first word: ``"bad_json"`` (a ``data:`` line that is not JSON),
            ``"error_event"`` (an ``{"error": ...}`` event, as vLLM sends mid-stream) or
            ``"cut"`` (the connection closes without the rest of the body).
        no_stream_usage: streamed answers carry no usage chunk, as some servers do.
        refuse_stream: answer 400 to ``stream_options`` (a server without streaming usage).
        refuse_response_format: answer 400 to ``response_format`` (no structured output).
        capacity_rps: answer at most this many chat requests per second (a bucket of one
            second's worth); above it, 429 with the exact wait as ``retry-after-ms``.
    """

    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        fault_rates: dict[str, float] | None = None,
        fault_fn: Callable[[str, int, dict[str, Any]], str | None] | None = None,
        retry_after: str | None = "1",
        retry_after_ms: str | None = None,
        hang_s: float = 5.0,
        responder: Callable[[list[dict[str, Any]]], str] | None = None,
        api_key: str | None = None,
        models: tuple[str, ...] = ("test-model",),
        models_status: int | None = None,
        reasoning_models: tuple[str, ...] = (),
        refuse: tuple[str, ...] = ("max_tokens", "temperature"),
        lifetime_s: float = 120.0,
        seed: int = 0,
        token_s: float = 0.0,
        stall_s: float = 0.0,
        stall_fn: Callable[[str, int], bool] | None = None,
        stream_fault_fn: Callable[[str, int], str | None] | None = None,
        no_stream_usage: bool = False,
        refuse_stream: bool = False,
        refuse_response_format: bool = False,
        capacity_rps: float | None = None,
    ) -> None:
        rates = dict(fault_rates or {})
        unknown = set(rates) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {FAULTS}")
        if sum(rates.values()) > 1:
            raise ValueError("fault rates add up to more than 1")
        self.latency_s = latency_s
        self.fault_rates = rates
        self.fault_fn = fault_fn
        self.retry_after = retry_after
        self.retry_after_ms = retry_after_ms
        self.hang_s = hang_s
        self.responder = responder or default_responder
        self.api_key = api_key
        self.models = models
        self.models_status = models_status
        self.reasoning_models = tuple(reasoning_models)
        self.refuse = tuple(refuse)
        self.lifetime_s = lifetime_s
        self.seed = seed
        self.token_s = token_s
        self.stall_s = stall_s
        self.stall_fn = stall_fn
        self.stream_fault_fn = stream_fault_fn
        self.no_stream_usage = no_stream_usage
        self.refuse_stream = refuse_stream
        self.refuse_response_format = refuse_response_format
        self.capacity_rps = capacity_rps
        self._bucket = (capacity_rps or 0.0, time.monotonic())  # tokens, stamp

        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self.reset_counts()

    # -- counters ---------------------------------------------------------------------

    def reset_counts(self) -> None:
        with self._lock:
            self.attempts_by_hash: Counter[str] = Counter()  # chat requests per request hash
            self.answered_by_hash: Counter[str] = Counter()  # well-formed 200 answers per hash
            self.fault_counts: Counter[str] = Counter()
            self.unauthorized = 0
            self.in_flight = 0
            self.max_in_flight = 0  # most chat requests being handled at once
            self.in_flight_hashes: Counter[str] = Counter()  # hashes being handled now
            self.answered_at: dict[str, float] = {}  # hash -> time.monotonic() of last answer
            self.answer_times: list[float] = []  # time.monotonic() of every 200 answer
            self.events: list[_Event] = []

    def in_flight_now(self, answered_within_s: float = 0.0) -> set[str]:
        """Hashes of the chat requests being handled at this moment, plus those answered
        in the last ``answered_within_s`` seconds (a client may not have stored them yet)."""
        with self._lock:
            since = time.monotonic() - answered_within_s
            recent = {d for d, t in self.answered_at.items() if t >= since}
            return set(self.in_flight_hashes) | (recent if answered_within_s else set())

    @property
    def total_requests(self) -> int:
        """Chat-completion requests received (every attempt, faults included)."""
        with self._lock:
            return sum(self.attempts_by_hash.values())

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": sum(self.attempts_by_hash.values()),
                "distinct": len(self.attempts_by_hash),
                "answered": sum(self.answered_by_hash.values()),
                "faults": dict(self.fault_counts),
                "unauthorized": self.unauthorized,
                "max_in_flight": self.max_in_flight,
            }

    # -- lifecycle --------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """Base URL to give an OpenAI client."""
        return f"http://{HOST}:{self.port}/v1"

    def start(self) -> LLMServer:
        handler = type("Handler", (_Handler,), {"llm": self})
        httpd = _Server((HOST, 0), handler)
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases hanging requests
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()
        httpd.shutdown()
        httpd.server_close()

    def __enter__(self) -> LLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- behaviour --------------------------------------------------------------------

    def choose_fault(self, digest: str, attempt: int, body: dict[str, Any]) -> str | None:
        if self.fault_fn is not None:
            forced = self.fault_fn(digest, attempt, body)
            if forced is not None:
                return None if forced == "ok" else forced
        if not self.fault_rates:
            return None
        draw = hashlib.sha256(f"{self.seed}:{digest}:{attempt}".encode()).digest()
        u = int.from_bytes(draw[:8], "big") / 2**64
        acc = 0.0
        for name in FAULTS:
            acc += self.fault_rates.get(name, 0.0)
            if u < acc:
                return name
        return None

    def refused_param(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """OpenAI's 400 error object for a parameter a reasoning model refuses, or None."""
        if body.get("model") not in self.reasoning_models:
            return None
        if "max_tokens" in body and "max_tokens" in self.refuse:
            return {
                "message": "Unsupported parameter: 'max_tokens' is not supported with this "
                "model. Use 'max_completion_tokens' instead.",
                "type": "invalid_request_error",
                "param": "max_tokens",
                "code": "unsupported_parameter",
            }
        temperature = body.get("temperature", 1)
        if temperature != 1 and "temperature" in self.refuse:
            return {
                "message": f"Unsupported value: 'temperature' does not support {temperature} "
                "with this model. Only the default (1) value is supported.",
                "type": "invalid_request_error",
                "param": "temperature",
                "code": "unsupported_value",
            }
        return None

    def over_capacity(self) -> float | None:
        """Seconds until the next request fits ``capacity_rps``, or None when it fits now."""
        if not self.capacity_rps:
            return None
        with self._lock:
            tokens, stamp = self._bucket
            now = time.monotonic()
            tokens = min(self.capacity_rps, tokens + (now - stamp) * self.capacity_rps)
            if tokens >= 1:
                self._bucket = (tokens - 1, now)
                return None
            self._bucket = (tokens, now)
            return (1 - tokens) / self.capacity_rps

    def refused_option(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """A 400 error object for a request option this server does not take, or None."""
        for name, refused in (
            ("stream_options", self.refuse_stream),
            ("response_format", self.refuse_response_format),
        ):
            if refused and name in body:
                return {
                    "message": f"Unrecognized request argument supplied: {name}",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
        return None

    def record(self, digest: str) -> tuple[int, float]:
        with self._lock:
            attempt = self.attempts_by_hash[digest]
            self.attempts_by_hash[digest] += 1
        return attempt, time.monotonic()

    def wait(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # else concurrent connects overflow the listen backlog
    allow_reuse_address = True


class _Handler(BaseHTTPRequestHandler):
    llm: LLMServer  # set on the per-server subclass
    protocol_version = "HTTP/1.1"  # keep-alive: one connection per client slot
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- helpers ----------------------------------------------------------------------

    def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        reason = self.responses.get(status, ("",))[0]
        lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        lines.append(f"Content-Length: {len(payload)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head + payload)  # one write: no Nagle/delayed-ACK stall

    def _error(self, status: int, message: str, kind: str, headers: dict | None = None) -> None:
        body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        self._send(status, json.dumps(body).encode(), headers)

    def _authorized(self) -> bool:
        want = self.llm.api_key
        if want is None:
            return True
        got = self.headers.get("Authorization", "")
        if got == f"Bearer {want}":
            return True
        with self.llm._lock:
            self.llm.unauthorized += 1
        # Echo what was sent, as careless servers do: clients must scrub it.
        sent = got.removeprefix("Bearer ")
        self._error(401, f"Incorrect API key provided: {sent}.", "invalid_request_error")
        return False

    # -- routes -----------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/stats":
            self._send(200, json.dumps(self.llm.stats()).encode())
        elif path == "/v1/models" and self.llm.models_status is not None:
            status = self.llm.models_status
            self._error(status, f"GET {path} answers HTTP {status} here", "invalid_request_error")
        elif path == "/v1/models" and self.llm.models:
            if not self._authorized():
                return
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": "raypipe-test"}
                for m in self.llm.models
            ]
            self._send(200, json.dumps({"object": "list", "data": data}).encode())
        else:
            self._error(404, f"no route {path}", "not_found")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != "/v1/chat/completions":
            self._error(404, f"no route {path}", "not_found")
            return
        if not self._authorized():
            return
        try:
            body = json.loads(raw)
            messages = body["messages"]
        except (ValueError, KeyError, TypeError):
            self._error(
                400, "request body is not a chat-completion request", "invalid_request_error"
            )
            return
        digest = request_hash(body)
        with self.llm._lock:
            self.llm.in_flight += 1
            self.llm.max_in_flight = max(self.llm.max_in_flight, self.llm.in_flight)
            self.llm.in_flight_hashes[digest] += 1
        try:
            self._chat(body, messages, digest)
        finally:
            with self.llm._lock:
                self.llm.in_flight -= 1
                self.llm.in_flight_hashes[digest] -= 1
                if not self.llm.in_flight_hashes[digest]:
                    del self.llm.in_flight_hashes[digest]

    def _chat(self, body: dict[str, Any], messages: list[dict[str, Any]], digest: str) -> None:
        llm = self.llm
        attempt, now = llm.record(digest)
        refused = llm.refused_param(body) or llm.refused_option(body)
        fault = "unsupported_param" if refused else llm.choose_fault(digest, attempt, body)
        query = self.path.split("?", 1)[1] if "?" in self.path else ""
        with llm._lock:
            auth = self.headers.get("Authorization", "")
            agent = self.headers.get("User-Agent", "")
            llm.events.append(_Event(now, digest, attempt, fault, query, auth, agent))
            if fault:
                llm.fault_counts[fault] += 1
        if refused:  # answered at once, as a real server validates before queueing
            self._send(400, json.dumps({"error": refused}).encode())
            return
        llm.wait(llm.latency_s)
        wait = llm.over_capacity() if not fault else None
        if wait is not None:
            fault = "429"
            with llm._lock:
                llm.fault_counts["over_capacity"] += 1
            headers = {"retry-after-ms": str(int(wait * 1000) + 1), "Retry-After": "1"}
            self._error(429, "Rate limit reached; try again later.", "requests", headers)
            return

        if fault == "429":
            headers = {}
            if llm.retry_after is not None:
                headers["Retry-After"] = llm.retry_after
            if llm.retry_after_ms is not None:
                headers["retry-after-ms"] = llm.retry_after_ms
            self._error(429, "Rate limit reached; try again later.", "requests", headers)
            return
        if fault is not None and fault.isdigit():
            self._error(int(fault), f"injected HTTP {fault}", "server_error")
            return
        if fault == "hang":
            llm.wait(llm.hang_s)
            self.close_connection = True  # never answered
            return
        if fault == "bad_json":
            self._send(200, b'{"id": "chatcmpl-x", "choices": [{"message": {"content": "trunc')
            return

        if fault == "bad_content":
            content: str | None = BAD_CONTENTS[int(digest[:8], 16) % len(BAD_CONTENTS)]
        elif fault == "empty":
            content = None if int(digest[:2], 16) % 2 else ""
        else:
            content = llm.responder(messages)
        prompt_tokens = sum(_estimate_tokens(str(m.get("content") or "")) + 4 for m in messages)
        completion_tokens = _estimate_tokens(content or "") if content else 0
        answer = {
            "id": f"chatcmpl-{digest[:16]}-{attempt}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", ""),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        with llm._lock:
            llm.answered_by_hash[digest] += 1
            llm.answered_at[digest] = time.monotonic()
            llm.answer_times.append(time.monotonic())
        if body.get("stream"):
            try:
                self._stream(answer, body, digest, attempt)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a stall)
                self.close_connection = True
        else:
            self._send(200, json.dumps(answer).encode())

    def _stream(self, answer: dict[str, Any], body: dict[str, Any], digest: str, attempt: int):
        """``answer`` as server-sent events: a role chunk, the text a word at a time
        (``token_s`` apart, with a stall where ``stall_fn`` says), the finish, the usage."""
        llm = self.llm
        head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        self.wfile.write((head + "Transfer-Encoding: chunked\r\n\r\n").encode("latin-1"))
        base = {k: answer[k] for k in ("id", "created", "model")}
        base["object"] = "chat.completion.chunk"
        choice = answer["choices"][0]
        text = choice["message"]["content"] or ""

        def send(delta: dict[str, Any], finish: str | None = None, usage=None) -> None:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage is not None:
                chunk = {**base, "choices": [], "usage": usage}
            self._chunk(f"data: {json.dumps(chunk)}\n\n".encode())

        send({"role": "assistant", "content": ""})
        words = [w + " " for w in text.split(" ")] if text else []
        if words:
            words[-1] = words[-1][:-1]
        stall = llm.stall_s and llm.stall_fn is not None and llm.stall_fn(digest, attempt)
        fault = llm.stream_fault_fn(digest, attempt) if llm.stream_fault_fn else None
        for i, word in enumerate(words):
            if i:
                llm.wait(llm.token_s)
            send({"content": word})
            if i == 0 and stall:
                llm.wait(llm.stall_s)
            if i == 0 and fault:
                self._stream_fault(fault)
                return
        send({}, choice["finish_reason"])
        if (body.get("stream_options") or {}).get("include_usage") and not llm.no_stream_usage:
            send({}, usage=answer["usage"])
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _stream_fault(self, fault: str) -> None:
        if fault == "bad_json":
            self._chunk(b'data: {"choices": [{"delta": {"content": "cut\n\n')
        elif fault == "error_event":
            error = {"error": {"message": "engine died", "type": "InternalServerError"}}
            self._chunk(f"event: error\ndata: {json.dumps(error)}\n\n".encode())
        elif fault != "cut":
            raise ValueError(f"unknown stream fault {fault!r}")
        if fault == "cut":
            self.close_connection = True  # no last chunk: the body ends mid-stream
        else:
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def http_date(seconds_from_now: float) -> str:
    """An HTTP date (for a Retry-After header given as a date)."""
    return email.utils.formatdate(time.time() + seconds_from_now, usegmt=True)


def loopback_cfg(server: Any, **fields: Any):
    """An ``openai``-backend :class:`~raypipe.llm.config.LLMConfig` for ``server`` (a
    loopback server, or a base URL): model ``test-model``, priced; ``fields`` set the
    rest and win. Test modules bind their own defaults with ``functools.partial``."""
    from raypipe.llm.config import LLMConfig  # here: the server runs without raypipe

    url = server if isinstance(server, str) else server.url
    base = {"backend": "openai", "model": "test-model", "base_url": url,
            "prices": {"test-model": (1.0, 2.0)}}  # fmt: skip
    return LLMConfig(**{**base, **fields})


def make_requests(n: int, tag: str = "r", **over: Any) -> list[LLMRequest]:
    """``n`` distinct chat requests keyed ``{tag}/00000``, ``{tag}/00001``, ...

    Request ``i`` has a system message and the user message ``"{tag} request number {i}"``,
    and seed ``i``; ``over`` sets other ``LLMRequest`` fields (``max_tokens=900``, ...).
    """
    from raypipe.llm.base import LLMRequest  # here: the server runs without raypipe

    return [
        LLMRequest(
            key=f"{tag}/{i:05d}",
            task="prompts",
            ability="color",
            messages=(
                {"role": "system", "content": "You write prompts."},
                {"role": "user", "content": f"{tag} request number {i}"},
            ),
            seed=i,
            **over,
        )
        for i in range(n)
    ]


def _parse_faults(text: str) -> dict[str, float]:
    if not text:
        return {}
    if text == "standard":
        return dict(STANDARD_FAULTS)
    return {k: float(v) for k, v in (item.split("=", 1) for item in text.split(","))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Loopback OpenAI-compatible chat server.")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    ap.add_argument("--faults", default="", help="'standard' or e.g. 429=0.1,500=0.05,hang=0.02")
    ap.add_argument("--retry-after", default="1", help="Retry-After header value on 429s")
    ap.add_argument("--hang", type=float, default=5.0, help="seconds a hang lasts")
    ap.add_argument("--api-key", default=None, help="required bearer token (default: any)")
    ap.add_argument("--lifetime", type=float, default=600.0, help="seconds before shutdown")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--token-s", type=float, default=0.0, help="seconds per streamed word")
    ap.add_argument("--words", type=int, default=0, help="answers of this many words (0: short)")
    ap.add_argument("--capacity", type=float, default=None, help="requests/s before 429s")
    args = ap.parse_args(argv)
    words = args.words
    responder = (lambda messages: " ".join(f"w{i}" for i in range(words))) if words else None
    server = LLMServer(
        latency_s=args.latency,
        fault_rates=_parse_faults(args.faults),
        retry_after=args.retry_after,
        hang_s=args.hang,
        api_key=args.api_key,
        lifetime_s=args.lifetime,
        seed=args.seed,
        token_s=args.token_s,
        responder=responder,
        capacity_rps=args.capacity,
    ).start()
    print(f"PORT {server.port}", flush=True)
    try:
        while server._httpd is not None:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
