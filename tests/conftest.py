"""Shared fixtures. One local Ray instance serves every test that asks for `ray_local`."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Tiny models for this test session, built once (see raypipe.testing)."""
    path = tmp_path_factory.mktemp("tiny")
    os.environ["RAYPIPE_TINY_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def ray_local(tiny_dir):
    """A local Ray shared by the whole session (start-up costs seconds).

    Depends on ``tiny_dir`` so its workers inherit RAYPIPE_TINY_DIR and load the tiny
    models the test process built, instead of building their own.
    """
    import ray

    if not ray.is_initialized():
        # Short temp dir: Ray's socket paths must stay under 108 characters.
        temp_dir = tempfile.mkdtemp(prefix="rp-ray-", dir="/tmp")
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=temp_dir,
            runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}},
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def llm_server():
    """Start loopback OpenAI-compatible servers: ``llm_server(**options) -> LLMServer``.

    Options as in ``tests/llm_server.py`` (latency, faults, responder, api_key, ...).
    Every server started stops when the test ends.
    """
    from llm_server import LLMServer

    started: list[LLMServer] = []

    def start(**options) -> LLMServer:
        options.setdefault("lifetime_s", 120.0)
        server = LLMServer(**options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
