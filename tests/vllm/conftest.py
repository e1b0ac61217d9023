"""Tests of the ``vllm`` backend: they run in .venv-vllm (vLLM's CPU build), which
``./scripts/test`` builds on first use and runs them in after the main suite.

Every test here is marked ``vllm``; the main suite (in .venv, without vLLM) deselects
them with ``-m "not vllm"``. Run alone without vLLM installed they are skipped with a
line that says how to run them, except under ``RAYPIPE_REQUIRE_VLLM=1`` (what
scripts/test sets for its vLLM run), where a missing vLLM is a failure: CI must run them.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    have_vllm = importlib.util.find_spec("vllm") is not None
    required = os.environ.get("RAYPIPE_REQUIRE_VLLM") == "1"
    skip = pytest.mark.skip(
        reason="vLLM is not installed here: ./scripts/test runs these in .venv-vllm "
        "(scripts/bootstrap-vllm.sh builds it)"
    )
    for item in items:
        if HERE not in Path(item.fspath).parents:
            continue
        item.add_marker(pytest.mark.vllm)
        if not have_vllm:
            if required:
                raise pytest.UsageError(
                    "RAYPIPE_REQUIRE_VLLM=1 but vllm is not importable in "
                    f"{os.environ.get('VIRTUAL_ENV', 'this environment')}"
                )
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_vllm(tiny_dir):
    """Ray for the vLLM tests: 2 logical CPUs as on this machine, the engines, render
    actor and light stages reserving fractions of them (as the demo-vllm preset does)."""
    import ray

    # The key the real_llm tier's openai runs send to vLLM's server (which checks none):
    # actors read it from their node's environment, here the raylet's, so it is set first.
    from smollm2 import SERVER_KEY_ENV

    os.environ.setdefault(SERVER_KEY_ENV, "not-checked-by-vllms-server")
    if not ray.is_initialized():
        ray.init(
            # The pools, the task that cuts render batches, and each writer's Ray Data LLM
            # stage actor (1 CPU each: Ray Data's default, which it does not let us set).
            num_cpus=6,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=tempfile.mkdtemp(prefix="rp-vllm-", dir="/tmp"),
            runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}},
        )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
