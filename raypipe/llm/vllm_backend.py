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

The application is named after what it runs (:func:`service_name`), so engines left up
by an earlier run (``llm.vllm.keep_engines``) or by a killed run (its resume) are found
and used instead of loading the model again. An engine that cannot start or dies fails
the run with a :class:`ModelError` that says what to do (:func:`start_failure`,
:func:`engine_failure`). :func:`check_model` fails fast, before any engine or render
actor starts, for a model that is missing, is no chat model, has an architecture or (on
CPU) a head size vLLM cannot run, or does not fit the engine's memory.

Sampling: each request's own ``seed`` goes into vLLM's ``SamplingParams`` (per-request
generators), with its temperature and max_tokens. An answer the engine stopped at
max_tokens gets ``finish_reason="length"`` and is rejected as ``max_tokens``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from raypipe.config import LLMConfig
from raypipe.errors import ConfigError, ModelError
from raypipe.llm.base import LLMRequest, LLMResult
from raypipe.llm.cache import ResponseCache, request_key
from raypipe.placement import actor_resources

log = logging.getLogger(__name__)

#: Ray Data's own default for async stages is 4 batches at once per task; raypipe hands
#: rows to the engine one by one (see VLLMConfig.batch_size), so it raises the bound.
ASYNC_CONCURRENCY_VAR = "RAY_DATA_DEFAULT_ASYNC_BATCH_UDF_MAX_CONCURRENCY"
#: Tokens one CPU engine step may prefill when llm.vllm.max_model_len is not set.
CPU_MAX_PREFILL_TOKENS = 8192
#: Bytes of RAM left to the rest of the node when a CPU engine's fit is checked.
CPU_HEADROOM_BYTES = 2 * 2**30


# ---------------------------------------------------------------------------------------
# Requests: cache key, token ids, sampling parameters, finish reason
# ---------------------------------------------------------------------------------------


def cache_body(model: str, req: LLMRequest) -> dict[str, Any]:
    """What the cache key hashes: the chat-completion body the ``openai`` backend sends
    for ``req`` (reasoning off), plus the schema as ``response_format`` when it has one."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [dict(m) for m in req.messages],
        "temperature": req.temperature,
        "max_tokens": req.max_tokens,
    }
    if req.seed is not None:
        body["seed"] = req.seed
    if req.response_schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": req.task, "schema": req.response_schema},
        }
    return body


def sampling_params(req: LLMRequest) -> dict[str, Any]:
    """``req``'s vLLM ``SamplingParams`` as a plain dict (what Ray Data LLM rows carry)."""
    schema = req.response_schema
    return {
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "seed": req.seed,
        "structured_outputs": None
        if schema is None
        else {"json": json.dumps(schema), "disable_any_whitespace": True},
    }


def chat_ids(tokenizer: Any, messages) -> list[int]:
    """The prompt token ids of ``messages`` through the tokenizer's chat template, with
    the generation prompt (what ``vllm.LLM.chat`` feeds the engine)."""
    out = tokenizer.apply_chat_template(
        [dict(m) for m in messages], add_generation_prompt=True, tokenize=True
    )
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(i) for i in ids]


def decode(tokenizer: Any, tokens: list[int]) -> str:
    """An answer's text from its token ids, decoded whole. vLLM's incremental detokenizer
    can drop text when a byte-fallback sequence goes astray ("invalid prefix
    detokenization error ... resetting decode stream"), leaving e.g. half a JSON object."""
    return tokenizer.decode(tokens, skip_special_tokens=True)


def finish_reason(n_out: int, last_token: int | None, max_tokens: int, eos: set[int]) -> str:
    """``length`` when the engine stopped at ``max_tokens`` without an end token, else
    ``stop`` (Ray Data LLM rows carry the tokens, not vLLM's finish reason)."""
    if n_out >= max_tokens and last_token not in eos:
        return "length"
    return "stop"


