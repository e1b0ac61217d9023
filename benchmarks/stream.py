"""Streaming of the whole generation job: early parts, a flat driver, a busy renderer.

    .venv/bin/python benchmarks/stream.py               # N=100 and 1,000 planned rows, minutes
    .venv/bin/python benchmarks/stream.py --smoke-test  # N=10 and 100, two jobs: ~2 min

The demo preset, openai backend against the loopback server (its own process, 0.1 s per
request, ``llm.concurrency=1``; every prompt unique, and the lines of a tenth of the
keywords malformed, so about 10% of prompts are rejected and replaced), tiny SD at 32 px
and 1 step, ``part_max_seconds=5``. Each job runs in a fresh subprocess and OUT: ``timed``
(10N rows, alone: the time figures), then ``small`` (N) and ``large`` (10N) after a
warm-up job, under tracemalloc (memory). Times are seconds from just before
``generate()`` (imports, Ray: ``setup_s``); ``--smoke-test`` takes them from ``large``.

- stream_ratio = first_part_s (earliest OUT/data mtime) / last_prompt_answer_s (<= 0.5);
- driver_bytes_per_row = (peak traced bytes at 10N - at N) / 9N (<= 512);
- render_busy_fraction = manifest ``render_busy_s`` / the render window (first dialogue
  answer to the writer's close), a lower bound;
- render_full_batch_share = ``render.full_batch_calls / render.calls`` (>= 0.95);
  render_idle_between_executions_share = ``render.idle_between_executions_s`` / the
  stream's time (<= 0.05). The last line printed is one JSON object of figures.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

KEY_ENV = "RAYPIPE_BENCH_KEY"
PROMPT_MARK = "Keywords to use, one per prompt:"


def serve(latency_s: float, times_path: str) -> None:
    """The loopback server; appends 'prompt|dialogue <time.time()>' per answer."""
    from llm_server import LLMServer
    from test_generate import template_responder

    respond, log = template_responder(), open(times_path, "a", buffering=1)
    answered = [0]

    def timed(messages):
        text = respond(messages)
        user = messages[-1]["content"]
        kind = "prompt" if PROMPT_MARK in user else "dialogue" if "Description:" in user else None
        if kind:
            log.write(f"{kind} {time.time()}\n")
        if kind == "prompt":  # unique prompts; a tenth of the keywords' lines malformed
            answered[0] += 1
            lines = [
                f"{ln.split('.')[0]}. a nice picture of something"
                if sum(map(ord, ln.split("((")[-1].split("))")[0])) % 10 == 0
                else f"{ln}, take {answered[0]}-{i}"
                for i, ln in enumerate(text.splitlines())
            ]
            text = "\n".join(lines)
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
    from raypipe.generate.pipeline import generate, local_cpus
    from raypipe.generate.render import check_render_model

    times = out + "-answers.txt"
    cmd = [sys.executable, __file__, "--serve", "0.1", times]
    server, port = common.start_server(cmd, stdin=subprocess.PIPE)
    cfg = load_config(
        GenerateConfig,
        common.ROOT / "raypipe" / "configs" / "generate" / "demo.yaml",
        ["log_to_driver=false", "progress=false", f"num_samples={n}", "part_max_seconds=5",
         "render.width=32", "render.height=32", "render.steps=1", "near_duplicate_threshold=1.0",
         "llm.backend=openai", f"llm.base_url=http://127.0.0.1:{port}/v1",
         f"llm.api_key_env={KEY_ENV}", "llm.model=test-model", "llm.concurrency=1"],
    )  # fmt: skip
    check_render_model(cfg.render)
    ray_tmp = common.start_ray(local_cpus(cfg))  # as a job's own local Ray
    try:
        # A small job first, untraced: Ray Data and the clients allocate some things once
        # per driver process (the stats actor's handle, ...); the figure is growth with N.
        if traced:
            generate(cfg.model_copy(update={"num_samples": 13}), out + "-warmup")
        setup_s = time.time() - t
        if traced:
            common.settle_type_registry()
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
    r2 = lambda x: round(x, 2)  # noqa: E731
    return {
        "n": n, "wall_s": r2(wall), "setup_s": r2(setup_s), "peak_traced_bytes": peak,
        "first_part_s": r2(min(os.path.getmtime(p) for p in parts) - t0),
        "first_prompt_answer_s": r2(min(prompts)), "last_prompt_answer_s": r2(max(prompts)),
        "first_dialogue_answer_s": r2(min(dialogues)), "prompt_requests": len(prompts),
        "dialogue_requests": len(dialogues), "data_parts": len(parts),
        "accepted": run["accepted"], "rejected": run["rows_written"] - run["accepted"],
        "stopped": manifest["stopped"], "images_rendered": run["images_rendered"],
        "images_per_s": r2(run["images_per_s"]), "render_busy_s": r2(run["render_busy_s"]),
        "render_window_s": r2(window), "render": run["render"],
        "stream_executions": run["stream_executions"],
        "timings_s": {k: r2(v) for k, v in run["timings_s"].items()},
    }  # fmt: skip


def run_one(n: int, out: Path, env: dict, traced: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--one", str(n), str(out)] + ([] if traced else ["--untraced"])
    rc, _, err, figures = common.run_json(cmd, env=env)
    if rc:
        sys.exit(f"--one {n} failed:\n{err[-4000:]}")
    return figures


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
        return common.emit(one(int(args.one[0]), args.one[1], not args.untraced))

    from raypipe.generate.config import RenderConfig
    from raypipe.generate.render import check_render_model

    n = 10 if args.smoke_test else args.n
    work = Path(tempfile.mkdtemp(prefix="rp-stream-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # The tiny models ($RAYPIPE_TINY_DIR, as the demo's) are built here, for all the jobs.
    check_render_model(RenderConfig(model="raypipe-tiny/tiny-sd"))
    try:
        timed = None if args.smoke_test else run_one(10 * n, work / "timed", env, traced=False)
        small = run_one(n, work / "small", env)
        large = run_one(10 * n, work / "large", env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    clock = timed or large  # --smoke-test: the traced run's (slower) times
    growth = large["peak_traced_bytes"] - small["peak_traced_bytes"]
    render = clock["render"]
    figures = {
        "n_small": n, "n_large": 10 * n, "first_part_s": clock["first_part_s"],
        "last_prompt_answer_s": clock["last_prompt_answer_s"],
        "stream_ratio": round(clock["first_part_s"] / clock["last_prompt_answer_s"], 3),
        "stream_ratio_traced": round(large["first_part_s"] / large["last_prompt_answer_s"], 3),
        "driver_bytes_per_row": round(growth / (9 * n), 1),
        "render_busy_fraction": round(clock["render_busy_s"] / clock["render_window_s"], 3),
        "render_full_batch_share": round(render["full_batch_calls"] / render["calls"], 3),
        "render_idle_between_executions_share": round(
            render["idle_between_executions_s"] / clock["timings_s"]["stream_s"], 3
        ),
        "timed": timed, "small": small, "large": large,
    }  # fmt: skip
    common.emit(figures)


if __name__ == "__main__":
    main()
