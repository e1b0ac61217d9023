"""The Ray Data LLM processor that sends a writing stage's rows to the run's engines."""

from __future__ import annotations

from typing import Any

from raypipe.llm.config import LLMConfig
from raypipe.llm.vllm.settings import DEPLOYMENT

#: Logical CPUs of each engine-stage actor: Ray Data's default for a map actor (1), which
#: ``ServeDeploymentProcessorConfig`` does not let a caller change. Each writer's stage
#: has up to ``llm.vllm.max_engines`` of them (a local Ray counts them: ``local_cpus``).
ENGINE_STAGE_CPUS = 1


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
    builds them itself). The stage runs at ``llm.vllm.batch_size`` rows per batch, on
    ``1..max_engines`` actors; each actor sends its batches' requests at once (Ray
    Data's default of 4 batches in flight per actor), and each engine decodes
    ``batch_size`` of them together. A batch waits until it has ``batch_size`` rows or
    its execution's input has ended, which is why a vLLM run has no late read tasks
    (:func:`raypipe.generate.executions.late_tasks`). The pre- and post-processing
    stages are light (``num_cpus``).
    """
    from ray.data.llm import ServeDeploymentProcessorConfig, build_processor

    v = cfg.vllm
    config = ServeDeploymentProcessorConfig(
        deployment_name=DEPLOYMENT,
        app_name=app,
        batch_size=v.batch_size,
        concurrency=(1, v.max_engines),
        should_continue_on_error=True,  # a failed request becomes a reject, not a dead job
    )
    return build_processor(
        config,
        preprocess=_preprocess,
        postprocess=_postprocess,
        preprocess_map_kwargs={"num_cpus": num_cpus},
        postprocess_map_kwargs={"num_cpus": num_cpus},
    )
