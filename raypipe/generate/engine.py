"""LLM writing stages on vLLM engines (``llm.backend: vllm``), in the generation stream.

    ds = add_vllm_writer(ds, PromptWriter, cfg, app=app, service=service, **writer_kwargs)

appends three stages where the other backends have one (raypipe.generate.prompts, raypipe.generate.dialogues):

1. :class:`EngineRequests`: the writer's ``prepare`` half (the same templates, keys and
   seeds), then per request the LLM cache (OUT/cache, keyed as the ``openai`` backend
   keys it) and the prompt's token ids through the model's chat template. A request
   already answered, a row that needs none (rejected upstream, handed back unmade) or a
   prompt too long for ``max_model_len`` still crosses the engine stage (Ray Data has one
   path for every row) as a one-token placeholder whose output is ignored: no persisted
   answer is generated again.
2. The Ray Data LLM processor (:func:`raypipe.llm.vllm.build_engine_processor`)
   that sends each row to the run's engines: one Serve application of
   ``llm.vllm.min_engines..max_engines`` engines (``app``), shared by every writer.
3. :class:`EngineAnswers`: the engine's text and token counts become results, new answers
   are stored in the cache, and the writer's ``finish`` half parses them, with the same
   reject reasons (``max_tokens`` for an answer cut at max_tokens).

The writer's row travels through the engine stage as one JSON column, so the engine
stage sees a fixed schema whatever the writer's rows hold.

A writer needs no engine when the driver finds, before the stream is built, that
OUT/cache answers every request of the rows the run plans first (:func:`check_cache`;
a re-run over the same OUT): it is then one stage, :class:`CacheServed`, served from
the cache, and a request the cache does not answer (a replacement planned during the
run) goes to the run's engines through its ``EngineService``, which starts them then
if no other writer needed them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import pyarrow as pa

from raypipe.generate.config import GenerateConfig
from raypipe.llm.base import LLMRequest, LLMResult
from raypipe.llm.config import LLMConfig
from raypipe.llm.vllm import VLLMBackend, decode, finish_reason, sampling_params
from raypipe.stage import Stage, add_stage

#: What the engine stage reads (the engine's ``method`` and its ``request_kwargs``: the
#: prompt's token ids and sampling parameters) and carries (``rp_payload``: the row, its
#: request, and what the cache said).
SAMPLING = pa.struct(
    [
        ("max_tokens", pa.int64()),
        ("temperature", pa.float64()),
        ("seed", pa.int64()),
        (
            "structured_outputs",
            pa.struct([("json", pa.string()), ("disable_any_whitespace", pa.bool_())]),
        ),
    ]
)
REQUEST_SCHEMA = pa.schema(
    [
        ("rp_payload", pa.string()),
        ("method", pa.string()),
        (
            "request_kwargs",
            pa.struct([("prompt_token_ids", pa.list_(pa.int64())), ("sampling_params", SAMPLING)]),
        ),
    ]
)
#: Sampling of a placeholder request (one greedy token, output ignored).
PLACEHOLDER = {"max_tokens": 1, "temperature": 0.0, "seed": None, "structured_outputs": None}


class _WriterHalf(Stage):
    """A writer (an LLMStage of raypipe.generate.llm_stage) built in this actor; its backend is a VLLMBackend."""

    def __init__(self, writer: type, writer_kwargs: dict[str, Any]):
        self.writer = writer(**writer_kwargs)
        self.backend: VLLMBackend = self.writer.backend
        if not isinstance(self.backend, VLLMBackend):  # pragma: no cover - wiring error
            raise TypeError(f"{type(self).__name__} needs llm.backend=vllm")


class EngineRequests(_WriterHalf):
    """Step 1 (see the module docstring): rows -> engine requests."""

    OUTPUT_COLUMNS = ("rp_payload", "method", "request_kwargs")

    def __init__(self, writer: type, writer_kwargs: dict[str, Any]):
        super().__init__(writer, writer_kwargs)
        self.INPUT_COLUMNS = writer.INPUT_COLUMNS
        self.bos = [self.backend.tokenizer.bos_token_id or 0]

    def process(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out = []
        for row, req in zip(rows, self.writer.prepare(rows)):
            payload: dict[str, Any] = {"row": row, "request": None, "cached": None, "error": None}
            ids, sampling = self.bos, PLACEHOLDER
            if req is not None:
                payload["request"] = dataclasses.asdict(req)
                entry = self.backend.cached(req)
                if entry is not None:
                    payload["cached"] = entry
                else:
                    prompt_ids, error = self.backend.prompt_ids(req)
                    if error:
                        payload["error"] = error
                    else:
                        ids, sampling = prompt_ids, sampling_params(req)
            out.append(
                {
                    "rp_payload": json.dumps(payload),
                    "method": "generate",
                    "request_kwargs": {"prompt_token_ids": ids, "sampling_params": sampling},
                }
            )
        return pa.Table.from_pylist(out, schema=REQUEST_SCHEMA)


class EngineAnswers(_WriterHalf):
    """Step 3 (see the module docstring): engine outputs -> the writer's rows."""

    INPUT_COLUMNS = ("rp_payload",)

    def process(self, batch: pa.Table) -> pa.Table:
        rows, requests, results = [], [], []
        for rec in batch.to_pylist():
            payload = json.loads(rec["rp_payload"])
            data = payload["request"]
            req = (
                None
                if data is None
                else LLMRequest(**{**data, "messages": tuple(data["messages"])})
            )
            rows.append(payload["row"])
            requests.append(req)
            results.append(None if req is None else self.result(req, payload, rec))
        return self.writer.finish(rows, requests, results)

    def result(self, req: LLMRequest, payload: dict[str, Any], rec: dict[str, Any]) -> LLMResult:
        if payload["cached"] is not None:
            return self.backend.served(req, payload["cached"])
        if payload["error"]:
            return self.backend.failed(req, payload["error"])
        error = rec.get("__inference_error__")
        if error:
            return self.backend.failed(req, f"engine: {error}")
        tokens = [int(t) for t in rec.get("rp_tokens") or []]
        finish = finish_reason(
            len(tokens), tokens[-1] if tokens else None, req.max_tokens, self.backend.eos
        )
        text = decode(self.backend.tokenizer, tokens)
        return self.backend.generated(
            req, text, int(rec.get("rp_prompt_tokens") or 0), len(tokens), finish
        )


