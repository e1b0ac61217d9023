"""The LLM client's contract against real-endpoint behaviour: failure kinds, progress
timeouts on streamed answers, the job-wide pause and adaptive limit, structured output
on the openai backend, budgets and the API key's path."""

from __future__ import annotations

import asyncio
import functools
import logging
import pickle
import sys
import time
from pathlib import Path

import openai
import pytest
from fake_clock import FakeClock
from llm_server import loopback_cfg, make_requests

from raypipe.errors import EndpointError
from raypipe.llm.base import Secret
from raypipe.llm.client import OpenAIBackend, httpx
from raypipe.llm.failures import (
    FATAL,
    TRANSIENT,
    MalformedResponse,
    StreamTimeout,
    content_failure,
    kind_of,
)
from raypipe.llm.limits import CUT_HOLD_S, JobLimiter, TokenBucket
from raypipe.llm.transport import _Events

KEY_ENV = "RAYPIPE_CONTRACT_TEST_KEY"
SENTINEL = "sk-contract-SENTINEL-5b1f0c"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SENTINEL)


make_cfg = functools.partial(loopback_cfg, api_key_env=KEY_ENV, backoff_initial_s=0.05, cache=False)


def words(n: int):
    return lambda messages: " ".join(f"w{i}" for i in range(n))


# ---------------------------------------------------------------------------------------
# 1. The failure table
# ---------------------------------------------------------------------------------------


def status_error(code: int) -> openai.APIStatusError:
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    response = httpx.Response(code, request=request, json={"error": {"message": "said"}})
    return openai.APIStatusError("said", response=response, body={"error": {"message": "said"}})


@pytest.mark.parametrize(
    ("status", "kind"),
    [(408, TRANSIENT), (409, TRANSIENT), (429, TRANSIENT), (500, TRANSIENT), (502, TRANSIENT),
     (503, TRANSIENT), (504, TRANSIENT), (400, FATAL), (401, FATAL), (403, FATAL),
     (404, FATAL), (413, FATAL), (422, FATAL)],
)  # fmt: skip
def test_failure_table_statuses(status, kind):
    assert kind_of(status_error(status)) == kind


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (openai.APIConnectionError(request=httpx.Request("POST", "http://x")), TRANSIENT),
        (StreamTimeout("no first token"), TRANSIENT),
        (asyncio.TimeoutError(), TRANSIENT),
        (MalformedResponse("not a completion"), TRANSIENT),
        (ValueError("a bug"), FATAL),
    ],
)
def test_failure_table_errors(exc, kind):
    assert kind_of(exc) == kind


@pytest.mark.parametrize(
    ("text", "finish", "refusal", "reason"),
    [
        ("fine", "stop", None, None),
        ("", "stop", None, "empty_completion"),
        (None, None, None, "empty_completion"),
        ("cut", "length", None, "max_tokens"),
        ("hidden", "content_filter", None, "content_filter"),
        (None, "stop", "I can't help", "refusal"),
    ],
)
def test_failure_table_content(text, finish, refusal, reason):
    got = content_failure(text, finish, refusal)
    assert (got.split(":")[0] if got else None) == reason


# ---------------------------------------------------------------------------------------
# 2. Time by progress
# ---------------------------------------------------------------------------------------


def test_a_20_s_stream_completes_under_a_half_second_idle_timeout(llm_server):
    """200 words 0.1 s apart: 20 s of answer, which the old 2 s per-attempt timeout
    (llm.timeout_s) would have cut and retried for ever."""
    server = llm_server(responder=words(200), token_s=0.1)
    cfg = make_cfg(server, idle_timeout_s=0.5, timeout_s=2.0, max_attempts=1)
    with OpenAIBackend(cfg) as llm:
        start = time.monotonic()
        (res,) = llm.complete_batch(make_requests(1))
        took = time.monotonic() - start
    assert res.ok and res.failure == "none" and res.attempts == 1, res
    assert res.text.split() == [f"w{i}" for i in range(200)]
    assert took >= 19 and res.completion_tokens > 0 and not res.usage_estimated