def eos_ids(tokenizer: Any, path: str) -> set[int]:
    """The tokens that end an answer: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        from transformers import GenerationConfig

        extra = GenerationConfig.from_pretrained(path).eos_token_id
        ids |= set(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    except (OSError, ValueError):
        pass
    return ids


# ---------------------------------------------------------------------------------------
# Engine settings and the Ray Data LLM processor
# ---------------------------------------------------------------------------------------


def model_path(cfg: LLMConfig) -> str:
    """``llm.model`` as the engines load it: a folder, or a hub id (checked, not loaded)."""
    from raypipe.generate.render import resolve_pretrained

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


# ---------------------------------------------------------------------------------------
# Fail-fast checks
# ---------------------------------------------------------------------------------------


def _weights_bytes(path: str) -> int:
    folder = Path(path)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(path, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the local cache: size unknown here
            return 0
    return sum(
        f.stat().st_size
        for pattern in ("*.safetensors", "*.bin", "*.pt")
        for f in folder.glob(pattern)
    )


def check_model(cfg: LLMConfig) -> dict[str, Any]:
    """Fail in seconds, with what to do, for a model the engines could not serve.

    Checks: the model resolves (folder with config.json, or a cached/fetchable hub id);
    its tokenizer has a chat template (raypipe sends chat requests); its architecture
    is one vLLM implements and ``max_model_len`` is within its positions; on CPU engines
    its attention head size is one vLLM's CPU attention supports; its weights fit the
    memory of one engine (GPU memory where this process sees the GPU, RAM for CPU
    engines). The last checks import vLLM (about ten seconds) and are skipped, with a
    log line, where vLLM is not installed in the driver's environment.
    """
    from transformers import AutoConfig, AutoTokenizer

    path = model_path(cfg)
    try:
        hf = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(
            f"llm.model={cfg.model!r}: cannot read its config or tokenizer ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Point llm.model at a folder written "
            "by save_pretrained (config.json, tokenizer files, weights) or at a hub id."
        ) from None
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"llm.model={cfg.model!r} is not a chat model: its tokenizer has no chat "
            "template, and raypipe sends chat requests (system + user messages). Use an "
            "instruct/chat model (e.g. Qwen/Qwen2.5-7B-Instruct), or add a chat_template "
            "to its tokenizer_config.json."
        )
    info: dict[str, Any] = {"path": path, "architectures": list(hf.architectures or [])}
    max_pos = getattr(hf, "max_position_embeddings", None)
    if cfg.vllm.max_model_len and max_pos and cfg.vllm.max_model_len > max_pos:
        raise ConfigError(
            f"llm.vllm.max_model_len={cfg.vllm.max_model_len} is more than {cfg.model!r} "
            f"has positions for ({max_pos}). Set llm.vllm.max_model_len<={max_pos}."
        )
    weights = _weights_bytes(path)
    info["weights_gib"] = round(weights / 2**30, 3)
    per_engine = weights / cfg.vllm.tensor_parallel_size
    v = cfg.vllm
    if not engines_use_gpu(cfg):
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        kv = v.gpu_memory_utilization * ram
        if per_engine + kv + CPU_HEADROOM_BYTES > ram:
            raise ModelError(
                f"llm.model={cfg.model!r} needs {per_engine / 2**30:.1f} GiB for weights plus "
                f"{kv / 2**30:.1f} GiB of KV cache (llm.vllm.gpu_memory_utilization="
                f"{v.gpu_memory_utilization} of {ram / 2**30:.0f} GiB RAM) per CPU engine, "
                "more than this node has. Lower gpu_memory_utilization (0.1 reserves a tenth "
                "of RAM) or use a smaller model."
            )
    else:
        try:
            import torch

            if torch.cuda.is_available():
                gpu = torch.cuda.get_device_properties(0).total_memory * v.gpus_per_worker
                if per_engine > v.gpu_memory_utilization * gpu:
                    raise ModelError(
                        f"llm.model={cfg.model!r}: {per_engine / 2**30:.1f} GiB of weights per "
                        f"engine worker do not fit in {v.gpu_memory_utilization} of "
                        f"{gpu / 2**30:.0f} GiB GPU memory. Raise llm.vllm.tensor_parallel_size "
                        "or gpu_memory_utilization, or use a smaller (or quantized) model."
                    )
        except ImportError:  # pragma: no cover - torch ships with raypipe
            pass
    try:
        from vllm.model_executor.models import ModelRegistry
    except ImportError:
        log.info("vllm is not installed here: architecture checks left to the engines")
        return info
    supported = set(ModelRegistry.get_supported_archs())
    if info["architectures"] and not set(info["architectures"]) & supported:
        raise ModelError(
            f"llm.model={cfg.model!r} is a {', '.join(info['architectures'])}, which this "
            "vLLM does not implement. Choose a model vLLM supports (its docs list them) or "
            "use llm.backend=openai with a server that serves it."
        )
    if not engines_use_gpu(cfg):
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        heads = getattr(hf, "num_attention_heads", None)
        head_dim = getattr(hf, "head_dim", None) or (
            hf.hidden_size // heads if heads and getattr(hf, "hidden_size", None) else None
        )
        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim is not None and head_dim not in sizes:
            raise ModelError(
                f"llm.model={cfg.model!r} has attention heads of size {head_dim}; vLLM's CPU "
                f"attention supports {sizes} (llm.vllm.gpus_per_worker=0 runs the engines on "
                "CPU). Use a model with a supported head size, or GPU engines."
            )
    return info


# ---------------------------------------------------------------------------------------
# An engine that died
# ---------------------------------------------------------------------------------------

#: What names an actor that holds a vLLM engine in Ray's errors: a replica of the engine
#: deployment (``ServeReplica:<app>:EngineServer``) or the service that starts it.
ENGINE_ACTORS = (DEPLOYMENT, "EngineService")
#: Ray's errors for an actor that died, as they read in the text of an error that wraps one.
ACTOR_DEATHS = ("ActorDiedError", "ActorUnavailableError", "RayActorError")


def engine_failure(exc: BaseException, cfg: LLMConfig, engine: bool = False) -> ModelError | None:
    """The :class:`ModelError` that says what to do when ``exc`` is a vLLM engine that
    died or could not start, else None (the caller re-raises ``exc``).

    Ray reports an actor that died as a ``RayActorError`` (``ActorDiedError``,
    ``ActorUnavailableError``) naming the actor's class; an engine replica that dies
    mid-request fails the request that way, and the stream with it (Serve replaces the
    replica; the same command resumes the run). An engine that cannot start is a
    ``ModelError`` from :class:`EngineService`, found through Ray's wrapping and returned
    as it is. Any other actor that died (a render actor out of memory) is no engine
    failure; ``engine=True``: the caller called nothing but an engine, so any actor death
    counts.
    """
    from ray.exceptions import RayActorError, RayError

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ModelError) and not isinstance(e, RayError):
            return e
        text = str(e)
        names_engine = engine or any(n in text for n in ENGINE_ACTORS)
        # A stage that called a dead engine fails with its own error (Ray Data's
        # UserCodeException), whose text holds the actor error it got.
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if isinstance(e, RayActorError):
            died, first = type(e).__name__, (lines or [""])[0]
        elif isinstance(e, RayError):
            died = next((n for n in ACTOR_DEATHS if n in text), None)
            first = next((line for line in lines if died and died in line), "")
        else:
            died = None
        if died and names_engine:
            return ModelError(
                f"a vLLM engine for llm.model={cfg.model!r} died ({died}: "
                f"{first[:300]}). The engine's own error is in the worker log above "
                "(log_to_driver=true shows it) or under Ray's session logs "
                "(/tmp/ray/session_latest/logs). Usual causes: too little memory for weights "
                "+ KV cache (lower llm.vllm.gpu_memory_utilization or llm.vllm.max_model_len, "
                "or raise llm.vllm.tensor_parallel_size), a dtype the device lacks "
                "(llm.vllm.dtype), a model vLLM cannot run. Rows already written are kept: "
                "fix the setting and run the same command again to resume."
            )
        todo.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    return None


def start_failure(cfg: LLMConfig, app: str, error: BaseException) -> ModelError:
    """What to do when the engines of ``app`` could not start (Serve gave up after
    ``engine_restarts + 1`` tries, or the deployment failed)."""
    import re

    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = lines[0][:300] if lines else type(error).__name__
    # Serve's message holds the constructor's traceback: its last exception line says why.
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    if raised and raised[-1] not in detail:
        detail += " ... " + raised[-1][:300]
    tries = cfg.vllm.engine_restarts + 1
    tried = "once" if tries == 1 else f"{tries} times"
    return ModelError(
        f"the vLLM engines for llm.model={cfg.model!r} could not start (Serve application "
        f"{app!r}, tried {tried}: {detail}). The engine's own error "
        "is in the worker log above (log_to_driver=true shows it) or under Ray's session "
        "logs (/tmp/ray/session_latest/logs). Usual causes: too little memory for weights "
        "+ KV cache (lower llm.vllm.gpu_memory_utilization or llm.vllm.max_model_len, or "
        "raise llm.vllm.tensor_parallel_size), a dtype the device lacks (llm.vllm.dtype), "
        "no node with the engine's resources (llm.vllm.gpus_per_worker, resources, "
        "accelerator_type). Nothing was rendered for it: fix the setting and run again."
    )


# ---------------------------------------------------------------------------------------
# The engines (a Serve application) and the backend object
# ---------------------------------------------------------------------------------------


class EngineServer:
    """One vLLM engine (``vllm.AsyncLLMEngine``): the body of the engine deployment's
    replicas. ``generate`` answers the stream's rows (Ray Data LLM's serve stage calls it
    and reads one item); ``complete`` answers one request of :class:`VLLMBackend`."""

    def __init__(self, path: str, kwargs: dict[str, Any]):
        import vllm

        args = vllm.AsyncEngineArgs(model=path, **kwargs)
        self.engine = vllm.AsyncLLMEngine.from_engine_args(args)
        self._tokenizer = None

    async def _run(self, prompt_ids, params: dict[str, Any]):
        import uuid

        import vllm
        from vllm.sampling_params import StructuredOutputsParams

        try:
            from vllm.inputs import TokensPrompt
        except ImportError:  # pragma: no cover - vLLM >= 0.19 moved it
            from vllm.inputs.llm import TokensPrompt
        # Rows from Ray Data hold numpy scalars, which vLLM's request encoder refuses.
        p = {k: (v.item() if hasattr(v, "item") else v) for k, v in dict(params).items()}
        so = p.pop("structured_outputs", None)
        sampling = vllm.SamplingParams(
            **p, structured_outputs=StructuredOutputsParams(**dict(so)) if so else None
        )
        prompt = TokensPrompt(prompt_token_ids=[int(i) for i in prompt_ids])
        final = None
        async for out in self.engine.generate(
            request_id=uuid.uuid4().hex, prompt=prompt, sampling_params=sampling
        ):
            final = out
        return final

    async def generate(self, request: dict[str, Any]):
        out = await self._run(request["prompt_token_ids"], request["sampling_params"])
        yield {
            "rp_tokens": list(out.outputs[0].token_ids),
            "rp_prompt_tokens": len(out.prompt_token_ids),
        }

    async def complete(self, prompt_ids: list[int], params: dict[str, Any]) -> dict[str, Any]:
        out = await self._run(prompt_ids, params)
        if self._tokenizer is None:
            import inspect

            tokenizer = self.engine.get_tokenizer()  # a coroutine in some vLLM versions
            self._tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer
        tokens = list(out.outputs[0].token_ids)
        return {
            "text": decode(self._tokenizer, tokens),
            "prompt_tokens": len(out.prompt_token_ids),
            "completion_tokens": len(tokens),
            "finish_reason": out.outputs[0].finish_reason,
        }

    async def check_health(self) -> None:
        if self.engine.errored:  # Serve replaces a replica whose engine died
            raise RuntimeError(f"the vLLM engine died: {self.engine.dead_error!r}")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None and hasattr(engine, "shutdown"):
            engine.shutdown()  # its engine-core process, which Ray does not track


class EngineService:
    """The run's engines: one Serve application (``min_engines..max_engines`` replicas of
    :class:`EngineServer`), shared by every writer of the run, the keyword banks and the
    on-demand requests of writers served from OUT/cache. Held by one Ray actor per run
    (or per :class:`VLLMBackend` used alone), so that whoever needs the engines first
    starts them, once, and nobody starts them when no request needs them.

    :meth:`ensure` starts the application, or uses the one already running under the same
    name (:func:`service_name`: same model, engine arguments and placement), left up by an
    earlier run (``llm.vllm.keep_engines``) or by a run that was killed: its resume uses
    them. :meth:`stop` deletes the application unless ``keep``, and says what it cost.
    """

    #: Seconds between looks at an application another run is still deploying.
    POLL_S = 1.0

    def __init__(self, llm: dict[str, Any]):
        self.cfg = LLMConfig.model_validate(llm)
        self.app = service_name(self.cfg)
        self.started = False  # by this service (False: found running)
        self.since: float | None = None
        self.held_s = 0.0
        self.replicas = 0
        self.used = False
        self.deleted = False

    def ensure(self) -> str:
        """The running application's name, started here if it was not running."""
        if self.since is not None:
            return self.app
        from ray import serve

        serve.start(proxy_location="Disabled")  # no HTTP: handles only
        status = self._status()
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            serve.delete(self.app)
            status = None
        if status is None:
            app = (
                serve.deployment(EngineServer)
                .options(**deployment_options(self.cfg))
                .bind(model_path(self.cfg), engine_kwargs(self.cfg))
            )
            try:
                serve.run(app, name=self.app, route_prefix=None)
            except Exception as e:  # noqa: BLE001 - Serve says RuntimeError; told apart here
                why = self._why()  # Serve's own error names only the deployment
                serve.delete(self.app)  # a failed application holds its resources
                raise start_failure(
                    self.cfg, self.app, RuntimeError(f"{e}\n{why}" if why else str(e))
                ) from None
            self.started = True
        else:
            while status == "DEPLOYING":  # another run is starting the same engines
                time.sleep(self.POLL_S)
                status = self._status()
            if status != "RUNNING":
                raise start_failure(self.cfg, self.app, RuntimeError(f"application {status}"))
        self.since = time.monotonic()
        self.used = True
        self.replicas = self._replicas()
        log.info("vLLM engines %s: %s", "started" if self.started else "found running", self.app)
        return self.app

    def _app(self):
        """Serve's status of the application, or None when it is not deployed."""
        from ray import serve

        return serve.status().applications.get(self.app)

    def _status(self) -> str | None:
        app = self._app()
        return None if app is None else str(getattr(app.status, "value", app.status))

    def _why(self) -> str:
        """What Serve says about the failed engine deployment: the constructor's
        traceback, whose last exception line is the engine's own error."""
        try:
            app = self._app()
        except Exception:  # noqa: BLE001 - only a better message is at stake
            return ""
        if app is None:
            return ""
        deployment = app.deployments.get(DEPLOYMENT)
        return "\n".join(m for m in (app.message, getattr(deployment, "message", "")) if m)

    def _replicas(self) -> int:
        app = self._app()
        if app is None or DEPLOYMENT not in app.deployments:
            return 0
        states = app.deployments[DEPLOYMENT].replica_states or {}
        return int(sum(n for state, n in states.items() if str(state).endswith("RUNNING")))

    def stop(self, keep: bool = False) -> dict[str, Any]:
        """Stop counting the engines' time, and delete the application unless ``keep``
        (it stays up for the next run); what the engines cost (:meth:`stats`)."""
        if self.since is not None:
            self.replicas = max(self.replicas, self._replicas())
            self.held_s += time.monotonic() - self.since
            self.since = None
        if self.used and not keep and not self.deleted:
            from ray import serve

            serve.delete(self.app)
            self.deleted = True
        return self.stats()

    def stats(self) -> dict[str, Any]:
        """``engines_started``: engines this service started (0: none, or found running);
        ``engine_s``: engine-seconds this run held (its time x the engines running)."""
        held = self.held_s + (time.monotonic() - self.since if self.since is not None else 0.0)
        engines = self.replicas or self.cfg.vllm.max_engines
        return {
            "app": self.app,
            "engines_started": engines if self.started else 0,
            "found_running": self.used and not self.started,
            "engine_s": held * engines if self.used else 0.0,
        }


