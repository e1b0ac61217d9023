"""What the benchmarks share: the checkout on the import path, an offline environment,
a private Ray, and alternating timed passes.

Importing this module puts the repository (``raypipe``) and ``tests/`` (the fixture
writers and the loopback LLM server) on ``sys.path``, so a benchmark runs as
``python benchmarks/<name>.py`` from a checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
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


def ray_wanted(no_ray: bool) -> bool:
    """Whether the raypipe path runs on Ray: asked for, and Ray installed."""
    if no_ray:
        return False
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def start_ray(num_cpus: int, num_gpus: int | None = None) -> None:
    """A private local Ray (own temp folder, no dashboard, no progress bars); GPUs as Ray
    detects them unless ``num_gpus`` is given."""
    import ray

    ray.init(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=tempfile.mkdtemp(prefix="rp-bench-", dir="/tmp"),
    )
    ray.data.DataContext.get_current().enable_progress_bars = False


def alternate(bare: Callable[[], Any], pipeline: Callable[[int], Any], rounds: int):
    """Bare, then ``rounds`` times (pipeline, bare): every pipeline pass lies between two
    bare passes, so a change in the machine's load weighs on both sides alike. Returns
    (bare passes, pipeline passes); ``pipeline`` gets the pass number."""
    bare_passes, pipe_passes = [bare()], []
    for i in range(rounds):
        pipe_passes.append(pipeline(i))
        bare_passes.append(bare())
    return bare_passes, pipe_passes


def niceness(have_ray: bool) -> int | None:
    return int(os.environ["RAY_worker_niceness"]) if have_ray else None


def emit(result: dict) -> dict:
    """Print the benchmark's result as its last line, one JSON object."""
    print(json.dumps(result))
    return result
