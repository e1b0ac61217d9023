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
import logging
import threading
import time
from typing import Any

from raypipe.abilities import load_catalog
from raypipe.errors import ActorLost, ConfigError
from raypipe.generate.config import GenerateConfig
from raypipe.generate.dialogues import BenchmarkItemWriter, DialogueWriter
from raypipe.generate.guards import check_shared_out, lease_lost, nothing_to_add, take_lease
from raypipe.generate.identity import check_identity, record_identity
from raypipe.generate.keywords import keyword_banks
from raypipe.generate.manifest import Tally, build_manifest, write_card_and_preview
from raypipe.generate.prompts import PromptWriter
from raypipe.generate.store import OutputStore
from raypipe.llm.failures import LLMFatalError, fatal_cause, fatal_message

log = logging.getLogger("raypipe.generate")

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
    from raypipe.stage import add_stage

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

    from raypipe.generate.engine import writer_stage
    from raypipe.generate.prompts import DedupStage
    from raypipe.generate.quality import add_image_stages
    from raypipe.generate.source import plan_source
    from raypipe.generate.writer import write_block
    from raypipe.stage import add_stage

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

    from raypipe.generate.outage import watching_outages
    from raypipe.generate.source import tickets_for

    planner = run["planner"]
    status = ray.get(planner.status.remote())
    for execution in range(MAX_EXECUTIONS):
        if status["finished"] or status["lost_actor"]:
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
            with (
                collecting_garbage(DRIVER_GC_S),
                watching_outages(run["limiter"], planner, cfg.llm.outage_stop_s, run),
            ):
                for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                    tally.add(batch)
                    if run["lease"].lost is not None:  # taken over: stop, publish nothing
                        raise run["lease"].lost
        except Exception as e:
            lost = lost_actor(run)
            if lost is not None:
                raise lost from e
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


def lost_actor(run: dict[str, Any]) -> ActorLost | None:
    """After the stream failed: whether the planner or the writer died (their state is
    lost, so the run stops; exit 75: the same command makes the rest), else None."""
    import ray

    for name, probe in (
        ("planner", lambda: run["planner"].status.remote()),  # also flushes its plan log
        ("writer", lambda: run["writer"].__ray_ready__.remote()),
    ):
        try:
            ray.get(probe(), timeout=30)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return ActorLost(
                f"the run's {name} actor died (its worker or node was lost), so the run "
                "stopped: the parts already in OUT are kept. Run the same command again: it "
                "makes the rows that were in flight or buffered again (answered requests "
                "come from OUT/cache at no cost)."
            )
    return None


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
            ray.init(address=cfg.ray_address, log_to_driver=cfg.log_to_driver)
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
