"""The openai backend against the loopback server: faults, retries, cache, limits, cost,
secrets, reasoning-model parameters."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import pickle
import threading
import time
from collections import Counter
from pathlib import Path

import openai
import pytest
from fake_clock import FakeClock
from llm_server import BAD_CONTENTS, STANDARD_FAULTS, http_date, loopback_cfg, make_requests

from raypipe.config import redact_url, redacted
from raypipe.errors import EndpointError
from raypipe.llm import make_backend
from raypipe.llm.base import LLMRequest
from raypipe.llm.cache import ResponseCache, request_key
from raypipe.llm.client import OpenAIBackend, httpx, retry_after_s
from raypipe.llm.config import LLMConfig, is_reasoning_model
from raypipe.llm.limits import InProcess, JobLimiter, LimiterHandle, TokenBucket
from raypipe.llm.slots import Slots

KEY_ENV = "RAYPIPE_TEST_LLM_KEY"
SENTINEL = "sk-raypipe-SENTINEL-7f3a9c1e5b"
ERROR_KINDS = ("http_", "timeout", "connection", "bad_response", "empty_completion")


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SENTINEL)
    return SENTINEL


make_cfg = functools.partial(
    loopback_cfg, api_key_env=KEY_ENV, concurrency=32, max_attempts=6, timeout_s=2.0,
    backoff_initial_s=0.01, backoff_max_s=0.2,
)  # fmt: skip


def user_text(body: dict) -> str:
    return body["messages"][-1]["content"]


# ---------------------------------------------------------------------------------------
# Faults: nothing lost, nothing duplicated, re-runs free
# ---------------------------------------------------------------------------------------


def test_fault_mix_500_requests_none_lost_then_rerun_is_free(llm_server, tmp_path):
    doomed = {f"r request number {i}" for i in (7, 123, 321)}  # 500 on every attempt
    server = llm_server(
        fault_rates=STANDARD_FAULTS,
        fault_fn=lambda h, a, body: "500" if user_text(body) in doomed else None,
        retry_after=None,
        retry_after_ms="100",
        hang_s=4.0,
        api_key=SENTINEL,
    )
    # A timeout well above the server's latency: on a loaded machine a tight one fires
    # on answers already on their way, and the server would count them twice.
    cfg = make_cfg(server, timeout_s=1.5)
    reqs = make_requests(500)
    with OpenAIBackend(cfg, tmp_path / "cache") as llm:
        results = llm.complete_batch(reqs)
        stats = llm.stats()

    # One result per request, in order, each answered or failed with a reason.
    assert [r.key for r in results] == [q.key for q in reqs]
    assert max(Counter(r.key for r in results).values()) == 1
    for r in results:
        assert r.ok != bool(r.error), r
        if not r.ok:
            assert r.error.startswith(ERROR_KINDS), r.error
    failed = [r for r in results if not r.ok]
    assert {r.key for r in failed} >= {"r/00007", "r/00123", "r/00321"}
    for r in failed:
        if r.key in {"r/00007", "r/00123", "r/00321"}:
            assert r.error.startswith("http_500") and r.attempts == cfg.max_attempts

    # The faults really happened and were retried; no request was answered twice.
    seen = server.stats()
    assert {"429", "500", "hang", "bad_json", "bad_content"} <= set(seen["faults"])
    assert seen["distinct"] == 500 and seen["unauthorized"] == 0
    assert max(server.answered_by_hash.values()) == 1
    assert seen["answered"] == len(results) - len(failed)
    # Malformed content is the stage parser's business: returned as text, once per fault.
    assert sum(r.text in BAD_CONTENTS for r in results) == seen["faults"]["bad_content"]
    assert stats["requests"] == 500
    assert stats["http_calls"] == seen["requests"]
    assert stats["retries"] == seen["requests"] - 500
    assert stats["failures"] == len(failed)
    assert sum(r.attempts for r in results) == seen["requests"]

    # Second run over the answered requests: all from the cache, zero HTTP calls.
    answered = [q for q, r in zip(reqs, results) if r.ok]
    before = server.total_requests
    with OpenAIBackend(cfg, tmp_path / "cache") as llm:
        again = llm.complete_batch(answered)
        assert llm.stats()["http_calls"] == 0
    assert server.total_requests == before
    assert all(r.cached and r.attempts == 0 and r.cost_usd == 0 for r in again)
    assert [r.text for r in again] == [r.text for r in results if r.ok]

    # Failures are not cached: asking again pays again.
    with OpenAIBackend(cfg, tmp_path / "cache") as llm:
        retry = llm.complete_batch([q for q in reqs if q.key == "r/00007"])
    assert not retry[0].ok and server.total_requests == before + cfg.max_attempts


def test_retry_after_seconds_is_honoured(llm_server):
    server = llm_server(fault_fn=lambda h, a, b: "429" if a == 0 else None, retry_after="1")
    with OpenAIBackend(make_cfg(server), None) as llm:
        (result,) = llm.complete_batch(make_requests(1))
    assert result.ok and result.attempts == 2
    first, second = server.events
    assert first.fault == "429" and second.attempt == 1
    assert second.time - first.time >= 1.0  # backoff alone would wait ~0.01 s
    # The wait the client chose: the server's second plus at most 10% jitter.
    request = httpx.Request("POST", server.url)
    answer = httpx.Response(429, request=request, headers={"Retry-After": "1"})
    exc = openai.RateLimitError("slow down", response=answer, body=None)
    with OpenAIBackend(make_cfg(server), None) as llm:

        async def backoff() -> float:  # on the backend's loop, where it pauses the job
            return llm._backoff(exc, 1)

        assert 1.0 <= llm._run(backoff()) <= 1.1


def test_retry_after_ms_is_honoured(llm_server):
    server = llm_server(
        fault_fn=lambda h, a, b: "429" if a == 0 else None, retry_after=None, retry_after_ms="400"
    )
    with OpenAIBackend(make_cfg(server), None) as llm:
        (result,) = llm.complete_batch(make_requests(1))
    first, second = server.events
    assert result.ok and 0.4 <= second.time - first.time < 1.5


def test_retry_after_header_forms():
    assert retry_after_s({"retry-after": "3"}) == 3.0
    assert retry_after_s({"retry-after": "0.5"}) == 0.5
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert 8.0 <= retry_after_s({"retry-after": http_date(10)}) <= 10.0
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({}) is None


@pytest.mark.parametrize("status", ["400", "401", "403", "404", "422"])
def test_client_errors_fail_at_once(llm_server, status):
    server = llm_server(fault_fn=lambda h, a, b: status)
    with OpenAIBackend(make_cfg(server), None) as llm:
        (result,) = llm.complete_batch(make_requests(1))
        assert llm.stats()["failures"] == 1
    assert not result.ok and result.error.startswith(f"http_{status}: ")
    assert result.attempts == 1 and server.total_requests == 1


@pytest.mark.parametrize(
    ("fault", "kind"), [("503", "http_503"), ("bad_json", "bad_response"), ("hang", "timeout")]
)
def test_retryable_faults_end_as_failures_after_max_attempts(llm_server, fault, kind):
    server = llm_server(fault_fn=lambda h, a, b: fault, hang_s=2.0)
    # A hang outlasts both limits: the whole answer's (unstreamed) and the first token's.
    cfg = make_cfg(server, max_attempts=3, timeout_s=0.3, first_token_timeout_s=0.3)
    with OpenAIBackend(cfg, None) as llm:
        (result,) = llm.complete_batch(make_requests(1))
    assert not result.ok and result.error.startswith(f"{kind}: "), result.error
    assert result.attempts == 3 and server.total_requests == 3


def test_empty_completion_is_a_failed_result_not_retried_not_cached(llm_server, tmp_path):
    server = llm_server(fault_fn=lambda h, a, b: "empty")
    cfg = make_cfg(server)
    for _ in range(2):
        with OpenAIBackend(cfg, tmp_path) as llm:
            results = llm.complete_batch(make_requests(4))
    assert all(not r.ok and r.error.startswith("empty_completion") for r in results)
    assert all(r.attempts == 1 for r in results)
    assert server.total_requests == 8  # asked twice: nothing was cached
    assert len(ResponseCache(tmp_path)) == 0


# ---------------------------------------------------------------------------------------
# Secrets
# ---------------------------------------------------------------------------------------


def test_api_key_is_sent_but_never_leaks(llm_server, tmp_path, caplog, capsys, monkeypatch):
    caplog.set_level(logging.DEBUG)  # every logger, the SDK's and HTTP library's included
    server = llm_server(
        api_key=SENTINEL, fault_rates={"429": 0.15, "500": 0.05, "bad_json": 0.05}, retry_after="0"
    )
    cfg = make_cfg(server)
    texts: list[str] = []
    with OpenAIBackend(cfg, tmp_path / "cache") as llm:
        results = llm.complete_batch(make_requests(40))
        # The check's one-token probe is not retried: a drawn fault would fail it (the
        # draw depends on the probe's body, which is not the same on every run).
        server.fault_rates = {}
        texts += [repr(llm), json.dumps(llm.stats()), str(llm.check())]
        with pytest.raises(TypeError) as info:
            pickle.dumps(llm)
        texts.append(str(info.value))
    assert server.unauthorized == 0 and all(r.ok for r in results)  # the key was sent

    # A wrong key: the server echoes it back in its 401 message.
    wrong = "sk-raypipe-WRONG-0d9e8f7a6b"
    monkeypatch.setenv(KEY_ENV, wrong)
    with OpenAIBackend(cfg, None) as llm:
        (bad,) = llm.complete_batch(make_requests(1, tag="w"))
        with pytest.raises(EndpointError) as info:
            llm.check()
    assert bad.error.startswith("http_401") and "***" in bad.error
    assert KEY_ENV in str(info.value)
    texts += [bad.error, str(info.value), repr(info.value.__cause__), repr(info.value.__context__)]

    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(EndpointError) as info:
        OpenAIBackend(cfg, None)
    assert KEY_ENV in str(info.value)

    out = capsys.readouterr()
    texts += [caplog.text, out.out, out.err, str(info.value)]
    texts += [p.read_text() for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert len(texts) > 40  # cache files were written and read
    for secret in (SENTINEL, wrong):
        assert not any(secret in t for t in texts), secret


def test_credentials_in_base_url_are_sent_but_never_written(llm_server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # the HTTP library logs every request's URL at INFO
    server = llm_server(fault_fn=lambda h, a, body: "400" if "doomed" in user_text(body) else None)
    password, query_key, token = "pw-SECRET-91c2e4", "qk-SECRET-55aa0f", "tk-SECRET-77bb3d"
    host_path = server.url.split("://", 1)[1]
    url = f"http://alice:{password}@{host_path}?api-key={query_key}&token={token}&api-version=7"
    cfg = make_cfg(server, base_url=url)
    texts: list[str] = []
    with OpenAIBackend(cfg, tmp_path / "cache") as llm:
        texts += [repr(llm), str(llm.check()), llm.base_url]
        results = llm.complete_batch(make_requests(5) + make_requests(1, tag="doomed"))
        texts += [r.error or "" for r in results]
    assert sum(r.ok for r in results) == 5 and results[-1].error.startswith("http_400")
    # The query parameters reach the server with every request; user:password as Basic auth.
    basic = "Basic " + base64.b64encode(f"alice:{password}".encode()).decode()
    assert all(e.query == f"api-key={query_key}&token={token}&api-version=7" for e in server.events)
    assert all(e.authorization == basic for e in server.events)

    server.stop()  # an error message that quotes the (redacted) URL
    with OpenAIBackend(cfg, None) as llm:
        with pytest.raises(EndpointError) as info:
            llm.check(timeout_s=2)
    manifest = json.dumps(redacted({"llm": cfg.model_dump(mode="json")}))
    texts += [str(info.value), manifest, caplog.text]
    texts += [p.read_text() for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert "http://***@127.0.0.1" in str(info.value) and "api-key=***" in manifest
    assert "api-key=***&token=***&api-version=7" in caplog.text  # scrubbed, not silenced
    for secret in (password, query_key, token):
        assert not any(secret in t for t in texts), secret


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pass%40word@host/v1", "https://***@host/v1"),
        ("https://sk-abc123@host:8443/v1", "https://***@host:8443/v1"),
        ("https://h/v1?api-key=abc&api-version=1", "https://h/v1?api-key=***&api-version=1"),
        (
            "https://h/v1?key=a&token=b&access_token=c&sig=d&model=m",
            "https://h/v1?key=***&token=***&access_token=***&sig=***&model=m",
        ),
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
        ("s3://bucket/cache?endpoint_override=127.0.0.1:9000&scheme=http", None),
        ("not a url", None),
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == (shown or url)


def test_manifest_redacts_urls_and_key_values(monkeypatch):
    monkeypatch.setenv("SOME_API_TOKEN", "env-secret-value-123")
    cfg = LLMConfig(backend="openai", base_url="https://u:p4ss@h/v1?api-key=zzz9", api_key_env="X")
    out = redacted({"llm": cfg.model_dump(mode="json"), "note": "uses env-secret-value-123"})
    assert out["llm"]["base_url"] == "https://***@h/v1?api-key=***"
    assert out["llm"]["api_key_env"] == "X" and out["note"] == "uses ***"


def test_missing_key_variable_names_it(monkeypatch, llm_server):
    server = llm_server()
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(EndpointError, match=KEY_ENV):
        make_backend(make_cfg(server), None)
    monkeypatch.setenv(KEY_ENV, "")
    with pytest.raises(EndpointError, match=KEY_ENV):
        make_backend(make_cfg(server), None)


# ---------------------------------------------------------------------------------------
# Limits, cost, cache, reachability, calling conventions
# ---------------------------------------------------------------------------------------


def test_concurrency_is_bounded(llm_server):
    server = llm_server(latency_s=0.1)
    with OpenAIBackend(make_cfg(server, concurrency=4), None) as llm:
        start = time.monotonic()
        results = llm.complete_batch(make_requests(20))
        elapsed = time.monotonic() - start
    assert all(r.ok for r in results)
    assert server.max_in_flight == 4
    assert elapsed >= 0.5  # 20 requests, 4 at a time, 0.1 s each


def test_slots_serve_retries_first_and_survive_cancellation():
    async def run() -> list[str]:
        slots, order = Slots(1), []
        await slots.acquire(retry=False)  # the only slot is taken

        async def user(name: str, retry: bool) -> None:
            await slots.acquire(retry)
            order.append(name)
            slots.release()

        first = asyncio.create_task(user("first-attempt", False))
        doomed = asyncio.create_task(user("cancelled", True))
        retry = asyncio.create_task(user("retry", True))
        await asyncio.sleep(0.01)
        doomed.cancel()
        await asyncio.sleep(0.01)
        slots.release()
        await asyncio.gather(first, retry)
        assert slots.busy == 0  # the cancelled waiter kept no slot
        return order

    assert asyncio.run(run()) == ["retry", "first-attempt"]


def test_requests_per_minute_limit_bounds_the_rate(llm_server):
    server = llm_server()
    cfg = make_cfg(server, requests_per_minute=1200)  # 20/s, bursts of one second's worth
    with OpenAIBackend(cfg, None) as llm:
        results = llm.complete_batch(make_requests(50))
    assert all(r.ok for r in results)
    times = sorted(e.time for e in server.events)
    # After the first second's burst (20), the other 30 arrive at <= 20/s: 1.5 s after the
    # first, less the time the first waited for its new connection (up to ~0.2 s here).
    assert times[-1] - times[0] >= 30 / 20 - 0.25
    for i in range(len(times)):  # no one-second window holds more than burst + rate
        assert sum(1 for t in times[i:] if t - times[i] < 1.0) <= 41


def test_token_bucket_goes_into_debt_and_a_give_back_wakes_waiters():
    async def run() -> tuple[float, float]:
        clock = FakeClock()
        bucket = TokenBucket(per_minute=6000, clock=clock.now, sleep=clock.sleep)  # 100/s
        await bucket.acquire(150)  # more than capacity: allowed when full, leaves a debt
        wait = asyncio.ensure_future(bucket.acquire(50))  # -50 must refill to 50: 1 s
        while not wait.done():
            await clock.advance(0.05)
        debt_wait = clock.now()

        start = clock.now()
        woken = asyncio.ensure_future(bucket.acquire(100))  # would wait 1 s
        await clock.advance(0.1)
        assert not woken.done()
        bucket.adjust(-150)  # the real cost was lower than reserved
        await clock.settle()
        assert woken.done()
        return debt_wait, clock.now() - start

    debt_wait, woken = asyncio.run(run())
    assert debt_wait == pytest.approx(1.0)
    assert woken == pytest.approx(0.1)


def test_tokens_per_minute_limit_bounds_the_token_rate(llm_server):
    server = llm_server(responder=lambda messages: "x" * 2000)  # 500 completion tokens
    cfg = make_cfg(server, tokens_per_minute=60_000)  # 1000 tokens/s, capacity 1000
    with OpenAIBackend(cfg, None) as llm:
        start = time.monotonic()
        results = llm.complete_batch(make_requests(5, max_tokens=500))
        elapsed = time.monotonic() - start
        used = llm.stats()["prompt_tokens"] + llm.stats()["completion_tokens"]
    assert all(r.ok for r in results) and used > 2500
    assert elapsed >= (used - 1000) / 1000 * 0.9

    # Reservations of max_tokens are corrected by the real usage: short answers don't wait.
    # Here the bucket never refills (its clock stands still, its sleeps never end), so
    # only the give-backs of the corrections let requests 2 and 3 through.
    async def never(seconds: float) -> None:
        await asyncio.Event().wait()

    short_cfg = make_cfg(llm_server(), tokens_per_minute=60_000)
    frozen = JobLimiter(None, 60_000, short_cfg.concurrency, clock=lambda: 0.0, sleep=never)
    handle = LimiterHandle(InProcess(frozen), None, 60_000)
    batches: list = []
    with OpenAIBackend(short_cfg, None, limiter=handle) as llm:
        # 3 x ~920 tokens reserved from a bucket of 1,000
        run = threading.Thread(
            target=lambda: batches.append(llm.complete_batch(make_requests(3, max_tokens=900))),
            daemon=True,
        )
        run.start()
        run.join(30)
        assert batches, "requests still wait for tokens: the corrections gave none back"
    assert all(r.ok for r in batches[0])
    assert frozen.stats()["token_corrections"] < -2 * 800  # real usage, not max_tokens


def test_cost_from_the_price_table(llm_server, caplog):
    server = llm_server()
    cfg = make_cfg(server, prices={"test-model": (1.5, 6.0)})
    with OpenAIBackend(cfg, None) as llm:
        results = llm.complete_batch(make_requests(10))
        stats = llm.stats()
    for r in results:
        assert r.prompt_tokens > 0 and r.completion_tokens > 0
        assert r.cost_usd == pytest.approx(
            (r.prompt_tokens * 1.5 + r.completion_tokens * 6.0) / 1e6
        )
    assert stats["prompt_tokens"] == sum(r.prompt_tokens for r in results)
    assert stats["completion_tokens"] == sum(r.completion_tokens for r in results)
    assert stats["cost_usd"] == pytest.approx(sum(r.cost_usd for r in results))

    # A dated variant prices as its family; an unknown model costs 0 with one warning.
    dated = make_cfg(server, model="test-model-2026-01-01", prices={"test-model": (1.5, 6.0)})
    with OpenAIBackend(dated, None) as llm:
        assert llm.complete_batch(make_requests(1))[0].cost_usd > 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="raypipe"):
        with OpenAIBackend(make_cfg(server, model="mystery"), None) as llm:
            results = llm.complete_batch(make_requests(5))
            assert llm.stats()["cost_usd"] == 0
    assert all(r.ok and r.cost_usd == 0 for r in results)
    assert sum("no price for model 'mystery'" in m for m in caplog.messages) == 1


def test_cache_layout_and_corrupt_entries(llm_server, tmp_path):
    server = llm_server()
    cfg = make_cfg(server)
    reqs = make_requests(3)
    with OpenAIBackend(cfg, tmp_path) as llm:
        first = llm.complete_batch(reqs)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert len(files) == 3
    for f in files:
        assert f.parent.name == f.name[:2] and len(f.stem) == 64  # ab/abcdef....json
        entry = json.loads(f.read_text())
        assert entry["text"] in {r.text for r in first} and entry["completion_tokens"] > 0
    files[0].write_text('{"text": trunc')  # a damaged entry is a miss, then rewritten
    with OpenAIBackend(cfg, tmp_path) as llm:
        again = llm.complete_batch(reqs)
        assert llm.stats()["cache_hits"] == 2 and llm.stats()["http_calls"] == 1
    assert [r.text for r in again] == [r.text for r in first]
    assert json.loads(files[0].read_text())["text"]


def test_cache_key_covers_model_messages_and_sampling():
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0.7}
    same = {"temperature": 0.7, "messages": [{"content": "x", "role": "user"}], "model": "m"}
    assert request_key(base) == request_key(same)  # key order does not matter
    for change in ({"model": "n"}, {"temperature": 0.8}, {"seed": 1}, {"max_tokens": 5}):
        assert request_key({**base, **change}) != request_key(base)


def test_identical_requests_in_flight_are_asked_once(llm_server, tmp_path):
    server = llm_server(latency_s=0.05)
    a = make_requests(1, tag="same")[0]
    b = LLMRequest(
        key="other-key", task=a.task, ability=a.ability, messages=a.messages, seed=a.seed
    )
    with OpenAIBackend(make_cfg(server), tmp_path) as llm:
        ra, rb = llm.complete_batch([a, b])
    assert server.total_requests == 1
    assert ra.ok and rb.ok and ra.text == rb.text and rb.key == "other-key" and rb.cached


def test_async_callers_and_threads(llm_server):
    server = llm_server(latency_s=0.01)
    with OpenAIBackend(make_cfg(server), None) as llm:
        # From a foreign event loop: bridged onto the backend's own loop.
        many = asyncio.run(llm.acomplete_many(make_requests(10, tag="a")))
        one = asyncio.run(llm.acomplete(make_requests(1, tag="b")[0]))
        # From several threads at once.
        out: dict[int, list] = {}

        def work(i: int) -> None:
            out[i] = llm.complete_batch(make_requests(10, tag=f"t{i}"))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(r.ok for r in many) and one.ok
    assert [r.key for r in out[2]] == [f"t2/{i:05d}" for i in range(10)]
    assert all(r.ok for rs in out.values() for r in rs)
    with pytest.raises(RuntimeError, match="closed"):
        llm.complete_batch(make_requests(1))


def test_check_reports_what_to_fix(llm_server):
    server = llm_server(models=("test-model", "other"))
    with OpenAIBackend(make_cfg(server), None) as llm:
        info = llm.check()
        assert info["models"] == 2 and info["model"] == "test-model"
    with OpenAIBackend(make_cfg(server, model="absent"), None) as llm:
        with pytest.raises(EndpointError, match="it serves: test-model, other"):
            llm.ping()

    # No /models route: a one-token completion stands in.
    bare = llm_server(models=())
    with OpenAIBackend(make_cfg(bare), None) as llm:
        assert llm.check()["models"] == 0
    assert bare.total_requests == 1

    # Nothing listening: the message says to check base_url and start the server.
    url, cfg = server.url, make_cfg(server)
    server.stop()
    with OpenAIBackend(cfg, None) as llm:
        with pytest.raises(EndpointError, match="base_url") as info:
            llm.check(timeout_s=2)
    assert url in str(info.value) and "vllm serve" in str(info.value)


# ---------------------------------------------------------------------------------------
# Reasoning models and picky servers
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "reasoning"),
    [("o1", True), ("o3-mini", True), ("o4-mini-2025-04-16", True), ("gpt-5", True),
     ("gpt-5.1-mini", True), ("openai/o3", True), ("gpt-4o", False), ("gpt-4.1-mini", False),
     ("omni-moderation", False), ("Qwen/Qwen2.5-7B-Instruct", False)],
)  # fmt: skip
def test_reasoning_auto_rule(model, reasoning):
    assert is_reasoning_model(model) is reasoning
    assert LLMConfig(model=model).reasoning_on() is reasoning
    assert LLMConfig(model=model, reasoning="on").reasoning_on()
    assert not LLMConfig(model=model, reasoning="off").reasoning_on()


def test_reasoning_model_gets_max_completion_tokens_and_no_temperature(llm_server):
    bodies: list[dict] = []
    server = llm_server(
        models=("o3-mini",),
        reasoning_models=("o3-mini",),
        fault_fn=lambda h, a, body: bodies.append(body),  # None: no fault
    )
    with OpenAIBackend(make_cfg(server, model="o3-mini"), None) as llm:  # reasoning=auto
        assert llm.check()["model"] == "o3-mini"
        results = llm.complete_batch(make_requests(8, max_tokens=300))
    assert all(r.ok for r in results) and not server.stats()["faults"]
    assert len(bodies) == 9  # the check's probe, then the work
    for body in bodies[1:]:
        assert body["max_completion_tokens"] == 300
        assert "max_tokens" not in body and "temperature" not in body


@pytest.mark.parametrize(
    ("refuse", "param"),
    [(("max_tokens", "temperature"), "max_tokens"), (("temperature",), "temperature")],
)
def test_reasoning_off_against_a_reasoning_model_fails_the_check_fast(llm_server, refuse, param):
    server = llm_server(models=("o3-mini",), reasoning_models=("o3-mini",), refuse=refuse)
    cfg = make_cfg(server, model="o3-mini", reasoning="off")
    with OpenAIBackend(cfg, None) as llm:
        with pytest.raises(EndpointError, match="set llm.reasoning=on") as info:
            llm.check()
        assert server.total_requests == 1  # the probe alone: not retried, before any work
        (result,) = llm.complete_batch(make_requests(1))  # a run that skipped the check
    assert f"'{param}'" in str(info.value) and "o3-mini" in str(info.value)
    assert result.error.startswith("http_400") and "llm.reasoning=on" in result.error
    assert result.attempts == 1  # a 400 is not retried


@pytest.mark.parametrize("status", [404, 405, 501])
def test_models_route_refused_falls_back_to_a_probe(llm_server, status):
    server = llm_server(models_status=status)
    with OpenAIBackend(make_cfg(server), None) as llm:
        assert llm.check()["models"] == 0
    assert server.total_requests == 1


def test_make_backend_picks_the_named_backend(llm_server, tmp_path):
    server = llm_server()
    llm = make_backend(make_cfg(server), tmp_path)
    try:
        assert isinstance(llm, OpenAIBackend) and llm.cache is not None
        assert Path(llm.cache.root) == tmp_path and llm.limiter is None
    finally:
        llm.close()
    no_cache = make_backend(make_cfg(server, cache=False), tmp_path)
    assert no_cache.cache is None
    no_cache.close()
    offline = make_backend(LLMConfig(backend="offline"), tmp_path)
    assert type(offline).__name__ == "OfflineBackend"


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_both_http_transports_handle_faults(llm_server, transport):
    server = llm_server(
        fault_rates={"429": 0.2, "500": 0.1, "bad_json": 0.1, "hang": 0.05},
        retry_after="0",
        hang_s=1,
    )
    cfg = make_cfg(server, http_transport=transport, timeout_s=0.3, max_attempts=10)
    with OpenAIBackend(cfg, None) as llm:
        results = llm.complete_batch(make_requests(40))
    assert all(r.ok for r in results)
    assert server.stats()["faults"].get("hang", 0) > 0
    # Streamed requests over aiohttp are raypipe's own; over httpx, the openai SDK's.
    agents = {e.user_agent.split("/")[0] for e in server.events}
    assert agents == ({"raypipe"} if transport == "aiohttp" else {"AsyncOpenAI"}), agents


def test_inside_a_ray_actor(ray_local, llm_server):
    """Stages build the backend in a Ray actor's __init__ and call it from plain code."""
    server = llm_server(api_key=SENTINEL, fault_rates={"429": 0.2}, retry_after="0")
    cfg = make_cfg(server)

    @ray_local.remote(num_cpus=0)
    class Writer:
        def __init__(self, cfg: LLMConfig) -> None:
            self.llm = OpenAIBackend(cfg, None)

        def __call__(self, batch: list[LLMRequest]) -> tuple[list[bool], dict]:
            results = self.llm.complete_batch(batch)
            return [r.ok for r in results], self.llm.stats()

    # (The actor class travels by value; it must not refer to this test module's names.)
    actor = Writer.options(runtime_env={"env_vars": {KEY_ENV: SENTINEL}}).remote(cfg)
    oks, _ = ray_local.get(actor.__call__.remote(make_requests(20)), timeout=60)
    again, stats = ray_local.get(actor.__call__.remote(make_requests(5, tag="x")), timeout=60)
    ray_local.kill(actor)
    assert all(oks) and len(oks) == 20 and all(again)
    assert stats["http_calls"] == server.total_requests and server.unauthorized == 0
