"""SD prompt writing (paper section 4.1): an actor pool of LLM clients, k prompts per
request; then the prompts' dedup (:class:`DedupStage`), one actor that releases rows as
the planner decides which repeat an earlier prompt."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from raypipe.generate.llm_stage import (
    UNMADE,
    LLMStage,
    add_usage,
    stable_seed,
    usage_meta,
)
from raypipe.llm import tasks
from raypipe.llm.base import LLMRequest
from raypipe.llm.failures import TRANSIENT
from raypipe.llm.tasks import (
    parse_prompts,
    prompt_request,
)
from raypipe.matching import emphasized_keywords
from raypipe.schema import is_rejected, reject, row_seed, rows_to_table
from raypipe.stage import Stage


class PromptWriter(LLMStage):
    """Writes one SD prompt per planned row, k rows per LLM request.

    Input: one item per request chunk: ``ability``, ``chunk``, ``indices`` (the rows of the
    chunk to make now), ``chunk_keywords`` (all k keywords of the chunk, so the request
    is identical whichever of its rows are asked for: later rows of the chunk and
    re-runs hit the cache), ``ids``.
    Output: work rows (raypipe.schema.WORK_SCHEMA) with id, ability, index, seed,
    keywords, prompt, negative_prompt, llm_model and meta filled, or rejected with
    stage ``prompts``. Positions of the answer that failed are *burned* with the planner,
    so no replacement row is ever planned onto an answer that already failed. A request
    counts its whole cost against the rows it served in this call.
    """

    INPUT_COLUMNS = ("ability", "chunk", "indices", "ids", "chunk_keywords")
    OUTPUT_COLUMNS = (
        "id",
        "ability",
        "index",
        "seed",
        "keywords",
        "prompt",
        "negative_prompt",
        "llm_model",
        "meta",
    )

    def __init__(self, *, negative_prompt: str, **llm_stage_kwargs: Any):
        super().__init__(**llm_stage_kwargs)
        self.negative_prompt = negative_prompt

    def prepare(self, items: list[dict[str, Any]]) -> list[LLMRequest | None]:
        stop = self.stop_reason()
        if stop:
            for it in items:
                it["unmade"] = stop
            return [None] * len(items)
        requests: list[LLMRequest | None] = []
        for it in items:
            key = f"prompts/{it['ability']}/{it['chunk']:06d}"
            requests.append(
                self.request(
                    prompt_request(
                        self.catalog[it["ability"]],
                        list(it["chunk_keywords"]),
                        key=key,
                        seed=stable_seed(self.run_seed, key),
                        temperature=self.cfg.temperature,
                    )
                )
            )
        return requests

    def finish(self, items, requests, results) -> pa.Table:
        if any(it.get("unmade") for it in items):
            return self.unmade(items)
        rows: list[dict[str, Any]] = []
        for it, req, res in zip(items, requests, results):
            k = len(it["chunk_keywords"])
            failure = self.failure(res)
            transient = failure is not None and res.failure == TRANSIENT
            if failure is not None:
                parsed = None
            elif req.response_schema:
                parsed = tasks.parse_prompts_json(res.text, list(it["chunk_keywords"]))
            else:
                parsed = parse_prompts(res.text, list(it["chunk_keywords"]))
            failed = [p for p in range(k) if parsed is None or parsed[p].reason]
            if failed and self.planner is not None and not transient:
                import ray

                ray.get(
                    self.planner.burn.remote(it["ability"], [it["chunk"] * k + p for p in failed])
                )
            for index, sid in zip(it["indices"], it["ids"]):
                pos = index % k
                row = {
                    "id": sid,
                    "ability": it["ability"],
                    "index": index,
                    "seed": row_seed(sid),
                    "keywords": [it["chunk_keywords"][pos]],
                    "negative_prompt": self.negative_prompt,
                    "llm_model": self.backend.model,
                    "meta": "{}",
                }
                add_usage(row, "prompts", usage_meta(res, share=len(it["indices"])))
                if failure is not None:
                    if not self.hand_back(row, res):
                        reject(row, "prompts", failure, res.text or "")
                elif parsed[pos].reason:
                    reject(row, "prompts", parsed[pos].reason, parsed[pos].raw or res.text)
                else:
                    row["prompt"] = parsed[pos].prompt
                    row["keywords"] = emphasized_keywords(parsed[pos].prompt) or row["keywords"]
                rows.append(row)
        return rows_to_table(rows)

    def unmade(self, items: list[dict[str, Any]]) -> pa.Table:
        rows = []
        for it in items:
            for index, sid in zip(it["indices"], it["ids"]):
                row = {"id": sid, "ability": it["ability"], "index": index, "meta": "{}"}
                rows.append(reject(row, UNMADE, it["unmade"], ""))
        return rows_to_table(rows)


class DedupStage(Stage):
    """Prompt dedup in the stream: one actor that holds rows until the planner decides.

    The decision is the planner's (:meth:`raypipe.generate.planner.Planner.dedup`): a
    row is compared once every lower-index row of its ability has arrived, so the
    lowest index wins among repeats whatever order prompts were written in. Rows wait
    here (prompt text only, no images yet) until then. Input: work rows from the
    prompt writer; output: the same rows, released in index order, rejected with stage
    ``dedup`` (``duplicate_prompt`` / ``near_duplicate_prompt``, raw naming the row it
    repeats) where they repeat an earlier one. Already-rejected rows pass through.
    Run it as a pool of exactly one actor: rows it holds are released by later blocks.
    If Ray restarts it after a crash, the rows it held are lost: the planner stops the
    run (:meth:`~raypipe.generate.planner.Planner.dedup_started`) rather than wait for
    them, and the same command makes them again.
    """

    INPUT_COLUMNS = ("id", "ability", "index", "prompt", "reject_stage", "reject_reason")

    def __init__(self, planner):
        self.planner = planner
        self.held: dict[str, dict] = {}
        if planner is not None:  # a restart after a crash lost what was held: say so
            import ray

            ray.get(planner.dedup_started.remote())

    def process(self, batch: pa.Table) -> pa.Table:
        import ray

        rows = batch.to_pylist()
        for r in rows:
            self.held[r["id"]] = r
        light = [
            (
                r["id"],
                r["ability"],
                r["index"],
                None if is_rejected(r) else r["prompt"],
                r["reject_reason"] if r["reject_stage"] == UNMADE else None,
            )
            for r in rows
        ]
        released = []
        for sid, reason, other in ray.get(self.planner.dedup.remote(light)):
            row = self.held.pop(sid)
            if reason == UNMADE:  # the run stops (``other``: why): handed back
                reject(row, UNMADE, other, "")
            elif reason:
                reject(
                    row, "dedup", reason, json.dumps({"prompt": row["prompt"], "repeats": other})
                )
            released.append(row)
        return rows_to_table(released)
