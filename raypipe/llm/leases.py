"""A client's side of the job-wide LLM limiter (:mod:`raypipe.llm.limits`): request and
token permits leased in small batches and handed straight to the requests waiting, the
job's pause and in-flight limit as the limiter last reported them, and the token
corrections (reported usage minus estimate) sent back within ``FLUSH_S``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from raypipe.llm.limits import (
    FLUSH_S,
    LimiterError,
    LimiterHandle,
)

log = logging.getLogger(__name__)


class Leases:
    """A client's side of the job limiter: permits leased in small batches, used at once.

    Runs on the backend's event loop. ``acquire(tokens)`` returns once this request
    holds one request permit and ``tokens`` token permits. Waiting requests are served
    in order; one lease call is in flight at a time and asks for what the requests
    waiting at that moment need (at most ``handle.lease_requests`` of them).
    """

    def __init__(self, handle: LimiterHandle) -> None:
        self.handle = handle
        self._limit_requests = bool(handle.requests_per_minute)
        self._limit_tokens = bool(handle.tokens_per_minute)
        self._requests = 0  # request permits held, not yet handed out
        self._tokens = 0.0  # token permits held
        self._correction = 0.0  # reported - estimated tokens, not yet sent
        self._waiters: deque[tuple[asyncio.Future[None], float]] = deque()
        self._pump: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.lease_calls = 0  # calls to the limiter that asked for permits
        self._answers = 0  # news not yet reported: answers, failures by kind, a pause
        self._failures: Counter[str] = Counter()
        self._pause_s = 0.0
        self._fatal: str | None = None
        self._last_error: str | None = None  # the last failure's message, until reported
        self.client = uuid.uuid4().hex  # names this client's totals at the limiter
        self._totals: dict[str, Any] = {"answers": 0, "failures": Counter()}
        self._pause_until = -float("inf")  # time.monotonic() until which attempts wait
        self.limit = float("inf")  # the job's in-flight limit per client, as last heard
        self.on_limit: Callable[[float], None] | None = None

    async def acquire(self, tokens: float) -> None:
        if not self._waiters and self._has(tokens):
            self._take(tokens)
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((waiter, tokens))
        self._kick()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._give(tokens)  # handed permits just as we were cancelled: pass them on
                self._serve()
            else:
                self._waiters = deque(w for w in self._waiters if w[0] is not waiter)
            raise

    def correct(self, extra_tokens: float) -> None:
        """Book the difference between the reported usage and the estimate, job-wide
        (a failed attempt books minus its whole reservation: it is given back).

        Sent on its own call, not with the next lease: that lease may be the one
        waiting for the tokens this correction gives back.
        """
        if self._limit_tokens and extra_tokens:
            self._correction += extra_tokens
            self._report_soon()

    def record(self, answers: int = 0, failure: str | None = None, message: str = "") -> None:
        """An answer arrived, or an attempt failed with ``failure`` (its kind; a fatal
        one with the server's ``message``, reported at once)."""
        self._answers += answers
        self._totals["answers"] += answers
        if failure is not None:
            self._failures[failure] += 1
            self._totals["failures"][failure] += 1
        if failure == "fatal" and message:
            self._fatal = self._fatal or message
        if failure is not None and message:
            self._last_error = message
        self._report_soon(at_once=failure == "fatal")

    def pause(self, seconds: float) -> None:
        """The server asked to wait (Retry-After, or a bare 429): this client waits at
        once, and the job's other clients from their next report or lease on."""
        self._pause_until = max(self._pause_until, time.monotonic() + seconds)
        self._pause_s = max(self._pause_s, seconds)
        self._report_soon(at_once=True)

    async def gate(self) -> None:
        """Wait out the job's pause, as this client last heard of it."""
        while (left := self._pause_until - time.monotonic()) > 0:
            await asyncio.sleep(left)

    async def flush(self) -> None:
        """Report now what is not yet reported."""
        await self._flush()

    async def close(self) -> None:
        """Send the corrections still held (a client that stops gives back what it over-reserved)."""
        for task in (self._pump, self._flusher):
            if task is not None:
                task.cancel()
        await self._flush()

    # -- internals ------------------------------------------------------------------

    def _has(self, tokens: float) -> bool:
        return (not self._limit_requests or self._requests >= 1) and (
            not self._limit_tokens or self._tokens >= tokens
        )

    def _take(self, tokens: float) -> None:
        if self._limit_requests:
            self._requests -= 1
        if self._limit_tokens:
            self._tokens -= tokens

    def _give(self, tokens: float) -> None:
        if self._limit_requests:
            self._requests += 1
        if self._limit_tokens:
            self._tokens += tokens

    def _kick(self) -> None:
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._run_pump())

    def _serve(self) -> None:
        while self._waiters:
            waiter, tokens = self._waiters[0]
            if waiter.done():  # cancelled
                self._waiters.popleft()
                continue
            if not self._has(tokens):
                return
            self._waiters.popleft()
            self._take(tokens)
            waiter.set_result(None)

    def _demand(self) -> tuple[int, float]:
        """Permits to ask for: enough for the first waiters, within one lease's size."""
        count, tokens = 0, 0.0
        for waiter, need in self._waiters:
            if waiter.done():
                continue
            if count >= self.handle.lease_requests:
                break
            if count and tokens + need > self.handle.lease_tokens:
                break
            count += 1
            tokens += need
        want_requests = max(0, count - self._requests) if self._limit_requests else 0
        want_tokens = max(0.0, tokens - self._tokens) if self._limit_tokens else 0.0
        return want_requests, want_tokens

    async def _run_pump(self) -> None:
        try:
            while True:
                self._serve()
                want_requests, want_tokens = self._demand()
                if not (want_requests or want_tokens):
                    return
                self.lease_calls += 1
                try:
                    await self.handle.actor.lease.remote(want_requests, want_tokens)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # the limiter is gone for good: fail the waiters
                    for waiter, _ in self._waiters:
                        if not waiter.done():
                            waiter.set_exception(
                                LimiterError(f"the job's LLM rate limiter failed: {e!r}")
                            )
                    self._waiters.clear()
                    return
                self._requests += want_requests
                self._tokens += want_tokens
        finally:
            self._pump = None

    def _report_soon(self, at_once: bool = False) -> None:
        if self._flusher is None:
            delay = 0.0 if at_once else FLUSH_S
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon(delay))

    async def _flush_soon(self, delay: float) -> None:
        try:
            await asyncio.sleep(delay)  # gather the news of many answers
            await self._flush()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the limiter restarts with full buckets: nothing to undo
            log.warning("could not report to the job's LLM limiter: %r", e)
        finally:
            self._flusher = None

    async def _flush(self) -> None:
        while self._correction or self._answers or self._failures or self._pause_s:
            news = dict(
                last_error=self._last_error,
                answers=self._answers,
                failures=dict(self._failures),
                pause_s=self._pause_s,
                correction=self._correction,
                fatal=self._fatal,
                client=self.client,
                totals={**self._totals, "failures": dict(self._totals["failures"])},
            )
            self._answers, self._failures, self._pause_s = 0, Counter(), 0.0
            self._last_error = None
            self._correction = 0.0
            reply = await self.handle.actor.report.remote(**news)
            self._hear(reply)

    def _hear(self, reply: dict[str, float]) -> None:
        """Apply the job's state from a report's reply: its pause and in-flight limit."""
        if reply.get("pause_s", 0) > 0:
            self._pause_until = max(self._pause_until, time.monotonic() + reply["pause_s"])
        limit = reply.get("limit")
        if limit is not None and limit != self.limit:
            self.limit = limit
            if self.on_limit is not None:
                self.on_limit(limit)
