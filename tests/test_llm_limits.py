"""Job-wide LLM rate limits: one limiter actor shared by every client, whatever their number."""

from __future__ import annotations

import asyncio
import functools
import time

import pytest
from fake_clock import FakeClock
from llm_server import loopback_cfg, make_requests

from raypipe.llm import make_backend
from raypipe.llm.base import LLMRequest
from raypipe.llm.config import LLMConfig
from raypipe.llm.limits import JobLimiter, LimiterHandle, start_limiter

KEY_ENV = "RAYPIPE_TEST_LLM_KEY"
KEY = "sk-limits-test"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


make_cfg = functools.partial(
    loopback_cfg,
    api_key_env=KEY_ENV,
    concurrency=32,
    timeout_s=10.0,
    backoff_initial_s=0.05,
    cache=False,
)


def client_actor(ray, cpus: float = 0.25):
    """An LLM client actor like a writing stage's (defined here so it travels by value)."""

    @ray.remote(num_cpus=cpus)
    class Client:
        def __init__(self, cfg: LLMConfig, limiter: LimiterHandle | None) -> None:
            self.llm = make_backend(cfg, limiter=limiter)

        def run(self, batch: list[LLMRequest]) -> dict:
            results = self.llm.complete_batch(batch)
            stats = self.llm.stats()
            stats["ok"] = sum(r.ok for r in results)
            stats["lease_calls"] = self.llm._limits.lease_calls if self.llm.limiter else 0
            return stats

    return Client.options(runtime_env={"env_vars": {KEY_ENV: KEY}})


def most_in_window(times: list[float], window_s: float) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window_s:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_a_limiter_for_every_openai_job_and_none_for_the_others(ray_local):
    assert start_limiter(LLMConfig(backend="offline", requests_per_minute=60)) is None
    assert start_limiter(LLMConfig(backend="vllm", model="m")) is None
    # openai, even unlimited: the job's pause, in-flight limit and outage detector.
    handle = start_limiter(LLMConfig(backend="openai"))
    assert handle is not None and handle.llm_stats()["answers"] == 0
    ray_local.kill(handle.actor)


def test_lease_sizes_stay_a_fraction_of_a_second():
    handle = LimiterHandle(None, requests_per_minute=600, tokens_per_minute=60_000)
    assert handle.lease_requests == 2 and handle.lease_tokens == 250
    assert LimiterHandle(None, 30, None).lease_requests == 1  # never below one
    assert LimiterHandle(None, None, 6000).lease_requests > 1


def test_limiter_grants_in_order_at_the_rate():
    async def run() -> list[float]:
        clock = FakeClock()
        # 10/s, burst 10.
        limiter = JobLimiter(600, None, clock=clock.now, sleep=clock.sleep)
        stamps: list[float] = []

        async def one() -> None:
            await limiter.lease(2, 0.0)
            stamps.append(clock.now())

        tasks = [asyncio.ensure_future(one()) for _ in range(10)]  # 20: 10 now, 10 over 1 s
        await clock.settle()
        while not all(t.done() for t in tasks):
            await clock.advance(0.05)
        return stamps

    stamps = asyncio.run(run())
    assert stamps == sorted(stamps)
    assert stamps[4] == 0.0  # the burst
    assert stamps[5] == pytest.approx(0.2) and stamps[-1] == pytest.approx(1.0)


def test_two_actors_share_one_request_limit(ray_local, llm_server):
    server = llm_server()
    cfg = make_cfg(server, requests_per_minute=2400)  # 40/s job-wide, leases of 10
    limiter = start_limiter(cfg)
    actors = [client_actor(ray_local).remote(cfg, limiter) for _ in range(2)]
    ray_local.get([a.__ray_ready__.remote() for a in actors], timeout=60)
    start = time.monotonic()
    stats = ray_local.get(
        [a.run.remote(make_requests(120, tag=f"a{i}")) for i, a in enumerate(actors)], timeout=120
    )
    elapsed = time.monotonic() - start
    for a in actors:
        ray_local.kill(a)
    assert [s["ok"] for s in stats] == [120, 120]
    times = [e.time for e in server.events]
    # 240 requests at 40/s after one second's burst: ~5 s, not the ~2.5 s of 40/s each.
    assert elapsed >= (240 - 40) / 40 * 0.9
    assert most_in_window(times, 1.0) <= 40 + 40 + 10  # burst + rate + one lease each
    # Permits come in leases: far fewer limiter calls than requests.
    assert all(s["lease_calls"] < 120 / 2 for s in stats)
    assert limiter.stats()["requests"] >= 240


