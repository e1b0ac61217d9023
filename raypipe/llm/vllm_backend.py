"""The ``vllm`` backend: vLLM engines inside the cluster, through Ray Data LLM.

In the generation stream each LLM writing stage becomes three (raypipe.generate.engine):
its ``prepare`` half (templates, cache lookup, chat template to token ids), a Ray Data
LLM processor (``ray.data.llm.build_processor`` with a ``vLLMEngineProcessorConfig``:
an autoscaling pool of vLLM engines, :func:`build_engine_processor`), and its ``finish``
half (parsing, rejects with reasons, cache writes). Same templates, request keys, seeds,
parsers and reject reasons as the ``openai`` backend; the cache key of a request is the
one the ``openai`` backend computes for the same request (the body it would send, plus
the JSON schema under ``llm.structured_output``), so answers persisted in OUT/cache are
never generated again. A writer whose requests are all answered in OUT/cache gets no
engine pool at all (raypipe.generate.engine.check_cache); a request the cache then
does not answer goes to :class:`EngineOnDemand`, one engine started on that request.
An engine that dies or cannot start fails the run with a :class:`ModelError` that says
what to do (:func:`engine_failure`).

:class:`VLLMBackend` is the same engine outside the stream, for the few requests made
before it (keyword banks): a short-lived engine in one Ray actor with the pool's
placement, started on the first request and stopped by :meth:`VLLMBackend.close`, so its
GPUs go back to the pools before the stream starts. A run whose banks are saved starts
no such engine. It is also what :meth:`VLLMBackend.check` uses to fail fast: a model
that is missing, is no chat model, has an architecture or (on CPU) a head size vLLM
cannot run, or does not fit the engine's memory fails in check_inputs, before any
engine or render actor starts.

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
    resources. Its ``accelerator_type`` is no bundle key (see :func:`engine_placement`)."""
    request = worker_request(cfg)
    bundle = {"CPU": request["num_cpus"], **request.get("resources", {})}
    if request.get("num_gpus"):
        bundle["GPU"] = request["num_gpus"]
    return bundle


def engine_placement(cfg: LLMConfig) -> dict[str, Any]:
    """The placement fields of one writer's ``vLLMEngineProcessorConfig``, from
    :func:`worker_request`: one bundle per tensor-parallel rank (``placement_group_config``)
    and ``accelerator_type``, which Ray Data LLM applies itself: as the engine actor's
    ``accelerator_type`` when the engine is one worker (the actor then asks for the
    bundle's CPUs, GPUs and resources), as an ``accelerator_type:X`` resource in every
    bundle of the engine's placement group otherwise. Ray Data LLM has no other way to
    take it: an ``accelerator_type`` key in a bundle is not a Ray resource name."""
    request = worker_request(cfg)
    return {
        "placement_group_config": {
            "bundles": [worker_bundle(cfg)] * cfg.vllm.tensor_parallel_size,
            "strategy": "PACK",
        },
        "accelerator_type": request.get("accelerator_type"),
    }


def engines_use_gpu(cfg: LLMConfig) -> bool:
    return cfg.vllm.gpus_per_worker > 0


def _preprocess(row: dict[str, Any]) -> dict[str, Any]:
    return {}  # rows arrive ready (raypipe.generate.engine.EngineRequests)


def _postprocess(row: dict[str, Any]) -> dict[str, Any]:
    tokens = row.get("generated_tokens")
    tokens = list(tokens) if tokens is not None else []
    return {
        "rp_payload": row["rp_payload"],
        "rp_tokens": [int(t) for t in tokens],
        "rp_prompt_tokens": int(row.get("num_input_tokens") or 0),
        "rp_completion_tokens": int(row.get("num_generated_tokens") or 0),
        "rp_engine_s": float(row.get("time_taken_llm") or 0.0),  # in the engine, queue included
    }


