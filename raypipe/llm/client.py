"""The ``openai`` backend: any OpenAI-compatible chat endpoint (OpenAI, a vLLM server, ...).

Stages call the synchronous :meth:`OpenAIBackend.complete_batch` from plain code
inside Ray actors. Underneath, one ``openai.AsyncOpenAI`` client lives on a private
event loop in a background thread for the backend's lifetime (an async HTTP client
must stay on the loop that made it); work is handed to it with
``run_coroutine_threadsafe``. Async callers use :meth:`acomplete` /
:meth:`acomplete_many`.

Per request, in order:

1. the response cache (a local folder or a URI; a hit costs nothing, makes no HTTP
   call and reports the tokens it served as ``cached_*``);
2. a concurrency slot (``llm.concurrency``, per client), then permits from the
   request- and token-per-minute limits: the job's limiter actor when one is given
   (:mod:`raypipe.llm.limits`; the limits are then job-wide), else in-process buckets
   (tokens estimated from the message length plus ``max_tokens``, corrected with the
   reported usage afterwards);
3. one HTTP attempt with a per-attempt timeout; tenacity retries 429, 5xx, timeouts,
   connection errors and malformed bodies with jittered exponential backoff, or
   after the server's ``Retry-After``/``retry-after-ms`` when it sends one, up to
   ``llm.max_attempts``; other 4xx fail at once;
4. the answer's text, token usage and cost (``llm.prices``) into an
   :class:`~raypipe.llm.base.LLMResult`; successful answers go to the cache.

Reasoning models (``llm.reasoning``) get ``max_completion_tokens`` and no
``temperature``; :meth:`OpenAIBackend.check` sends one request shaped like the real
ones, so a server that refuses those parameters fails the run before any work.

A request that still fails comes back as ``LLMResult(text=None, error="<kind>: <detail>")``;
nothing is raised for one request. The API key is read from the environment
variable ``llm.api_key_env`` and sent as a Bearer token; query parameters of
``llm.base_url`` (``?api-key=...``) are sent with every request, and a
``user:password@`` part as HTTP Basic auth instead of the Bearer token. The key and any
credentials inside ``llm.base_url`` are scrubbed from every message raypipe writes,
and from the HTTP library's own log lines (which quote request URLs).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import json
import logging
import os
import random
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import openai
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from raypipe.config import LLMConfig, redact_url, url_secrets
from raypipe.errors import EndpointError
from raypipe.llm.base import LLMRequest, LLMResult, Secret
from raypipe.llm.cache import ResponseCache, request_key
from raypipe.llm.limits import Leases, LimiterHandle, TokenBucket

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Longest Retry-After raypipe honours; a server asking for more is waited on this long.
MAX_RETRY_AFTER_S = 120.0
#: Statuses retried besides 429 and 5xx (request timeout, conflict), as the openai SDK does.
RETRYABLE_4XX = (408, 409)
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _sdk_httpx() -> Any:
    """The HTTP library module the installed openai SDK is built on (httpx2, or httpx)."""
    base = next(c for c in openai.DefaultAsyncHttpxClient.__mro__ if c.__name__ == "AsyncClient")
    return sys.modules[base.__module__.split(".")[0]]


httpx = _sdk_httpx()


_Secret = Secret


# ---------------------------------------------------------------------------------------
# Errors of one attempt
# ---------------------------------------------------------------------------------------


class MalformedResponse(Exception):
    """A 200 answer whose body is not a chat completion (retryable)."""


def retry_after_s(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        return code == 429 or code >= 500 or code in RETRYABLE_4XX
    return isinstance(
        exc, (openai.APIConnectionError, asyncio.TimeoutError, TimeoutError, MalformedResponse)
    )


def describe(exc: BaseException) -> str:
    """``<kind>: <short detail>`` for an attempt's exception (not yet scrubbed)."""
    if isinstance(exc, openai.APIStatusError):
        detail = exc.message
        body = exc.body
        if isinstance(body, dict):
            inner = body.get("error", body)
            if isinstance(inner, dict) and inner.get("message"):
                detail = str(inner["message"])
        return f"http_{exc.status_code}: {detail}"
    if isinstance(exc, (openai.APITimeoutError, asyncio.TimeoutError, TimeoutError)):
        return "timeout: no answer within the per-attempt timeout (llm.timeout_s)"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        return f"connection: {type(cause).__name__ if cause else 'connection error'}"
    if isinstance(exc, MalformedResponse):
        return f"bad_response: {exc}"
    return f"error: {type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------
