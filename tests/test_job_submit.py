"""jobs/generate.py through a real `ray job submit`, as on a cluster made by cluster.yaml.

One local head (`ray start --head` on 127.0.0.1, its own temp dir and ports, the test's
virtual environment first on PATH, dashboard on 127.0.0.1) takes two jobs submitted with
`--working-dir .`: the demo preset with a small N, which must end SUCCEEDED with its rows
in OUT, and one with a mistyped override, which must end FAILED with the error (and its
suggestion) in `ray job logs`. The package Ray uploaded must leave out the virtual
environments and run outputs (.rayignore, .gitignore). The head is stopped whatever
happens, by killing exactly the processes it started: `ray stop` would stop every Ray
on the machine, including the session's shared one.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv the tests run in: `python` of the jobs
N = 13  # one row per ability

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Head:
    """A Ray head started with `ray start --head --block` in its own session."""

    def __init__(self, tiny_dir: Path) -> None:
        # Short temp dir: Ray's socket paths must stay under 108 characters.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rpj-", dir="/tmp"))
        self.dashboard_port = free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            RAY_DATA_DISABLE_PROGRESS_BARS="1",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONUNBUFFERED="1",
        )
        env.pop("RAYPIPE_TINY_DIR", None)  # the jobs get it from their runtime env
        self.env = env
        self.log = self.temp_dir / "head.log"
        cmd = [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            "--num-cpus=2",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
        ]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                self.api("/api/version")
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(
            f"the head's dashboard did not answer in {timeout_s:.0f} s:\n{self.tail()}"
        )

    def api(self, path: str) -> dict:
        with urllib.request.urlopen(self.address + path, timeout=5) as r:
            return json.loads(r.read())

    def job(self, submission_id: str) -> dict:
        return self.api(f"/api/jobs/{submission_id}")

    def wait_job(self, submission_id: str, timeout_s: float = 300.0) -> dict:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            info = self.job(submission_id)
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {submission_id} still {info['status']} after {timeout_s:.0f} s")

    def ray(self, *args: str, timeout_s: float = 300.0) -> subprocess.CompletedProcess:
        """The `ray` command line, pointed at this head."""
        return subprocess.run(
            [str(BIN / "ray"), *args],
            env={**self.env, "RAY_ADDRESS": self.address},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def packages(self) -> list[Path]:
        """The working-dir packages the head unpacked for its jobs."""
        found = self.temp_dir.glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
        return sorted(p for p in found if p.is_dir())

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text()[-n:] if self.log.exists() else ""

    def stop(self) -> None:
        """Kill every process of this head and nothing else: its session (the daemons and
        workers that `ray start` spawned) and any job driver (own session, cwd in our
        temp dir)."""
        import psutil

        mine = []
        for p in psutil.process_iter():
            try:
                if p.pid == os.getpid():
                    continue
                if os.getsid(p.pid) == self.proc.pid or str(p.cwd()).startswith(str(self.temp_dir)):
                    mine.append(p)
            except (psutil.Error, OSError):
                continue
        for p in mine:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(mine, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=5)
        self.proc.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head(tiny_dir):
    h = Head(tiny_dir)
    try:
        h.wait_ready()
        yield h
    finally:
        h.stop()


def submit(head: Head, submission_id: str, out: Path, tiny_dir: Path, *extra: str, wait=True):
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
        "python",
        "jobs/generate.py",
        "--config",
        "jobs/configs/demo.yaml",
        "--out",
        str(out),
        "--num-samples",
        str(N),
        "render.width=32",
        "render.height=32",
        *extra,
    )


@pytest.fixture(scope="module")
def jobs(head, tiny_dir, tmp_path_factory):
    """Both jobs, submitted to the one head: the bad one first (without waiting), then
    the good one (waiting for it), so they run side by side."""
    tmp = tmp_path_factory.mktemp("jobs")
    run = uuid.uuid4().hex[:8]
    # A run output in the checkout that must not travel with the jobs.
    made_out = not (REPO / "out").exists()
    marker = REPO / "out" / f"rp-job-submit-test-{run}"
    marker.mkdir(parents=True)
    (marker / "marker.txt").write_text("run output: must not be uploaded\n")
    try:
        bad_id, good_id = f"rp-bad-{run}", f"rp-good-{run}"
        bad = submit(head, bad_id, tmp / "bad", tiny_dir, "render.batchsize=3", wait=False)
        assert bad.returncode == 0, bad.stdout + bad.stderr
        t = time.time()
        good = submit(head, good_id, tmp / "good", tiny_dir)
        print(f"good job: {time.time() - t:.1f} s")
    finally:
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
        assert (pkg / "jobs" / "configs" / "demo.yaml").is_file()
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