class CacheServed(_WriterHalf):
    """A writer whose requests the driver found answered in OUT/cache
    (:func:`check_cache`), as one stage without an engine stage: the writer's own
    ``process`` through its VLLMBackend, which serves every answer from the cache and
    sends a request the cache does not answer to the engines of ``service`` (the run's
    EngineService actor, which starts them then if they are not up)."""

    def __init__(self, writer: type, writer_kwargs: dict[str, Any], service):
        super().__init__(writer, writer_kwargs)
        self.INPUT_COLUMNS = writer.INPUT_COLUMNS
        self.backend.attach(service)

    def process(self, batch: pa.Table) -> pa.Table:
        return self.writer.process(batch)


def add_vllm_writer(ds, writer: type, cfg, app: str | None = None, service=None, **writer_kwargs):
    """Append ``writer`` (a raypipe.generate.llm_stage.LLMStage) on vLLM engines: its request
    half, a Ray Data LLM processor sending to the engines of Serve application ``app``,
    its answer half (see the module docstring). Without ``app``, the writer is served from
    OUT/cache (:class:`CacheServed`), with ``service`` (the run's EngineService actor) for
    what the cache does not answer."""
    from raypipe.llm.vllm import build_engine_processor
    from raypipe.placement import actor_resources

    kwargs = {"writer": writer, "writer_kwargs": writer_kwargs}
    pool = dict(
        max_actors=cfg.llm_actors,
        **actor_resources(num_cpus=cfg.llm_actor_cpus, resources=cfg.llm_actor_resources),
    )
    if app is None:
        return add_stage(ds, CacheServed, {**kwargs, "service": service}, **pool)
    ds = add_stage(ds, EngineRequests, kwargs, **pool)
    ds = build_engine_processor(cfg.llm, app, num_cpus=cfg.llm_actor_cpus)(ds)
    return add_stage(ds, EngineAnswers, kwargs, **pool)


# ---------------------------------------------------------------------------------------
# Which writers need engines: the driver's check of OUT/cache
# ---------------------------------------------------------------------------------------

