"""Typed config for LLaVA tuning (``raypipe train``): model, stage, data, scale, optimiser.

Presets live in ``raypipe/configs/train/`` (``tiny``, ``llava15-7b-stage1``,
``llava15-7b-stage2``) and load with :func:`raypipe.config.load_config` plus dotted
overrides such as ``global_batch_size=64`` or ``model.projector=linear``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raypipe.config import Config, load_config

#: LLaVA-1.5's LoRA targets: every linear layer of the LLM's attention and MLP blocks.
LLAMA_LINEAR_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ModelSpec(Config):
    """Which LLaVA to tune: an existing llava-hf checkpoint, or one composed from parts."""

    llava: str | None = Field(
        None,
        description="A llava-hf checkpoint: hub id (llava-hf/llava-1.5-7b-hf), local folder "
        "(e.g. stage 1's export) or raypipe-tiny/<name>. Exclusive with vision_tower + llm.",
    )
    vision_tower: str | None = Field(
        None,
        description="Vision encoder to compose with `llm`: a CLIP(-vision) hub id or folder "
        "(openai/clip-vit-large-patch14-336 for LLaVA-1.5).",
    )
    llm: str | None = Field(
        None,
        description="Causal LM to compose with `vision_tower` (lmsys/vicuna-7b-v1.5 for "
        "LLaVA-1.5); its tokenizer becomes the processor's tokenizer.",
    )
    projector: Literal["linear", "mlp2x_gelu"] = Field(
        "mlp2x_gelu",
        description="Projector of a composed model: `mlp2x_gelu` (Linear-GELU-Linear, "
        "LLaVA-1.5) or `linear` (one Linear, LLaVA). Ignored when `llava` is set.",
    )
    vision_feature_layer: int = Field(
        -2, description="Vision hidden layer fed to the projector (LLaVA uses the penultimate)."
    )
    image_token: str = Field(
        "<image>", description="Placeholder token for image features; added to the tokenizer."
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        parts = self.vision_tower is not None or self.llm is not None
        if self.llava is not None and parts:
            raise ValueError(
                "set either model.llava (a llava checkpoint) or model.vision_tower + model.llm, "
                "not both"
            )
        if self.llava is None and (self.vision_tower is None or self.llm is None):
            raise ValueError(
                "name the model: model.llava=<llava checkpoint> or both "
                "model.vision_tower=<CLIP id> and model.llm=<causal LM id>"
            )
        return self


class LoraSpec(Config):
    """LoRA adapters on the LLM's linear layers (stage 2 only); merged into the export."""

    rank: int = Field(128, ge=1, description="Adapter rank r (LLaVA-1.5 LoRA: 128).")
    alpha: float = Field(256.0, gt=0, description="Scaling numerator: update = alpha/r * BA.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    targets: list[str] = Field(
        default_factory=lambda: list(LLAMA_LINEAR_LAYERS),
        description="Names of the LLM's linear layers that get adapters (vision tower and "
        "projector never do).",
    )


class DataSpec(Config):
    """Training data: sources, mixing, rendering and order."""

    sources: list[str] = Field(
        default_factory=list,
        description="Data sources as `PATH[:IMAGE_FOLDER][@WEIGHT]`: a raypipe Parquet dir/file, "
        "a LLaVA JSON (+ image folder) or a StableLLaVA JSON. WEIGHT sets the mixing ratio "
        "(default 1). `--data` on the command line replaces this list.",
    )
    template: Literal["vicuna_v1", "plain", "chat_template"] = Field(
        "vicuna_v1",
        description="Conversation format: `vicuna_v1` (LLaVA-1.5's conversations), `plain` "
        "(LLaVA-1.5's stage 1: image tokens, then the first answer as a caption, then EOS; "
        "no system prompt, no roles, loss on the caption only) or `chat_template` (the "
        "tokenizer's own chat template). The export's chat template renders the same format.",
    )
    max_length: int = Field(
        2048, ge=16, description="Token limit per sample; text beyond it is cut (never images)."
    )
    pad_to_square: bool = Field(
        True, description="Pad images to a square with the mean colour first (LLaVA-1.5)."
    )
    num_samples: int | None = Field(
        None, ge=1, description="Use at most this many samples per epoch (None = all)."
    )
    deterministic_order: bool = Field(
        True,
        description="The driver builds a light index (ids and Parquet row groups, no "
        "images); each epoch's order is a function of (seed, epoch, data), and every worker "
        "reads only the row groups holding its slice of each global batch "
        "(raypipe/train/shards.py): the batches, and so the losses, do not depend on the "
        "worker count, and resume restarts at the exact sample, reading nothing before it. "
        "False: Ray Data streams and splits the data dynamically between workers (resume "
        "skips the same number of samples, not the same samples; the equal split leaves "
        "num_rows % num_workers rows per epoch, counted in the summary).",
    )
    shuffle_window_rows: int = Field(
        2048,
        ge=1,
        description="deterministic_order: row groups are shuffled, then rows within "
        "windows of at least this many rows; every step samples one window evenly. Larger: "
        "more randomness, more memory (a worker holds its share of the current window's "
        "images, about shuffle_window_rows / num_workers).",
    )
    allow_external_paths: bool = Field(
        False,
        description="Read image paths that leave the source's image folder: absolute paths, "
        "URIs (s3://...) and `..`. Off: such rows are dropped (one reason, nothing read), "
        "so a dataset cannot make workers read other files or buckets with their "
        "credentials. Turn on only for datasets you trust that were exported with "
        "absolute paths.",
    )
    prefetch_steps: int = Field(
        1,
        ge=0,
        description="Steps of samples each worker decodes and tokenises ahead in a "
        "background thread (0 = inline).",
    )


