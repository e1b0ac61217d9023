"""An LLM outage pauses the run; one that lasts ``llm.outage_stop_s`` stops it cleanly.

A row whose request failed as transient after its retries is handed back and made
again (raypipe.generate.planner), so a short outage costs time, never rows. While the
stream runs, :func:`watching_outages` asks the job's limiter every second how long the
endpoint has answered nothing while its requests failed as transient
(:meth:`raypipe.llm.limits.JobLimiter.llm_stats`). At ``llm.outage_stop_s`` it halts the
planner: rows in flight finish or are handed back, the writer flushes its parts, the
manifest is written with ``stopped: llm_outage`` and the job exits 75; the same command
resumes once the endpoint is back.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from raypipe.config import redact_url

log = logging.getLogger("raypipe.generate")

#: Reason a run halted for an outage stops with (the manifest's ``stopped``).
LLM_OUTAGE = "llm_outage"
#: How often the driver asks the limiter whether the endpoint is down.
POLL_S = 1.0


@contextlib.contextmanager
def watching_outages(limiter, planner, stop_s: float, run: dict[str, Any]):
    """While the block runs, halt ``planner`` once ``limiter`` reports an outage of
    ``stop_s`` seconds; what was seen goes to ``run["outage"]``. No limiter (the offline
    and vllm backends): nothing to watch."""
    if limiter is None:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        import ray

        while not done.wait(POLL_S):
            try:
                stats = limiter.llm_stats(timeout_s=10.0)
            except Exception as e:  # noqa: BLE001 - the limiter restarts; ask again
                log.warning("could not ask the job's LLM limiter for its stats: %r", e)
                continue
            if stats.get("outage_s", 0.0) >= stop_s:
                run["outage"] = {"seconds": stats["outage_s"], "last_error": stats["last_error"]}
                log.warning(
                    "the LLM endpoint answered nothing for %.0f s (last error: %s): "
                    "stopping the run cleanly",
                    stats["outage_s"],
                    stats["last_error"],
                )
                ray.get(planner.halt.remote(LLM_OUTAGE))
                return

    thread = threading.Thread(target=watch, name="raypipe-outage-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def outage_message(manifest: dict[str, Any], wanted: int) -> str:
    """What the job prints when the run stopped for an outage (exit 75)."""
    run = manifest["runs"][-1]
    outage = run.get("outage") or {}
    llm = manifest["config"]["llm"]
    endpoint = redact_url(llm.get("base_url") or "the provider's default endpoint")
    seconds = outage.get("seconds", llm["outage_stop_s"])
    return (
        f"raypipe: the LLM endpoint {endpoint} ({llm['model']}) answered nothing for "
        f"{seconds:.0f} s while its requests failed (last error: "
        f"{outage.get('last_error') or 'none reported'}), so the run stopped cleanly: "
        f"{manifest['counts']['accepted']} of {wanted} rows accepted, parts and manifest "
        "written, no row rejected for it. Run the same command again once the endpoint "
        "answers (answered requests come from OUT/cache at no cost), or raise "
        f"llm.outage_stop_s (now {llm['outage_stop_s']:g}) to wait longer."
    )
