"""jobs/generate.py through a real `ray job submit`, as on a cluster made by cluster.yaml.

One local head (`ray start --head` on 127.0.0.1, its own temp dir and ports, the test's
virtual environment first on PATH, dashboard on 127.0.0.1) takes two jobs submitted with
`--working-dir .`: the demo preset with a small N, which must end SUCCEEDED with its rows
in OUT, and one with a mistyped override, which must end FAILED with the error (and its
suggestion) in `ray job logs`. The package Ray uploaded must leave out the virtual
environments and run outputs (.rayignore, .gitignore). The demo job sends its LLM requests
to a loopback server with an API key the head's node environment holds, as docs/cluster.md
has `ray start` export it: the key must appear in no job info, log or
file of OUT or of the head's session. The head is stopped whatever
happens, by killing exactly the processes it started: `ray stop` would stop every Ray
on the machine, including the session's shared one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ray_cluster import ray_head  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N = 13  # one row per ability
#: The node's API key: made here, so not even the uploaded tests/ folder holds it.
KEY_ENV = "RAYPIPE_SUBMIT_TEST_KEY"
SENTINEL = f"sk-submit-SENTINEL-{uuid.uuid4().hex}"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head():
    env = {k: v for k, v in os.environ.items() if k != "RAYPIPE_TINY_DIR"}  # runtime env's
    env.update(
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        # the jobs' drivers find the `raypipe` console script of this environment
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    # What cluster.yaml does with ~/.raypipe/env: `ray start` runs with the key exported.
    env[KEY_ENV] = SENTINEL
    with ray_head(num_cpus=4, env=env, cwd=REPO) as h:
        yield h


#: the two entry points a job may name: a checkout's script and the installed command
SCRIPT = ("python", "jobs/generate.py", "--config", "raypipe/configs/generate/demo.yaml")
COMMAND = ("raypipe", "generate", "--config", "demo")


def submit(
    head, submission_id: str, out: Path, tiny_dir: Path, *extra: str, wait=True, n=N,
    entry=SCRIPT,
):  # fmt: skip
    runtime_env = {"env_vars": {"RAYPIPE_TINY_DIR": str(tiny_dir)}}
    return head.ray(
        "job",
        "submit",
        f"--submission-id={submission_id}",
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps(runtime_env),
        *([] if wait else ["--no-wait"]),
        "--",
        *entry,
        "--out",
        str(out),
        "--num-samples",
        str(n),
        "render.width=32",
        "render.height=32",
        *extra,
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def jobs(head, tiny_dir, tmp_path_factory):
    """Both jobs, submitted to the one head: the bad one first (without waiting), then
    the good one (waiting for it), so they run side by side. The good one asks a
    loopback LLM server that takes only the node's key."""
    from llm_server import LLMServer
    from test_generate import template_responder

    tmp = tmp_path_factory.mktemp("jobs")
    server = LLMServer(responder=template_responder(), api_key=SENTINEL, lifetime_s=600).start()
    run = uuid.uuid4().hex[:8]
    # A run output in the checkout that must not travel with the jobs.
    made_out = not (REPO / "out").exists()
    marker = REPO / "out" / f"rp-job-submit-test-{run}"
    marker.mkdir(parents=True)
    (marker / "marker.txt").write_text("run output: must not be uploaded\n")
    try:
        bad_id, good_id = f"rp-bad-{run}", f"rp-good-{run}"
        bad = submit(
            head, bad_id, tmp / "bad", tiny_dir, "render.batchsize=3", wait=False, entry=COMMAND
        )
        assert bad.returncode == 0, bad.stdout + bad.stderr
        t = time.time()
        good = submit(
            head, good_id, tmp / "good", tiny_dir, "llm.backend=openai",
            f"llm.base_url={server.url}", f"llm.api_key_env={KEY_ENV}", "llm.model=test-model",
            "extra_keywords_per_ability=0",
        )  # fmt: skip
        print(f"good job: {time.time() - t:.1f} s")
    finally:
        server.stop()
        shutil.rmtree(marker, ignore_errors=True)
        if made_out:
            try:
                (REPO / "out").rmdir()  # only if still empty: others may write there too
            except OSError:
                pass
    return {
        "good": (good_id, good, tmp / "good"),
        "bad": (bad_id, bad, tmp / "bad"),
        "packages": head.packages(),
        "server": server,
    }


