"""The response cache: local folders and S3 URIs, entry formats, usage served from cache."""

from __future__ import annotations

import functools
import json
import logging
import uuid

import pytest
from llm_server import loopback_cfg, make_requests

from raypipe.errors import ConfigError
from raypipe.llm import make_backend
from raypipe.llm.cache import ENTRY_FORMAT, ResponseCache, request_key
from raypipe.llm.client import OpenAIBackend
from raypipe.llm.config import LLMConfig

KEY_ENV = "RAYPIPE_TEST_LLM_KEY"


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-cache-test")


make_cfg = functools.partial(
    loopback_cfg, api_key_env=KEY_ENV, timeout_s=5.0, backoff_initial_s=0.01
)


def test_hits_report_served_usage_apart_from_paid_usage(llm_server, tmp_path):
    server = llm_server()
    cfg = make_cfg(server)
    with OpenAIBackend(cfg, tmp_path) as llm:
        paid = llm.complete_batch(make_requests(5))
        first = llm.stats()
    assert all(
        r.ok and not r.cached and r.cost_usd > 0 and r.cached_prompt_tokens == 0 for r in paid
    )
    assert first["cache_hits"] == 0 and first["cached_prompt_tokens"] == 0

    with OpenAIBackend(cfg, tmp_path) as llm:
        served = llm.complete_batch(make_requests(5))
        stats = llm.stats()
    for p, s in zip(paid, served):
        assert s.cached and s.text == p.text and s.attempts == 0
        assert (s.prompt_tokens, s.completion_tokens, s.cost_usd) == (0, 0, 0.0)
        assert (s.cached_prompt_tokens, s.cached_completion_tokens) == (
            p.prompt_tokens,
            p.completion_tokens,
        )
        assert s.cached_cost_usd == pytest.approx(p.cost_usd)
    assert stats["http_calls"] == 0 and stats["cache_hits"] == 5
    assert stats["prompt_tokens"] == stats["completion_tokens"] == 0 and stats["cost_usd"] == 0
    assert stats["cached_prompt_tokens"] == first["prompt_tokens"]
    assert stats["cached_completion_tokens"] == first["completion_tokens"]
    assert stats["cached_cost_usd"] == pytest.approx(first["cost_usd"])
    assert server.total_requests == 5


def test_entries_of_earlier_versions_keep_working(llm_server, tmp_path):
    """An entry as raypipe wrote it before formats (no `format`, no cost) is a hit."""
    server = llm_server()
    cfg = make_cfg(server)
    (req,) = make_requests(1, tag="old")
    with OpenAIBackend(cfg, None) as llm:
        key = request_key(llm._body(req))
    old = {"model": "test-model", "text": "an old answer", "prompt_tokens": 12,
           "completion_tokens": 30, "finish_reason": "stop"}  # fmt: skip
    (tmp_path / key[:2]).mkdir()
    (tmp_path / key[:2] / f"{key}.json").write_text(json.dumps(old))
    with OpenAIBackend(cfg, tmp_path) as llm:
        (result,) = llm.complete_batch([req])
    assert result.cached and result.text == "an old answer" and server.total_requests == 0
    assert result.cached_prompt_tokens == 12 and result.cached_completion_tokens == 30
    assert result.cached_cost_usd == pytest.approx((12 * 1.0 + 30 * 2.0) / 1e6)  # priced now


def test_newer_format_entries_are_ignored_with_one_message(tmp_path, caplog):
    cache = ResponseCache(tmp_path)
    keys = [request_key({"n": i}) for i in range(3)]
    for key in keys:
        cache.put(key, {"text": "x"})
        path = tmp_path / key[:2] / f"{key}.json"
        path.write_text(json.dumps({"format": ENTRY_FORMAT + 1, "text": "from the future"}))
    with caplog.at_level(logging.WARNING, logger="raypipe"):
        assert all(cache.get(k) is None for k in keys)
    assert sum("newer than this raypipe reads" in m for m in caplog.messages) == 1


def test_local_writes_are_atomic_and_tidy(tmp_path):
    cache = ResponseCache(str(tmp_path / "c"))
    key = request_key({"model": "m"})
    cache.put(key, {"text": "hello", "prompt_tokens": 3})
    assert cache.get(key) == {"format": ENTRY_FORMAT, "text": "hello", "prompt_tokens": 3}
    assert len(cache) == 1
    assert [p.name for p in (tmp_path / "c").rglob("*") if p.is_file()] == [f"{key}.json"]
    assert cache.get(request_key({"model": "other"})) is None


def test_cache_on_s3_uri(s3_server):
    bucket = s3_server.make_bucket(f"cache-{uuid.uuid4().hex[:8]}")
    uri = s3_server.uri(bucket, "run/cache")
    cache = ResponseCache(uri)
    assert not cache.is_local and cache.root == f"{bucket}/run/cache"
    key = request_key({"model": "m", "messages": []})
    assert cache.get(key) is None and len(cache) == 0
    cache.put(key, {"text": "stored in S3", "completion_tokens": 4})
    again = ResponseCache(uri)  # another reader sees the whole entry
    assert again.get(key)["text"] == "stored in S3" and len(again) == 1
    info = s3_server.filesystem().get_file_info(f"{bucket}/run/cache/{key[:2]}/{key}.json")
    assert info.size > 0

    with pytest.raises(ConfigError, match="does not exist"):
        ResponseCache(s3_server.uri("no-such-bucket", "cache"))
    with pytest.raises(ConfigError, match="llm.cache=false"):
        ResponseCache("nosuchscheme://x/y")


def test_backends_share_an_s3_cache_across_processes(s3_server, llm_server, ray_local):
    """One backend pays; a second one in another process (a Ray actor) answers the
    same requests from the S3 cache with zero HTTP calls."""
    bucket = s3_server.make_bucket(f"shared-{uuid.uuid4().hex[:8]}")
    uri = s3_server.uri(bucket, "run/cache")
    server = llm_server()
    cfg = make_cfg(server)
    reqs = make_requests(12, tag="s3")
    llm = make_backend(cfg, uri)
    try:
        paid = llm.complete_batch(reqs)
    finally:
        llm.close()
    assert all(r.ok and not r.cached for r in paid) and server.total_requests == 12
    assert len(ResponseCache(uri)) == 12

    @ray_local.remote(num_cpus=0.25)
    class Reader:
        def __init__(self, cfg: LLMConfig, uri: str) -> None:
            self.llm = make_backend(cfg, uri)

        def __call__(self, batch):
            results = self.llm.complete_batch(batch)
            return results, self.llm.stats()

    reader = Reader.options(runtime_env={"env_vars": {KEY_ENV: "sk-cache-test"}}).remote(cfg, uri)
    served, stats = ray_local.get(reader.__call__.remote(reqs), timeout=120)
    ray_local.kill(reader)
    assert server.total_requests == 12  # nothing asked again
    assert stats["http_calls"] == 0 and stats["cache_hits"] == 12
    assert [r.text for r in served] == [r.text for r in paid]
    assert all(r.cached and r.cost_usd == 0 for r in served)
    assert stats["cached_prompt_tokens"] == sum(r.prompt_tokens for r in paid)
