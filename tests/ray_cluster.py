"""A real Ray head (``ray start --head``) for tests, stopped whatever happens.

``ray stop`` (and Ray's own ``AutoscalingCluster``, which calls ``ray stop --force``)
kills every Ray process on the machine, including the session's shared Ray. So the head
here runs ``--block`` in a session of its own, and teardown kills that process and its
descendants only (gcs, raylets of the head and of any fake autoscaled nodes, workers).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
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


def _kill_tree(proc: subprocess.Popen, marker: str) -> None:
    """Kill ``proc``, everything under it, and any process naming ``marker`` (the temp dir)."""
    victims = []
    try:
        root = psutil.Process(proc.pid)
        victims = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in (a or "") for a in p.info["cmdline"] or []):
                victims.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(victims, timeout=10)


@contextmanager
def ray_head(num_cpus: int = 2, autoscaling: dict | None = None, env: dict | None = None):
    """Start a head on 127.0.0.1; yields ``{"address", "dashboard", "temp_dir", "env"}``.

    ``autoscaling``: ``{"head": {...}, "workers": {...}}`` for the fake autoscaler. The
    venv's bin comes first on PATH (``ray start`` runs ``ray`` and Python from there).
    """
    port, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rp-head-", dir="/tmp")  # short: socket paths
    head_env = dict(os.environ if env is None else env)
    head_env["PATH"] = f"{VENV_BIN}{os.pathsep}{head_env.get('PATH', '')}"
    head_env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    head_env.pop("RAY_ADDRESS", None)
    cmd = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
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
        path = Path(temp_dir) / "autoscaling.json"
        path.write_text(json.dumps(config))
        cmd.append(f"--autoscaling-config={path}")
        head_env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        cmd, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"ray start exited {proc.returncode}: {(Path(temp_dir) / 'head.log').read_text()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", dash), timeout=1):
                    break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("the Ray head did not start within 90 s") from None
                time.sleep(0.5)
        job_env = dict(head_env)
        job_env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        yield {
            "address": f"127.0.0.1:{port}",
            "dashboard": f"http://127.0.0.1:{dash}",
            "temp_dir": temp_dir,
            "env": job_env,
        }
    finally:
        _kill_tree(proc, temp_dir)
        log.close()