class TrainConfig(Config):
    """One tuning run (one stage)."""

    name: str = Field(
        "train", description="Run name: checkpoints go to OUT/<name>/, the export to OUT/export."
    )
    model: ModelSpec = Field(description="Model to tune.")
    stage: Literal[1, 2] = Field(
        1,
        description="1: train the projector only (feature alignment). 2: train projector + "
        "LLM, vision tower frozen (visual instruction tuning).",
    )
    lora: LoraSpec | None = Field(
        None, description="LoRA on the LLM instead of full tuning (stage 2 only); None = off."
    )
    data: DataSpec = Field(default_factory=DataSpec, description="Training data.")

    # Scale
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one per GPU on GPUs).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL; else CPU and gloo.")
    cpus_per_worker: float | None = Field(
        None,
        gt=0,
        description="CPUs reserved per worker; None = 0.5 on CPU (whole CPUs per worker "
        "starve Ray Data's readers on small machines and deadlock), 4 on GPU.",
    )

    # Batch
    global_batch_size: int = Field(
        8, ge=1, description="Samples per optimiser step, summed over workers."
    )
    micro_batch_size: int = Field(
        2,
        ge=1,
        description="Samples per forward/backward on one worker; gradient accumulation "
        "steps = global_batch_size / (micro_batch_size * num_workers).",
    )

    # Optimiser and schedule
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (LLaVA-1.5: 0).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_ratio: float = Field(
        0.03, ge=0, lt=1, description="Linear warm-up as a fraction of all steps, then cosine."
    )
    epochs: int = Field(1, ge=1, description="Passes over the data (ignored if max_steps is set).")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimiser steps (None = run all epochs)."
    )
    grad_clip: float | None = Field(1.0, gt=0, description="Clip gradient norm; None = off.")
    seed: int = Field(0, description="Seed for data mixing, LoRA init and dropout.")

    # Numerics and memory
    mixed_precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="Compute dtype: `auto` = bf16 on GPU and fp32 on CPU. Parameters, "
        "gradient reduction and optimiser state stay fp32.",
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each decoder/encoder layer in backward to save memory."
    )

    # Checkpoints and logging
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="Sharded checkpoint every N optimiser steps; None = never."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Keep this many latest checkpoints.")
    max_failures: int = Field(
        3,
        ge=0,
        description="Worker-group restarts after a failure (each resumes from the latest "
        "checkpoint) before the run fails.",
    )
    log_every: int = Field(
        1, ge=1, description="Print loss, lr, grad norm and tokens/s every N steps (rank 0)."
    )
    report_every: int = Field(
        10,
        ge=1,
        description="Send metrics to Ray Train (ray.train.report) every N steps, and at "
        "checkpoints and the end. A report waits for Ray Train's controller, which collects "
        "results about every 2 s, so reporting every step slows steps shorter than that.",
    )
    export: bool = Field(
        True, description="Save the tuned model in Hugging Face format to OUT/export at the end."
    )
    peak_flops: float | None = Field(
        None,
        gt=0,
        description="Peak FLOP/s of one accelerator for MFU; None = known GPUs (H100/H200 "
        "bf16 dense 989e12, A100 312e12), MFU not reported on CPU.",
    )

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        per_step = self.micro_batch_size * self.num_workers
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"micro_batch_size * num_workers ({self.micro_batch_size} * "
                f"{self.num_workers} = {per_step}); e.g. set global_batch_size="
                f"{max(per_step, round(self.global_batch_size / per_step) * per_step)} or "
                "change micro_batch_size"
            )
        if self.lora is not None and self.stage != 2:
            raise ValueError("lora applies to stage 2 only; set stage=2 or remove lora")
        return self

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per worker per optimiser step."""
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)

    @property
    def worker_cpus(self) -> float:
        """CPUs Ray reserves for each training worker."""
        if self.cpus_per_worker is not None:
            return self.cpus_per_worker
        return 4.0 if self.use_gpu else 0.5

    @property
    def compute_dtype(self) -> str:
        """`bf16` or `fp32`, resolving `auto` by device."""
        if self.mixed_precision == "auto":
            return "bf16" if self.use_gpu else "fp32"
        return self.mixed_precision


def load_train_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """Preset YAML (optional) + dotted overrides -> validated :class:`TrainConfig`."""
    return load_config(TrainConfig, path, list(overrides))


__all__ = ["DataSpec", "LoraSpec", "ModelSpec", "TrainConfig", "load_train_config"]