def test_a_stall_longer_than_the_idle_timeout_is_retried(llm_server):
    server = llm_server(
        responder=words(5), stall_s=3.0, stall_fn=lambda digest, attempt: attempt == 0
    )
    cfg = make_cfg(server, idle_timeout_s=0.5, max_attempts=3)
    with OpenAIBackend(cfg) as llm:
        (res,) = llm.complete_batch(make_requests(1))
        stats = llm.stats()
    assert res.ok and res.attempts == 2, res
    assert stats["retries"] == 1 and stats["failure_kinds"] == {}


def test_a_stall_on_every_attempt_is_a_transient_failure(llm_server):
    server = llm_server(responder=words(5), stall_s=3.0, stall_fn=lambda d, a: True)
    cfg = make_cfg(server, idle_timeout_s=0.3, max_attempts=2)
    with OpenAIBackend(cfg) as llm:
        (res,) = llm.complete_batch(make_requests(1))
    assert not res.ok and res.failure == TRANSIENT and "llm.idle_timeout_s" in res.error


def test_usage_is_counted_and_marked_when_the_stream_carries_none(llm_server):
    server = llm_server(responder=words(40), no_stream_usage=True)
    with OpenAIBackend(make_cfg(server)) as llm:
        (res,) = llm.complete_batch(make_requests(1))
    assert res.ok and res.usage_estimated and res.completion_tokens > 0


@pytest.mark.parametrize(
    ("fault", "reason"),
    [("bad_json", "bad_response"), ("error_event", "stream_error"), ("cut", "connection")],
)
def test_a_broken_stream_is_a_transient_failure_and_retried(llm_server, fault, reason):
    """A non-JSON event, an error event and a disconnect mid-stream: each fails the
    attempt as transient (never fatal); the retry answers."""
    server = llm_server(responder=words(5), stream_fault_fn=lambda d, a: fault if a == 0 else None)
    with OpenAIBackend(make_cfg(server, max_attempts=3)) as llm:
        (res,) = llm.complete_batch(make_requests(1))
        stats = llm.stats()
    assert res.ok and res.attempts == 2 and res.text == "w0 w1 w2 w3 w4", res
    assert stats["retries"] == 1 and stats["failure_kinds"] == {}
    server2 = llm_server(responder=words(5), stream_fault_fn=lambda d, a: fault)
    with OpenAIBackend(make_cfg(server2, max_attempts=2)) as llm:
        (res,) = llm.complete_batch(make_requests(1))
    assert res.failure == TRANSIENT and res.error.startswith(reason), res.error


def test_server_sent_events_are_read_across_blocks_and_line_ends():
    """Events split anywhere between reads, CRLF or CR line ends, comments, ``event:``
    fields and a multi-line ``data:`` all give the same chunks; nothing after [DONE]."""
    stream = (
        b': keep-alive\r\n\r\nevent: chunk\r\ndata: {"a": 1}\r\n\r\n'
        b'data:{"b":\r\ndata: 2}\r\rdata: [DONE]\n\ndata: {"c": 3}\n\n'
    )
    for size in (1, 2, 3, 7, len(stream)):
        events, got = _Events(), []
        for i in range(0, len(stream), size):
            got += events.feed(stream[i : i + size])
        assert got == [{"a": 1}, {"b": 2}] and events.done, size


def test_stream_auto_falls_back_once_on_a_server_that_refuses_it(llm_server, caplog):
    server = llm_server(refuse_stream=True)
    with caplog.at_level(logging.WARNING), OpenAIBackend(make_cfg(server)) as llm:
        results = llm.complete_batch(make_requests(8))
        assert not llm.stream
    assert all(r.ok for r in results)
    assert sum("refuses streamed requests" in r.message for r in caplog.records) == 1


def test_stream_on_against_a_server_that_refuses_it_is_fatal(llm_server):
    server = llm_server(refuse_stream=True)
    with OpenAIBackend(make_cfg(server, stream="on")) as llm:
        results = llm.complete_batch(make_requests(3))
    assert all(r.failure == FATAL for r in results) and "stream_options" in results[0].error
    assert server.total_requests == 3  # no retries


