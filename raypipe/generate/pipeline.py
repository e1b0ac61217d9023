"""A generation run, from its checks to its manifest, writing OUT.

    generate(cfg, out)  # what jobs/generate.py calls

1. Check inputs: abilities, LLM endpoint, render model, OUT; fail before any rendering.
2. Ray, the job-wide LLM rate limiter, keyword banks (saved in OUT/keywords, reused;
   a bank left short is retried by the next run, a bounded number of times).
3. The planner actor reads OUT and plans the rows still missing (raypipe.generate.planner).
4. The stream (raypipe.generate.stream): one streaming Ray Data execution per fixed
   plan, SD prompts -> dedup -> dialogues -> render -> quality -> the writer actor
   (Parquet parts by size or age); rows rejected before render are replaced in the same
   execution, the rest by at most three top-ups; the driver holds per-row counters only.
5. The writer writes what it still holds; the manifest, the dataset card and the
   preview sheet are written."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from raypipe.abilities import load_catalog
from raypipe.errors import ConfigError
from raypipe.generate.config import GenerateConfig
from raypipe.generate.guards import check_shared_out, lease_lost, nothing_to_add, take_lease
from raypipe.generate.identity import check_identity, record_identity
from raypipe.generate.keywords import keyword_banks
from raypipe.generate.manifest import Tally, build_manifest, write_card_and_preview
from raypipe.generate.store import OutputStore
from raypipe.generate.stream import stream

log = logging.getLogger("raypipe.generate")

# ------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------


def local_cpus(cfg: GenerateConfig) -> int:
    """Logical CPUs a local Ray needs for one execution of the stream: what its actor
    pools reserve at their largest, the writer's light tasks, and one CPU for the task
    that cuts render batches (Ray Data runs it at 1 CPU)."""
    pools = 2 * cfg.llm_actors * cfg.llm_actor_cpus + 0.05  # two LLM writers, dedup
    pools += cfg.render.max_actors * cfg.render.cpus_per_actor
    pools += cfg.quality.max_actors * cfg.quality.cpus_per_actor  # CPU runs only
    if cfg.llm.backend == "vllm":  # each writer's Ray Data LLM stage (its actors' CPU)
        from raypipe.llm.vllm.processor import ENGINE_STAGE_CPUS

        pools += 2 * cfg.llm.vllm.max_engines * ENGINE_STAGE_CPUS
    # The cutter's CPU, and one more: with only its own, Ray Data's per-operator
    # reservations held the cutter back until the LLM pools ended (rendering started
    # after the last prompt; benchmarks/RESULTS.md, "Fixed plans per execution").
    return math.ceil(pools + 2 * cfg.writer_cpus + 2.0)


def check_inputs(cfg: GenerateConfig, store: OutputStore) -> dict[str, Any]:
    """Step 1: everything that can fail cheaply fails here, before Ray or any model loads."""
    from raypipe.generate.quality_models import check_quality_models
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
    )


def start_actors(
    cfg: GenerateConfig, store: OutputStore, banks, quota, spent_usd: float, lease=None
):
    """The run's planner and writer, pinned to the driver's node (GPU workers come and go)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raypipe.generate.executions import late_tasks
    from raypipe.generate.planner import Planner
    from raypipe.generate.writer import PartWriter

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    planner = (
        ray.remote(Planner)
        .options(num_cpus=0, max_concurrency=64, scheduling_strategy=here)
        .remote(
            *planner_args(cfg, store, banks, quota, spent_usd),
            lease=lease,
            late_tasks=late_tasks(cfg.llm.backend),
        )
    )
    writer = (
        ray.remote(PartWriter)
        .options(num_cpus=0, max_concurrency=8, scheduling_strategy=here)
        .remote(store.uri, planner, cfg.part_max_rows, cfg.part_max_seconds, lease=lease)
    )
    return planner, writer


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

    from raypipe.generate.engine import start_engine_service
    from raypipe.llm.limits import start_limiter

    t_start = time.time()
    store = OutputStore(out)
    # 0. One dataset per OUT, one run at a time: checked before anything is paid or loaded.
    catalog = load_catalog(cfg.catalog_dirs or None, names=cfg.abilities)
    checked = check_identity(store, cfg, catalog, accept_identity_change)
    done = nothing_to_add(cfg, store, list(catalog), bool(checked["changes"]))
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
            from raypipe.placement import start_ray

            start_ray(cfg.ray_address, local_cpus(cfg), log_to_driver=cfg.log_to_driver)
        check_shared_out(store)
        ray.data.DataContext.get_current().enable_progress_bars = cfg.progress
        limiter = start_limiter(cfg.llm)
        service = start_engine_service(cfg.llm)  # vllm: the run's engines, started on first use
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

    from raypipe.generate.engine import vllm_writer_report, vllm_writers

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
    if run.get("outage"):
        manifest["runs"][-1]["outage"] = run["outage"]
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