# Rate limits
# ---------------------------------------------------------------------------------------


class Slots:
    """``n`` concurrency slots; retries are served before first attempts.

    A retried request has already waited (its backoff); putting it behind every
    request not yet started would make the slowest request of a batch slower still.
    """

    def __init__(self, n: int) -> None:
        self.free = n
        self._retries: deque[asyncio.Future[None]] = deque()
        self._firsts: deque[asyncio.Future[None]] = deque()

    async def acquire(self, retry: bool) -> None:
        if self.free > 0 and not self._retries and not self._firsts:
            self.free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        (self._retries if retry else self._firsts).append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    (self._retries if retry else self._firsts).remove(waiter)
            raise

    def release(self) -> None:
        for queue in (self._retries, self._firsts):
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)  # the slot passes straight to the waiter
                    return
        self.free += 1


def estimate_prompt_tokens(messages: tuple[dict[str, str], ...] | list[dict[str, str]]) -> int:
    """About 4 characters per token plus a few per message, as OpenAI's guidance has it."""
    return 3 + sum(4 + len(str(m.get("content") or "")) // 4 for m in messages)


class LocalLimits:
    """``llm.requests_per_minute``/``tokens_per_minute`` applied in this process only:
    what a backend uses when no job limiter was handed to it."""

    def __init__(self, cfg: LLMConfig) -> None:
        self._rpm = TokenBucket(cfg.requests_per_minute) if cfg.requests_per_minute else None
        self._tpm = TokenBucket(cfg.tokens_per_minute) if cfg.tokens_per_minute else None

    async def acquire(self, tokens: float) -> None:
        if self._rpm is not None:
            await self._rpm.acquire(1)
        if self._tpm is not None:
            await self._tpm.acquire(tokens)

    def correct(self, extra_tokens: float) -> None:
        if self._tpm is not None:
            self._tpm.adjust(extra_tokens)

    async def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------
# Reasoning models and parameters a server refuses
# ---------------------------------------------------------------------------------------

#: Request parameters that differ between reasoning and classic chat models.
SHAPE_PARAMS = ("max_tokens", "max_completion_tokens", "temperature")
#: Words with which servers refuse a parameter (OpenAI, vLLM's and pydantic's validators).
REFUSAL_WORDS = ("unsupported", "not supported", "unrecognized", "unknown", "extra", "permitted")


def refused_parameter(exc: BaseException) -> str | None:
    """The request parameter a 400/422 answer refuses (max_tokens, temperature, ...), if any."""
    if not isinstance(exc, openai.APIStatusError) or exc.status_code not in (400, 422):
        return None
    body = exc.body if isinstance(exc.body, dict) else {}
    inner = body.get("error") if isinstance(body.get("error"), dict) else body
    if inner.get("param") in SHAPE_PARAMS:
        return inner["param"]
    text = f"{inner.get('message') or exc.message} {inner.get('code') or ''}".lower()
    if not any(word in text for word in REFUSAL_WORDS):
        return None
    quoted = [p for p in SHAPE_PARAMS if f"'{p}'" in text or f"`{p}`" in text]
    named = quoted or [p for p in SHAPE_PARAMS if p in text]
    return named[0] if named else None


def parameter_hint(param: str, reasoning_on: bool) -> str:
    """What to set when the server refused ``param`` (see ``llm.reasoning``)."""
    if reasoning_on:
        return (
            f"the server refuses {param!r}, which llm.reasoning=on sends "
            "(max_completion_tokens, no temperature): set llm.reasoning=off for servers and "
            "models that take max_tokens and temperature."
        )
    return (
        f"the server refuses {param!r}, as OpenAI's reasoning models (o1, o3, o4-mini, gpt-5, "
        "...) do: set llm.reasoning=on (max_completion_tokens, no temperature)."
    )


# ---------------------------------------------------------------------------------------
# Secrets in log lines the HTTP library writes (it quotes request URLs)
# ---------------------------------------------------------------------------------------


class _ScrubLogFilter(logging.Filter):
    """Replaces registered secrets in the records of the loggers it is attached to."""

    def __init__(self) -> None:
        super().__init__()
        self._counts: Counter[str] = Counter()  # secret -> backends using it
        self._secrets: tuple[str, ...] = ()  # longest first; replaced whole, never mutated
        self._lock = threading.Lock()

    def register(self, secrets: list[str], add: bool) -> None:
        with self._lock:
            for value in secrets:
                self._counts[value] += 1 if add else -1
            self._counts = +self._counts  # drop counts at zero
            self._secrets = tuple(sorted(self._counts, key=len, reverse=True))

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = self._secrets
        if secrets:
            message = clean = record.getMessage()
            for value in secrets:
                clean = clean.replace(value, "***")
            if clean != message:
                record.msg, record.args = clean, None
        return True


#: The HTTP libraries' loggers whose lines can quote a request URL.
URL_LOGGERS = ("httpx", "httpx2", "httpcore", "openai", "openai._base_client")
_log_scrub = _ScrubLogFilter()
for _name in URL_LOGGERS:
    logging.getLogger(_name).addFilter(_log_scrub)


# ---------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------


def split_base_url(url: str | None) -> tuple[str | None, dict[str, str], dict[str, str]]:
    """``(url, query parameters, headers)`` for the openai SDK from ``llm.base_url``.

    The SDK appends request paths to the base URL's text, so query parameters
    (``?api-key=...``) go as its default query. A ``user:password@`` part is sent as
    HTTP Basic auth, in place of the Bearer key, on every transport (as curl does;
    left in the URL, httpx would do the same silently and aiohttp would refuse it).
    """
    if not url or ("?" not in url and "@" not in url):
        return url, {}, {}
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    headers = {}
    if "@" in parts.netloc:
        userinfo, host = parts.netloc.rsplit("@", 1)
        user, _, password = userinfo.partition(":")
        pair = f"{unquote(user)}:{unquote(password)}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        parts = parts._replace(netloc=host)
    return urlunsplit(parts._replace(query="")), query, headers


def _price(prices: dict[str, tuple[float, float]], model: str) -> tuple[float, float] | None:
    """Exact match first, else the longest price key the model name starts with."""
    if model in prices:
        return prices[model]
    matches = [k for k in prices if model.startswith(k)]
    return prices[max(matches, key=len)] if matches else None


#: Counters of ``stats()``. ``prompt_tokens``/``completion_tokens`` are paid usage (HTTP
#: answers); ``cached_*`` is usage served from the cache (and in-flight duplicates).
STAT_KEYS = (
    "requests",
    "cache_hits",
    "http_calls",
    "retries",
    "failures",
    "prompt_tokens",
    "completion_tokens",
    "cached_prompt_tokens",
    "cached_completion_tokens",
)


class OpenAIBackend:
    """LLM backend on an OpenAI-compatible chat-completions endpoint.

    Args:
        cfg: the client's settings (endpoint, key variable, limits, retries, prices).
        cache_dir: where the response cache lives: a local folder (``OUT/cache``) or a
            pyarrow filesystem URI (``s3://bucket/run/cache?endpoint_override=...``);
            None, or ``cfg.cache=False``, turns caching off.
        api_key: the key as a :class:`~raypipe.llm.base.Secret`, used when the
            environment variable ``cfg.api_key_env`` is not set in this process.
        limiter: the job's limiter (:func:`raypipe.llm.limits.start_limiter`); None =
            apply ``cfg``'s rate limits in this process only.

    Raises:
        EndpointError: the environment variable ``cfg.api_key_env`` is not set.
        ConfigError: the cache location cannot be opened.
    """

    def __init__(
        self,
        cfg: LLMConfig,
        cache_dir: str | Path | None = None,
        api_key: Secret | None = None,
        limiter: LimiterHandle | None = None,
    ) -> None:
        # The environment wins; ``api_key`` is how a driver hands its key to Ray actors
        # on machines where the variable is not set.
        api_key = os.environ.get(cfg.api_key_env, "") or (api_key.value if api_key else "")
        if not api_key:
            raise EndpointError(
                f"the environment variable {cfg.api_key_env} (llm.api_key_env) is not set: "
                f"export {cfg.api_key_env}=<your API key> before running. A local vLLM "
                "server started without --api-key accepts any non-empty value."
            )
        self.cfg = cfg
        self.model = cfg.model
        self.reasoning = cfg.reasoning_on()
        self.base_url = redact_url(cfg.base_url or "https://api.openai.com/v1")
        self._url_secrets = url_secrets(cfg.base_url)
        self.cache = ResponseCache(cache_dir) if (cache_dir is not None and cfg.cache) else None
        self.limiter = limiter
        if limiter is None and (cfg.requests_per_minute or cfg.tokens_per_minute):
            if _in_ray_actor():
                log.warning(
                    "llm.requests_per_minute/tokens_per_minute apply to this actor alone: no "
                    "job limiter was passed. Start one with raypipe.llm.limits.start_limiter"
                    "(cfg) and pass it to make_backend(..., limiter=) to share the limits."
                )
        price = _price(cfg.prices, cfg.model)
        if price is None:
            log.warning(
                "no price for model %r in llm.prices: its cost is reported as 0 USD. Add "
                "llm.prices.%s=[prompt, completion] (USD per million tokens) to count it.",
                cfg.model,
                cfg.model,
            )
        self._price = price or (0.0, 0.0)
        self._counts: Counter[str] = Counter({k: 0 for k in STAT_KEYS})
        self._errors: Counter[str] = Counter()
        self._cost = 0.0
        self._cached_cost = 0.0
        self._stats_lock = threading.Lock()
        self._closed = False

        # The loop thread owns the HTTP client, the slots and the buckets.
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="raypipe-llm-loop", daemon=True
        )
        self._thread.start()
        _log_scrub.register(self._url_secrets, add=True)
        try:
            self._run(self._setup(api_key))
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._closed = True
            _log_scrub.register(self._url_secrets, add=False)
            raise

    async def _setup(self, api_key: str) -> None:
        cfg = self.cfg
        self._secret = _Secret(api_key)  # for scrubbing messages; prints as ***
        self._slots = Slots(cfg.concurrency)
        self._limits: Leases | LocalLimits | None = None
        if self.limiter is not None:
            self._limits = Leases(self.limiter)
        elif cfg.requests_per_minute or cfg.tokens_per_minute:
            self._limits = LocalLimits(cfg)
        self._inflight: dict[str, asyncio.Future[LLMResult]] = {}
        base_url, query, headers = split_base_url(cfg.base_url)
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            default_query=query or None,
            default_headers=headers or None,
            api_key=api_key,
            max_retries=0,  # tenacity owns retries
            timeout=cfg.timeout_s,
            http_client=self._http_client(),
        )

    def _http_client(self) -> Any:
        conc = self.cfg.concurrency
        limits = httpx.Limits(
            max_connections=max(1000, conc), max_keepalive_connections=max(100, conc)
        )
        transport = self.cfg.http_transport
        if transport == "auto":
            transport = "httpx" if any(os.environ.get(v) for v in PROXY_VARS) else "aiohttp"
        aio = getattr(openai, "DefaultAioHttpClient", None)
        if transport == "aiohttp":
            try:
                if aio is None:
                    raise RuntimeError("this openai version has no aiohttp transport")
                return aio(limits=limits, timeout=self.cfg.timeout_s)
            except RuntimeError as e:  # aiohttp (or the SDK's adapter) missing
                if self.cfg.http_transport == "aiohttp":
                    raise EndpointError(
                        f"llm.http_transport=aiohttp is not available ({e}): install "
                        "aiohttp, or set llm.http_transport=httpx."
                    ) from None
        return openai.DefaultAsyncHttpxClient(limits=limits, timeout=self.cfg.timeout_s)

    # -- running on the private loop ----------------------------------------------------

    def _on_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._on_loop():
            coro.close()
            raise RuntimeError("OpenAIBackend: call the async methods from its own loop")
        if self._closed:
            coro.close()
            raise RuntimeError("OpenAIBackend is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _bridge(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._on_loop():
            return await coro
        if self._closed:
            coro.close()
            raise RuntimeError("OpenAIBackend is closed")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    # -- public API ---------------------------------------------------------------------

    def complete_batch(self, requests: list[LLMRequest]) -> list[LLMResult]:
        """Answer every request concurrently; one result per request, in order."""
        return self._run(self._complete_many(list(requests)))

    async def acomplete(self, request: LLMRequest) -> LLMResult:
        """Answer one request (from any event loop)."""
        return await self._bridge(self._complete(request))

    async def acomplete_many(self, requests: list[LLMRequest]) -> list[LLMResult]:
        """Answer requests concurrently (from any event loop); results in order."""
        return await self._bridge(self._complete_many(list(requests)))

    def check(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Fail fast, before a long run, if the endpoint is unreachable or refuses the key.

        Lists the endpoint's models (falling back to a 1-token completion where
        ``/models`` is not served) and checks that ``llm.model`` is available.

        Returns:
            ``{"base_url", "model", "models", "latency_s"}``.

        Raises:
            EndpointError: with what to do (set the key variable, fix base_url, start
            the server, pick a served model).
        """
        return self._run(self._check(timeout_s))

    ping = check

    def stats(self) -> dict[str, Any]:
        """Counters so far: requests, cache_hits, http_calls, retries, failures, and
        failures by kind (``errors``); paid usage: prompt_tokens, completion_tokens,
        cost_usd; usage served from the cache (no HTTP call, not paid again):
        cached_prompt_tokens, cached_completion_tokens, cached_cost_usd (what those
        answers cost when they were paid for)."""
        with self._stats_lock:
            out: dict[str, Any] = dict(self._counts)
            out["cost_usd"] = round(self._cost, 8)
            out["cached_cost_usd"] = round(self._cached_cost, 8)
            out["errors"] = dict(self._errors)
        return out

    def close(self) -> None:
        """Close the HTTP client and stop the loop thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._on_loop():
            self._loop.call_soon(self._loop.stop)
            return
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        except Exception as e:  # closing must not mask the caller's own error
            log.debug("closing the HTTP client failed: %s", type(e).__name__)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()
        _log_scrub.register(self._url_secrets, add=False)

    async def _shutdown(self) -> None:
        # Calls still running (from other threads) end as cancelled instead of hanging.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._limits is not None:
            try:  # hand back what was over-reserved, for the job's other clients
                await asyncio.wait_for(self._limits.close(), 5)
            except Exception as e:
                log.debug("returning token corrections failed: %s", type(e).__name__)
        await self._client.close()

    def __enter__(self) -> OpenAIBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        cache = str(self.cache) if self.cache else None
        return (
            f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r}, "
            f"api_key_env={self.cfg.api_key_env!r}, concurrency={self.cfg.concurrency}, "
            f"cache={cache!r})"
        )

    def __reduce__(self) -> Any:
        raise TypeError(
            "OpenAIBackend holds a live HTTP client and is not picklable: build it where "
            "it is used (e.g. in the stage's __init__) with make_backend(cfg, cache_dir)."
        )

    # -- one request --------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        """``text`` without the API key or any credential inside ``llm.base_url``."""
        secret = getattr(self, "_secret", None)
        if secret and secret.value:
            text = text.replace(secret.value, "***")
        for value in getattr(self, "_url_secrets", ()):
            text = text.replace(value, "***")
        return text

    def _count(self, **deltas: float) -> None:
        with self._stats_lock:
            for k, v in deltas.items():
                if k == "cost_usd":
                    self._cost += v
                else:
                    self._counts[k] += int(v)

    def _body(self, req: LLMRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": [dict(m) for m in req.messages]}
        if self.reasoning:  # reasoning models refuse max_tokens and any non-default temperature
            body["max_completion_tokens"] = req.max_tokens
        else:
            body["temperature"] = req.temperature
            body["max_tokens"] = req.max_tokens
        if req.seed is not None:
            body["seed"] = req.seed
        return body

    def _served(self, req: LLMRequest, prompt: int, completion: int, cost: float) -> LLMResult:
        """A result answered without an HTTP call: nothing paid, the served usage reported."""
        self._count(cache_hits=1, cached_prompt_tokens=prompt, cached_completion_tokens=completion)
        with self._stats_lock:
            self._cached_cost += cost
        return LLMResult(
            key=req.key,
            text=None,
            cached=True,
            cached_prompt_tokens=prompt,
            cached_completion_tokens=completion,
            cached_cost_usd=cost,
        )

    def _cost_of(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self._price[0] + completion_tokens * self._price[1]) / 1e6

    async def _complete_many(self, requests: list[LLMRequest]) -> list[LLMResult]:
        return list(await asyncio.gather(*(self._complete(r) for r in requests)))

    async def _complete(self, req: LLMRequest) -> LLMResult:
        self._count(requests=1)
        body = self._body(req)
        if self.cache is None:
            return await self._call(req, body, None)

        # 1. Cache, and identical requests already in flight, answer for free.
        key = request_key(body)
        if self.cache.is_local:
            entry = self.cache.get(key)
        else:  # an object store: a round trip, kept off the event loop
            entry = await asyncio.to_thread(self.cache.get, key)
        if entry is not None:
            prompt = _int(entry.get("prompt_tokens"))
            completion = _int(entry.get("completion_tokens"))
            cost = entry.get("cost_usd")
            if not isinstance(cost, (int, float)):  # entries of format 1 hold no cost
                cost = self._cost_of(prompt, completion)
            result = self._served(req, prompt, completion, float(cost))
            result.text = entry["text"]
            result.finish_reason = entry.get("finish_reason")
            return result
        pending = self._inflight.get(key)
        if pending is not None:
            try:
                first: LLMResult | None = await asyncio.shield(pending)
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # this request itself was cancelled
                first = None
            if first is not None and first.ok:
                result = self._served(
                    req, first.prompt_tokens, first.completion_tokens, first.cost_usd
                )
                result.text = first.text
                result.finish_reason = first.finish_reason
                return result
            return await self._call(req, body, key)  # the first failed: try on our own
        future: asyncio.Future[LLMResult] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._call(req, body, key)
        except BaseException:  # cancelled: waiters try on their own
            future.cancel()
            raise
        finally:
            self._inflight.pop(key, None)
        future.set_result(result)
        return result

    async def _call(self, req: LLMRequest, body: dict[str, Any], key: str | None) -> LLMResult:
        """2.-4.: HTTP attempts with retries, then the result (and its cache entry)."""
        start = time.monotonic()
        estimate = estimate_prompt_tokens(req.messages) + req.max_tokens
        attempts = 0
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.cfg.max_attempts),
            wait=self._wait,
            retry=retry_if_exception(is_retryable),
            before_sleep=lambda state: self._before_sleep(req, state),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    if attempts > 1:
                        self._count(retries=1)
                    text, usage, finish = await self._attempt(body, estimate, attempts > 1)
        except Exception as e:
            error = describe(e)
            param = refused_parameter(e)
            if param is not None:
                error += f" ({parameter_hint(param, self.reasoning)})"
            return self._failed(req, self._scrub(error), attempts, start)

        prompt_tokens = _int(usage.get("prompt_tokens"))
        completion_tokens = _int(usage.get("completion_tokens"))
        cost = self._cost_of(prompt_tokens, completion_tokens)
        self._count(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost_usd=cost)
        common = dict(
            key=req.key,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost,
            attempts=attempts,
            latency_s=time.monotonic() - start,
        )
        if not text:  # paid for, but nothing to parse: the stage rejects it
            error = f"empty_completion: the model returned no text (finish_reason={finish})"
            if finish == "length" and self.reasoning:
                error += "; a reasoning model's thinking counts against llm.max_tokens: raise it"
            self._count(failures=1)
            with self._stats_lock:
                self._errors["empty_completion"] += 1
            log.warning("request %s: %s", req.key, error)
            return LLMResult(text=None, error=error, **common)
        if key is not None and self.cache is not None:
            entry = {
                "model": self.model,
                "text": text,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "cost_usd": cost,
                "finish_reason": finish,
            }
            if self.cache.is_local:
                self.cache.put(key, entry)
            else:
                await asyncio.to_thread(self.cache.put, key, entry)
        return LLMResult(text=text, finish_reason=finish, **common)

    async def _attempt(
        self, body: dict[str, Any], estimate: int, retry: bool
    ) -> tuple[str | None, dict, Any]:
        """One HTTP call: (content, usage, finish_reason); raises on any failure."""
        await self._slots.acquire(retry)
        try:
            if self._limits is not None:
                await self._limits.acquire(estimate)
            self._count(http_calls=1)
            # post() with a plain body: the same request chat.completions.create sends,
            # without its per-call type transform (a large share of the CPU per call).
            response = await asyncio.wait_for(
                self._client.post("/chat/completions", body=body, cast_to=httpx.Response),
                timeout=self.cfg.timeout_s,
            )
        finally:
            self._slots.release()
        try:
            data = json.loads(response.content)
            choice = data["choices"][0]
            content = choice["message"].get("content")
            usage = data.get("usage") or {}
            if not isinstance(usage, dict) or not (content is None or isinstance(content, str)):
                raise TypeError("unexpected field types")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise MalformedResponse(
                f"HTTP {response.status_code} body is not a chat completion ({type(e).__name__})"
            ) from None
        if self._limits is not None and usage:
            used = _int(usage.get("prompt_tokens")) + _int(usage.get("completion_tokens"))
            self._limits.correct(used - estimate)
        return content, usage, choice.get("finish_reason")

    def _wait(self, state: RetryCallState) -> float:
        """Retry-After when the server sent one, else jittered exponential backoff."""
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, openai.APIStatusError):
            after = retry_after_s(exc.response.headers)
            if after is not None:
                after = min(after, MAX_RETRY_AFTER_S)
                return after + random.uniform(0, min(1.0, 0.1 * after))
        initial, cap = self.cfg.backoff_initial_s, self.cfg.backoff_max_s
        base = min(cap, initial * 2 ** (state.attempt_number - 1))
        return min(cap, base + random.uniform(0, base))

    def _before_sleep(self, req: LLMRequest, state: RetryCallState) -> None:
        if log.isEnabledFor(logging.DEBUG):
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            log.debug(
                "request %s attempt %d failed (%s); retrying in %.2fs",
                req.key,
                state.attempt_number,
                self._scrub(describe(exc)) if exc else "?",
                wait,
            )

    def _failed(self, req: LLMRequest, error: str, attempts: int, start: float) -> LLMResult:
        self._count(failures=1)
        with self._stats_lock:
            self._errors[error.split(":", 1)[0]] += 1
        log.warning("request %s failed after %d attempt(s): %s", req.key, attempts, error)
        return LLMResult(
            key=req.key,
            text=None,
            error=error[:500],
            attempts=attempts,
            latency_s=time.monotonic() - start,
        )

    # -- reachability -------------------------------------------------------------------

    async def _check(self, timeout_s: float) -> dict[str, Any]:
        client = self._client.with_options(timeout=timeout_s, max_retries=0)
        start = time.monotonic()
        models: list[str] = []
        problem = None
        try:
            # 1. The served models, where the server lists them.
            try:
                page = await self._check_call(client.models.list, start + timeout_s)
                models = [m.id for m in page.data]
            except openai.APIStatusError as e:
                if e.status_code not in (404, 405, 501):  # no /models route: probe below
                    raise
            if models and self.model not in models:
                shown = ", ".join(models[:20]) + (" ..." if len(models) > 20 else "")
                problem = (
                    f"{self.base_url} does not list model {self.model!r}; it serves: {shown}. "
                    "Set llm.model to one of them."
                )
            else:
                # 2. One token, asked with the parameters real requests use: a server that
                # refuses them (max_tokens vs max_completion_tokens) fails here, not later.
                probe = self._body(
                    LLMRequest(
                        key="check",
                        task="check",
                        ability="",
                        # A fresh question each time: never a repeat of an answered request.
                        messages=({"role": "user", "content": f"ping {uuid.uuid4().hex[:8]}"},),
                        temperature=self.cfg.temperature,
                        max_tokens=1,
                    )
                )
                await self._check_call(
                    lambda: client.post("/chat/completions", body=probe, cast_to=httpx.Response),
                    start + timeout_s,
                )
        except Exception as e:
            problem = self._endpoint_problem(e)
        if problem:  # raised out here so the SDK's exception (and its text) is not chained
            raise EndpointError(problem)
        return {
            "base_url": self.base_url,
            "model": self.model,
            "models": len(models),
            "latency_s": round(time.monotonic() - start, 3),
        }

    async def _check_call(self, call: Callable[[], Awaitable[T]], deadline: float) -> T:
        """``call()`` until it succeeds, fails for good, or ``deadline`` passes: a 429 or
        5xx at start-up is retried (after Retry-After when it fits), not fatal."""
        attempt = 0
        while True:
            attempt += 1
            left = deadline - time.monotonic()
            try:
                return await asyncio.wait_for(call(), max(0.01, left))
            except openai.APIStatusError as e:  # unreachable or refused: fail at once
                if not is_retryable(e):
                    raise
                wait = retry_after_s(e.response.headers) or min(2.0, 0.1 * 2**attempt)
                if time.monotonic() + wait >= deadline:
                    raise
                await asyncio.sleep(wait)

    def _endpoint_problem(self, exc: Exception) -> str:
        """What went wrong reaching the endpoint, and what to do, for an EndpointError."""
        var, url = self.cfg.api_key_env, self.base_url
        if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return (
                f"{url} refused the API key in ${var} (HTTP {exc.status_code}): set {var} to "
                "a valid key for this endpoint (llm.api_key_env names the variable)."
            )
        if isinstance(exc, openai.NotFoundError):
            return (
                f"{url} does not serve model {self.model!r} (HTTP 404): check llm.model and "
                "llm.base_url (it usually ends in /v1)."
            )
        param = refused_parameter(exc)
        if param is not None:
            return self._scrub(
                f"{url} refused a request for model {self.model!r} ({describe(exc)}): "
                + parameter_hint(param, self.reasoning)
            )
        if isinstance(exc, openai.APIStatusError):
            return self._scrub(f"{url} answered {describe(exc)}: check the server's log.")
        if isinstance(exc, (openai.APIConnectionError, asyncio.TimeoutError, TimeoutError)):
            what = "did not answer in time" if is_timeout(exc) else "is unreachable"
            return (
                f"the LLM endpoint {url} {what}: check llm.base_url, that the server is "
                "running (e.g. `vllm serve <model> --port 8000`) and reachable from this "
                "machine."
            )
        return self._scrub(f"checking {url} failed: {describe(exc)}")


def is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (openai.APITimeoutError, asyncio.TimeoutError, TimeoutError))


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _in_ray_actor() -> bool:
    ray = sys.modules.get("ray")
    try:
        return bool(ray and ray.is_initialized() and ray.get_runtime_context().get_actor_id())
    except Exception:
        return False
