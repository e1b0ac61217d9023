"""One HTTP attempt of a chat completion, streamed or not, timed by its progress.

A streamed attempt (``llm.stream``) fails only when it makes no progress: no first
token within ``first_token_s`` (a reasoning model streams nothing while it thinks, so
its default is longer), or no chunk within ``idle_s`` once tokens flow; an optional
``deadline_s`` bounds the whole attempt. A long answer at a slow token rate therefore
completes however long it takes, and a stalled one fails (transient) in about
``idle_s``. Usage comes from the final chunk (``stream_options.include_usage``); a
server that sends none gets its usage counted from the text and marked estimated.

A non-streamed attempt (``llm.stream=off``, or ``auto`` after a server refused
streaming) waits at most ``llm.timeout_s`` for the whole answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import anyio
import openai

try:  # the openai SDK's aiohttp extra; without it every request goes through httpx
    import aiohttp
except ImportError:  # pragma: no cover - the package depends on openai[aiohttp]
    aiohttp = None

from raypipe.errors import EndpointError
from raypipe.llm.config import LLMConfig
from raypipe.llm.failures import MalformedResponse, StreamError, StreamTimeout


def _sdk_httpx() -> Any:
    """The HTTP library module the installed openai SDK is built on (httpx2, or httpx)."""
    base = next(c for c in openai.DefaultAsyncHttpxClient.__mro__ if c.__name__ == "AsyncClient")
    return sys.modules[base.__module__.split(".")[0]]


httpx = _sdk_httpx()
#: What the HTTP layer raises when a connection fails mid-body (the SDK's own list).
TRANSPORT_ERRORS = (httpx.RequestError, ssl.SSLError, anyio.EndOfStream)
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")

#: Fields a streamed request adds to the body (not part of it: see request_body).
STREAM_FIELDS = {"stream": True, "stream_options": {"include_usage": True}}


@dataclass
class Answer:
    """What one successful attempt returned."""

    text: str | None
    finish_reason: str | None
    usage: dict[str, Any] = field(default_factory=dict)
    refusal: str | None = None
    #: usage counted from the text (the server sent none)
    estimated: bool = False

    def tokens(self) -> tuple[int, int]:
        """(prompt, completion) tokens of the usage; 0 for what is missing or malformed."""
        return _int(self.usage.get("prompt_tokens")), _int(self.usage.get("completion_tokens"))


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


@dataclass(frozen=True)
class Timeouts:
    """Progress limits of one streamed attempt, in seconds (``None``: no limit)."""

    first_token_s: float
    idle_s: float
    deadline_s: float | None = None


def estimate_tokens(text: str) -> int:
    """About 4 characters per token, as OpenAI's guidance has it."""
    return max(1, len(text) // 4) if text else 0


def estimate_prompt_tokens(messages: tuple[dict[str, str], ...] | list[dict[str, str]]) -> int:
    """About 4 characters per token plus a few per message."""
    return 3 + sum(4 + len(str(m.get("content") or "")) // 4 for m in messages)


def transport_of(cfg: LLMConfig) -> str:
    """``llm.http_transport`` resolved: ``auto`` is aiohttp unless a proxy variable is set."""
    if cfg.http_transport != "auto":
        return cfg.http_transport
    return "httpx" if any(os.environ.get(v) for v in PROXY_VARS) else "aiohttp"


def http_client(cfg: LLMConfig, timeout_s: float) -> Any:
    """The HTTP layer under the openai client (``llm.http_transport``): aiohttp costs
    about half the CPU per request of httpx; httpx honours the proxy variables."""
    conc = cfg.concurrency
    limits = httpx.Limits(max_connections=max(1000, conc), max_keepalive_connections=max(100, conc))
    transport = transport_of(cfg)
    aio = getattr(openai, "DefaultAioHttpClient", None)
    if transport == "aiohttp":
        try:
            if aio is None:
                raise RuntimeError("this openai version has no aiohttp transport")
            return aio(limits=limits, timeout=timeout_s)
        except RuntimeError as e:  # aiohttp (or the SDK's adapter) missing
            if cfg.http_transport == "aiohttp":
                raise EndpointError(
                    f"llm.http_transport=aiohttp is not available ({e}): install "
                    "aiohttp, or set llm.http_transport=httpx."
                ) from None
    return openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout_s)


async def plain_attempt(client: Any, body: dict[str, Any], timeout_s: float) -> Answer:
    """A non-streamed attempt: the whole answer within ``timeout_s``."""
    # post() with a plain body: the same request chat.completions.create sends,
    # without its per-call type transform (a large share of the CPU per call).
    response = await asyncio.wait_for(
        client.post("/chat/completions", body=body, cast_to=httpx.Response), timeout=timeout_s
    )
    return parse_completion(response.content, response.status_code)


def parse_completion(content: bytes, status: int) -> Answer:
    """A whole (non-streamed) chat completion body; MalformedResponse if it is none."""
    try:
        data = json.loads(content)
        choice = data["choices"][0]
        message = choice["message"]
        text = message.get("content")
        usage = data.get("usage") or {}
        if not isinstance(usage, dict) or not (text is None or isinstance(text, str)):
            raise TypeError("unexpected field types")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise MalformedResponse(
            f"HTTP {status} body is not a chat completion ({type(e).__name__})"
        ) from None
    return Answer(text, choice.get("finish_reason"), usage, message.get("refusal"))


class _Clock:
    """The progress limits of one streamed attempt, from its start."""

    def __init__(self, limits: Timeouts) -> None:
        self.limits = limits
        self.start = time.monotonic()
        self.deadline = self.start + limits.deadline_s if limits.deadline_s else None

    def next_wait(self, first: bool, since: float | None = None) -> tuple[float, str]:
        """How long the next step may take (the idle limit runs from ``since``, the last
        event), and what it is called when it does not come."""
        now = time.monotonic()
        if first:
            left, what = self.limits.first_token_s - (now - self.start), "first"
        else:
            left, what = self.limits.idle_s - (now - (since or now)), "idle"
        if self.deadline is not None and self.deadline - now < left:
            left, what = self.deadline - now, "deadline"
        return max(0.0, left), what

    def timed_out(self, what: str) -> StreamTimeout:
        limits = self.limits
        if what == "first":
            text = f"no first token within {limits.first_token_s:g} s (llm.first_token_timeout_s)"
        elif what == "idle":
            text = f"the stream stalled for {limits.idle_s:g} s (llm.idle_timeout_s)"
        else:
            text = f"the answer took longer than {limits.deadline_s:g} s (llm.deadline_s)"
        return StreamTimeout(text)

    async def within(self, awaitable: Any, first: bool) -> Any:
        left, what = self.next_wait(first)
        try:
            return await asyncio.wait_for(awaitable, left)
        except asyncio.TimeoutError:
            raise self.timed_out(what) from None


class _Events:
    """Server-sent events from the stream's byte blocks: the JSON of each ``data:``
    event (a multi-line event's lines joined), until ``[DONE]``. Other fields
    (``event:``, ``id:``, comments) carry nothing a chat completion needs."""

    def __init__(self) -> None:
        self.tail = b""
        self.data: list[bytes] = []
        self.done = False

    def feed(self, block: bytes) -> list[Any]:
        block = self.tail + block if self.tail else block
        carry = b""
        if b"\r" in block:  # CRLF or CR line ends; a CR at the end may start a CRLF
            if block.endswith(b"\r"):
                block, carry = block[:-1], b"\r"
            block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = block.split(b"\n")
        self.tail = lines.pop() + carry
        events = []
        for line in lines:
            if line.startswith(b"data:"):
                self.data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif not line and self.data and not self.done:
                event = self.flush()
                if event is not None:
                    events.append(event)
        return events

    def flush(self) -> Any:
        """The pending event's JSON (None for ``[DONE]`` or none pending)."""
        if not self.data:
            return None
        raw = self.data[0] if len(self.data) == 1 else b"\n".join(self.data)
        self.data = []
        if raw.startswith(b"[DONE]"):
            self.done = True
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise MalformedResponse(f"a stream event is not JSON: {raw[:80]!r}") from None


class _Collector:
    """The answer, gathered chunk by chunk."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.refusal: list[str] = []
        self.finish: str | None = None
        self.usage: dict[str, Any] = {}
        self.started = False  # a first token (or reasoning, refusal, finish) arrived

    def add(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            raise MalformedResponse(f"a stream chunk is not a JSON object: {chunk!r:.80}")
        error = chunk.get("error")
        if error:  # an error event: its message, as the SDK's stream gave it
            message = error.get("message") if isinstance(error, dict) else None
            raise StreamError(str(message or error)[:300])
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.pieces.append(delta["content"])
            if delta.get("refusal"):
                self.refusal.append(delta["refusal"])
            # Reasoning text counts as progress (it is not part of the answer).
            if delta.get("content") or delta.get("refusal") or _reasoning(delta):
                self.started = True
            if choice.get("finish_reason"):
                self.finish, self.started = choice["finish_reason"], True

    def answer(self, messages: Any) -> Answer:
        text = "".join(self.pieces) if self.pieces else None
        answer = Answer(text, self.finish, self.usage, "".join(self.refusal) or None)
        if not self.usage:  # counted from the text, and marked so
            answer.estimated = True
            answer.usage = {
                "prompt_tokens": estimate_prompt_tokens(messages or ()),
                "completion_tokens": estimate_tokens(text or ""),
            }
        return answer


async def streamed_attempt(
    client: Any, body: dict[str, Any], limits: Timeouts, direct: DirectStreams | None = None
) -> Answer:
    """A streamed attempt: events until the end, each within the progress limits.

    Sent by ``direct`` where there is one (aiohttp), else by the openai SDK, which
    hands back the raw response; the events are read here, a few dict lookups each: a
    third less client CPU per request than the SDK's own stream objects."""
    clock = _Clock(limits)
    if direct is not None:
        return await direct.attempt(body, clock)
    request = client.post(
        "/chat/completions", body={**body, **STREAM_FIELDS}, cast_to=httpx.Response, stream=True
    )
    response = await clock.within(request, first=True)
    try:
        if "event-stream" not in response.headers.get("content-type", ""):
            # A server that ignores "stream" answers whole: read it as such.
            content = await clock.within(response.aread(), first=True)
            return parse_completion(content, response.status_code)
        collected = _Collector()
        try:
            await _read(response.aiter_bytes(), clock, collected)
        except httpx.TimeoutException as e:
            raise openai.APITimeoutError(request=response.request) from e
        except TRANSPORT_ERRORS as e:  # a disconnect mid-stream: transient, as before it
            raise openai.APIConnectionError(request=response.request) from e
    finally:
        await response.aclose()
    return collected.answer(body.get("messages"))


#: The openai SDK's exception class for each HTTP status (as its client raises them).
STATUS_ERRORS = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    403: openai.PermissionDeniedError,
    404: openai.NotFoundError,
    409: openai.ConflictError,
    422: openai.UnprocessableEntityError,
    429: openai.RateLimitError,
}