def build_engine_processor(cfg: LLMConfig):
    """A Ray Data LLM processor for one writing stage: ``processor(ds)`` appends it.

    Rows carry ``tokenized_prompt`` and ``sampling_params`` (raypipe builds the chat
    prompt itself, so the chat-template, tokenize and detokenize stages are off: one
    actor pool, the engines, and two light map tasks). Ray Data LLM's ``batch_size`` is
    1: a larger batch would hold rows until that many have arrived, and the generation
    stream's source waits for its rows to be decided, so a run's last rows would wait
    forever. Each engine still decodes ``llm.vllm.batch_size`` requests together
    (``max_num_seqs``), with as many in flight. A dead engine is restarted
    ``llm.vllm.engine_restarts`` times, then the run fails (not restarted forever).
    Placement: :func:`engine_placement`.
    """
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    v = cfg.vllm
    config = vLLMEngineProcessorConfig(
        model_source=model_path(cfg),
        engine_kwargs=engine_kwargs(cfg),
        concurrency=(v.min_engines, v.max_engines),
        batch_size=1,
        max_concurrent_batches=v.batch_size,
        **engine_placement(cfg),
        log_engine_metrics=False,  # else vLLM imports ray.serve
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        should_continue_on_error=True,  # a failed request becomes a reject, not a dead job
        runtime_env={"env_vars": {ASYNC_CONCURRENCY_VAR: str(v.batch_size)}},
    )
    processor = build_processor(
        config,
        preprocess=_preprocess,
        postprocess=_postprocess,
        preprocess_map_kwargs={"num_cpus": 0.05},
        postprocess_map_kwargs={"num_cpus": 0.05},
    )
    engine = processor.get_stage_by_name("vLLMEngineStage")
    engine.map_batches_kwargs.update(
        max_restarts=v.engine_restarts, max_task_retries=v.engine_restarts
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

#: Classes of the Ray actors that hold a vLLM engine: Ray Data LLM's engine stage (its
#: pool's actors are named ``MapWorker(MapBatches(vLLMEngineStageUDF))``), and raypipe's
#: own engine actor and the on-demand one that starts it.
ENGINE_ACTORS = ("vLLMEngineStageUDF", "EngineActor", "EngineOnDemand")


def engine_failure(exc: BaseException, cfg: LLMConfig, engine: bool = False) -> ModelError | None:
    """The :class:`ModelError` that says what to do when ``exc`` is a vLLM engine that
    died or could not start, else None (the caller re-raises ``exc``).

    Ray reports an actor that died as a ``RayActorError`` (``ActorDiedError``,
    ``ActorUnavailableError``) naming the actor's class. Ray Data LLM's engine stage exits
    its actor when its engine dies (vLLM's ``EngineDeadError``) or fails to load, Ray
    restarts it ``llm.vllm.engine_restarts`` times, and Ray Data then fails the whole
    execution with that error. A ``ModelError`` raised in a stage (an on-demand engine of
    a cache-served writer that died) is found through Ray's wrapping and returned as it
    is. Any other actor that died (a render actor out of memory) is no engine failure;
    ``engine=True``: the caller called nothing but an engine, so any actor death counts.
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
        if isinstance(e, RayActorError) and (engine or any(n in text for n in ENGINE_ACTORS)):
            pool = "vLLMEngineStageUDF" in text
            times = f"{cfg.vllm.engine_restarts + 1} times" if pool else "once"
            first = next((line for line in text.splitlines() if line.strip()), type(e).__name__)
            return ModelError(
                f"a vLLM engine for llm.model={cfg.model!r} could not start or died ({times}; "
                f"{type(e).__name__}: {first.strip()}). The engine's own error is in the "
                "worker log above (log_to_driver=true shows it) or under Ray's session logs "
                "(/tmp/ray/session_latest/logs). Usual causes: too little memory for weights "
                "+ KV cache (lower llm.vllm.gpu_memory_utilization or llm.vllm.max_model_len, "
                "or raise llm.vllm.tensor_parallel_size), a dtype the device lacks "
                "(llm.vllm.dtype), a model vLLM cannot run. Rows already written are kept: "
                "fix the setting and run the same command again to resume."
            )
        todo.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    return None


# ---------------------------------------------------------------------------------------
# The backend object: helpers for the stream's stages, a short-lived engine for the rest
# ---------------------------------------------------------------------------------------


class EngineActor:
    """One ``vllm.LLM`` in a Ray actor: the short-lived engine of :class:`VLLMBackend`."""

    def __init__(self, path: str, kwargs: dict[str, Any]):
        import vllm

        kwargs = dict(kwargs)
        kwargs.pop("disable_log_stats", None)
        self.llm = vllm.LLM(model=path, **kwargs)

    def generate(self, prompts: list[list[int]], params: list[dict[str, Any]]) -> list[dict]:
        import vllm
        from vllm.sampling_params import StructuredOutputsParams

        sampling = []
        for p in params:
            p = dict(p)
            so = p.pop("structured_outputs", None)
            sampling.append(
                vllm.SamplingParams(
                    **p, structured_outputs=StructuredOutputsParams(**so) if so else None
                )
            )
        outs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompts], sampling, use_tqdm=False
        )
        tokenizer = self.llm.get_tokenizer()
        return [
            {
                "text": decode(tokenizer, list(o.outputs[0].token_ids)),
                "prompt_tokens": len(o.prompt_token_ids),
                "completion_tokens": len(o.outputs[0].token_ids),
                "finish_reason": o.outputs[0].finish_reason,
            }
            for o in outs
        ]


class VLLMBackend:
    """The ``vllm`` backend object (see the module docstring).

    In the stream's actors it holds what their stages share (the model path, tokenizer,
    cache, limits) and starts nothing. :meth:`complete_batch` (keyword banks, tests)
    starts one engine actor on first use; :meth:`close` stops it.
    """

    def __init__(self, cfg: LLMConfig, cache_dir: str | Path | None = None):
        self.cfg = cfg
        self.model = cfg.model
        self.cache = ResponseCache(cache_dir) if cache_dir else None
        self._path: str | None = None
        self._tokenizer = None
        self._eos: set[int] | None = None
        self._max_len: int | None = None
        self._actor = None
        self._on_demand = None  # an EngineOnDemand handle (attach)
        self.engine_s = 0.0  # seconds the short-lived engine was held
        self._started = 0.0
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

    # --- the LLMBackend protocol (a short-lived engine) ----------------------------------

    def check(self) -> dict[str, Any]:
        return check_model(self.cfg)

    def attach(self, engine) -> None:
        """Send the requests the cache does not answer to ``engine`` (an
        :class:`EngineOnDemand` actor shared by a writer's actors) instead of an engine
        of this backend's own; that engine's time and start are counted where it lives."""
        self._on_demand = engine

    def _engine(self):
        if self._on_demand is not None:
            return self._on_demand
        if self._actor is None:
            import ray

            # One actor for the whole engine: the request of all its workers.
            options = {
                **worker_request(self.cfg, self.cfg.vllm.tensor_parallel_size),
                "max_restarts": 0,
            }
            self._started = time.monotonic()
            self._counts["engines_started"] += 1
            self._actor = (
                ray.remote(EngineActor)
                .options(**options)
                .remote(self.path, engine_kwargs(self.cfg))
            )
        return self._actor

    def complete_batch(self, requests: list[LLMRequest]) -> list[LLMResult]:
        import ray

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
                outs = ray.get(
                    self._engine().generate.remote(
                        [ids for _, ids in todo], [sampling_params(requests[i]) for i, _ in todo]
                    )
                )
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
        held = time.monotonic() - self._started if self._actor is not None else 0.0
        return {**self._counts, "cost_usd": 0.0, "engine_s": self.engine_s + held}

    def close(self) -> None:
        if self._actor is not None:
            import ray

            ray.kill(self._actor)
            self._actor = None
            self.engine_s += time.monotonic() - self._started

    def __repr__(self) -> str:
        return f"VLLMBackend(model={self.model!r})"


class EngineOnDemand:
    """The engine of a writer served from OUT/cache alone (raypipe.generate.engine): a
    Ray actor that reserves nothing and starts one engine (:class:`EngineActor`, with the
    engine pool's placement) on the first request the cache did not answer, for all of
    that writer's actors. A run that needs none starts none; :meth:`close` stops it and
    says whether it started (``engines_started``) and for how long (``engine_s``)."""

    def __init__(self, llm: dict[str, Any]):
        self.backend = VLLMBackend(LLMConfig.model_validate(llm))

    def generate(self, prompts: list[list[int]], params: list[dict[str, Any]]) -> list[dict]:
        import ray

        return ray.get(self.backend._engine().generate.remote(prompts, params))

    def engine(self):
        """The engine actor (started here if it was not yet)."""
        return self.backend._engine()

    def stats(self) -> dict[str, Any]:
        return self.backend.stats()

    def close(self) -> dict[str, Any]:
        self.backend.close()
        return self.backend.stats()
