"""A real Ray head (``ray start --head``) for tests, stopped whatever happens.

    with ray_head(num_cpus=2) as head:            # or ray_head(autoscaling={...})
        subprocess.run([...], env=head.env)        # a driver that joins this head
        head.ray("job", "submit", ...)             # the `ray` command, pointed at it

``ray stop`` (and Ray's own ``AutoscalingCluster``, which calls ``ray stop --force``)
kills every Ray process on the machine, including the session's shared Ray. So the head
here runs ``--block`` in a session of its own, with its own temp dir and ports, and
teardown kills exactly its processes: ``ray start`` and its descendants (gcs, raylets of
the head and of any fake autoscaled nodes, workers), whatever runs in its session, and
whatever names or runs in its temp dir (job drivers, which Ray starts in sessions of
their own with their working dir there).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import psutil

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_autoscaling_config(port: int, head: dict, worker_types: dict) -> dict:
    """An autoscaling config for Ray's fake multi-node provider (nodes are local raylets)."""
    node_types = {"ray.head.default": {"resources": head, "node_config": {}, "max_workers": 0}}
    node_types.update(worker_types)
    return {
        "cluster_name": "raypipe-fake",
        "max_workers": sum(t.get("max_workers", 0) for t in worker_types.values()),
        "upscaling_speed": 2.0,
        "idle_timeout_minutes": 5,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{port}",
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": node_types,
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class Head:
    """A head on 127.0.0.1 (see the module docstring); :func:`ray_head` starts and stops it.

    ``address``: the GCS address; ``dashboard``: the dashboard's URL (the Jobs API);
    ``env``: the environment a driver or `ray` command joining the head runs with (the
    venv's bin first on PATH, ``RAY_ADDRESS`` set).
    """

    def __init__(self, num_cpus: int = 2, autoscaling: dict | None = None,
                 env: dict | None = None, cwd: Path | None = None) -> None:  # fmt: skip
        port, dash = free_port(), free_port()
        # Short: Ray's socket paths must stay under 108 characters.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rp-head-", dir="/tmp"))
        self.address = f"127.0.0.1:{port}"
        self.dashboard = f"http://127.0.0.1:{dash}"
        head_env = {
            k: v for k, v in (os.environ if env is None else env).items()
            if not k.startswith("RAY_ADDRESS")
        }  # fmt: skip
        head_env["PATH"] = f"{VENV_BIN}{os.pathsep}{head_env.get('PATH', '')}"
        head_env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        cmd = [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            f"--temp-dir={self.temp_dir}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            # Their defaults collide between two heads on one machine.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            "--disable-usage-stats",
        ]
        if autoscaling is not None:
            config = fake_autoscaling_config(
                port, {"CPU": num_cpus, **autoscaling.get("head", {})}, autoscaling["workers"]
            )
            path = self.temp_dir / "autoscaling.json"
            path.write_text(json.dumps(config))
            cmd.append(f"--autoscaling-config={path}")
            head_env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        self.env = {**head_env, "RAY_ADDRESS": self.address}
        self.log = self.temp_dir / "head.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                cmd, env=head_env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def __getitem__(self, key: str):  # head["env"], head["address"], ...
        return getattr(self, key)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until the dashboard answers its version (the Jobs API is up)."""
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
        with urllib.request.urlopen(self.dashboard + path, timeout=5) as r:
            return json.loads(r.read())

    def wait_job(self, submission_id: str, timeout_s: float = 300.0) -> dict:
        deadline = time.time() + timeout_s
        while True:
            info = self.api(f"/api/jobs/{submission_id}")
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                return info
            if time.time() > deadline:
                raise TimeoutError(
                    f"job {submission_id} still {info['status']} after {timeout_s:.0f} s"
                )
            time.sleep(0.5)

    def ray(self, *args: str, cwd: Path | None = None,
            timeout_s: float = 300.0) -> subprocess.CompletedProcess:  # fmt: skip
        """The `ray` command line, pointed at this head's dashboard (the Jobs API)."""
        return subprocess.run(
            [str(VENV_BIN / "ray"), *args],
            env={**self.env, "RAY_ADDRESS": self.dashboard},
            cwd=cwd,
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
        """Kill this head's processes and nothing else (see the module docstring)."""
        marker = str(self.temp_dir)
        victims = {}
        try:
            root = psutil.Process(self.proc.pid)
            victims = {p.pid: p for p in (root, *root.children(recursive=True))}
        except psutil.NoSuchProcess:
            pass
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid == os.getpid() or p.pid in victims:
                    continue
                if (
                    os.getsid(p.pid) == self.proc.pid
                    or any(marker in (a or "") for a in p.info["cmdline"] or [])
                    or p.cwd().startswith(marker)
                ):
                    victims[p.pid] = p
            except (psutil.Error, OSError):
                continue
        for p in victims.values():
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(list(victims.values()), timeout=10)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@contextmanager
def ray_head(num_cpus: int = 2, autoscaling: dict | None = None, env: dict | None = None,
             cwd: Path | None = None):  # fmt: skip
    """Start a :class:`Head` and wait for it; stop it whatever happens.

    ``autoscaling``: ``{"head": {...}, "workers": {...}}`` for Ray's fake autoscaler
    (node types as in an autoscaling config); ``env``: the head's environment (default
    this process's).
    """
    head = Head(num_cpus=num_cpus, autoscaling=autoscaling, env=env, cwd=cwd)
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()
