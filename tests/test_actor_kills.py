"""Each stateful actor of a run, killed once mid-run (SIGKILL to its worker, as a
crash or an OOM kill does), triggered by a count of rows the run wrote to OUT.

The planner, the writer and the prompt dedup actor hold what cannot be rebuilt mid-run
(rows in flight, buffered or waiting for lower indices): the run stops at once with exit
75. Ray restarts the job's limiter, the LLM clients and the render actor, and the run
goes on. After each kill, the run plus at most one re-run of the same command ends with
exactly N unique rows, balanced, and no answer the runs stored was requested again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from llm_server import LLMServer  # noqa: E402
from test_generate import (  # noqa: E402
    _job_cmd,
    _job_env,
    read_data,
    read_rejects,
    template_responder,
)
from test_stream import openai_overrides  # noqa: E402

from raypipe.errors import EXIT_RESUMABLE  # noqa: E402

N = 30


def ray_worker(name: str) -> int | None:
    """The pid of the youngest worker of this session's Ray (its raylet is a child of
    this process) whose process title names ``name``; another Ray's are left alone."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            title = " ".join(p.cmdline())
            if title.startswith("ray::") and name in title:
                found.append((-p.create_time(), p.pid))
        except psutil.Error:  # ended meanwhile
            continue
    return min(found)[1] if found else None


def rows_in(out: Path) -> int:
    """Rows in OUT/data's published parts."""
    import pyarrow.parquet as pq

    n = 0
    for part in (out / "data").glob("part-*.parquet"):
        try:
            n += pq.read_metadata(part).num_rows
        except OSError:  # replaced meanwhile
            pass
    return n


class Killer(threading.Thread):
    """Kills each named worker once the run has written ``after`` more rows to OUT (or
    once ``after()`` is true)."""

    def __init__(self, server: LLMServer, out: Path, plan: list[tuple[str, Any]]):
        super().__init__(daemon=True)
        self.server, self.out, self.plan = server, out, plan
        self.base = rows_in(out)
        self.killed: list[str] = []
        self.rows_at_kill: list[int] = []
        self.kill_times: list[float] = []  # time.monotonic() of each kill
        self.in_flight: set[str] = set()  # answered to a worker that died: asked again
        self.stop = threading.Event()

    def due(self, after) -> bool:
        """``after``: rows written to OUT since the start, or a condition to wait for."""
        return after() if callable(after) else rows_in(self.out) - self.base >= after

    def run(self) -> None:
        for name, after in self.plan:
            while not self.due(after):
                if self.stop.wait(0.1):
                    return
            pid = None
            while pid is None and not self.stop.wait(0.05):
                pid = ray_worker(name)
            if pid is None:
                return
            self.in_flight |= self.server.in_flight_now(answered_within_s=2.0)
            os.kill(pid, signal.SIGKILL)
            self.killed.append(name)
            self.rows_at_kill.append(rows_in(self.out))
            self.kill_times.append(time.monotonic())
            time.sleep(0.5)
            self.in_flight |= self.server.in_flight_now(answered_within_s=2.0)


def wait_quiet(server: LLMServer, quiet_s: float = 2.0, timeout_s: float = 60.0) -> None:
    """Until no request is in flight and none has arrived for ``quiet_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        last = server.events[-1].time if server.events else 0.0
        if not server.in_flight_now() and time.monotonic() - last >= quiet_s:
            return
        time.sleep(0.1)
    raise AssertionError(f"the stopped run's actors still send requests after {timeout_s} s")


def run_killing(server, out, cmd, plan) -> tuple[int, Killer]:
    from raypipe.jobs import generate as generate_job

    killer = Killer(server, out, plan)
    killer.start()
    try:
        rc = generate_job.main(cmd)
    finally:
        killer.stop.set()
        killer.join()
    return rc, killer


def exact(out: Path, n: int) -> None:
    import json

    ids = [r["id"] for r in read_data(out)]
    assert len(ids) == n and len(set(ids)) == n
    assert not {r["id"] for r in read_rejects(out)} & set(ids)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["balanced"] and manifest["stopped"] is None


@pytest.mark.slow
def test_a_killed_actor_stops_the_run_or_heals_and_the_same_command_ends_exact(
    ray_local, tiny_dir, tmp_path, capsys
):
    """One OUT; each step asks for more rows (an operational change) and kills one
    actor of that run after its first row in OUT (the heal step: three, two rows apart).
    The dedup actor is killed once its step's first prompt answers are in: it ends with
    the read tasks, which may be before the first row reaches OUT."""
    from raypipe.jobs import generate as generate_job

    out = tmp_path / "out"
    with LLMServer(responder=template_responder(), latency_s=1.0, lifetime_s=600) as server:
        base = openai_overrides(
            server,
            "abilities=[color,animal]",
            "llm.concurrency=1",
            "llm_batch_chunks=1",
            # Rows reach OUT in waves a dialogue block apart (5 answers, 5 s), not as one
            # burst of 8 at the end: a kill after the first row lands well before the end.
            "render.batch_size=2",
        )
        allowed: set[str] = set()  # answered to a worker as it died: asked again
        steps = [
            # What holds state that is lost: the run stops at once (exit 75), except when
            # the dedup actor held no row as it died (then the retried block is decided
            # as before and the run goes on).
            (10, ["DedupStage"], "prompt dedup actor was restarted"),
            (20, ["PartWriter"], "writer actor died"),
            # What Ray restarts: the run goes on.
            (40, ["JobLimiter", "MapBatches(DialogueWriter)", "MapBatches(Render"], None),
            # Last: its re-run is a job of its own (a new driver, as the command is).
            (50, ["Planner"], "planner actor died"),
        ]
        for n, names, says in steps:
            full = _job_cmd(out, *base, f"num_samples={n}", "part_max_rows=2", "part_max_seconds=1")
            cmd = full[2:]  # from --config on: the job's main() in this process
            plan = [(m, 1 + 2 * k) for k, m in enumerate(names)]
            if names == ["DedupStage"]:
                asked = len(server.answered_by_hash)
                plan = [("DedupStage", lambda asked=asked: len(server.answered_by_hash) > asked)]
            rc, killer = run_killing(server, out, cmd, plan)
            err = capsys.readouterr().err
            assert killer.killed == names, (names, killer.rows_at_kill, err[-2000:])
            assert max(killer.rows_at_kill) < n  # each kill landed before the run's end
            allowed |= killer.in_flight
            if rc == EXIT_RESUMABLE:
                # The run stopped; Ray Data releases its LLM actors without killing them,
                # so they finish the block in hand. What they are answered after the kill
                # is refused by the lease fence (never stored) and asked again.
                wait_quiet(server)
                since_kill = time.monotonic() - killer.kill_times[0] + 2.0
                allowed |= server.in_flight_now(answered_within_s=since_kill)
            if says is None or (names == ["DedupStage"] and rc == 0):
                assert rc == 0, err[-2000:]
            else:
                assert rc == EXIT_RESUMABLE and says in err and "same command" in err, err[-2000:]
                if names == ["Planner"]:
                    job = subprocess.run(
                        full, env=_job_env(tiny_dir), capture_output=True, text=True, timeout=400
                    )
                    assert job.returncode == 0, job.stderr[-2000:]
                else:
                    assert generate_job.main(cmd) == 0  # the same command, once
            exact(out, n)
        repeated = {d for d, k in server.answered_by_hash.items() if k > 1}
    # Only answers that reached a worker as it was killed (never stored) were asked again.
    assert repeated <= allowed, len(repeated - allowed)