def status_error(response: Any) -> openai.APIStatusError:
    """The openai SDK's exception for an error response (an httpx response, body read),
    with the message and body its client gives it."""
    text = response.text.strip()
    try:
        body: Any = json.loads(text)
        message = f"Error code: {response.status_code} - {body}"
    except ValueError:
        body, message = text or None, text or f"Error code: {response.status_code}"
    data = body.get("error", body) if isinstance(body, dict) else body
    status = response.status_code
    cls = STATUS_ERRORS.get(status) or (
        openai.InternalServerError if status >= 500 else openai.APIStatusError
    )
    return cls(message, response=response, body=data)


def direct_streams(
    cfg: LLMConfig, client: Any, query: dict[str, str], headers: dict[str, str], read_s: float
) -> DirectStreams | None:
    """Streamed attempts over aiohttp where ``llm.http_transport`` resolves to it."""
    if transport_of(cfg) != "aiohttp" or aiohttp is None:
        return None
    return DirectStreams(client, query, headers, max(1000, cfg.concurrency), read_s)


class DirectStreams:
    """Streamed attempts sent straight over aiohttp (``llm.http_transport``: aiohttp, or
    auto without a proxy): the request the SDK's client sends (its base URL, default
    query and headers, its key as Bearer auth), without the SDK's per-request option
    models and the httpx layer it puts over aiohttp, about a third of the client's CPU
    per request (benchmarks/RESULTS.md). Errors are the SDK's own exception classes, so
    the failure table reads them unchanged. Made and closed on the client's loop."""

    def __init__(
        self, client: Any, query: dict[str, str], headers: dict[str, str], connections: int,
        read_timeout_s: float,
    ) -> None:  # fmt: skip
        url = f"{str(client.base_url).rstrip('/')}/chat/completions"
        self.url = f"{url}?{urlencode(query)}" if query else url
        self.headers = {
            "Authorization": f"Bearer {client.api_key}",
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            "User-Agent": "raypipe",
            **headers,  # Basic auth from the URL's user:password@ replaces the Bearer key
        }
        connector = aiohttp.TCPConnector(limit=connections, ssl=httpx.create_ssl_context())
        timeout = aiohttp.ClientTimeout(total=None, sock_read=read_timeout_s)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout)

    def __repr__(self) -> str:  # never the headers: they hold the key
        return f"DirectStreams({self.url.split('?')[0]!r})"

    async def attempt(self, body: dict[str, Any], clock: _Clock) -> Answer:
        data = json.dumps({**body, **STREAM_FIELDS}).encode()
        try:
            post = self.session.post(self.url, data=data, headers=self.headers)
            response = await clock.within(post, first=True)
            try:
                if response.status >= 400:
                    content = await clock.within(response.read(), first=True)
                    raise status_error(self._response(response.status, response.headers, content))
                if "event-stream" not in response.headers.get("content-type", ""):
                    content = await clock.within(response.read(), first=True)
                    return parse_completion(content, response.status)
                collected = _Collector()
                await _read(response.content.iter_any(), clock, collected)
            finally:
                response.release()
        except aiohttp.ServerTimeoutError as e:  # the socket's own read limit
            raise openai.APITimeoutError(request=self._request()) from e
        except (aiohttp.ClientError, OSError) as e:  # refused, reset, cut mid-stream
            if isinstance(e, TimeoutError):
                raise
            raise openai.APIConnectionError(request=self._request()) from e
        return collected.answer(body.get("messages"))

    def _request(self) -> Any:
        """The request as the SDK's exceptions carry it (no query: it may hold a key)."""
        return httpx.Request("POST", self.url.split("?")[0])

    def _response(self, status: int, headers: Any, content: bytes) -> Any:
        items = list(dict(headers).items())
        return httpx.Response(status, headers=items, content=content, request=self._request())

    async def close(self) -> None:
        await self.session.close()


