"""An LLM outage pauses the run; one longer than ``llm.outage_stop_s`` stops it cleanly
(exit 75) and the same command then finishes exactly.

The real job (tiny SD on CPU) against the loopback OpenAI-compatible server, which
answers 503 to every request from its Nth on, for a window of time.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from llm_server import LLMServer  # noqa: E402
from test_generate import (  # noqa: E402
    _job_cmd,
    demo_config,
    read_data,
    read_rejects,
    template_responder,  # noqa: E402
)
from test_stream import openai_overrides  # noqa: E402

from raypipe.errors import EXIT_RESUMABLE  # noqa: E402
from raypipe.generate.pipeline import generate  # noqa: E402


class Outage:
    """``fault_fn`` of the loopback server: 503 for every chat request from the
    ``after + 1``-th one after :meth:`arm`, for ``window_s`` seconds (None: until
    :meth:`end`)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.after: int | None = None

    def arm(self, after: int, window_s: float | None) -> None:
        with self.lock:
            self.after, self.window_s, self.seen, self.began, self.failed = (
                after, window_s, 0, None, 0,
            )  # fmt: skip

    def end(self) -> None:
        with self.lock:
            self.after = None

    def __call__(self, digest: str, attempt: int, body: dict) -> str | None:
        with self.lock:
            if self.after is None:
                return None
            self.seen += 1
            if self.seen <= self.after:
                return None
            if self.began is None:
                self.began = time.monotonic()
            if self.window_s is not None and time.monotonic() - self.began > self.window_s:
                return None
            self.failed += 1
            return "503"


def _no_llm_error(out: Path) -> None:
    reasons = [f"{r['stage']}:{r['reason']}" for r in read_rejects(out)]
    assert not [r for r in reasons if "llm_error" in r or "llm_" in r], reasons


@pytest.mark.slow
def test_an_outage_pauses_the_run_and_a_longer_one_stops_it_for_the_same_command(
    ray_local, tiny_dir, tmp_path, capsys
):
    from raypipe.jobs import generate as generate_job

    outage = Outage()
    out = tmp_path / "out"
    with LLMServer(responder=template_responder(), fault_fn=outage, lifetime_s=600) as server:
        fast_retries = ["llm.max_attempts=2", "llm.backoff_initial_s=0.1", "llm.backoff_max_s=0.2"]
        base = openai_overrides(server, "abilities=[color,animal]", *fast_retries)

        # 1. 503s from the 40th request on, for 3 s, under llm.outage_stop_s=60: the run
        # waits the outage out and ends with every row, none rejected for it.
        outage.arm(after=40, window_s=3.0)
        first = generate(demo_config(*base, "num_samples=40", "llm.outage_stop_s=60"), str(out))
        assert outage.failed > 0  # the outage hit the run
        run = first["runs"][-1]
        assert run["llm_stats"]["failures"]["transient"] > 0 and run["requeued"] > 0
        assert first["stopped"] is None and first["counts"]["balanced"]
        assert len({r["id"] for r in read_data(out)}) == 40
        _no_llm_error(out)

        # 2. An outage from the 5th request of a larger run on, longer than
        # llm.outage_stop_s=4: the run stops cleanly with exit 75 and says why.
        outage.arm(after=5, window_s=None)
        cmd = _job_cmd(out, *base, "num_samples=60", "llm.outage_stop_s=4")[2:]
        assert generate_job.main(cmd) == EXIT_RESUMABLE
        err = capsys.readouterr().err
        assert f"LLM endpoint {server.url}" in err and "llm.outage_stop_s" in err, err
        assert "http_503" in err and "Run the same command again" in err, err
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["stopped"] == "llm_outage" and manifest["counts"]["balanced"]
        assert manifest["runs"][-1]["outage"]["seconds"] >= 4
        assert 40 <= len(read_data(out)) < 60
        assert not (out / "lease.json").exists()  # released: the same command needs no take-over
        _no_llm_error(out)

        # 3. The endpoint is back: the same command finishes exactly, paying for no
        # answer twice.
        outage.end()
        assert generate_job.main(cmd) == 0
        repeats = [h for h, n in server.answered_by_hash.items() if n > 1]
    rows = read_data(out)
    assert len(rows) == 60 and len({r["id"] for r in rows}) == 60
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stopped"] is None and manifest["counts"]["balanced"]
    _no_llm_error(out)
    assert repeats == []
