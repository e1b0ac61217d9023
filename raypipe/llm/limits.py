"""Job-wide LLM rate limits: one Ray actor holds the account's request and token buckets.

``llm.requests_per_minute`` and ``llm.tokens_per_minute`` are what the account allows,
so every client of a job (each LLM actor of every stage, and the driver's keyword-bank
client) draws on the same two buckets, however many actors there are. The pipeline
calls :func:`start_limiter` once after ``ray.init`` and hands the returned
:class:`LimiterHandle` (picklable) to every ``make_backend(..., limiter=handle)``.

The limiter is not on every request's path: a client takes permits in small leases
(:class:`~raypipe.llm.leases.Leases`), sized by the requests it has waiting, at most a
quarter second of the job's rate each, and hands them straight to those requests. So at any moment the
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
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from raypipe.llm.config import LLMConfig

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
    own running totals with every report (:class:`~raypipe.llm.leases.Leases`), so a
    restarted limiter has the whole count of every client from that client's next
    report on (a client that ended before the restart is not counted again;
    ``llm_stats()["restarted"]`` then says the counts may be short).

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
        self._last_failure: float | None = None  # the last transient failure heard
        self._last_error: str | None = None  # its message (scrubbed by the client)
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
        last_error: str | None = None,
    ) -> dict[str, float]:
        """A client's news since its last report: answers, failures by kind, a pause it
        was asked for, token corrections, the message of a fatal failure, and (with
        ``client``) its running ``totals`` of answers and failures since it started, and
        the message of its last failure. Returns the pause left and the in-flight limit."""
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
        if (failures or {}).get("transient"):
            self._last_failure = now
        if last_error:
            self._last_error = last_error
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
            # Seconds without an answer while transient failures arrive: the endpoint is
            # down (0 while it answers, or while requests are only slow).
            "outage_s": round(now - since, 3)
            if self._last_failure is not None and self._last_failure >= since
            else 0.0,
            "last_error": self._last_error,
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


class LimiterError(RuntimeError):
    """The job-wide limiter actor could not be reached (a request then fails with it)."""
