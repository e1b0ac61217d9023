"""What the engines run and where: vLLM engine arguments, Ray placement of the engine
workers, the Serve deployment options and the application name they give."""

from __future__ import annotations

import json
from typing import Any

from raypipe.llm.config import LLMConfig
from raypipe.placement import actor_resources

#: Tokens one CPU engine step may prefill when llm.vllm.max_model_len is not set.
CPU_MAX_PREFILL_TOKENS = 8192


def model_path(cfg: LLMConfig) -> str:
    """``llm.model`` as the engines load it: a folder, or a hub id (checked, not loaded)."""
    from raypipe.models import resolve_pretrained

    return resolve_pretrained(cfg.model, "config.json", "llm.model")


def engine_kwargs(cfg: LLMConfig) -> dict[str, Any]:
    """The vLLM engine arguments of ``llm.vllm``."""
    v = cfg.vllm
    kwargs: dict[str, Any] = {
        "dtype": v.dtype,
        "tensor_parallel_size": v.tensor_parallel_size,
        "gpu_memory_utilization": v.gpu_memory_utilization,
        "enforce_eager": v.enforce_eager,
        "max_num_seqs": v.batch_size,
        "disable_log_stats": True,
    }
    if v.max_model_len is not None:
        kwargs["max_model_len"] = v.max_model_len
    if v.tensor_parallel_size > 1:
        kwargs["distributed_executor_backend"] = "ray"  # its workers in the replica's group
    if not engines_use_gpu(cfg):
        # vLLM's CPU build fails a seeded request whose prompt is prefilled in chunks
        # ("CPU Generator does not use offset": it rewinds the request's generator, which
        # CPU generators cannot do): prefill every prompt in one step instead.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(v.max_model_len or CPU_MAX_PREFILL_TOKENS, 2048)
    if cfg.structured_output:
        # llguidance: xgrammar 0.2 fails to compile the schemas' bounded string patterns
        # ("per_rule_fsm_hashes" check) and ignores a request's disable_any_whitespace.
        kwargs["structured_outputs_config"] = {
            "backend": "guidance",
            "disable_any_whitespace": True,
        }
    kwargs.update(v.engine_kwargs)
    return kwargs


def worker_request(cfg: LLMConfig, workers: int = 1) -> dict[str, Any]:
    """Ray's request for ``workers`` engine workers (one per tensor-parallel rank) from
    ``llm.vllm``'s placement fields, through :func:`raypipe.placement.actor_resources`
    like every other pool's: ``num_cpus``, ``num_gpus``, ``resources`` and, for GPU
    engines only, ``accelerator_type``."""
    v = cfg.vllm
    return actor_resources(
        num_cpus=v.cpus_per_worker * workers,
        num_gpus=v.gpus_per_worker * workers or None,
        resources={name: amount * workers for name, amount in v.resources.items()},
        accelerator_type=v.accelerator_type,
    )


def worker_bundle(cfg: LLMConfig) -> dict[str, float]:
    """:func:`worker_request` as a placement-group bundle: ``CPU``, ``GPU`` and the custom
    resources. Its ``accelerator_type`` is no bundle key (see :func:`deployment_options`)."""
    request = worker_request(cfg)
    bundle = {"CPU": request["num_cpus"], **request.get("resources", {})}
    if request.get("num_gpus"):
        bundle["GPU"] = request["num_gpus"]
    return bundle


def engines_use_gpu(cfg: LLMConfig) -> bool:
    return cfg.vllm.gpus_per_worker > 0


#: The Serve deployment that holds the engines, in every engine application.
DEPLOYMENT = "EngineServer"
#: Serve applications of engines are named this, then a hash of what they run.
APP_PREFIX = "raypipe-vllm-"


def deployment_options(cfg: LLMConfig) -> dict[str, Any]:
    """The Serve options of the engine deployment: ``min_engines..max_engines`` replicas
    (autoscaled on requests in flight, ``batch_size`` per engine), each one engine placed
    through :func:`worker_request` like every other pool. An engine of one worker is one
    actor with that request (``accelerator_type`` included); a tensor-parallel engine is
    a placement group of one bundle per rank, with ``accelerator_type`` as Ray's
    ``accelerator_type:X`` label resource in each bundle (a bundle takes no
    ``accelerator_type`` key), the replica itself in the first bundle."""
    v = cfg.vllm
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        "max_ongoing_requests": 2 * v.batch_size,
        "max_constructor_retry_count": v.engine_restarts + 1,
        "health_check_period_s": 10.0,
        "graceful_shutdown_timeout_s": 5.0,
    }
    if v.min_engines == v.max_engines:
        options["num_replicas"] = v.max_engines
    else:
        options["autoscaling_config"] = {
            "min_replicas": v.min_engines,
            "max_replicas": v.max_engines,
            "target_ongoing_requests": v.batch_size,
        }
    request = worker_request(cfg)
    if v.tensor_parallel_size == 1:
        options["ray_actor_options"] = request
        return options
    bundle = worker_bundle(cfg)
    if request.get("accelerator_type"):
        bundle[f"accelerator_type:{request['accelerator_type']}"] = 0.001
    options["ray_actor_options"] = {"num_cpus": 0}
    options["placement_group_bundles"] = [bundle] * v.tensor_parallel_size
    options["placement_group_strategy"] = "PACK"
    return options


def service_name(cfg: LLMConfig) -> str:
    """The Serve application of ``cfg``'s engines: the same model, engine arguments and
    placement (and raypipe version) give the same name, so a run finds engines another run left up
    (``llm.vllm.keep_engines``, or a killed run) and uses them instead of starting its own."""
    import hashlib

    from raypipe import __version__

    what = [__version__, model_path(cfg), engine_kwargs(cfg), deployment_options(cfg)]
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
    return APP_PREFIX + digest[:12]
