"""The base of the LLM writing stages, and what they share: seeds, usage, fatal stops.

Each stage builds its LLM backend once in ``__init__`` and is a pure
``__call__(batch: pyarrow.Table) -> pyarrow.Table`` over work rows (raypipe.schema).
A request whose answer cannot be used (cut at max_tokens, refused, or text that does
not parse) rejects the rows it was for, with the reason and the raw text; nothing is
dropped silently. A request that failed as transient after its retries (an outage, not
the row's content) hands its rows back unmade (stage ``unmade``, reason
``llm_transient``): the planner plans them again, and the run stops cleanly when the
endpoint stays down for ``llm.outage_stop_s``. The stages:
:mod:`raypipe.generate.prompts` and :mod:`raypipe.generate.dialogues`; the keyword banks
(:mod:`raypipe.generate.keywords`) are written on the driver.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

from raypipe.abilities import load_catalog
from raypipe.llm import make_backend, tasks
from raypipe.llm.base import LLMRequest, LLMResult
from raypipe.llm.config import LLMConfig
from raypipe.llm.failures import FATAL, TRANSIENT, LLMFatalError, fatal_message
from raypipe.schema import is_rejected, reject
from raypipe.stage import Stage

#: Stage of rows handed back unmade: the run was halted (``max_usd``, ``llm_outage``), or
#: their request failed as transient (see raypipe.generate.planner).
UNMADE = "unmade"
#: Reason of a row handed back after a transient failure (the planner makes it again).
TRANSIENT_REASON = "llm_transient"


def stable_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts (LLM APIs take small ints)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "big") >> 1


def usage_meta(result: LLMResult, share: int = 1) -> dict[str, Any]:
    """A request's tokens and cost, split over the ``share`` rows it served in this call.

    ``prompt_tokens``, ``completion_tokens`` and ``cost_usd`` are what was paid; an answer
    served from the cache (or by an identical request in flight) pays nothing and
    counts what it served as ``cached_*``.
    """
    return {
        "prompt_tokens": result.prompt_tokens / share,
        "completion_tokens": result.completion_tokens / share,
        "cost_usd": result.cost_usd / share,
        "cached_prompt_tokens": result.cached_prompt_tokens / share,
        "cached_completion_tokens": result.cached_completion_tokens / share,
        "cached": result.cached,
        "attempts": result.attempts,
        "latency_s": result.latency_s,
    }


def add_usage(row: dict[str, Any], stage: str, usage: dict[str, Any]) -> None:
    meta = json.loads(row["meta"]) if row.get("meta") else {}
    llm = meta.setdefault("llm", {})
    llm[stage] = usage
    row["meta"] = json.dumps(meta, sort_keys=True)


def stop_if_fatal(results: list[LLMResult], backend=None) -> None:
    """A fatal failure (the endpoint refused the key, the model, a parameter) stops the
    run at once, with the server's message, instead of rejecting rows one by one. The
    job's limiter hears of it first (the driver reads the message there: Ray Data does
    not carry an actor's exception type back)."""
    for res in results:
        if res.failure == FATAL:
            if hasattr(backend, "flush_reports"):
                backend.flush_reports()
            raise LLMFatalError(fatal_message(res.error or "no message"))


class LLMStage(Stage):
    """Base of the LLM writing stages: the backend and catalog, built once per actor.

    The backend reads the API key on the actor's node (``llm.api_key_env`` or
    ``llm.api_key_file``): it is never an argument. ``limiter`` is the job-wide limiter
    shared by every LLM client of the run; ``planner`` the run's planner, told what each
    batch paid (for ``max_usd``); ``lease`` the run's LeaseToken, which fences the
    answers it stores in OUT/cache.
    """

    def __init__(
        self,
        llm: dict,
        cache_dir: str | None,
        catalog_dirs: list[str],
        run_seed: int,
        limiter=None,
        planner=None,
        lease=None,
    ):
        self.cfg = LLMConfig.model_validate(llm)
        self.catalog = load_catalog(catalog_dirs or None)
        self.backend = make_backend(self.cfg, cache_dir, self.catalog, limiter=limiter)
        cache = getattr(self.backend, "cache", None)
        if cache is not None and lease is not None:  # answers stored only while the run
            cache.fence = lease.check  # holds OUT (``lease``: its LeaseToken)
        self.run_seed = run_seed
        self.planner = planner

    # A writing stage is two halves: ``prepare`` (rows -> one request per row, or None for
    # a row that needs none) and ``finish`` (rows, requests, results -> output table).
    # ``process`` joins them through ``self.backend``; the ``vllm`` backend runs them as
    # two stages with the Ray Data LLM engine between (raypipe.generate.engine).

    def prepare(self, rows: list[dict[str, Any]]) -> list[LLMRequest | None]:
        raise NotImplementedError  # pragma: no cover - abstract

    def finish(
        self,
        rows: list[dict[str, Any]],
        requests: list[LLMRequest | None],
        results: list[LLMResult | None],
    ) -> pa.Table:
        raise NotImplementedError  # pragma: no cover - abstract

    def process(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        requests = self.prepare(rows)
        answers = iter(self.complete([r for r in requests if r is not None]))
        return self.finish(rows, requests, [None if r is None else next(answers) for r in requests])

    def request(self, req: LLMRequest) -> LLMRequest:
        """``req`` as this run sends it: its completion limit capped by ``llm.max_tokens``,
        with its JSON schema under ``llm.structured_output`` (:func:`tasks.for_run`)."""
        return tasks.for_run(req, self.cfg)

    @staticmethod
    def hand_back(row: dict[str, Any], res: LLMResult | None) -> bool:
        """Hand ``row`` back unmade if ``res`` failed as transient (True if it did)."""
        if res is None or res.failure != TRANSIENT:
            return False
        reject(row, UNMADE, TRANSIENT_REASON, res.error or "")
        return True

    @staticmethod
    def failure(res: LLMResult) -> str | None:
        """Why ``res`` cannot be used at all (failed, or cut at max_tokens), else None."""
        if not res.ok:
            return f"llm_error:{res.error}"
        if res.finish_reason == "length":
            return "max_tokens"
        return None

    def writable(self, rows: list[dict[str, Any]]) -> list[bool]:
        """Which rows to write: not yet rejected; once the run is halted none (they are
        handed back unmade, in place)."""
        todo = [not is_rejected(r) for r in rows]
        stop = self.stop_reason() if any(todo) else None
        if stop:
            for r, t in zip(rows, todo):
                if t:
                    reject(r, UNMADE, stop, "")
            todo = [False] * len(rows)
        return todo

    def stop_reason(self) -> str | None:
        """Why the run was halted (``max_usd``, ``llm_outage``: rows are then handed back
        unmade), else None."""
        if self.planner is None:
            return None
        import ray

        return ray.get(self.planner.stop_reason.remote())

    def complete(self, requests: list) -> list[LLMResult]:
        """Answer ``requests``; tell the planner what they paid."""
        results = self.backend.complete_batch(requests) if requests else []
        stop_if_fatal(results, self.backend)
        paid = sum(r.cost_usd for r in results)
        if self.planner is not None and paid:
            import ray

            ray.get(self.planner.spend.remote(paid))
        return results
