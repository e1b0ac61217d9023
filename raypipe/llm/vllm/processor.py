"""The Ray Data LLM processor that sends a writing stage's rows to the run's engines."""

from __future__ import annotations

from typing import Any

from raypipe.llm.config import LLMConfig
from raypipe.llm.vllm.settings import DEPLOYMENT

#: Ray Data's own default for async stages is 4 batches at once per task; raypipe hands
#: rows to the engine one by one (see VLLMConfig.batch_size), so it raises the bound.
ASYNC_CONCURRENCY_VAR = "RAY_DATA_DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY"


def _preprocess(row: dict[str, Any]) -> dict[str, Any]:
    return {}  # rows arrive ready (raypipe.generate.engine.EngineRequests)


def _postprocess(row: dict[str, Any]) -> dict[str, Any]:
    tokens = row.get("rp_tokens")
    tokens = list(tokens) if tokens is not None else []
    return {
        "rp_payload": row["rp_payload"],
        "rp_tokens": [int(t) for t in tokens],
        "rp_prompt_tokens": int(row.get("rp_prompt_tokens") or 0),
        "rp_engine_s": float(row.get("time_taken") or 0.0),  # queue included
    }


def build_engine_processor(cfg: LLMConfig, app: str, num_cpus: float = 0.05):
    """A Ray Data LLM processor that sends a writing stage's rows to the run's engines
    (``ray.data.llm``'s ``ServeDeploymentProcessorConfig``: ``processor(ds)`` appends it).

    The engines are one Serve application (:class:`EngineService`), shared by every
    writer of the run, so the prompt and dialogue writers batch their requests on the
    same engines instead of each holding a copy of the model. Rows carry ``method`` and
    ``request_kwargs`` (the chat prompt's token ids and sampling parameters: raypipe
    builds them itself). Ray Data LLM's ``batch_size`` is 1: a larger batch would hold
    rows until that many have arrived, and the generation stream's source waits for its
    rows to be decided, so a run's last rows would wait forever. The stage is light
    actors (``num_cpus`` each, up to ``max_engines``) that keep ``2 * batch_size`` requests
    per engine in flight; each engine decodes ``batch_size`` of them together.
    """
    import ray
    from ray.data.llm import ServeDeploymentProcessorConfig, build_processor

    v = cfg.vllm
    config = ServeDeploymentProcessorConfig(
        deployment_name=DEPLOYMENT,
        app_name=app,
        batch_size=1,
        concurrency=1,
        should_continue_on_error=True,  # a failed request becomes a reject, not a dead job
    )
    processor = build_processor(
        config,
        preprocess=_preprocess,
        postprocess=_postprocess,
        preprocess_map_kwargs={"num_cpus": num_cpus},
        postprocess_map_kwargs={"num_cpus": num_cpus},
    )
    in_flight = 2 * v.batch_size
    stage = processor.get_stage_by_name("ServeDeploymentStage")
    stage.map_batches_kwargs.update(
        compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=v.max_engines, max_tasks_in_flight_per_actor=in_flight
        ),
        max_concurrency=in_flight,
        num_cpus=num_cpus,
        runtime_env={"env_vars": {ASYNC_CONCURRENCY_VAR: str(in_flight)}},
    )
    return processor
