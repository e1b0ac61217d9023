"""Streaming of the whole generation job: early parts, a flat driver, a busy renderer.

    .venv/bin/python benchmarks/stream.py               # N=100 and 1,000 planned rows, minutes
    .venv/bin/python benchmarks/stream.py --smoke-test  # N=10 and 100, two jobs: ~2 min

The demo preset with the openai backend against the loopback server (tests/llm_server.py,
in its own process, 0.1 s per request, ``llm.concurrency=1``: the LLM is the slow side,
as under an API's rate limit), tiny SD at 32 px and 1 step, ``part_max_seconds=5``.
Three jobs, each in a fresh subprocess (``--one N OUT``) and OUT, so Ray starts clean:
``timed`` (10N rows, the job alone, as a user runs it: the time figures), then
``small`` (N) and ``large`` (10N), each after a warm-up job and under tracemalloc (the
memory figure; tracemalloc slows the driver's Python several times, so their times
are not the user's). Imports (torch and diffusers too: the tiny SD is resolved) and
Ray's start-up come just before the job's start; they are reported as ``setup_s`` and
not counted in the times below.

- first_part_s: earliest mtime of OUT/data/*.parquet, seconds from the job's start
  (just before ``generate()``), timed run.
- last_prompt_answer_s: when the server answered its last prompt request (the last
  user message holds "Keywords to use, one per prompt:"), same clock, timed run.
- stream_ratio = first_part_s / last_prompt_answer_s (streams if well under 1).
- driver_bytes_per_row: growth of the driver's peak traced memory (tracemalloc,
  started just before ``generate()``, after a 13-row warm-up job in the same process that
  takes Ray's once-per-driver allocations out of the figure) from N to 10N rows, / 9N.
- render_busy_fraction (timed run) = manifest ``render_busy_s`` (the sum of the render
  actor's pipeline calls: embed, denoise, decode, encode) / the render window, from the
  server's first dialogue answer (no row can reach the renderer before it) to the
  writer's close (job start + ``timings_s.total_s``). The window is at least the
  render phase, so the fraction is a lower bound.

``--smoke-test`` (what ``run_all.py --quick`` runs: proof that the benchmark works, not
figures) leaves the ``timed`` job out: its time figures come from the traced ``large``
run, slowed by tracemalloc, and ``timed`` is null.

The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
KEY_ENV = "RAYPIPE_BENCH_KEY"
PROMPT_MARK = "Keywords to use, one per prompt:"


def serve(latency_s: float, times_path: str) -> None:
    """The loopback server; appends 'prompt|dialogue <time.time()>' per answer."""
    sys.path.insert(0, str(ROOT / "tests"))
    from llm_server import LLMServer
    from test_generate import template_responder

    respond, log = template_responder(), open(times_path, "a", buffering=1)

    def timed(messages):
        text = respond(messages)
        user = messages[-1]["content"]
        kind = "prompt" if PROMPT_MARK in user else "dialogue" if "Description:" in user else None
        if kind:
            log.write(f"{kind} {time.time()}\n")
        return text

    with LLMServer(responder=timed, latency_s=latency_s, lifetime_s=3600) as server:
        print(f"PORT {server.port}", flush=True)
        sys.stdin.read()  # until the parent closes our stdin


def one(n: int, out: str, traced: bool = True) -> dict:
    """One job of n rows into out, in this (fresh) process; ``traced``: after a warm-up
    job, under tracemalloc (memory figures), else the job alone, as a user runs it."""
    import tracemalloc

    t = time.time()
    # What generate() imports lazily (and resolving the tiny SD imports torch and
    # diffusers here): a fixed cost, many times slower under tracemalloc than in a job.
    import ray
    import ray.data  # noqa: F401

    import raypipe.generate.quality  # noqa: F401
    import raypipe.llm.client  # noqa: F401
    import raypipe.llm.limits  # noqa: F401
    from raypipe.config import load_config
    from raypipe.generate.config import GenerateConfig
    from raypipe.generate.pipeline import generate
    from raypipe.generate.render import check_render_model

    times = out + "-answers.txt"
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "0.1", times],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    port = int(server.stdout.readline().split()[1])
    cfg = load_config(
        GenerateConfig,
        ROOT / "raypipe" / "configs" / "generate" / "demo.yaml",
        ["log_to_driver=false", "progress=false", f"num_samples={n}", "part_max_seconds=5",
         "render.width=32", "render.height=32", "render.steps=1",
         "llm.backend=openai", f"llm.base_url=http://127.0.0.1:{port}/v1",
         f"llm.api_key_env={KEY_ENV}", "llm.model=test-model", "llm.concurrency=1"],
    )  # fmt: skip
    check_render_model(cfg.render)
    ray_tmp = tempfile.mkdtemp(prefix="rp-bench-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=ray_tmp)
    try:
        # A small job first, untraced: Ray Data and the clients allocate some things once
        # per driver process (the stats actor's handle, ...); the figure is growth with N.
        if traced:
            generate(cfg.model_copy(update={"num_samples": 13}), out + "-warmup")
        setup_s = time.time() - t
        if traced:
            settle_type_registry()
            tracemalloc.start()
        t0 = time.time()
        manifest = generate(cfg, out)
        wall = time.time() - t0
        peak = tracemalloc.get_traced_memory()[1] if traced else None
        tracemalloc.stop()
    finally:
        server.stdin.close()
        server.wait(timeout=30)
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    answers = [line.split() for line in Path(times).read_text().splitlines()]
    answers = [(kind, float(t) - t0) for kind, t in answers if float(t) >= t0]  # not warm-up's
    prompts = [t for kind, t in answers if kind == "prompt"]
    dialogues = [t for kind, t in answers if kind == "dialogue"]
    parts = glob.glob(os.path.join(out, "data", "*.parquet"))
    run = manifest["runs"][-1]
    window = run["timings_s"]["total_s"] - min(dialogues)
    return {
        "n": n,
        "wall_s": round(wall, 2),
        "setup_s": round(setup_s, 2),
        "peak_traced_bytes": peak,
        "first_part_s": round(min(os.path.getmtime(p) for p in parts) - t0, 2),
        "first_prompt_answer_s": round(min(prompts), 2),
        "last_prompt_answer_s": round(max(prompts), 2),
        "first_dialogue_answer_s": round(min(dialogues), 2),
        "prompt_requests": len(prompts),
        "dialogue_requests": len(dialogues),
        "data_parts": len(parts),
        "accepted": run["accepted"],
        "rejected": run["rows_written"] - run["accepted"],
        "stopped": manifest["stopped"],
        "images_rendered": run["images_rendered"],
        "images_per_s": round(run["images_per_s"], 2),
        "render_busy_s": round(run["render_busy_s"], 2),
        "render_window_s": round(window, 2),
        "timings_s": {k: round(v, 2) for k, v in run["timings_s"].items()},
    }


def settle_type_registry(limit: int = 50_000) -> None:
    """Have the interpreter reallocate its registry of ``object``'s subclasses now, before
    tracing starts, rather than during the traced job.

    That registry is a dict of every live class; a class freed leaves a dummy slot, and
    when the slots run out the table (~295 KB here, about 5,000 classes) is reallocated
    at the same size. Ray Data's driver creates and frees a class on every actor-location
    lookup and task submission (``.options()``), so the table is reallocated after every
    ~6,000 of them: now and then, whatever the run's size. Allocated before tracing, the
    table is invisible to tracemalloc until its first reallocation inside the traced job,
    which then shows as ~295 KB of new memory in that job (seen in the 10N job, not in
    the N one: a 300-byte-per-row error). Churning classes until one reallocation happens
    (a jump of over 64 KB at one class creation) leaves ~6,000 creations of headroom,
    more than the traced jobs make.
    """
    import gc
    import tracemalloc

    tracemalloc.start()
    try:
        for i in range(limit):
            before = tracemalloc.get_traced_memory()[0]
            type("Churn", (), {})
            if tracemalloc.get_traced_memory()[0] - before > 64 * 1024:
                return
            if i % 64 == 0:
                gc.collect(0)  # free the classes made so far (each is a reference cycle)
        raise RuntimeError(f"no reallocation of the class registry in {limit} classes")
    finally:
        tracemalloc.stop()
        gc.collect()


def run_one(n: int, out: Path, env: dict, traced: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--one", str(n), str(out)] + ([] if traced else ["--untraced"])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"--one {n} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="rows of the small run (large: 10N)")
    ap.add_argument("--smoke-test", action="store_true", help="N=10, no separate timed job")
    ap.add_argument("--one", nargs=2, metavar=("N", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--untraced", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve", nargs=2, metavar=("LATENCY", "TIMES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    for var, value in (("HF_HUB_OFFLINE", "1"), ("RAY_AUTH_MODE", "disabled"),
                       ("RAY_USAGE_STATS_ENABLED", "0"), (KEY_ENV, "sk-bench-not-a-real-key")):  # fmt: skip
        os.environ.setdefault(var, value)
    if args.serve:
        return serve(float(args.serve[0]), args.serve[1])
    if args.one:
        return print(json.dumps(one(int(args.one[0]), args.one[1], not args.untraced)))

    from raypipe.generate.config import RenderConfig
    from raypipe.generate.render import check_render_model

    n = 10 if args.smoke_test else args.n
    work = Path(tempfile.mkdtemp(prefix="rp-stream-"))
    # The tiny models of $RAYPIPE_TINY_DIR (default ~/.cache/raypipe/tiny, as the demo's):
    # built here on first use, then shared by the jobs and by later runs.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    check_render_model(RenderConfig(model="raypipe-tiny/tiny-sd"))
    try:
        timed = None if args.smoke_test else run_one(10 * n, work / "timed", env, traced=False)
        small = run_one(n, work / "small", env)
        large = run_one(10 * n, work / "large", env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    clock = timed or large  # --smoke-test: the traced run's (slower) times
    figures = {
        "n_small": n,
        "n_large": 10 * n,
        "first_part_s": clock["first_part_s"],
        "last_prompt_answer_s": clock["last_prompt_answer_s"],
        "stream_ratio": round(clock["first_part_s"] / clock["last_prompt_answer_s"], 3),
        "stream_ratio_traced": round(large["first_part_s"] / large["last_prompt_answer_s"], 3),
        "driver_bytes_per_row": round(
            (large["peak_traced_bytes"] - small["peak_traced_bytes"]) / (9 * n), 1
        ),
        "render_busy_fraction": round(clock["render_busy_s"] / clock["render_window_s"], 3),
        "timed": timed,
        "small": small,
        "large": large,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
