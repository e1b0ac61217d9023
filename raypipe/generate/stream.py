"""Step 4 of a run: the stream, one streaming Ray Data execution per fixed plan.

    stream(cfg, run, tally)  # what raypipe.generate.pipeline calls

``build_stream`` composes one execution: the planner's fixed plan (read tasks,
raypipe.generate.source) -> SD prompts (an actor pool of LLM clients, k rows per
request) -> prompt dedup (by index) -> dialogues -> rows already decided routed to the
writer -> blocks of ``render.batch_size`` rows -> render (GPU actor pool) -> quality ->
the writer actor. ``stream`` runs executions until the planner has nothing more to
make (raypipe.generate.planner: late read tasks, top-ups); the driver keeps counters.
With ``llm.backend: vllm`` each LLM writer is its request half, a pool of vLLM engines
(Ray Data LLM) and its answer half, in the same stream (raypipe.generate.engine).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from typing import Any

from raypipe.errors import ActorLost
from raypipe.generate.config import GenerateConfig
from raypipe.generate.dialogues import BenchmarkItemWriter, DialogueWriter
from raypipe.generate.manifest import Tally
from raypipe.generate.prompts import PromptWriter
from raypipe.llm.failures import LLMFatalError, fatal_cause, fatal_message

log = logging.getLogger("raypipe.generate")

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


def build_stream(cfg: GenerateConfig, run: dict[str, Any], plan: dict[str, Any]):
    """One execution as a Ray Dataset: its fixed plan -> ... -> the writer actor."""
    import ray

    from raypipe.generate.engine import writer_stage
    from raypipe.generate.prompts import DedupStage
    from raypipe.generate.quality import add_image_stages
    from raypipe.generate.source import plan_source
    from raypipe.generate.writer import route_rejects, write_block
    from raypipe.stage import add_stage

    planner = run["planner"]
    ds = ray.data.read_datasource(
        plan_source(planner, plan["execution"], plan["tasks"]),
        override_num_blocks=plan["tasks"],
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
        lease=run["lease"].token(),
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
    # Rows already decided go to the writer here; the rest are cut into blocks of
    # render.batch_size rows (exactly: only the execution's last block is short), so
    # every render call is full (one task of a CPU at a time; it only slices).
    ds = ds.map_batches(
        route_rejects,
        fn_kwargs={"writer": run["writer"], "planner": planner},
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=cfg.writer_cpus,
    )
    ds = ds.repartition(target_num_rows_per_block=cfg.render.batch_size, strict=True)
    ds = add_image_stages(ds, cfg.render, cfg.quality, run["banks"])
    return ds.map_batches(
        write_block,
        fn_kwargs={"writer": run["writer"]},
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=cfg.writer_cpus,
    )


# ------------------------------------------------------------------------------------
# Executions
# ------------------------------------------------------------------------------------


def stream(cfg: GenerateConfig, run: dict[str, Any], tally: Tally) -> dict[str, Any]:
    """One execution of the stream per fixed plan, until the planner has nothing
    more to make (or stops: top-ups used up, max_usd, an outage); returns its status."""
    import ray

    from raypipe.generate.outage import watching_outages

    planner = run["planner"]
    with watching_outages(run["limiter"], planner, cfg.llm.outage_stop_s, run):
        while True:
            plan = ray.get(planner.plan_execution.remote())
            if plan["wait_s"] > 0:  # rows handed back after an outage are pausing
                time.sleep(min(plan["wait_s"], 5.0))
                continue
            if not plan["tasks"]:
                break
            if plan["top_up"]:
                log.info("top-up: %d rows replace rejected ones", plan["rows"])
            tally.execution = plan["execution"]
            run_execution(cfg, run, plan, tally)
            run["executions"] = run.get("executions", 0) + 1
    return ray.get(planner.status.remote())


def run_execution(cfg: GenerateConfig, run: dict[str, Any], plan, tally: Tally) -> None:
    """One execution of the stream; the counts of its rows go to ``tally``."""
    import ray

    ds = build_stream(cfg, run, plan)
    try:
        with collecting_garbage(DRIVER_GC_S):
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                tally.add(batch)
                if run["lease"].lost is not None:  # taken over: stop, publish nothing
                    raise run["lease"].lost
    except Exception as e:
        error = stream_failure(cfg, run, e)
        if error is e:
            raise
        if isinstance(error, LLMFatalError):  # the endpoint's message, no traceback
            raise error from None
        raise error from e
    routed = ray.get(run["writer"].routed_tally.remote())
    if routed is not None:
        tally.merge(routed)
    del ds
    gc.collect()  # the finished execution's operators and their per-block stats


def stream_failure(cfg: GenerateConfig, run: dict[str, Any], e: Exception) -> Exception:
    """What an execution that raised ``e`` fails the run with: a lost planner or writer
    (exit 75), the endpoint's refusal (its message, no traceback), an engine failure."""
    lost = lost_actor(run)
    if lost is not None:
        return lost
    fatal = fatal_cause(e)
    if fatal is None and run.get("limiter") is not None:  # an actor met it
        error = run["limiter"].llm_stats().get("fatal_error")
        fatal = LLMFatalError(fatal_message(error)) if error else None
    if fatal is not None:
        return LLMFatalError(str(fatal))
    if cfg.llm.backend == "vllm":
        from raypipe.llm.vllm import engine_failure

        error = engine_failure(e, cfg.llm)
        if error is not None:
            return error
    return e


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
