"""Throughput of the openai backend against the loopback server, with and without faults.

    .venv/bin/python benchmarks/llm_client.py              # 2,000 requests, 100 ms, concurrency 64
    .venv/bin/python benchmarks/llm_client.py --faults     # + 429 (Retry-After 1 s), 500, hangs, bad bodies
    .venv/bin/python benchmarks/llm_client.py --smoke-test # a few seconds
    .venv/bin/python benchmarks/llm_client.py --slow-stream # 200-word answers at 20 words/s
    .venv/bin/python benchmarks/llm_client.py --capacity 20 --requests 400  # 429s above 20/s
    .venv/bin/python benchmarks/llm_client.py --capacity 20 --requests 400 --fixed

The server runs in its own process (its own GIL), answers every request after
``--latency`` seconds, and the client keeps ``--concurrency`` requests in flight, so
the bound is concurrency / latency requests per second; efficiency = achieved / bound.
The cache is off. The last line printed is one JSON object of figures.

``--slow-stream``: every answer streams ``--words`` words, one per ``--token-s``
seconds (10 s each by default), so the bound is concurrency / (latency + words x
token_s). ``--capacity C``: the server answers C requests/s and 429s the rest with the
exact wait; ``429_per_answer`` is the figure, with the job-wide pause and adaptive
in-flight limit (default) or with them switched off (``--fixed``: each request waits
out its own Retry-After, the others keep sending).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter

import common

from raypipe.llm.base import LLMRequest
from raypipe.llm.client import OpenAIBackend
from raypipe.llm.config import LLMConfig

KEY_ENV = "RAYPIPE_BENCH_KEY"


def start_server(latency_s: float, faults: bool, *extra: str) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, str(common.ROOT / "tests/llm_server.py"), "--latency", str(latency_s)]
    cmd += ["--api-key", os.environ[KEY_ENV], "--lifetime", "900", *extra]
    if faults:
        cmd += ["--faults", "standard", "--retry-after", "1", "--hang", "10"]
    return common.start_server(cmd)


def make_requests(n: int, tag: str) -> list[LLMRequest]:
    return [
        LLMRequest(
            key=f"{tag}/{i:06d}",
            task="prompts",
            ability="color",
            messages=(
                {"role": "system", "content": "You write text-to-image prompts."},
                {"role": "user", "content": f"Write one prompt about colour #{i} ({tag})."},
            ),
            seed=i,
            max_tokens=256,
        )
        for i in range(n)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.1, help="server seconds per request")
    ap.add_argument("--faults", action="store_true", help="10%% 429, 5%% 500, 2%% hang, 5%% bad")
    ap.add_argument("--transport", default="auto", choices=["auto", "aiohttp", "httpx"])
    ap.add_argument("--backoff-initial", type=float, default=0.5, help="first retry wait (s)")
    ap.add_argument("--smoke-test", action="store_true", help="200 requests, a few seconds")
    ap.add_argument("--slow-stream", action="store_true", help="long answers, streamed slowly")
    ap.add_argument("--words", type=int, default=200, help="words per answer (--slow-stream)")
    ap.add_argument("--token-s", type=float, default=0.05, help="seconds per word (--slow-stream)")
    ap.add_argument("--capacity", type=float, default=None, help="server requests/s, 429 above")
    ap.add_argument("--fixed", action="store_true", help="no job pause, no adaptive limit")
    ap.add_argument("--stream", default="auto", choices=["auto", "on", "off"], help="llm.stream")
    args = ap.parse_args()
    if args.smoke_test:
        args.requests = 200
    os.environ.setdefault(KEY_ENV, "sk-bench-not-a-real-key")

    # 1. Server in its own process; client with the cache off.
    extra = ["--capacity", str(args.capacity)] if args.capacity else []
    if args.slow_stream:
        extra += ["--words", str(args.words), "--token-s", str(args.token_s)]
    proc, port = start_server(args.latency, args.faults, *extra)
    cfg = LLMConfig(
        backend="openai",
        model="test-model",
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key_env=KEY_ENV,
        concurrency=args.concurrency,
        timeout_s=3.0,  # hangs last 10 s: each costs one timeout, then a retry
        first_token_timeout_s=3.0,
        idle_timeout_s=3.0,
        max_attempts=50 if args.capacity else 6,
        backoff_initial_s=args.backoff_initial,
        prices={"test-model": (0.15, 0.60)},
        cache=False,
        http_transport=args.transport,
        stream=args.stream,
    )
    llm = OpenAIBackend(cfg, cache_dir=None)
    if args.fixed:  # each request on its own: no job-wide pause, no AIMD
        llm._limits.pause = lambda seconds: None
        llm._limits.on_limit = None
    try:
        # 2. Warm up connections (not timed), then the timed run.
        llm.complete_batch(make_requests(args.concurrency, "warmup"))
        warm = llm.stats()
        requests = make_requests(args.requests, "bench")
        cpu0, start = time.process_time(), time.perf_counter()
        results = llm.complete_batch(requests)
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu0
        stats = llm.stats()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as resp:
            server = json.load(resp)
    finally:
        llm.close()
        proc.terminate()
        proc.wait(timeout=10)

    # 3. Accounting: every request answered or failed with a reason, once.
    by_key = Counter(r.key for r in results)
    answered = sum(r.ok for r in results)
    failed = sum(1 for r in results if not r.ok and r.error)
    lost = len({q.key for q in requests} - set(by_key)) + sum(
        1 for r in results if not r.ok and not r.error
    )
    per_request = args.latency + (args.words * args.token_s if args.slow_stream else 0.0)
    bound = args.concurrency / per_request
    if args.capacity:
        bound = min(bound, args.capacity)
    achieved = args.requests / elapsed
    # Each request's time from the batch's start to its result (all start at once, queued
    # for a slot): shows how much of the elapsed time the slowest few retry chains take.
    done = sorted(r.latency_s for r in results)
    done_99 = done[int(0.99 * (len(done) - 1))]
    figures = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "latency_s": args.latency,
        "faults": args.faults,
        "achieved_rps": round(achieved, 1),
        "bound_rps": round(bound, 1),
        "efficiency": round(achieved / bound, 3),
        "elapsed_s": round(elapsed, 2),
        "done_99pct_s": round(done_99, 2),
        "slowest_request_s": round(done[-1], 2),
        "answered": answered,
        "failed": failed,
        "lost": lost,
        "duplicated": sum(n - 1 for n in by_key.values()),
        "max_attempts": cfg.max_attempts,
        "backoff_initial_s": cfg.backoff_initial_s,
        "retries": stats["retries"] - warm["retries"],
        "http_calls": stats["http_calls"] - warm["http_calls"],
        "errors": stats["errors"],
        "server_faults": server["faults"],
        "client_cpu_ms_per_request": round(cpu / args.requests * 1e3, 3),
        "cost_usd": stats["cost_usd"],
        "transport": args.transport,
        "slow_stream": args.slow_stream,
        "capacity_rps": args.capacity,
        "fixed": args.fixed,
        "stream": args.stream,
        "429_per_answer": round(
            (server["faults"].get("over_capacity", 0) + server["faults"].get("429", 0))
            / max(1, answered),
            3,
        ),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
