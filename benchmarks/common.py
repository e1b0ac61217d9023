"""What the benchmarks share: the checkout on the import path, an offline environment,
their options, a private Ray, alternating timed passes and the figures made of them, and
a class registry settled before tracemalloc starts.

Importing this module puts the repository (``raypipe``) and ``tests/`` (the fixture
writers and the loopback LLM server) on ``sys.path``, so a benchmark runs as
``python benchmarks/<name>.py`` from a checkout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def bench_env(ray_niceness: int | None = None) -> None:
    """No hub downloads, no Ray usage stats or token auth, quiet tokenizers; Ray's workers
    at ``ray_niceness`` (the environment's ``RAY_worker_niceness`` wins)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if ray_niceness is not None:
        os.environ.setdefault("RAY_worker_niceness", str(ray_niceness))


def bench_dir() -> Path:
    """Where the real-size models are kept between runs (building one takes longer than a
    benchmark run): ``$RAYPIPE_BENCH_DIR``, default the temp folder."""
    return Path(os.environ.get("RAYPIPE_BENCH_DIR", tempfile.gettempdir()))


def quiet_transformers() -> None:
    """No progress bars and only errors from transformers."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose ``--help`` shows the benchmark's docstring as written."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_pass_args(p: argparse.ArgumentParser, smoke: str, what: str) -> None:
    """The options of a benchmark that alternates a raypipe path with a bare loop."""
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    p.add_argument("--threads", type=int, help="CPU: torch threads per path (default 1)")
    p.add_argument("--rounds", type=int, default=2, help="pipeline passes (bare: one more)")
    p.add_argument("--no-ray", action="store_true", help=f"call the {what} in-process")
    p.add_argument(
        "--ray-niceness", type=int, default=0, help="niceness of Ray's workers (Ray's own: 15)"
    )
    p.add_argument("--smoke-test", action="store_true", help=smoke)


def torch_device(threads: int | None) -> tuple[str, int]:
    """(device, threads): cuda when torch sees a GPU, else cpu, where torch then runs
    ``threads`` threads (default 1)."""
    import torch

    from raypipe.models import resolve_device

    device, threads = resolve_device("auto"), threads or 1
    if device == "cpu":
        torch.set_num_threads(threads)
    return device, threads


def ray_wanted(no_ray: bool) -> bool:
    """Whether the raypipe path runs on Ray: asked for, and Ray installed."""
    if no_ray:
        return False
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def pipeline_name(have_ray: bool, no_ray: bool) -> str:
    """How the raypipe path ran: on Ray Data, or its stage called in-process."""
    if have_ray:
        return "ray-data"
    return "in-process" + ("" if no_ray else " (ray not installed)")


def start_ray(num_cpus: int, num_gpus: int | None = None) -> str:
    """A private local Ray (own temp folder, no dashboard, no progress bars); GPUs as Ray
    detects them unless ``num_gpus`` is given. Returns the temp folder."""
    import ray

    temp = tempfile.mkdtemp(prefix="rp-bench-", dir="/tmp")
    ray.init(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=temp,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    return temp


@contextlib.contextmanager
def ray_up(have_ray: bool, num_cpus: int, num_gpus: int | None = None) -> Iterator[None]:
    """:func:`start_ray` for the ``with`` block (when ``have_ray``), shut down after it."""
    if not have_ray:
        yield
        return
    import ray

    start_ray(num_cpus, num_gpus)
    try:
        yield
    finally:
        ray.shutdown()


def niceness(have_ray: bool) -> int | None:
    return int(os.environ["RAY_worker_niceness"]) if have_ray else None


def alternate(bare: Callable[[], Any], pipeline: Callable[[int], Any], rounds: int):
    """Bare, then ``rounds`` times (pipeline, bare): every pipeline pass lies between two
    bare passes, so a change in the machine's load weighs on both sides alike. Returns
    (bare passes, pipeline passes); ``pipeline`` gets the pass number."""
    bare_passes, pipe_passes = [bare()], []
    for i in range(rounds):
        pipe_passes.append(pipeline(i))
        bare_passes.append(bare())
    return bare_passes, pipe_passes


def timed_batches(run: Callable[[list], list], rows: list, size: int, device: str, finish=None):
    """A bare loop's pass: ``run`` on the first ``size`` rows (the warm-up, untimed), then
    on the others, ``size`` at a time, timed, and ``finish`` on their results inside the
    timed window. Returns (seconds, warm-up results, timed results)."""
    import torch

    warm = run(rows[:size])
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    done = []
    for start in range(size, len(rows), size):
        done += run(rows[start : start + size])
    if finish is not None:
        finish(done)
    return time.perf_counter() - t0, warm, done


def window(ends: list[float], closed_at: float) -> tuple[float, list[bool]]:
    """A pipeline pass's timed window, from the end of the stage's first call (the earliest
    of the rows' call ``ends``) to ``closed_at``, and which rows it holds (later calls')."""
    first = min(ends)
    return closed_at - first, [e > first for e in ends]


def pass_figures(unit: str, rate: str, pipe: list, bare: list, rounds: int):
    """The figures of :func:`alternate`'s passes, each pass a tuple (seconds, count, ...):
    each side's count, rate over all its passes (``pipeline_<rate>``, ``bare_<rate>``) and
    per pass (``*_by_pass``), and ratio = pipeline / bare. Returns (figures, the
    pipeline's rate, the bare loop's rate), the rates unrounded."""
    pipe_n, pipe_s = sum(p[1] for p in pipe), sum(p[0] for p in pipe)
    bare_n, bare_s = sum(p[1] for p in bare), sum(p[0] for p in bare)
    pipe_rate, bare_rate = pipe_n / pipe_s, bare_n / bare_s
    figures = {
        unit: pipe_n,
        f"bare_{unit}": bare_n,
        f"pipeline_{rate}": round(pipe_rate, 3),
        f"bare_{rate}": round(bare_rate, 3),
        "ratio": round(pipe_rate / bare_rate, 3),
        "rounds": rounds,
        f"pipeline_{rate}_by_pass": [round(p[1] / p[0], 3) for p in pipe],
        f"bare_{rate}_by_pass": [round(p[1] / p[0], 3) for p in bare],
    }
    return figures, pipe_rate, bare_rate


def run_settings(device: str, threads: int, have_ray: bool) -> dict:
    """The settings that close a passes benchmark's figures."""
    import torch

    return {
        "threads": threads if device == "cpu" else None,
        "ray_worker_niceness": niceness(have_ray),
        "torch": torch.__version__,
    }


def settle_type_registry(limit: int = 50_000) -> None:
    """Have the interpreter reallocate its registry of ``object``'s subclasses now, before
    tracemalloc starts, rather than during a traced job (where it shows as ~295 KB of new
    memory): classes made and freed until one creation allocates over 64 KB, which leaves
    ~6,000 creations of headroom (benchmarks/RESULTS.md, 2026-12-03)."""
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


def start_server(cmd: list[str], **popen_kw) -> tuple[subprocess.Popen, int]:
    """Start a loopback LLM server as ``cmd`` (one that prints ``PORT <n>`` first):
    (its process, its port)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, **popen_kw)
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"loopback server did not start: {line!r}")
    return proc, int(line.split()[1])


def last_json(out: str) -> dict | None:
    """The last line of ``out`` that is a JSON object, or None."""
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def run_json(cmd: list[str], timeout: float | None = None, **kw):
    """Run a benchmark (or one job of one) as ``cmd``: (exit code, stdout, stderr, the JSON
    object it printed last or None); exit code 124 if it ran past ``timeout`` seconds."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
        rc, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = 124, (e.stdout or b"").decode(errors="replace"), "timed out"
    return rc, out, err, last_json(out)


def emit(result: dict) -> dict:
    """Print the benchmark's result as its last line, one JSON object."""
    print(json.dumps(result))
    return result
