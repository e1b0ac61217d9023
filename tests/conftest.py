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
# Fake AWS credentials for the s3_server fixture, set before any Ray worker starts so
# workers inherit them; they never reach anything but the loopback S3 server.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


#: Fixtures that make a test an integration test: Ray, servers, subprocess jobs.
INTEGRATION_FIXTURES = frozenset(
    {"ray_local", "ray_vllm", "s3_server", "llm_server", "head", "jobs"}
)


def pytest_collection_modifyitems(config, items):
    """Mark each test that uses Ray, a server or a subprocess job ``integration``;
    the rest are unit tests (``-m "not integration"`` runs them in about a minute)."""
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & INTEGRATION_FIXTURES or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Tiny models for this test session, built once (see raypipe.tiny)."""
    path = tmp_path_factory.mktemp("tiny")
    os.environ["RAYPIPE_TINY_DIR"] = str(path)
    return path


#: API key variables (and values) the tests' LLM actors find on the session's Ray node.
NODE_KEYS = {
    "RAYPIPE_TEST_KEY": "sk-test-sentinel-0123456789",
    "RAYPIPE_STREAM_TEST_KEY": "sk-stream-test-0123456789",
    "RAYPIPE_CONTRACT_TEST_KEY": "sk-contract-SENTINEL-5b1f0c",
    "RAYPIPE_OUT_TEST_KEY": "sk-raypipe_out_test_key",  # tests/test_out_folder.py
    "RAYPIPE_OUT_SECOND_KEY": "sk-raypipe_out_second_key",
}


@pytest.fixture(scope="session")
def ray_local(tiny_dir):
    """A local Ray shared by the whole session (start-up costs seconds).

    Depends on ``tiny_dir`` so its workers inherit RAYPIPE_TINY_DIR and load the tiny
    models the test process built, instead of building their own.
    """
    import ray

    if not ray.is_initialized():
        # The loopback servers' API keys live in the nodes' environment, as a cluster's
        # do: LLM actors read the key where they run; it never travels as an argument.
        os.environ.update(NODE_KEYS)
        # Short temp dir: Ray's socket paths must stay under 108 characters.
        temp_dir = tempfile.mkdtemp(prefix="rp-ray-", dir="/tmp")
        # 4 logical CPUs on a 2-core machine: a run's pools and the one-CPU task that
        # cuts render batches (raypipe.generate.pipeline.local_cpus), as a job's own
        # local Ray gets.
        ray.init(
            num_cpus=4,
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


class S3Endpoint:
    """A loopback S3 server (moto) for tests: its address, a filesystem and URIs on it."""

    region = "us-east-1"

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint  # "127.0.0.1:PORT"

    def filesystem(self):
        """A ``pyarrow.fs.S3FileSystem`` on this server (it may create buckets)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            endpoint_override=self.endpoint,
            scheme="http",
            access_key="test",
            secret_key="test",
            region=self.region,
            allow_bucket_creation=True,
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no error if it exists); returns the name."""
        self.filesystem().create_dir(name)
        return name

    def uri(self, bucket: str, path: str = "") -> str:
        """``s3://bucket/path?endpoint_override=...``: what ``FileSystem.from_uri`` opens.

        The keys come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (set above, and
        inherited by Ray workers); pyarrow's S3 URIs take no keys in the query.
        """
        where = f"{bucket}/{path.strip('/')}".rstrip("/")
        return f"s3://{where}?endpoint_override={self.endpoint}&scheme=http&region={self.region}"

    def __repr__(self) -> str:
        return f"S3Endpoint({self.endpoint!r})"


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP endpoint on 127.0.0.1 (moto), shared by the session.

    Creates no bucket: call ``s3_server.make_bucket(name)`` (use names unique to your
    test). See :class:`S3Endpoint` for ``.endpoint``, ``.filesystem()`` and ``.uri()``.
    """
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 call otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield S3Endpoint(f"{host}:{port}")
    server.stop()