# ---------------------------------------------------------------------------------------
# 1. Fatal failures
# ---------------------------------------------------------------------------------------


def test_a_401_is_fatal_at_once_with_the_servers_message(llm_server):
    server = llm_server(api_key="sk-the-right-one")
    with OpenAIBackend(make_cfg(server, max_attempts=6)) as llm:
        results = llm.complete_batch(make_requests(5))
        stats = llm.stats()
    assert all(r.failure == FATAL for r in results)
    assert "Incorrect API key provided" in results[0].error
    assert SENTINEL not in results[0].error  # the server echoed it: scrubbed
    assert stats["http_calls"] <= 5 and stats["retries"] == 0


# ---------------------------------------------------------------------------------------
# 3. The job's limiter, on a clock driven by hand
# ---------------------------------------------------------------------------------------


def test_a_retry_after_one_actor_got_delays_another_actors_next_grant():
    async def run() -> None:
        clock = FakeClock()
        limiter = JobLimiter(600, None, concurrency=8, clock=clock.now, sleep=clock.sleep)
        reply = limiter.report(failures={"transient": 1}, pause_s=5.0)  # actor A's 429
        assert reply["pause_s"] == 5.0
        grant = asyncio.ensure_future(limiter.lease(1, 0.0))  # actor B asks next
        await clock.advance(4.9)
        assert not grant.done()
        await clock.advance(0.2)
        assert grant.done()
        assert limiter.report()["pause_s"] == 0.0
        assert limiter.llm_stats()["pauses"] == 1

    asyncio.run(run())


def test_the_in_flight_limit_is_cut_on_transient_failures_and_grows_back():
    clock = FakeClock()
    limiter = JobLimiter(None, None, concurrency=16, clock=clock.now, sleep=clock.sleep)
    assert limiter.report(failures={"transient": 3})["limit"] == 8
    assert limiter.report(failures={"transient": 1})["limit"] == 8  # one cut per burst
    clock.t += CUT_HOLD_S
    assert limiter.report(failures={"transient": 1})["limit"] == 4
    limits = [limiter.report(answers=1)["limit"] for _ in range(200)]
    assert limits == sorted(limits) and limits[-1] == 16  # additive: 1/limit per answer
    assert limiter.report(failures={"content": 5})["limit"] == 16  # content: no cut
    stats = limiter.llm_stats()
    assert stats["failures"] == {"transient": 5, "content": 5, "fatal": 0}
    assert stats["answers"] == 200 and stats["seconds_since_success"] == 0
    clock.t += 42.0
    assert limiter.llm_stats()["seconds_since_success"] == 42.0


def test_the_outage_clock_runs_only_while_transient_failures_come_without_answers():
    clock = FakeClock()
    limiter = JobLimiter(None, None, concurrency=16, clock=clock.now, sleep=clock.sleep)
    limiter.report(answers=3)
    clock.t += 50.0  # slow answers, no failures: not an outage
    assert limiter.llm_stats()["outage_s"] == 0.0
    limiter.report(failures={"transient": 2}, last_error="http_503: upstream down")
    clock.t += 10.0
    stats = limiter.llm_stats()
    assert stats["outage_s"] == 60.0 and stats["last_error"] == "http_503: upstream down"
    limiter.report(answers=1)  # the endpoint answers again
    assert limiter.llm_stats()["outage_s"] == 0.0


def test_the_limiters_counts_survive_its_restart():
    """Ray restarts a dead limiter actor empty; the clients' running totals, sent with
    their next report, give it back the job's counts, and it says it restarted."""
    from raypipe.llm.leases import Leases
    from raypipe.llm.limits import InProcess, LimiterHandle

    async def run() -> None:
        clock = FakeClock()
        first = JobLimiter(None, None, clock=clock.now, sleep=clock.sleep, restarted=False)
        handle = LimiterHandle(InProcess(first), None, None)
        client = Leases(handle)
        client.record(answers=3)
        client.record(failure="transient")
        await client.flush()
        assert first.llm_stats()["answers"] == 3 and not first.llm_stats()["restarted"]
        # The actor dies; Ray starts a new one behind the same handle.
        handle.actor.limiter = second = JobLimiter(
            None, None, clock=clock.now, sleep=clock.sleep, restarted=True
        )
        client.record(answers=2)
        await client.flush()
        stats = second.llm_stats()
        assert stats["answers"] == 5 and stats["failures"]["transient"] == 1
        assert stats["restarted"]
        await client.close()

    asyncio.run(run())