#: Reads of cache entries at once when OUT/cache is on an object store.
CHECK_THREADS = 32
#: The stage name of each writer (its rows' reject stage and usage key).
WRITER_STAGES = {
    "PromptWriter": "prompts",
    "DialogueWriter": "dialogue",
    "BenchmarkItemWriter": "benchmark",
}


def writer_stage(writer: type) -> str:
    return WRITER_STAGES[writer.__name__]


def stored_keys(cache) -> set[str]:
    """The request keys of every entry in ``cache`` (a ResponseCache), in one listing."""
    from raypipe import storage

    return {
        path.rsplit("/", 1)[-1][: -len(".json")]
        for path in storage.list_files(cache.fs, cache.root, ".json")
    }


def read_entries(cache, keys: list[str]) -> list[dict[str, Any] | None]:
    """``cache.get`` of each key (the stream's own lookup and validation: an unreadable,
    malformed or newer-format entry is None), concurrently on an object store."""
    if cache.is_local:
        return [cache.get(k) for k in keys]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(CHECK_THREADS) as pool:
        return list(pool.map(cache.get, keys))


def check_cache(
    cfg, planner_args: tuple, cache_dir: str | None, second: type, second_kwargs: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Which writers of this run have requests OUT/cache does not answer, decided on the
    driver before the stream is built (a writer with none needs no engine).

    Returns ``{stage: {"requests": N, "unanswered": M}}`` for ``prompts`` and the second
    writer (``dialogue`` or ``benchmark``), over the rows the run plans first: ``N``
    requests checked, ``M`` of them not answered (0: the writer needs no engine). ``M``
    is None where it cannot be known: the second writer's requests hold the prompts, so
    they are known only when every prompt request is answered. For the second writer
    ``N`` may count rows dedup would drop (dedup is decided only where an answer is
    missing), and ``M`` stops at the first ability that has an unanswered request.

    Exact for those rows: a planner built here with the planner actor's arguments reads
    OUT as that actor does and plans the same rows, in the same request chunks; the
    writers build their requests themselves (same templates, keys, seeds, schema); an
    answer counts when its key is in one listing of the cache and ``ResponseCache.get``
    accepts the entry (what the stream's lookup does). For the second writer the answered
    prompts go through the prompt writer's own ``finish`` and the planner's own dedup
    (its index holds OUT/data's prompts), so its requests are those of the rows that
    reach it. Entries are read only when every key is listed (a fresh run reads none).

    Not known here: replacements, which the planner adds during the run for rows
    rejected at any stage (render and quality rejects depend on the images). A writer
    served from the cache alone sends a replacement's request that the cache does not
    answer to the run's engines, started then if they are not up (counted in the
    manifest).
    """
    from raypipe.generate.planner import Planner
    from raypipe.generate.prompts import PromptWriter

    name = writer_stage(second)
    if cache_dir is None:  # llm.cache=false: nothing is answered
        unknown = {"requests": None, "unanswered": None}
        return {"prompts": dict(unknown), name: dict(unknown)}
    planner = Planner(*planner_args)  # reads OUT; writes nothing (its plan log is not flushed)
    pending = sum(len(ab.pending) for ab in planner.abilities.values())
    items = planner._take(pending) if pending else []
    common = dict(
        llm=cfg.llm.model_dump(),
        cache_dir=cache_dir,
        catalog_dirs=cfg.catalog_dirs,
        run_seed=cfg.seed,
    )
    prompts = PromptWriter(negative_prompt=cfg.render.negative_prompt, **common)
    backend: VLLMBackend = prompts.backend
    stored = stored_keys(backend.cache)
    requests = prompts.prepare(items)
    keys = [backend.key(r) for r in requests]
    out = {
        "prompts": {"requests": len(keys), "unanswered": sum(k not in stored for k in keys)},
        name: {"requests": None, "unanswered": None},
    }
    if out["prompts"]["unanswered"]:
        return out
    entries = read_entries(backend.cache, keys)
    out["prompts"]["unanswered"] = sum(e is None for e in entries)
    if out["prompts"]["unanswered"]:
        return out
    results = [backend.served(r, e) for r, e in zip(requests, entries)]
    rows = prompts.finish(items, requests, results).to_pylist()
    requests_n, missing = _second_writer_unanswered(
        planner, second(**common, **second_kwargs), rows, stored
    )
    out[name] = {"requests": requests_n, "unanswered": missing}
    return out


def _second_writer_unanswered(planner, writer, rows: list[dict], stored: set) -> tuple[int, int]:
    """(requests, unanswered) of the second writer over the prompt writer's ``rows``."""
    from raypipe.schema import is_rejected

    todo = [r for r in rows if not is_rejected(r)]
    keys = [writer.backend.key(r) for r in writer.prepare(todo)]
    # Rows rejected at dedup send no request. Dedup costs about as much as the rest
    # together, so it is decided only where it matters: in the abilities of rows whose
    # answer is not listed (the planner decides it per ability, in index order), one
    # ability at a time, until one has a request that is not answered.
    unlisted: dict[str, int] = {}
    for r, k in zip(todo, keys):
        if k not in stored:
            unlisted[r["ability"]] = unlisted.get(r["ability"], 0) + 1
    missing = 0
    for ability in sorted(unlisted, key=unlisted.get, reverse=True):
        light = [
            (r["id"], r["ability"], r["index"], None if is_rejected(r) else r["prompt"])
            for r in rows
            if r["ability"] == ability
        ]
        dropped = {sid for sid, reason, _ in planner.dedup(light) if reason}
        keys = [k for r, k in zip(todo, keys) if r["id"] not in dropped]
        todo = [r for r in todo if r["id"] not in dropped]
        missing = sum(k not in stored for r, k in zip(todo, keys) if r["ability"] == ability)
        if missing:
            break
    if not missing:
        missing = sum(e is None for e in read_entries(writer.backend.cache, keys))
    return len(keys), missing


# ------------------------------------------------------------------------------------
# The run's engines and which writers use them (called by raypipe.generate.pipeline)
# ------------------------------------------------------------------------------------


def start_engine_service(llm: LLMConfig):
    """``llm.backend: vllm``: the run's :class:`~raypipe.llm.vllm.EngineService`
    actor (on the driver's node; it reserves nothing and starts the engines only when a
    request needs them), else None."""
    if llm.backend != "vllm":
        return None
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raypipe.llm.vllm.service import start_service

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return start_service(llm, scheduling_strategy=here)


def vllm_writers(cfg: GenerateConfig, args: tuple, cache: str | None, service) -> dict[str, Any]:
    """``llm.backend: vllm``: which writers send their rows to the engines in the stream.

    A writer whose requests (for the rows the run plans first) are all answered in
    OUT/cache (:func:`raypipe.generate.engine.check_cache`, exact for those rows) does
    not: it is served from the cache, and sends what the cache does not answer (a
    replacement row's request) to the run's engines, which start then. A re-run over the
    same OUT thus loads no model. When a writer needs the engines they are started here,
    before the stream (an engine that cannot start fails the run before any rendering).
    """
    import ray

    from raypipe.generate.stream import second_writer
    from raypipe.llm.vllm import engine_failure

    second, second_kwargs = second_writer(cfg)
    checked = check_cache(cfg, args, cache, second, second_kwargs)
    pools = {stage: "cache" if r["unanswered"] == 0 else "engines" for stage, r in checked.items()}
    apps = {}
    if "engines" in pools.values():
        try:
            app = ray.get(service.ensure.remote())
        except Exception as e:  # noqa: BLE001 - sorted by engine_failure
            error = engine_failure(e, cfg.llm, engine=True)
            if error is None:
                raise
            raise error from None
        apps = {stage: app for stage, kind in pools.items() if kind == "engines"}
    logging.getLogger("raypipe.generate").info(
        "vLLM writers: %s (requests not answered in OUT/cache, of the rows planned first: %s)",
        ", ".join(f"{k} on {v}" for k, v in pools.items()),
        ", ".join(f"{k} {v['unanswered']}/{v['requests']}" for k, v in checked.items()),
    )
    return {"pools": pools, "apps": apps, "service": service, "cache_check": checked}


def vllm_writer_report(run: dict[str, Any]) -> dict[str, Any]:
    """Per writer of a ``vllm`` run: ``on`` (``engines``: its rows went to the engines;
    ``cache``: served from OUT/cache), the requests of the rows planned first and how many
    of them the cache did not answer (None: not known)."""
    return {
        stage: {"on": kind, **(run.get("cache_check") or {}).get(stage, {})}
        for stage, kind in run.get("pools", {}).items()
    }