#: After ``[DONE]``, how long the rest of the body (HTTP/1.1's last chunk) may take.
DRAIN_S = 2.0


async def _read(stream: Any, clock: _Clock, collected: _Collector) -> None:
    """Feed ``collected`` the stream's events until ``[DONE]`` or its end; the body after
    ``[DONE]`` is read too, so that the connection is kept for the next request. A block
    without an event (a comment, a keep-alive) is no progress: the idle limit runs on."""
    events, blocks = _Events(), stream.__aiter__()
    since: float | None = None
    what, timer = "first", _Timer()
    try:
        async with timer:
            while True:
                left, what = clock.next_wait(not collected.started, since)
                if events.done:
                    left = min(left, DRAIN_S)
                try:
                    block = await timer.next(blocks, left)
                except StopAsyncIteration:
                    break
                got = events.feed(block)
                if got:
                    since = time.monotonic()
                    for chunk in got:
                        collected.add(chunk)
    except (TimeoutError, asyncio.TimeoutError):
        if not timer.expired():
            raise
        if events.done:  # the answer is whole; the server held the body open
            return
        raise clock.timed_out(what) from None
    if not events.done:
        last = events.flush()  # an event the stream ended without a blank line after
        if last is not None:
            collected.add(last)


class _Timer:
    """Bounds each wait for the next block: one ``asyncio.timeout`` moved per block
    (Python 3.11+), not a task per block as ``asyncio.wait_for`` makes (3.10)."""

    def __init__(self) -> None:
        self.scope = asyncio.timeout(None) if hasattr(asyncio, "timeout") else None

    async def __aenter__(self) -> _Timer:
        if self.scope is not None:
            await self.scope.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> Any:
        if self.scope is not None:
            return await self.scope.__aexit__(*exc)
        return None

    async def next(self, blocks: Any, left: float) -> bytes:
        if self.scope is None:
            return await asyncio.wait_for(blocks.__anext__(), left)
        self.scope.reschedule(asyncio.get_running_loop().time() + left)
        return await blocks.__anext__()

    def expired(self) -> bool:
        return self.scope is None or self.scope.expired()


def _reasoning(delta: dict[str, Any]) -> bool:
    return bool(delta.get("reasoning_content") or delta.get("reasoning"))
