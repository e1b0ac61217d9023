"""The ``openai`` backend: any OpenAI-compatible chat endpoint (OpenAI, vLLM, SGLang...).

Stages call :meth:`OpenAIBackend.complete_batch` from plain code in Ray actors; the HTTP
clients live on a private event loop (:mod:`.loop_thread`); async callers use ``acomplete*``.

Per request, in order:

1. the response cache (a folder or a URI; a hit makes no HTTP call and reports its
   tokens as ``cached_*``); the key hashes the body sent (:mod:`.request_body`);
2. the job's pause (a ``Retry-After`` any client of the job received), an in-flight
   slot (the job's adaptive limit, at most ``llm.concurrency``), then permits from the
   request- and token-per-minute limits; all three come from the job's limiter
   (:mod:`raypipe.llm.limits`), or an in-process one when none is given;
3. one HTTP attempt (:mod:`.transport`: streamed over aiohttp, or by the openai SDK),
   timed by its progress unless ``llm.stream=off``; a failed attempt gives its token
   reservation back and is retried if transient (:mod:`.failures`) after the server's
   ``Retry-After`` (pausing the whole job) or a jittered backoff, to ``llm.max_attempts``;
4. text, usage and cost (``llm.prices``) into an :class:`~raypipe.llm.base.LLMResult`
   with its ``failure`` kind; answers with text go to the cache.

Nothing is raised for one request: a failure is ``LLMResult(text=None, error="<reason>:
<detail>", failure=<kind>)``. A ``fatal`` one (401, 403, 404, 400...) fails every later
request of this backend at once; the caller stops the run (``LLMFatalError``).

The key is read in this process, kept out of messages and logs (:mod:`.credentials`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import openai

from raypipe.config import redact_url, url_secrets
from raypipe.llm import endpoint_check
from raypipe.llm.base import LLMRequest, LLMResult, Secret
from raypipe.llm.cache import ResponseCache, request_key
from raypipe.llm.config import LLMConfig
from raypipe.llm.credentials import log_scrub, read_api_key, scrub, split_base_url
from raypipe.llm.failures import (
    CONTENT,
    FATAL,
    TRANSIENT,
    content_failure,
    describe,
    error_text,
    kind_of,
    refused_parameter,
    retry_after_s,
    retry_wait,
)
from raypipe.llm.leases import Leases
from raypipe.llm.limits import LimiterHandle, local_limiter
from raypipe.llm.loop_thread import LoopThread, cancel_others
from raypipe.llm.pricing import cost_usd, price_or_zero
from raypipe.llm.request_body import request_body
from raypipe.llm.slots import Slots
from raypipe.llm.transport import (
    Answer,
    Timeouts,
    direct_streams,
    estimate_prompt_tokens,
    http_client,
    httpx,
    plain_attempt,
    streamed_attempt,
)
from raypipe.llm.usage import Usage

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds added to the longest progress limit for the HTTP library's own read timeout.
IO_MARGIN_S = 30.0

__all__ = ["OpenAIBackend", "estimate_prompt_tokens", "httpx", "retry_after_s"]


class OpenAIBackend:
    """LLM backend on an OpenAI-compatible chat-completions endpoint.

    Args:
        cfg: the client's settings (endpoint, key variable, limits, retries, prices).
        cache_dir: where the response cache lives: a local folder (``OUT/cache``) or a
            pyarrow filesystem URI (``s3://bucket/run/cache?endpoint_override=...``);
            None, or ``cfg.cache=False``, turns caching off.
        api_key: a key for this process when neither ``$cfg.api_key_env`` nor
            ``cfg.api_key_file`` holds one (in-process callers only: it cannot be pickled).
        limiter: the job's limiter (:func:`raypipe.llm.limits.start_limiter`); None =
            an in-process one (limits, pauses and the in-flight limit for this client alone).

    Raises:
        EndpointError: no API key.
        ConfigError: the cache location cannot be opened.
    """

    def __init__(
        self,
        cfg: LLMConfig,
        cache_dir: str | Path | None = None,
        api_key: Secret | None = None,
        limiter: LimiterHandle | None = None,
    ) -> None:
        secret = read_api_key(cfg, api_key)
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
        self._price = price_or_zero(cfg.prices, cfg.model)
        self.stream = cfg.stream != "off"
        self.timeouts = Timeouts(cfg.first_token_s(), cfg.idle_timeout_s, cfg.deadline_s)
        self._fatal: str | None = None  # set by the first fatal failure
        self.usage = Usage()

        # The loop thread owns the HTTP client, the slots and the limiter's client side.
        self._thread = LoopThread("OpenAIBackend")
        log_scrub.register(self._url_secrets, add=True)
        try:
            self._thread.run(self._setup(secret))
        except BaseException:
            self._thread.stop()
            log_scrub.register(self._url_secrets, add=False)
            raise

    async def _setup(self, secret: Secret) -> None:
        cfg = self.cfg
        self._secret = secret  # for scrubbing messages; prints as ***, cannot be pickled
        self._slots = Slots(cfg.concurrency)
        self._limits = Leases(self.limiter or local_limiter(cfg))
        self._limits.on_limit = self._slots.set_limit
        self._inflight: dict[str, asyncio.Future[LLMResult]] = {}
        base_url, query, headers = split_base_url(cfg.base_url)
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            default_query=query or None,
            default_headers=headers or None,
            api_key=secret.value,
            max_retries=0,  # this module owns retries
            timeout=self._io_timeout(),
            http_client=http_client(self.cfg, self._io_timeout()),
        )
        self._direct = direct_streams(cfg, self._client, query, headers, self._io_timeout())

    def _io_timeout(self) -> float:
        """The HTTP library's own read timeout: beyond every limit raypipe applies itself."""
        t = self.timeouts
        return max(self.cfg.timeout_s, t.first_token_s, t.idle_s, t.deadline_s or 0) + IO_MARGIN_S

    def first_answer_s(self) -> float:
        """How long a request may wait for an answer to start (first token, or whole)."""
        return self.timeouts.first_token_s if self.stream else self.cfg.timeout_s

    # -- public API ---------------------------------------------------------------------

    def complete_batch(self, requests: list[LLMRequest]) -> list[LLMResult]:
        """Answer every request concurrently; one result per request, in order."""
        return self._thread.run(self._complete_many(list(requests)))

    async def acomplete(self, request: LLMRequest) -> LLMResult:
        """Answer one request (from any event loop)."""
        return await self._thread.bridge(self._complete(request))

    async def acomplete_many(self, requests: list[LLMRequest]) -> list[LLMResult]:
        """Answer requests concurrently (from any event loop); results in order."""
        return await self._thread.bridge(self._complete_many(list(requests)))

    def check(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Fail fast, before a long run, if the endpoint is unreachable, refuses the key,
        does not serve ``llm.model`` or refuses the parameters real requests carry
        (:mod:`raypipe.llm.endpoint_check`). ``timeout_s`` bounds reaching the server;
        the probes that generate get a real request's limits (:meth:`first_answer_s`).

        Returns:
            ``{"base_url", "model", "models", "latency_s", "stream", "structured_output"}``:
            the last two as resolved for this endpoint (``auto`` settled).

        Raises:
            EndpointError: with what to do (set the key variable, fix base_url, start
            the server, pick a served model, turn an option off).
        """
        return self._thread.run(endpoint_check.check(self, timeout_s))

    ping = check

    def stats(self) -> dict[str, Any]:
        """Counters so far: requests, cache_hits, http_calls, retries, failures, failed
        requests by reason (``errors``) and by kind (``failure_kinds``: transient,
        content, fatal); paid usage: prompt_tokens, completion_tokens, cost_usd
        (``estimated_usage``: answers whose usage was counted from the text); usage
        served from the cache (no HTTP call, not paid again): cached_prompt_tokens,
        cached_completion_tokens, cached_cost_usd (what those answers cost when paid)."""
        return self.usage.stats()

    def flush_reports(self) -> None:
        """Send what the job's limiter has not heard yet (before the caller raises)."""
        self._thread.run(self._limits.flush())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the backend's loop (tests and endpoint_check use it)."""
        return self._thread.run(coro)

    def close(self) -> None:
        """Close the HTTP client and stop the loop thread (idempotent)."""
        if not self._thread.closed:
            self._thread.stop(self._shutdown)
            log_scrub.register(self._url_secrets, add=False)

    async def _shutdown(self) -> None:
        await cancel_others()
        try:  # hand back what was over-reserved, and the last news, to the job
            await asyncio.wait_for(self._limits.close(), 5)
        except Exception as e:
            log.debug("reporting to the job's limiter failed: %s", type(e).__name__)
        await self._client.close()
        if self._direct is not None:
            await self._direct.close()

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
        return scrub(text, ((secret.value,) if secret else ()) + tuple(self._url_secrets))

    def _count(self, **deltas: float) -> None:
        self.usage.count(**deltas)

    def body(self, req: LLMRequest) -> dict[str, Any]:
        """The body sent for ``req``, which the cache key hashes too."""
        return request_body(self.model, req, self.reasoning)

    _body = body  # the name evaluate/ uses for its cache checks

    def _served(self, req: LLMRequest, prompt: int, completion: int, cost: float) -> LLMResult:
        """A result answered without an HTTP call: nothing paid, the served usage reported."""
        self._count(
            cache_hits=1,
            cached_prompt_tokens=prompt,
            cached_completion_tokens=completion,
            cached_cost_usd=cost,
        )
        return LLMResult(
            key=req.key,
            text=None,
            cached=True,
            cached_prompt_tokens=prompt,
            cached_completion_tokens=completion,
            cached_cost_usd=cost,
        )

    async def _complete_many(self, requests: list[LLMRequest]) -> list[LLMResult]:
        return list(await asyncio.gather(*(self._complete(r) for r in requests)))

    async def _complete(self, req: LLMRequest) -> LLMResult:
        self._count(requests=1)
        body = self.body(req)
        if self.cache is None:
            return await self._call(req, body, None)

        # 1. Cache, and identical requests already in flight, answer for free.
        key = request_key(body)
        if self.cache.is_local:
            entry = self.cache.get(key)
        else:  # an object store: a round trip, kept off the event loop
            entry = await asyncio.to_thread(self.cache.get, key)
        if entry is not None:
            prompt, completion = Answer(None, None, entry).tokens()
            cost = entry.get("cost_usd")
            if not isinstance(cost, (int, float)):  # entries of format 1 hold no cost
                cost = cost_usd(self._price, prompt, completion)
            result = self._served(req, prompt, completion, float(cost))
            result.text = entry["text"]
            result.finish_reason = entry.get("finish_reason")
            if result.finish_reason in ("length", "content_filter"):
                result.failure = CONTENT
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
                result.text, result.failure = first.text, first.failure
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
        attempts, dropped = 0, False
        while True:
            if self._fatal is not None:  # the endpoint refused this run: no more calls
                return self._failed(req, self._fatal, FATAL, attempts, start)
            attempts += 1
            if attempts > 1:
                self._count(retries=1)
            try:
                answer = await self._attempt(body, estimate, attempts > 1)
                break
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not dropped and self._drop_stream(e):
                    attempts, dropped = attempts - 1, True
                    continue
                kind = kind_of(e)
                if kind != TRANSIENT or attempts >= self.cfg.max_attempts:
                    error = self._scrub(error_text(e, self.reasoning))
                    self._limits.record(failure=kind, message=error[:500])
                    return self._failed(req, error, kind, attempts, start)
                self._limits.record(failure=kind)
                wait = self._backoff(e, attempts)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "request %s attempt %d failed (%s); retrying in %.2fs",
                        req.key, attempts, self._scrub(describe(e)), wait,
                    )  # fmt: skip
                await asyncio.sleep(wait)
        return await self._answered(req, answer, key, attempts, start)

    async def _answered(
        self, req: LLMRequest, answer: Answer, key: str | None, attempts: int, start: float
    ) -> LLMResult:
        """4. An answer that arrived: its usage and cost, its content check, the cache."""
        prompt_tokens, completion_tokens = answer.tokens()
        cost = cost_usd(self._price, prompt_tokens, completion_tokens)
        self._count(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost_usd=cost)
        if answer.estimated:
            self._count(estimated_usage=1)
        self._limits.record(answers=1)
        text, finish = answer.text, answer.finish_reason
        result = LLMResult(
            key=req.key,
            text=text,
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost,
            attempts=attempts,
            latency_s=time.monotonic() - start,
            usage_estimated=answer.estimated,
        )
        problem = content_failure(text, finish, answer.refusal)
        if problem is not None:  # paid for, but unusable: the stage rejects it
            if finish == "length" and self.reasoning:
                problem += "; a reasoning model's thinking counts against llm.max_tokens: raise it"
            self._limits.record(failure=CONTENT)
            result.failure, result.error = CONTENT, problem
            if not text or answer.refusal:
                result.text = None
                self.usage.failed(problem.split(":", 1)[0], CONTENT)
                log.warning("request %s: %s", req.key, problem)
                return result
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
        return result

    async def _attempt(self, body: dict[str, Any], estimate: int, retry: bool) -> Answer:
        """One HTTP call; raises on any failure, after giving back its token reservation."""
        await self._limits.gate()  # the job's pause, if a server asked for one
        await self._slots.acquire(retry)
        try:
            await self._limits.acquire(estimate)
            self._count(http_calls=1)
            try:
                if self.stream:
                    answer = await streamed_attempt(self._client, body, self.timeouts, self._direct)
                else:
                    answer = await plain_attempt(self._client, body, self.cfg.timeout_s)
            except BaseException:
                self._limits.correct(-estimate)  # nothing served: the reservation returns
                raise
        finally:
            self._slots.release()
        if answer.usage:
            self._limits.correct(sum(answer.tokens()) - estimate)
        return answer

    def _drop_stream(self, exc: Exception) -> bool:
        """``llm.stream=auto`` on a server that refuses streaming: whole answers from now
        on (one log line). True when the attempt should simply be made again."""
        if self.cfg.stream != "auto":
            return False
        if refused_parameter(exc, ("stream_options", "stream")) is None:
            return False
        if not self.stream:
            return True  # another request already switched (and said so)
        self.stream = False
        log.warning(
            "%s refuses streamed requests (%s): sending whole answers instead, each within "
            "llm.timeout_s=%gs (llm.stream=auto).",
            self.base_url, self._scrub(describe(exc))[:200], self.cfg.timeout_s,
        )  # fmt: skip
        return True

    def _backoff(self, exc: Exception, attempt: int) -> float:
        """The wait before the next attempt; a server's Retry-After pauses the whole job."""
        wait, pause = retry_wait(exc, attempt, self.cfg.backoff_initial_s, self.cfg.backoff_max_s)
        if pause is not None:
            self._limits.pause(pause)
        return wait

    def _failed(
        self, req: LLMRequest, error: str, kind: str, attempts: int, start: float
    ) -> LLMResult:
        self.usage.failed(error.split(":", 1)[0], kind)
        if kind == FATAL and self._fatal is None:
            self._fatal = error[:500]
            log.error("%s refused request %s: %s", self.base_url, req.key, error)
        elif kind != FATAL:
            log.warning("request %s failed after %d attempt(s): %s", req.key, attempts, error)
        return LLMResult(
            key=req.key,
            text=None,
            error=error[:500],
            failure=kind,
            attempts=attempts,
            latency_s=time.monotonic() - start,
        )


def _in_ray_actor() -> bool:
    ray = sys.modules.get("ray")
    try:
        return bool(ray and ray.is_initialized() and ray.get_runtime_context().get_actor_id())
    except Exception:
        return False