def test_a_failed_attempts_token_reservation_returns(llm_server):
    """Through the backend: an attempt answered 500 gives its tokens back, so after one
    failed and one answered attempt the bucket holds all but the reported usage."""
    from raypipe.llm.limits import InProcess, LimiterHandle

    clock = FakeClock()  # frozen: the bucket does not refill during the test
    limiter = JobLimiter(None, 600_000, clock=clock.now, sleep=clock.sleep)  # 10,000/s
    handle = LimiterHandle(InProcess(limiter), None, 600_000)
    server = llm_server(fault_fn=lambda digest, attempt, body: "500" if attempt == 0 else None)
    with OpenAIBackend(make_cfg(server, max_attempts=2), limiter=handle) as llm:
        (res,) = llm.complete_batch(make_requests(1, max_tokens=900))
        used = res.prompt_tokens + res.completion_tokens
    assert res.ok and res.attempts == 2
    assert limiter._tokens.tokens == pytest.approx(10_000 - used)
    assert limiter.llm_stats()["failures"]["transient"] == 1


def test_a_token_bucket_on_a_fake_clock_refills_at_its_rate():
    clock = FakeClock()
    bucket = TokenBucket(60, clock=clock.now)  # 1/s, holds 1
    bucket.adjust(1)
    assert bucket.tokens == 0
    clock.t += 0.5
    bucket.adjust(0)
    assert bucket.tokens == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------
# 4. Structured output on the openai backend
# ---------------------------------------------------------------------------------------


def test_structured_output_check_quotes_the_servers_refusal(llm_server):
    server = llm_server(refuse_response_format=True)
    with OpenAIBackend(make_cfg(server, structured_output=True)) as llm:
        with pytest.raises(EndpointError) as e:
            llm.check()
    assert server.total_requests == 2  # the one-token probe, then the refused one: not retried
    assert "Unrecognized request argument supplied: response_format" in str(e.value)
    assert "llm.structured_output=false" in str(e.value)


def test_structured_output_auto_turns_off_and_says_so(llm_server, caplog):
    server = llm_server(refuse_response_format=True)
    with (
        caplog.at_level(logging.WARNING),
        OpenAIBackend(make_cfg(server, structured_output="auto")) as llm,
    ):
        checked = llm.check()
    assert checked["structured_output"] is False
    assert any("structured output is off" in r.message for r in caplog.records)


def test_structured_output_true_sends_the_schema_as_response_format(llm_server):
    import dataclasses

    from raypipe.llm.cache import request_key
    from raypipe.llm.endpoint_check import PROBE_SCHEMA
    from raypipe.llm.request_body import request_body

    seen = []
    server = llm_server(fault_fn=lambda d, a, body: seen.append(body) and None)
    with OpenAIBackend(make_cfg(server, structured_output=True)) as llm:
        assert llm.check()["structured_output"] is True
        assert seen[-1]["max_tokens"] <= 16 and "response_format" in seen[-1]
        req = dataclasses.replace(make_requests(1)[0], response_schema=PROBE_SCHEMA)
        llm.complete_batch([req])
    fmt = seen[-1]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"] == req.response_schema
    # The body sent is the body hashed (minus the transport fields).
    sent = {k: v for k, v in seen[-1].items() if k not in ("stream", "stream_options")}
    assert request_key(sent) == request_key(request_body("test-model", req))


# ---------------------------------------------------------------------------------------
# 5. Budget and the API key's path
# ---------------------------------------------------------------------------------------


def test_max_usd_with_an_unpriced_model_is_refused_before_any_request(llm_server):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_generate import demo_config
    from test_stream import openai_overrides

    from raypipe.errors import ConfigError

    server = llm_server()
    with pytest.raises(ConfigError) as e:
        demo_config(*openai_overrides(server, "llm.model=o3", "max_usd=5", "llm.prices={}"))
    assert "llm.prices.o3" in str(e.value)
    assert server.total_requests == 0 and server.stats()["unauthorized"] == 0