def test_demo_job_succeeds_and_writes_its_rows(head, jobs):
    job_id, res, out = jobs["good"]
    assert res.returncode == 0, (
        f"ray job submit failed:\n{res.stdout[-4000:]}\n{res.stderr[-3000:]}"
    )
    info = head.wait_job(job_id)
    assert info["status"] == "SUCCEEDED", info
    # The driver joined this head (the job's RAY_ADDRESS) rather than starting a Ray of
    # its own: the head recorded it as the job's driver.
    assert (info.get("driver_info") or {}).get("pid"), info
    assert f"wrote {N} rows" in res.stdout
    rows = pq.read_table(out / "data").to_pylist()
    assert len(rows) == N and len({r["id"] for r in rows}) == N
    assert len({r["ability"] for r in rows}) == N  # one per ability
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["accepted"] == N
    assert manifest["config"]["render"]["width"] == 32


def test_bad_override_fails_the_job_with_its_error_in_the_logs(head, jobs):
    # This job runs `raypipe generate --config demo` (the console script, a preset name).
    job_id, _, out = jobs["bad"]
    info = head.wait_job(job_id)
    assert info["status"] == "FAILED", info
    status = head.ray("job", "status", job_id, timeout_s=60)
    assert f"Job '{job_id}' failed" in status.stdout + status.stderr, status.stdout[-2000:]
    assert "exit code 2" in status.stdout  # raypipe's exit status for a user error
    logs = head.ray("job", "logs", job_id, timeout_s=60)
    assert logs.returncode == 0, logs.stderr
    assert "render.batchsize" in logs.stdout, logs.stdout[-3000:]
    assert "did you mean render.batch_size?" in logs.stdout, logs.stdout[-3000:]
    assert not (out / "data").exists(), "a job refused at its config wrote data"


def test_uploaded_package_leaves_out_environments_and_run_outputs(jobs):
    packages = jobs["packages"]
    assert packages, "no working-dir package found under the head's temp dir"
    for pkg in packages:
        top = {p.name for p in pkg.iterdir()}
        assert {"raypipe", "jobs", "pyproject.toml"} <= top, top
        assert (pkg / "raypipe" / "configs" / "generate" / "demo.yaml").is_file()
        leaked = sorted(
            n for n in top if n.startswith((".venv", "venv", ".git")) and n != ".gitignore"
        )
        # (Ray may keep an ignored folder as an empty entry; what matters is its files.)
        leaked += [
            n
            for n in ("out", "runs", ".whl", ".gpu")
            if any(p.is_file() for p in pkg.glob(f"{n}/**/*"))
        ]
        assert not leaked, f"uploaded with the job: {leaked}"
        assert not list(pkg.rglob("*.egg-info"))
        size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
        assert size < 20 * 2**20, f"package of {size / 2**20:.1f} MiB: something large travels"


def test_the_node_key_reaches_the_llm_but_no_job_info_log_or_file(head, jobs):
    job_id, res, out = jobs["good"]
    server = jobs["server"]
    assert res.returncode == 0, f"{res.stdout[-4000:]}\n{res.stderr[-3000:]}"
    assert head.wait_job(job_id)["status"] == "SUCCEEDED"
    # The key was used: every request the server saw carried it, and none was refused.
    chats = [ev for ev in server.events if ev.hash]
    assert chats and server.unauthorized == 0
    assert {ev.authorization for ev in chats} == {f"Bearer {SENTINEL}"}
    assert len(pq.read_table(out / "data")) == N

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.dashboard)
    seen = {
        "ray job submit": res.stdout + res.stderr,
        "job info": client.get_job_info(job_id).model_dump_json(),
        "job list": json.dumps([j.model_dump() for j in client.list_jobs()], default=str),
        "ray job list": head.ray("job", "list", timeout_s=60).stdout,
        "ray job logs": client.get_job_logs(job_id),
        "ray list actors": head.ray("list", "actors", "--detail", timeout_s=60).stdout,
    }
    assert f"wrote {N} rows" in seen["ray job logs"]  # the logs were read
    for where, text in seen.items():
        assert SENTINEL not in text, where
    files = [p for root in (out, head.temp_dir) for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in files)
    assert any(p.suffix == ".log" for p in files)  # the session's logs
    leaked = [str(p) for p in files if SENTINEL.encode() in p.read_bytes()]
    assert not leaked, leaked
