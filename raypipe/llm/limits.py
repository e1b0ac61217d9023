"""Job-wide LLM rate limits: one Ray actor holds the account's request and token buckets.

``llm.requests_per_minute`` and ``llm.tokens_per_minute`` are what the account allows,
so every client of a job (each LLM actor of every stage, and the driver's keyword-bank
client) draws on the same two buckets, however many actors there are. The pipeline
calls :func:`start_limiter` once after ``ray.init`` and hands the returned
:class:`LimiterHandle` (picklable) to every ``make_backend(..., limiter=handle)``.

The limiter is not on every request's path: a client takes permits in small leases
(:class:`Leases`), sized by the requests it has waiting, at most a quarter second of
the job's rate each, and hands them straight to those requests. So at any moment the
permits granted but not yet used are a few per client, and no window of time sees
more requests than the bucket allows (one second's worth of burst plus the rate).
Tokens are reserved from an estimate (prompt length plus ``max_tokens``); each client
sends the differences to the reported usage back within ``FLUSH_S`` (one call for all
answers of that time), so over-reservations are returned to the whole job, and
under-reservations are taken from it.

Without a limiter (a single process, e.g. ``jobs/curate.py``) the backend applies the
same buckets in-process: then the limits hold for that one client.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from raypipe.llm.config import LLMConfig

log = logging.getLogger(__name__)

#: Longest a lease may last at the job's rate (seconds' worth of permits per lease).
LEASE_S = 0.25
#: How long a client may sit on unsent token corrections (reported usage - estimate).
FLUSH_S = 0.1
#: Most requests one lease serves when only a token limit is set.
MAX_LEASE_REQUESTS = 64
#: The in-flight limit is halved at most once per this many seconds.
CUT_HOLD_S = 1.0
#: Failure kinds counted by the limiter (raypipe.llm.failures.KINDS without "none").
FAILURE_KINDS = ("transient", "content", "fatal")


class TokenBucket:
    """A per-minute limit as a bucket refilled continuously, holding one second's worth.

    ``acquire(n)`` waits until the bucket holds ``n`` (or is full, for requests bigger
    than a second's worth) and takes ``n``; it may go negative, which delays the next
    callers, so the long-run rate stays at the limit. Waiters are served in order, and
    a give-back (``adjust`` with a negative amount) wakes the one waiting.
    """

    def __init__(
        self,
        per_minute: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.tokens = self.capacity
        self._clock, self._sleep = clock, sleep
        self.stamp = clock()
        self._lock = asyncio.Lock()
        self._given_back = asyncio.Event()

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    async def acquire(self, n: float) -> None:
        async with self._lock:
            need = min(n, self.capacity)
            self._refill()
            while self.tokens < need:
                self._given_back.clear()
                # Until the bucket refills enough, or a give-back arrives first.
                refilled = asyncio.ensure_future(self._sleep((need - self.tokens) / self.rate))
                given = asyncio.ensure_future(self._given_back.wait())
                _, pending = await asyncio.wait(
                    {refilled, given}, return_when=asyncio.FIRST_COMPLETED
                )
                for task in pending:
                    task.cancel()
                self._refill()
            self.tokens -= n

    def adjust(self, extra: float) -> None:
        """Take ``extra`` more (or give back, if negative) once the real cost is known."""
        self._refill()
        self.tokens = min(self.capacity, self.tokens - extra)
        if extra < 0:
            self._given_back.set()


class JobLimiter:
    """The job's LLM load control (one async Ray actor, ``num_cpus=0``, per job).

    It holds, for every LLM client of the job:

    - the request and token buckets (``llm.requests_per_minute``/``tokens_per_minute``);
      leases are granted in arrival order, each once both buckets hold it;
    - the pause: a ``Retry-After`` (or a 429 without one: ``DEFAULT_429_PAUSE_S``) that
      any client received holds every lease, and every client's next attempt, until it
      has passed, so the other actors stop hitting 429 too;
    - the in-flight limit per client (``limit``), adaptive: additive increase,
      multiplicative decrease (AIMD). Each answer adds ``1/limit`` (one more request in
      flight per limit's worth of answers, as TCP grows its window); transient failures
      halve it, at most once per ``CUT_HOLD_S`` (a burst of failures is one signal),
      never below 1 nor above ``llm.concurrency``;
    - the job's outage detector (:meth:`llm_stats`): seconds since the last successful
      answer and the count of each failure kind.

    The counts survive a restart of the actor (``max_restarts``): each client sends its
    own running totals with every report (:class:`Leases`), so a restarted limiter has the
    whole count of every client from that client's next report on (a client that ended
    before the restart is not counted again; ``llm_stats()["restarted"]`` then says the
    counts may be short).

    ``clock`` and ``sleep`` are injectable so tests can drive time by hand.
    """

    def __init__(
        self,
        requests_per_minute: float | None,
        tokens_per_minute: float | None,
        concurrency: int = 32,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        restarted: bool | None = None,
    ):
        self._clock, self._sleep = clock, sleep
        self._restarted = _was_restarted() if restarted is None else restarted
        buckets = dict(clock=clock, sleep=sleep)
        self._requests = (
            TokenBucket(requests_per_minute, **buckets) if requests_per_minute else None
        )
        self._tokens = TokenBucket(tokens_per_minute, **buckets) if tokens_per_minute else None
        self._lock = asyncio.Lock()
        self._granted = [0, 0.0, 0.0]  # requests, tokens, token corrections (for stats)
        self.concurrency = concurrency
        self.limit = float(concurrency)
        self._last_cut = -float("inf")
        self._pause_until = -float("inf")
        self._started = clock()
        self._last_success: float | None = None
        self._answers = 0
        self._failures: Counter[str] = Counter({k: 0 for k in FAILURE_KINDS})
        self._pauses = 0
        self._fatal: str | None = None
        self._totals: dict[str, dict[str, Any]] = {}  # client -> its running totals

    async def lease(self, requests: int, tokens: float, correction: float = 0.0) -> None:
        """Wait until ``requests`` and ``tokens`` are granted; first book ``correction``
        (reported usage minus estimate, summed over the client's answers since its last call).
        """
        self._correct(correction)
        if requests <= 0 and tokens <= 0:
            return
        async with self._lock:  # one lease at a time: first come, first served
            await self._paused()
            if self._requests is not None and requests > 0:
                await self._requests.acquire(requests)
            if self._tokens is not None and tokens > 0:
                await self._tokens.acquire(tokens)
        self._granted[0] += requests
        self._granted[1] += tokens

    def report(
        self,
        answers: int = 0,
        failures: dict[str, int] | None = None,
        pause_s: float = 0.0,
        correction: float = 0.0,
        fatal: str | None = None,
        client: str | None = None,
        totals: dict[str, Any] | None = None,
    ) -> dict[str, float]:
        """A client's news since its last report: answers, failures by kind, a pause it
        was asked for, token corrections, the message of a fatal failure, and (with
        ``client``) its running ``totals`` of answers and failures since it started.
        Returns the pause left and the in-flight limit."""
        now = self._clock()
        if client is not None and totals is not None:
            self._totals[client] = totals
        if fatal and self._fatal is None:
            self._fatal = fatal
        self._correct(correction)
        if answers:
            self._answers += answers
            self._last_success = now
            self.limit = min(float(self.concurrency), self.limit + answers / self.limit)
        for kind, n in (failures or {}).items():
            self._failures[kind] += n
        if (failures or {}).get("transient") and now - self._last_cut >= CUT_HOLD_S:
            self.limit = max(1.0, self.limit / 2)
            self._last_cut = now
        if pause_s > 0 and now + pause_s > self._pause_until:
            self._pause_until = now + pause_s
            self._pauses += 1
        return {"pause_s": max(0.0, self._pause_until - now), "limit": self.limit}

    def llm_stats(self) -> dict[str, Any]:
        """The job's outage detector, as the manifest embeds it."""
        now = self._clock()
        since = self._last_success if self._last_success is not None else self._started
        # What this actor heard, or what the clients say they sent: each is a lower
        # bound of the truth (the first falls short after a restart).
        answers = sum(t.get("answers", 0) for t in self._totals.values())
        failures = Counter()
        for t in self._totals.values():
            failures.update(t.get("failures", {}))
        return {
            "answers": max(self._answers, answers),
            "failures": {k: max(n, failures[k]) for k, n in self._failures.items()},
            "restarted": self._restarted,
            "seconds_since_success": round(now - since, 3),
            "any_success": self._last_success is not None,
            "pauses": self._pauses,
            "in_flight_limit": round(self.limit, 2),
            "fatal_error": self._fatal,
        }

    def stats(self) -> dict[str, float]:
        """Permits granted so far: requests, tokens, and the sum of token corrections."""
        return dict(zip(("requests", "tokens", "token_corrections"), self._granted))

    def _correct(self, correction: float) -> None:
        if correction and self._tokens is not None:
            self._tokens.adjust(correction)
            self._granted[2] += correction

    async def _paused(self) -> None:
        while (left := self._pause_until - self._clock()) > 0:
            await self._sleep(left)


def _was_restarted() -> bool:
    """Whether this process is a limiter actor that Ray restarted (False outside Ray)."""
    try:
        import ray

        if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
            return False
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # no Ray, or its state API unreachable: say nothing false
        return False


class InProcess:
    """A :class:`JobLimiter` in this process, called the way a Ray actor handle is
    (``handle.lease.remote(...)``): what a backend uses when no job limiter is given."""

    def __init__(self, limiter: JobLimiter) -> None:
        self.limiter = limiter

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.limiter, name)

        class _Call:
            @staticmethod
            def remote(*args: Any, **kwargs: Any) -> Any:
                result = method(*args, **kwargs)
                return result if inspect.isawaitable(result) else _done(result)

        return _Call


async def _done(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class LimiterHandle:
    """What clients receive: the limiter actor and the limits it enforces (picklable)."""

    actor: Any  # ray.actor.ActorHandle of a JobLimiter, or an InProcess one
    requests_per_minute: float | None
    tokens_per_minute: float | None

    @property
    def lease_requests(self) -> int:
        """Most requests one lease covers: a quarter second of the job's request rate."""
        if not self.requests_per_minute:
            return MAX_LEASE_REQUESTS
        return max(1, int(self.requests_per_minute / 60 * LEASE_S))

    @property
    def lease_tokens(self) -> float:
        """Tokens one lease asks for at most (a single request may need more)."""
        if not self.tokens_per_minute:
            return float("inf")
        return max(1.0, self.tokens_per_minute / 60 * LEASE_S)

    def _get(self, method: str, timeout_s: float) -> Any:
        if isinstance(self.actor, InProcess):
            return getattr(self.actor.limiter, method)()
        import ray

        return ray.get(getattr(self.actor, method).remote(), timeout=timeout_s)

    def stats(self, timeout_s: float = 30.0) -> dict[str, float]:
        return self._get("stats", timeout_s)

    def llm_stats(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """The job's outage detector (:meth:`JobLimiter.llm_stats`)."""
        return self._get("llm_stats", timeout_s)


def local_limiter(cfg: LLMConfig) -> LimiterHandle:
    """A limiter for one process (its limits then hold for that process alone)."""
    limiter = JobLimiter(cfg.requests_per_minute, cfg.tokens_per_minute, cfg.concurrency)
    return LimiterHandle(InProcess(limiter), cfg.requests_per_minute, cfg.tokens_per_minute)


def start_limiter(cfg: LLMConfig) -> LimiterHandle | None:
    """Start the job's limiter actor (call after ``ray.init``); None unless ``cfg.backend``
    is ``openai``.

    Keep the handle alive for the whole job: the actor lives as long as the caller holds
    it. If the actor dies, Ray restarts it (with full buckets) and retries the leases in
    flight; the clients' next reports restore its counts (see :class:`JobLimiter`).
    """
    if cfg.backend != "openai":
        return None
    import ray

    actor_cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(JobLimiter)
    actor = actor_cls.remote(cfg.requests_per_minute, cfg.tokens_per_minute, cfg.concurrency)
    return LimiterHandle(actor, cfg.requests_per_minute, cfg.tokens_per_minute)


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
                answers=self._answers,
                failures=dict(self._failures),
                pause_s=self._pause_s,
                correction=self._correction,
                fatal=self._fatal,
                client=self.client,
                totals={**self._totals, "failures": dict(self._totals["failures"])},
            )
            self._answers, self._failures, self._pause_s = 0, Counter(), 0.0
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


class LimiterError(RuntimeError):
    """The job-wide limiter actor could not be reached (a request then fails with it)."""
