"""The ``vllm`` backend: vLLM engines inside the cluster, reached through Ray Data LLM.

The run's engines are one Ray Serve application (:class:`EngineService`):
``llm.vllm.min_engines..max_engines`` replicas of :class:`EngineServer`, each one vLLM
async engine placed like every other pool. Every LLM request of the run goes to them:
in the generation stream each LLM writing stage becomes three (raypipe.generate.engine):
its ``prepare`` half (templates, cache lookup, chat template to token ids), a Ray Data
LLM processor (``ray.data.llm.build_processor`` with a ``ServeDeploymentProcessorConfig``,
:func:`build_engine_processor`) that sends the rows to the engines, and its ``finish``
half (parsing, rejects with reasons, cache writes). The prompt and dialogue writers thus
batch on the same engines, and the GPUs hold one copy of the model per engine, not one
per writer. The keyword banks (before the stream) and the writers served from OUT/cache
(:class:`VLLMBackend`) use the same engines.

Same templates, request keys, seeds, parsers and reject reasons as the ``openai``
backend; the cache key of a request is the one the ``openai`` backend computes for the
same request (the body it would send, plus the JSON schema under
``llm.structured_output``), so answers persisted in OUT/cache are never generated again.
A run whose requests are all answered in OUT/cache starts no engine at all
(raypipe.generate.engine.check_cache); a request the cache then does not answer starts
them then.

The application is named after what it runs (:func:`~raypipe.llm.vllm.settings.service_name`), so engines left up
by an earlier run (``llm.vllm.keep_engines``) or by a killed run (its resume) are found
and used instead of loading the model again. An engine that cannot start or dies fails
the run with a :class:`ModelError` that says what to do (:func:`start_failure`,
:func:`engine_failure`). :func:`check_model` fails fast, before any engine or render
actor starts, for a model that is missing, is no chat model, has an architecture or (on
CPU) a head size vLLM cannot run, or does not fit the engine's memory.

Sampling: each request's own ``seed`` goes into vLLM's ``SamplingParams`` (per-request
generators), with its temperature and max_tokens. An answer the engine stopped at
max_tokens gets ``finish_reason="length"`` and is rejected as ``max_tokens``.

Modules: ``request`` (cache body, sampling parameters, token ids), ``settings`` (engine
arguments, placement, Serve options, application name), ``processor`` (the Ray Data LLM
stage), ``checks`` (fail-fast model checks), ``failures`` (engine deaths and failed
starts as ModelErrors), ``server`` (one engine), ``service`` (the Serve application),
``backend`` (:class:`VLLMBackend`). None imports vLLM at import time.
"""

from raypipe.llm.vllm.backend import VLLMBackend
from raypipe.llm.vllm.checks import check_model
from raypipe.llm.vllm.failures import engine_failure, start_failure
from raypipe.llm.vllm.processor import build_engine_processor
from raypipe.llm.vllm.request import (
    chat_ids,
    decode,
    eos_ids,
    finish_reason,
    sampling_params,
)
from raypipe.llm.vllm.server import EngineServer
from raypipe.llm.vllm.service import EngineService
from raypipe.llm.vllm.settings import (
    APP_PREFIX,
    DEPLOYMENT,
    deployment_options,
    engine_kwargs,
    engines_use_gpu,
    model_path,
    service_name,
    worker_bundle,
    worker_request,
)

__all__ = [
    "APP_PREFIX", "DEPLOYMENT", "EngineServer", "EngineService", "VLLMBackend",
    "build_engine_processor", "chat_ids", "check_model", "decode",
    "deployment_options", "engine_failure", "engine_kwargs", "engines_use_gpu",
    "eos_ids", "finish_reason", "model_path", "sampling_params", "service_name",
    "start_failure", "worker_bundle", "worker_request",
]  # fmt: skip