class VLLMBackend:
    """The ``vllm`` backend object (see the module docstring).

    In the stream's actors it holds what their stages share (the model path, tokenizer,
    cache, limits) and starts nothing. :meth:`complete_batch` (keyword banks, writers
    served from OUT/cache, tests) sends what the cache does not answer to the engines of
    the :class:`EngineService` given to :meth:`attach` (the run's), or else of one of its
    own, started on first use and stopped by :meth:`close`.
    """

    def __init__(self, cfg: LLMConfig, cache_dir: str | Path | None = None):
        self.cfg = cfg
        self.model = cfg.model
        self.cache = ResponseCache(cache_dir) if cache_dir else None
        self._path: str | None = None
        self._tokenizer = None
        self._eos: set[int] | None = None
        self._max_len: int | None = None
        self._service = None  # an EngineService actor (attach, or this backend's own)
        self._own_service = False
        self._handle = None  # the Serve handle of the service's engines
        self.engine_s = 0.0  # engine-seconds of this backend's own service
        self._counts = dict(
            requests=0, cache_hits=0, failures=0, prompt_tokens=0, completion_tokens=0,
            cached_prompt_tokens=0, cached_completion_tokens=0, engines_started=0,
        )  # fmt: skip

    # --- what the stream's stages use -------------------------------------------------

    @property
    def path(self) -> str:
        if self._path is None:
            self._path = model_path(self.cfg)
        return self._path

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._tokenizer

    @property
    def eos(self) -> set[int]:
        if self._eos is None:
            self._eos = eos_ids(self.tokenizer, self.path)
        return self._eos

    @property
    def max_model_len(self) -> int:
        if self._max_len is None:
            from transformers import AutoConfig

            own = getattr(AutoConfig.from_pretrained(self.path), "max_position_embeddings", None)
            self._max_len = self.cfg.vllm.max_model_len or own or 2**31
        return self._max_len

    def key(self, req: LLMRequest) -> str:
        return request_key(cache_body(self.model, req))

    def cached(self, req: LLMRequest) -> dict[str, Any] | None:
        return self.cache.get(self.key(req)) if self.cache is not None else None

    def prompt_ids(self, req: LLMRequest) -> tuple[list[int] | None, str | None]:
        """``(token ids, None)``, or ``(None, error)`` when prompt + max_tokens cannot fit."""
        ids = chat_ids(self.tokenizer, req.messages)
        if len(ids) + req.max_tokens > self.max_model_len:
            return None, (
                f"prompt_too_long: {len(ids)} prompt tokens + max_tokens {req.max_tokens} > "
                f"max_model_len {self.max_model_len}; raise llm.vllm.max_model_len"
            )
        return ids, None

    def served(self, req: LLMRequest, entry: dict[str, Any]) -> LLMResult:
        """A stored answer, served: nothing generated, its usage counted as cached."""
        prompt, completion = (
            int(entry.get("prompt_tokens") or 0),
            int(entry.get("completion_tokens") or 0),
        )
        self._count(cache_hits=1, cached_prompt_tokens=prompt, cached_completion_tokens=completion)
        return LLMResult(
            key=req.key,
            text=entry["text"],
            cached=True,
            cached_prompt_tokens=prompt,
            cached_completion_tokens=completion,
            finish_reason=entry.get("finish_reason"),
        )

    def generated(
        self, req: LLMRequest, text: str, prompt_tokens: int, completion_tokens: int, finish: str
    ) -> LLMResult:
        """An answer the engine wrote: stored in the cache (when there is text), counted."""
        self._count(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        common = dict(
            key=req.key,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=finish,
        )
        if not text:
            self._count(failures=1)
            return LLMResult(
                text=None,
                error=f"empty_completion: the model returned no text ({finish})",
                **common,
            )
        if self.cache is not None:
            self.cache.put(
                self.key(req),
                {
                    "model": self.model,
                    "text": text,
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "cost_usd": 0.0,
                    "finish_reason": finish,
                },
            )
        return LLMResult(text=text, **common)

    def failed(self, req: LLMRequest, error: str) -> LLMResult:
        self._count(failures=1)
        return LLMResult(key=req.key, text=None, error=error)

    # --- the LLMBackend protocol (the run's engines, or engines of its own) -------------

    def check(self) -> dict[str, Any]:
        return check_model(self.cfg)

    def attach(self, service) -> None:
        """Use the engines of ``service`` (an :class:`EngineService` actor, the run's)
        instead of starting a service of this backend's own; they are counted there."""
        self._service = service

    def _engine(self):
        """The Serve handle of the engines (the service starts them if they are not up)."""
        if self._handle is None:
            import ray
            from ray import serve

            if self._service is None:
                self._service = (
                    ray.remote(EngineService).options(num_cpus=0).remote(self.cfg.model_dump())
                )
                self._own_service = True
            app = ray.get(self._service.ensure.remote())
            self._handle = serve.get_app_handle(app)
        return self._handle

    def complete_batch(self, requests: list[LLMRequest]) -> list[LLMResult]:
        results: list[LLMResult | None] = [None] * len(requests)
        todo: list[tuple[int, list[int]]] = []
        for i, req in enumerate(requests):
            self._count(requests=1)
            entry = self.cached(req)
            if entry is not None:
                results[i] = self.served(req, entry)
                continue
            ids, error = self.prompt_ids(req)
            if error:
                results[i] = self.failed(req, error)
            else:
                todo.append((i, ids))
        if todo:
            try:
                engine = self._engine()
                calls = [
                    engine.complete.remote(ids, sampling_params(requests[i])) for i, ids in todo
                ]
                outs = [call.result() for call in calls]
            except Exception as e:  # noqa: BLE001 - sorted by engine_failure
                error = engine_failure(e, self.cfg, engine=True)
                if error is None:
                    raise
                raise error from None
            for (i, _), out in zip(todo, outs):
                results[i] = self.generated(
                    requests[i],
                    out["text"],
                    out["prompt_tokens"],
                    out["completion_tokens"],
                    "length" if out["finish_reason"] == "length" else "stop",
                )
        return results  # type: ignore[return-value]

    def _count(self, **deltas: int) -> None:
        for k, v in deltas.items():
            self._counts[k] += v

    def stats(self) -> dict[str, Any]:
        return {**self._counts, "cost_usd": 0.0, "engine_s": self.engine_s}

    def close(self) -> None:
        """Stop this backend's own engines (unless ``llm.vllm.keep_engines``); an
        attached service is the caller's to stop."""
        self._handle = None
        if self._own_service:
            import ray

            stopped = ray.get(self._service.stop.remote(self.cfg.vllm.keep_engines))
            self._counts["engines_started"] += stopped["engines_started"]
            self.engine_s += stopped["engine_s"]
            ray.kill(self._service)
            self._service, self._own_service = None, False

    def __repr__(self) -> str:
        return f"VLLMBackend(model={self.model!r})"
