"""The ``openai`` backend: any OpenAI-compatible chat endpoint (OpenAI, a vLLM server, ...).

Stages call the synchronous :meth:`OpenAIBackend.complete_batch` from plain code
inside Ray actors. Underneath, one ``openai.AsyncOpenAI`` client lives on a private
event loop in a background thread for the backend's lifetime (an async HTTP client
must stay on the loop that made it); work is handed to it with
``run_coroutine_threadsafe``. Async callers use :meth:`acomplete` /
:meth:`acomplete_many`.

Per request, in order:

1. the on-disk cache (a hit costs nothing and makes no HTTP call);
2. a concurrency slot (``llm.concurrency``), then the request- and token-per-minute
   buckets (tokens estimated from the message length plus ``max_tokens``, corrected
   with the reported usage afterwards);
3. one HTTP attempt with a per-attempt timeout; tenacity retries 429, 5xx, timeouts,
   connection errors and malformed bodies with jittered exponential backoff, or
   after the server's ``Retry-After``/``retry-after-ms`` when it sends one, up to
   ``llm.max_attempts``; other 4xx fail at once;
4. the answer's text, token usage and cost (``llm.prices``) into an
   :class:`~raypipe.llm.base.LLMResult`; successful answers go to the cache.

A request that still fails comes back as ``LLMResult(text=None, error="<kind>: <detail>")``;
nothing is raised for one request. The API key is read from the environment
variable ``llm.api_key_env``, handed to the HTTP client and scrubbed from every
message raypipe writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import os
import random
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import openai
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from raypipe.config import LLMConfig
from raypipe.errors import EndpointError
from raypipe.llm.base import LLMRequest, LLMResult, Secret
from raypipe.llm.cache import ResponseCache, request_key

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


class TokenBucket:
    """A per-minute limit as a bucket refilled continuously, holding one second's worth.

    ``acquire(n)`` waits until the bucket holds ``n`` (or is full, for requests bigger
    than a second's worth) and takes ``n``; it may go negative, which delays the next
    callers, so the long-run rate stays at the limit. Waiters are served in order, and
    a give-back (``adjust`` with a negative amount) wakes the one waiting.
    """

    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()
        self._given_back = asyncio.Event()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    async def acquire(self, n: float) -> None:
        async with self._lock:
            need = min(n, self.capacity)
            self._refill()
            while self.tokens < need:
                self._given_back.clear()
                try:
                    await asyncio.wait_for(
                        self._given_back.wait(), (need - self.tokens) / self.rate
                    )
                except asyncio.TimeoutError:
                    pass
                self._refill()
            self.tokens -= n

    def adjust(self, extra: float) -> None:
        """Take ``extra`` more (or give back, if negative) once the real cost is known."""
        self._refill()
        self.tokens = min(self.capacity, self.tokens - extra)
        if extra < 0:
            self._given_back.set()


def estimate_prompt_tokens(messages: tuple[dict[str, str], ...] | list[dict[str, str]]) -> int:
    """About 4 characters per token plus a few per message, as OpenAI's guidance has it."""
    return 3 + sum(4 + len(str(m.get("content") or "")) // 4 for m in messages)


# ---------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------


def _safe_url(url: str | None) -> str:
    """The base URL without any user:password part (for messages and repr)."""
    if not url:
        return "https://api.openai.com/v1"
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


def _price(prices: dict[str, tuple[float, float]], model: str) -> tuple[float, float] | None:
    """Exact match first, else the longest price key the model name starts with."""
    if model in prices:
        return prices[model]
    matches = [k for k in prices if model.startswith(k)]
    return prices[max(matches, key=len)] if matches else None


STAT_KEYS = (
    "requests",
    "cache_hits",
    "http_calls",
    "retries",
    "failures",
    "prompt_tokens",
    "completion_tokens",
)


class OpenAIBackend:
    """LLM backend on an OpenAI-compatible chat-completions endpoint.

    Args:
        cfg: the client's settings (endpoint, key variable, limits, retries, prices).
        cache_dir: folder of the response cache (``OUT/cache``); None, or
            ``cfg.cache=False``, turns caching off.
        api_key: the key as a :class:`~raypipe.llm.base.Secret`, used when the
            environment variable ``cfg.api_key_env`` is not set in this process.

    Raises:
        EndpointError: the environment variable ``cfg.api_key_env`` is not set.
    """

    def __init__(
        self, cfg: LLMConfig, cache_dir: str | Path | None = None, api_key: Secret | None = None
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
        self.base_url = _safe_url(cfg.base_url)
        self.cache = ResponseCache(cache_dir) if (cache_dir is not None and cfg.cache) else None
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
        self._stats_lock = threading.Lock()
        self._closed = False

        # The loop thread owns the HTTP client, the slots and the buckets.
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="raypipe-llm-loop", daemon=True
        )
        self._thread.start()
        try:
            self._run(self._setup(api_key))
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._closed = True
            raise

    async def _setup(self, api_key: str) -> None:
        cfg = self.cfg
        self._secret = _Secret(api_key)  # for scrubbing messages; prints as ***
        self._slots = Slots(cfg.concurrency)
        self._rpm = TokenBucket(cfg.requests_per_minute) if cfg.requests_per_minute else None
        self._tpm = TokenBucket(cfg.tokens_per_minute) if cfg.tokens_per_minute else None
        self._inflight: dict[str, asyncio.Future[LLMResult]] = {}
        self._client = openai.AsyncOpenAI(
            base_url=cfg.base_url,
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
        """Counters so far: requests, cache_hits, http_calls, retries, failures,
        prompt_tokens, completion_tokens, cost_usd, and failures by kind (``errors``)."""
        with self._stats_lock:
            out: dict[str, Any] = dict(self._counts)
            out["cost_usd"] = round(self._cost, 8)
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

    async def _shutdown(self) -> None:
        # Calls still running (from other threads) end as cancelled instead of hanging.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
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
        cache = str(self.cache.root) if self.cache else None
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
        secret = getattr(self, "_secret", None)
        return text.replace(secret.value, "***") if secret and secret.value else text

    def _count(self, **deltas: float) -> None:
        with self._stats_lock:
            for k, v in deltas.items():
                if k == "cost_usd":
                    self._cost += v
                else:
                    self._counts[k] += int(v)

    def _body(self, req: LLMRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [dict(m) for m in req.messages],
            "temperature": req.temperature,
            "max_tokens": req.max_tokens,
        }
        if req.seed is not None:
            body["seed"] = req.seed
        return body

    async def _complete_many(self, requests: list[LLMRequest]) -> list[LLMResult]:
        return list(await asyncio.gather(*(self._complete(r) for r in requests)))

    async def _complete(self, req: LLMRequest) -> LLMResult:
        self._count(requests=1)
        body = self._body(req)
        if self.cache is None:
            return await self._call(req, body, None)

        # 1. Cache, and identical requests already in flight, answer for free.
        key = request_key(body)
        entry = self.cache.get(key)
        if entry is not None:
            self._count(cache_hits=1)
            return LLMResult(
                key=req.key,
                text=entry["text"],
                prompt_tokens=int(entry.get("prompt_tokens", 0)),
                completion_tokens=int(entry.get("completion_tokens", 0)),
                cached=True,
            )
        pending = self._inflight.get(key)
        if pending is not None:
            try:
                first: LLMResult | None = await asyncio.shield(pending)
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # this request itself was cancelled
                first = None
            if first is not None and first.ok:
                self._count(cache_hits=1)
                return LLMResult(
                    key=req.key,
                    text=first.text,
                    prompt_tokens=first.prompt_tokens,
                    completion_tokens=first.completion_tokens,
                    cached=True,
                )
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
            return self._failed(req, self._scrub(describe(e)), attempts, start)

        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
        cost = (prompt_tokens * self._price[0] + completion_tokens * self._price[1]) / 1e6
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
                "finish_reason": finish,
            }
            self.cache.put(key, entry)
        return LLMResult(text=text, **common)

    async def _attempt(
        self, body: dict[str, Any], estimate: int, retry: bool
    ) -> tuple[str | None, dict, Any]:
        """One HTTP call: (content, usage, finish_reason); raises on any failure."""
        await self._slots.acquire(retry)
        try:
            if self._rpm is not None:
                await self._rpm.acquire(1)
            if self._tpm is not None:
                await self._tpm.acquire(estimate)
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
        if self._tpm is not None and usage:
            used = int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)
            self._tpm.adjust(used - estimate)
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
            try:
                page = await asyncio.wait_for(client.models.list(), timeout_s)
                models = [m.id for m in page.data]
            except openai.NotFoundError:  # some servers have no /models: ask for one token
                probe = {
                    "model": self.model,
                    "messages": [{"role": "user", "content": "ping"}],
                    "max_tokens": 1,
                }
                await asyncio.wait_for(
                    client.post("/chat/completions", body=probe, cast_to=httpx.Response),
                    timeout_s,
                )
        except Exception as e:
            problem = self._endpoint_problem(e)
        if problem:  # raised out here so the SDK's exception (and its text) is not chained
            raise EndpointError(problem)
        if models and self.model not in models:
            shown = ", ".join(models[:20]) + (" ..." if len(models) > 20 else "")
            raise EndpointError(
                f"{self.base_url} does not list model {self.model!r}; it serves: {shown}. "
                "Set llm.model to one of them."
            )
        return {
            "base_url": self.base_url,
            "model": self.model,
            "models": len(models),
            "latency_s": round(time.monotonic() - start, 3),
        }

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
