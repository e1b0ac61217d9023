"""The generation job's configs: what to make (abilities, counts, seed), with which models
(render, quality checks, the LLM), and how fast (actor pools, in-flight window, limits).

Presets live in ``raypipe/configs/generate/``; every field is classified identity or
operational in :mod:`raypipe.generate.identity`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raypipe.config import Config
from raypipe.errors import ConfigError
from raypipe.llm.config import LLMConfig

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
        description="GPU pools: times a batch is retried after its actor died (the actor "
        "itself is restarted without limit); bounded so a batch that always kills its GPU "
        "actor fails the job. CPU pools retry as Ray Data does by default.",
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


__all__ = ["GenerateConfig", "QualityConfig", "RenderConfig"]