def test_the_key_cannot_be_pickled_and_stage_arguments_do_not_carry_it(llm_server):
    with pytest.raises(TypeError, match="must not be pickled"):
        pickle.dumps(Secret(SENTINEL))
    from ray import cloudpickle

    from raypipe.generate.llm_stage import LLMStage

    server = llm_server()
    cfg = make_cfg(server)
    with OpenAIBackend(cfg) as llm:
        with pytest.raises(TypeError):
            pickle.dumps(llm)
        assert SENTINEL not in repr(llm)
    # What the pipeline hands each LLM actor: the config, never the key.
    args = dict(llm=cfg.model_dump(), cache_dir=None, catalog_dirs=[], run_seed=0, limiter=None)
    assert SENTINEL.encode() not in cloudpickle.dumps(args)
    assert "api_key" not in LLMStage.__init__.__code__.co_varnames


def test_the_key_file_is_read_where_the_variable_is_unset(llm_server, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    server = llm_server(api_key=SENTINEL)
    (tmp_path / "key").write_text(SENTINEL + "\n")
    with OpenAIBackend(make_cfg(server, api_key_file=str(tmp_path / "key"))) as llm:
        (res,) = llm.complete_batch(make_requests(1))
    assert res.ok and server.unauthorized == 0
    with pytest.raises(EndpointError, match="api_key_file"):
        OpenAIBackend(make_cfg(server, api_key_file=str(tmp_path / "missing")))


# ---------------------------------------------------------------------------------------
# The generation job: a fatal failure stops it; the key stays out of everything it writes
# ---------------------------------------------------------------------------------------


def _job_overrides(server, *more: str) -> list[str]:
    return [
        "llm.backend=openai",
        f"llm.base_url={server.url}",
        f"llm.api_key_env={KEY_ENV}",
        "llm.model=test-model",
        "extra_keywords_per_ability=0",  # no driver-side requests: the actors meet the 401
        "abilities=[color]",
        *more,
    ]


def test_a_401_in_the_actors_stops_the_run_at_once_with_no_rejects(
    ray_local, tiny_dir, tmp_path, llm_server
):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_generate import demo_config, read_data, read_rejects, template_responder

    from raypipe.generate.pipeline import generate
    from raypipe.llm.failures import LLMFatalError

    def revoked(digest, attempt, body):  # the start-up probe passes, then the key is revoked
        return "401" if body.get("max_tokens", 0) > 16 else None

    server = llm_server(responder=template_responder(), fault_fn=revoked, lifetime_s=900)
    cfg = demo_config(*_job_overrides(server, "num_samples=4", "llm.max_attempts=6"))
    with pytest.raises(LLMFatalError, match="injected HTTP 401") as e:
        generate(cfg, str(tmp_path))
    assert "Traceback" not in str(e.value) and SENTINEL not in str(e.value)
    assert read_rejects(tmp_path) == [] and read_data(tmp_path) == []
    chat = [ev for ev in server.events if ev.fault == "401"]
    assert 0 < len(chat) <= 4 and all(ev.attempt == 0 for ev in chat)  # never retried


def test_the_key_is_in_no_file_of_a_run_and_the_manifest_has_llm_stats(
    ray_local, tiny_dir, tmp_path, llm_server
):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_generate import demo_config, read_data, template_responder

    from raypipe.generate.pipeline import generate

    server = llm_server(responder=template_responder(), api_key=SENTINEL, lifetime_s=900)
    manifest = generate(demo_config(*_job_overrides(server, "num_samples=2")), str(tmp_path))
    assert len(read_data(tmp_path)) == 2 and server.unauthorized == 0
    stats = manifest["runs"][-1]["llm_stats"]
    assert stats["answers"] >= 3 and stats["failures"]["transient"] == 0
    assert stats["any_success"] and stats["seconds_since_success"] < 600
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SENTINEL.encode() not in path.read_bytes(), path