def test_token_limit_is_job_wide_and_corrected_by_reported_usage(ray_local, llm_server):
    """Two backends, one limiter: max_tokens reservations are refunded job-wide."""
    server = llm_server()  # short answers: ~10 tokens, against 900 reserved
    cfg = make_cfg(server, tokens_per_minute=60_000)  # 1,000 tokens/s, burst 1,000
    limiter = start_limiter(cfg)
    backends = [make_backend(cfg, limiter=limiter) for _ in range(2)]
    try:
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(2) as pool:
            runs = list(
                pool.map(
                    lambda ib: ib[1].complete_batch(make_requests(6, f"t{ib[0]}", max_tokens=900)),
                    enumerate(backends),
                )
            )
            used = sum(
                b.stats()["prompt_tokens"] + b.stats()["completion_tokens"] for b in backends
            )
    finally:
        for b in backends:
            b.close()
    assert all(r.ok for rs in runs for r in rs)
    # Every reservation (12 x ~910, ~10 s at 1,000/s) was corrected down to the usage.
    granted = limiter.stats()
    assert granted["tokens"] >= 12 * 900
    assert granted["tokens"] + granted["token_corrections"] == pytest.approx(used, abs=1)


def test_without_a_limiter_each_backend_applies_the_limits_alone(llm_server):
    server = llm_server()
    cfg = make_cfg(server, requests_per_minute=1200)  # 20/s
    with make_backend(cfg) as a, make_backend(cfg) as b:
        assert a.limiter is None
        a.complete_batch(make_requests(20, "a"))
        b.complete_batch(make_requests(20, "b"))
        # Each its own in-process limiter, which granted its own 20 requests.
        assert a._limits.handle is not b._limits.handle
        assert a._limits.handle.stats()["requests"] == 20
        assert b._limits.handle.stats()["requests"] == 20


@pytest.mark.slow
def test_four_actors_hold_the_job_rate_for_20_s(ray_local, llm_server):
    """The acceptance test: 4 client actors, each offered far more than the job's
    600 requests/minute, for 20 s: the server sees 0.9-1.05 x the limit on top of the
    one-second burst, and no 10 s window above a quarter of the minute's limit. (20 s
    holds 2 of those windows and 20 refills of the burst; the limiter's own timing is
    checked on a fake clock above.)"""
    window_s = 20
    burst = 600 // 60  # the limiter's one-second burst, granted at once at the start
    server = llm_server(latency_s=0.05, lifetime_s=400)
    cfg = make_cfg(server, requests_per_minute=600, concurrency=32)
    limiter = start_limiter(cfg)
    actors = [client_actor(ray_local).remote(cfg, limiter) for _ in range(4)]
    ray_local.get([a.__ray_ready__.remote() for a in actors], timeout=120)
    runs = [a.run.remote(make_requests(750, tag=f"a{i}")) for i, a in enumerate(actors)]
    # 3,000 requests offered: they would take 5 minutes. Stop once the server has seen
    # requests past the window (counted from its first request, whenever that came).
    deadline = time.monotonic() + window_s + 60
    while time.monotonic() < deadline:
        seen = [e.time for e in server.events]
        if seen and max(seen) >= min(seen) + window_s + 0.5:
            break
        time.sleep(0.5)
    for a in actors:
        ray_local.kill(a)
    del runs
    times = sorted(e.time for e in server.events)
    t0 = times[0]
    in_window = sum(1 for t in times if t < t0 + window_s)
    ratio = (in_window - burst) / window_s / (600 / 60)
    worst = most_in_window(times, 10.0)
    print(f"job-wide rate over {window_s} s: {ratio:.3f} x limit; worst 10 s window: {worst}")
    assert 0.9 <= ratio <= 1.05
    assert worst <= 150


def test_four_actors_offering_three_times_capacity_get_every_answer_at_capacity(
    ray_local, llm_server
):
    """A server that answers C = 4 requests/s and 429s (with the exact wait) above it;
    4 client actors offer 120 requests at once (far above 3C). With the job's pause and
    adaptive limit, every request is answered and the server's answer rate over the
    last 20 s stays within 20% of C."""
    capacity = 4.0
    server = llm_server(capacity_rps=capacity, lifetime_s=600)
    cfg = make_cfg(server, max_attempts=200, backoff_initial_s=0.2, concurrency=8)
    limiter = start_limiter(cfg)
    actors = [client_actor(ray_local, cpus=0.1).remote(cfg, limiter) for _ in range(4)]
    ray_local.get([a.__ray_ready__.remote() for a in actors], timeout=120)
    stats = ray_local.get(
        [a.run.remote(make_requests(30, tag=f"c{i}")) for i, a in enumerate(actors)], timeout=300
    )
    for a in actors:
        ray_local.kill(a)
    assert [s["ok"] for s in stats] == [30, 30, 30, 30]
    times = sorted(server.answer_times)
    assert len(times) == 120
    last = [t for t in times if t > times[-1] - 20.0]
    rate = len(last) / 20.0
    print(f"answer rate over the last 20 s: {rate:.2f}/s against a capacity of {capacity}/s")
    assert 0.8 * capacity <= rate <= 1.2 * capacity
    assert limiter.llm_stats()["pauses"] > 0
