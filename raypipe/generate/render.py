"""The render stage: prompts -> encoded images with a diffusers text-to-image pipeline.

One :class:`Renderer` per actor loads the pipeline once (fp16 + SDPA on CUDA, fp32 on
CPU) and renders batches of rows. Every row gets its own ``torch.Generator`` seeded
with the row's ``seed``, and its text embeddings are computed from its prompt alone
(``((word))`` emphasis and prompts over 77 tokens handled in
:mod:`raypipe.generate.emphasis`). Kernels for a batch of 1 and a batch of 8 round
differently (~1e-6), which flips one 8-bit level in about 1 pixel in 60,000; so with
``batch_invariant`` on (the default on CPU) each row also runs through the text
encoder, UNet and VAE as its own batch, and re-rendering a row gives the same bytes
whichever rows share its pipeline call (on the same kind of machine with the same
number of torch threads: thread count changes reduction order too; Ray gives an actor
``floor(cpus_per_actor)`` threads). On CUDA the default batches whole calls for speed.

:func:`add_render` appends the stage to a Ray Dataset as an autoscaling actor pool
(the generation pipeline appends it with the quality checks, through
:func:`raypipe.generate.quality.add_image_stages`); :func:`check_render_model` validates
the model id in a second, before any rendering. The pipeline's own safety checker is
never run: it would black out images without saying so (the quality stage can run the
same checker as a classifier that rejects with a reason instead).
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raypipe.errors import ConfigError, ModelError
from raypipe.generate.config import RenderConfig
from raypipe.generate.emphasis import TokenChunks, encode_chunks, pad_chunks, tokenize_chunks
from raypipe.generate.unet_batches import (
    KeyLengths,
    masked_forward,
    rowwise_forward,
    trim_forward,
)
from raypipe.models import OFFLINE_HINT, resolve_device, resolve_dtype, resolve_pretrained
from raypipe.schema import is_rejected, reject, rows_to_table, update_meta
from raypipe.stage import Stage, add_stage

log = logging.getLogger(__name__)

STAGE = "render"
#: File extension per image format (the image struct's ``path`` is ``<id>.<ext>``).
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def check_render_model(cfg: RenderConfig) -> str:
    """Resolve ``cfg.model`` to what ``from_pretrained`` will load, without loading weights.

    Local folders must hold ``model_index.json``; hub ids must be in the local HF cache
    when offline (HF_HUB_OFFLINE=1), else their ``model_index.json`` is fetched (a few
    kB). Also checks ``cfg.scheduler`` names a diffusers scheduler. Raises ModelError /
    ConfigError with what to do, so a job fails in its first seconds.
    """
    resolved = resolve_pretrained(cfg.model, "model_index.json", "render.model")
    if cfg.scheduler:
        scheduler_class(cfg.scheduler)
    return resolved


def scheduler_class(name: str):
    """The diffusers scheduler class called ``name`` (ConfigError listing the choices)."""
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        known = sorted(
            n
            for n in dir(diffusers)
            if n.endswith("Scheduler")
            and isinstance(getattr(diffusers, n, None), type)
            and issubclass(getattr(diffusers, n), SchedulerMixin)
        )
        raise ConfigError(
            f"render.scheduler={name!r} is not a diffusers scheduler. Use None (the model's "
            f"own) or one of: {', '.join(known)}"
        )
    return cls


def load_pipeline(cfg: RenderConfig, device: str, dtype):
    """Load the text-to-image pipeline and set it up for fast batched inference."""
    import diffusers
    import torch
    from diffusers import AutoPipelineForText2Image

    # 1. Resolve the model (fails fast with a ModelError that says what to do).
    model = check_render_model(cfg)

    # 2. Load safetensors weights; safety checker off (it would black out images
    #    without telling us; quality.safety_checker rejects them with a reason instead).
    kwargs: dict[str, Any] = {"use_safetensors": True}
    # Newer diffusers name it `dtype` and warn on `torch_dtype`; older ones need the latter.
    new_name = hasattr(diffusers.utils.deprecation_utils, "_resolve_dtype")
    kwargs["dtype" if new_name else "torch_dtype"] = dtype
    index = _model_index(model)
    if "safety_checker" in index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(model, **kwargs)
    except Exception as e:
        raise ModelError(
            f"could not load render.model={cfg.model!r} ({model}) as a diffusers "
            f"text-to-image pipeline: {type(e).__name__}: {e}. Check that it is a Stable "
            "Diffusion 1.x/2.x/XL or SD-Turbo pipeline with safetensors weights. " + OFFLINE_HINT
        ) from e
    if getattr(pipe, "safety_checker", None) is not None:
        # The model index was not readable beforehand: drop the checker now, unused.
        log.warning("render: %s came with a safety checker; it is not used", cfg.model)
        pipe.safety_checker = None

    # 3. Scheduler, attention, memory format, device.
    if cfg.scheduler:
        pipe.scheduler = scheduler_class(cfg.scheduler).from_config(pipe.scheduler.config)
    if cfg.attention == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if device == "cuda" and cfg.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if device == "cuda" and cfg.compile:
        pipe.unet = torch.compile(pipe.unet)
    return pipe


def _model_index(model: str) -> dict[str, Any]:
    path = Path(model) / "model_index.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(model, "model_index.json")
        path = Path(hit) if isinstance(hit, str) else None
    return json.loads(path.read_text()) if path else {}


# ---------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------


def encode_image(pixels: np.ndarray, image_format: str, quality: int = 95) -> bytes:
    """HxWx3 uint8 -> PNG / JPEG / WebP bytes."""
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(pixels)
    if image_format == "png":
        # Level 1: lossless like any level, several times faster to write than the default.
        img.save(buf, format="PNG", compress_level=1)
    elif image_format == "jpeg":
        img.save(buf, format="JPEG", quality=quality)
    elif image_format == "webp":
        img.save(buf, format="WEBP", quality=quality)
    else:
        raise ConfigError(f"image_format {image_format!r}: use png, jpeg or webp")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------


def _ray_node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001
        return None


class Renderer(Stage):
    """Render each row's prompt with its own seed; encode the image.

    Input columns: ``id``, ``prompt``, ``negative_prompt`` (empty = ``cfg.negative_prompt``),
    ``seed``; rows with an empty prompt or no seed are rejected (``empty_prompt``,
    ``missing_seed``). Output columns: ``image`` (``{"bytes", "path": "<id>.<ext>"}``), ``width``,
    ``height``, ``sd_model``, ``negative_prompt`` (what the model got), ``meta`` (merged:
    ``steps``, ``guidance``, ``render_s`` per image, ``scheduler``, ``dtype``,
    ``prompt_chunks``, ``render_node``: the Ray node that rendered it, ``render_call_rows``:
    the rows of its pipeline call). Rows whose image comes out with NaN pixels are rejected
    (``render``/``nan_image``); already-rejected rows pass through untouched.
    """

    INPUT_COLUMNS = ("id", "prompt", "negative_prompt", "seed")
    OUTPUT_COLUMNS = ("image", "width", "height", "sd_model", "negative_prompt", "meta")

    def __init__(self, cfg: RenderConfig):
        import torch

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if self.device == "cpu" and self.dtype == torch.float16:
            log.warning("render: float16 on CPU is slow and may give NaN images")
        self.pipe = load_pipeline(cfg, self.device, self.dtype)
        # SDXL-style pipelines have a second text encoder and want pooled embeddings.
        self.encoders = [(self.pipe.tokenizer, self.pipe.text_encoder)]
        self.dual = getattr(self.pipe, "text_encoder_2", None) is not None
        if self.dual:
            self.encoders.append((self.pipe.tokenizer_2, self.pipe.text_encoder_2))
        self.guided = cfg.guidance_scale > 1 and (
            getattr(self.pipe.unet.config, "time_cond_proj_dim", None) is None
        )
        self.scheduler_name = type(self.pipe.scheduler).__name__
        self.invariant = cfg.batch_invariant == "on" or (
            cfg.batch_invariant == "auto" and self.device == "cpu"
        )
        # Rows of any chunk counts share a call (raypipe.generate.unet_batches).
        self.keys = KeyLengths()
        forward = trim_forward(self.pipe.unet.forward)
        if self.invariant:
            # Same shapes for a row whatever its batch -> same kernels -> same bits.
            self.pipe.vae.enable_slicing()
            forward = rowwise_forward(forward, self.guided)
        self.pipe.unet.forward = masked_forward(forward, self.keys)
        self.pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))
        self.node = _ray_node_id()

    def process(self, batch: pa.Table) -> pa.Table:
        # In the stream, batches of cfg.batch_size rows (rejected rows were routed to the
        # writer before); called directly, a table of any size, in calls of at most that.
        rows = batch.to_pylist()
        todo = self._prepare([r for r in rows if not is_rejected(r)])
        for start in range(0, len(todo), self.cfg.batch_size):
            self.render_rows(todo[start : start + self.cfg.batch_size])
        return rows_to_table(rows)

    # -- steps ---------------------------------------------------------------------------

    def _prepare(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Tokenize each row (``_n``: its chunk count, the longest of its prompt and its
        negative prompt); reject rows that cannot render."""
        todo = []
        for row in rows:
            if not (row.get("prompt") or "").strip():
                reject(row, STAGE, "empty_prompt", "")
                continue
            if row.get("seed") is None:
                reject(row, STAGE, "missing_seed", row["prompt"])
                continue
            negative = row.get("negative_prompt") or self.cfg.negative_prompt
            row["negative_prompt"] = negative if self.guided else (row.get("negative_prompt") or "")
            row["_tokens"] = [self._tokenize(tok, row["prompt"] or "") for tok, _ in self.encoders]
            n = max(len(t.ids) for t in row["_tokens"])
            if self.guided:
                row["_neg_tokens"] = [self._tokenize(tok, negative) for tok, _ in self.encoders]
                n = max([n] + [len(t.ids) for t in row["_neg_tokens"]])
            row["_n"] = n
            todo.append(row)
        return todo

    def _tokenize(self, tokenizer, text: str) -> TokenChunks:
        return tokenize_chunks(tokenizer, text, emphasis=self.cfg.emphasis)

    def render_rows(self, rows: list[dict[str, Any]]) -> None:
        """Render rows in one pipeline call; fill their columns in place."""
        import torch

        t0, wall0 = time.perf_counter(), time.time()
        # 1. Text embeddings, per row (emphasis + chunks), one encoder pass per encoder.
        embeds = self._embed(rows)
        own = [r.pop("_n") for r in rows]
        # 2. One generator per row, on the CPU: a row's noise depends on its seed alone,
        #    on any device and in any batch.
        generators = [torch.Generator("cpu").manual_seed(int(r["seed"])) for r in rows]
        # 3. Denoise and decode.
        with torch.inference_mode():
            images = self._denoise(embeds, own, generators)
            # 4. NaN check and 8-bit conversion on the device (as diffusers' own
            #    numpy path: float32, x255, round), then one small copy to the host.
            bad = torch.isnan(images).flatten(1).any(1).tolist()
            pixels = (
                (images.float().nan_to_num(0.0) * 255)
                .round()
                .clamp(0, 255)
                .to(torch.uint8)
                .permute(0, 2, 3, 1)
                .cpu()
                .numpy()
            )
        # 5. Encode in threads (Pillow releases the GIL).
        fmt, ext = self.cfg.image_format, EXTENSIONS[self.cfg.image_format]
        encoded = list(
            self.pool.map(lambda p: encode_image(p, fmt, self.cfg.image_quality), pixels)
        )
        per_image = (time.perf_counter() - t0) / len(rows)
        wall = [round(wall0, 3), round(time.time(), 3)]  # the call's span (idle between executions)

        # 6. Fill the rows.
        for row, data, px, is_nan in zip(rows, encoded, pixels, bad):
            chunks = len(row.pop("_tokens")[0].ids)
            row.pop("_neg_tokens", None)
            update_meta(
                row,
                steps=self.cfg.steps,
                guidance=self.cfg.guidance_scale,
                render_s=round(per_image, 4),
                render_call_rows=len(rows),  # the size of the pipeline call it was in
                render_wall=wall,
                scheduler=self.scheduler_name,
                dtype=str(self.dtype).removeprefix("torch."),
                prompt_chunks=chunks,
                render_node=self.node,
            )
            row["sd_model"] = self.cfg.model
            if is_nan:
                reject(row, STAGE, "nan_image", f"NaN pixels rendering {row['prompt']!r}")
                continue
            row["image"] = {"bytes": data, "path": f"{row['id']}.{ext}"}
            row["height"], row["width"] = int(px.shape[0]), int(px.shape[1])

    def _denoise(self, embeds: dict[str, Any], chunks: list[int], generators):
        """The pipeline call: images (as tensors) of rows of ``chunks`` prompt chunks each."""
        per_chunk = embeds["prompt_embeds"].shape[1] // max(chunks)
        if len(set(chunks)) > 1:  # the keys each row attends to (unet_batches)
            self.keys.lengths = [n * per_chunk for n in chunks]
        try:
            return self.pipe(
                **embeds,
                num_inference_steps=self.cfg.steps,
                guidance_scale=self.cfg.guidance_scale,
                width=self.cfg.width,
                height=self.cfg.height,
                generator=generators,
                output_type="pt",
            ).images
        finally:
            self.keys.lengths = None

    def _embed(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Pipeline kwargs: prompt_embeds (+ negative, + pooled for SDXL-style pipelines)."""
        import torch

        n = max(r["_n"] for r in rows)
        out: dict[str, Any] = {}
        sides = [("", "_tokens")] + ([("negative_", "_neg_tokens")] if self.guided else [])
        with torch.inference_mode():
            for prefix, key in sides:
                parts, pooled = [], None
                for i, (tokenizer, encoder) in enumerate(self.encoders):
                    # Each row padded to its own chunk count (the call's padding beyond
                    # is masked in the UNet: masked_forward).
                    chunks = [pad_chunks(r[key][i], tokenizer, r["_n"]) for r in rows]
                    if self.dual:
                        # SDXL: penultimate hidden states of both encoders, concatenated;
                        # pooled output of the second encoder's first chunk.
                        last = i == len(self.encoders) - 1
                        res = self._encode(tokenizer, encoder, chunks, n, -2, pooled=last)
                        if last:
                            res, pooled = res
                        parts.append(res)
                    else:
                        parts.append(self._encode(tokenizer, encoder, chunks, n))
                embeds = torch.cat(parts, dim=-1)
                if (
                    prefix
                    and self.dual
                    and getattr(self.pipe.config, "force_zeros_for_empty_prompt", False)
                ):
                    empty = torch.tensor(
                        [not r["negative_prompt"] for r in rows], device=embeds.device
                    )
                    embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
                    pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
                out[f"{prefix}prompt_embeds"] = embeds.to(self.dtype)
                if pooled is not None:
                    out[f"{prefix}pooled_prompt_embeds"] = pooled.to(self.dtype)
        return out

    def _encode(
        self, tokenizer, encoder, chunks: list[TokenChunks], n: int, layer=None, pooled=False
    ):
        """encode_chunks over the rows at once, or row by row when batch-invariant; each
        row's embedding zero-padded to ``n`` chunks (keys the UNet masks)."""
        import torch

        if self.invariant:
            outs = [encode_chunks(encoder, [c], self.device, layer, pooled) for c in chunks]
        else:  # one pass needs one shape: the padding chunks are empty prompts
            padded = [pad_chunks(c, tokenizer, n) for c in chunks]
            outs = [encode_chunks(encoder, padded, self.device, layer, pooled)]
        states = [o[0] if pooled else o for o in outs]
        width = max(s.shape[1] for s in states)
        states = torch.cat(
            [torch.nn.functional.pad(s, (0, 0, 0, width - s.shape[1])) for s in states]
        )
        if pooled:
            return states, torch.cat([o[1] for o in outs])
        return states


# ---------------------------------------------------------------------------------------
# Ray Data
# ---------------------------------------------------------------------------------------


def render_uses_gpu(cfg: RenderConfig) -> bool:
    """Whether render actors ask Ray for GPUs: device=cuda, or auto on a cluster that has
    GPUs or whose autoscaler can add GPU nodes (:func:`raypipe.placement.uses_gpu`)."""
    from raypipe.placement import uses_gpu

    return uses_gpu(cfg.device)


def render_pool_args(cfg: RenderConfig, use_gpu: bool) -> dict[str, Any]:
    """The render pool's size, batch and Ray resource requests (for :func:`add_stage`).

    Every call gets ``batch_size`` rows (the stream cuts blocks to that size before the
    pool). On GPU each actor asks for ``gpus_per_actor`` GPUs (of ``accelerator_type``,
    if set), plus the custom ``resources``, so a cluster autoscaler adds nodes that have
    them while the pool wants more actors (:func:`raypipe.placement.actor_resources`).
    Ray Data restarts a dead actor without limit; on GPU its block is retried
    ``max_task_retries`` times, so a prompt that kills its GPU worker every time fails
    the run instead of taking GPUs forever.
    """
    from raypipe.placement import actor_resources

    args = {
        "batch_size": cfg.batch_size,
        "min_actors": cfg.min_actors,
        "max_actors": cfg.max_actors,
        **actor_resources(
            num_cpus=cfg.cpus_per_actor,
            num_gpus=cfg.gpus_per_actor if use_gpu else None,
            resources=cfg.resources,
            accelerator_type=cfg.accelerator_type,
        ),
    }
    if use_gpu:
        # The one raypipe parameter that Ray 2.60 takes only as an extra remote arg
        # (deprecated; a RayDeprecationWarning): replace it with the named remote
        # parameter once Ray Data's map_batches has one (announced for Ray 2.64).
        args["max_task_retries"] = cfg.max_task_retries
    return args


def add_render(ds, cfg: RenderConfig, stage: type[Renderer] = Renderer):
    """Append the render stage alone to a Ray Dataset: an autoscaling pool of Renderers.

    Pool size and resources: :func:`render_pool_args`. ``stage`` may be a Renderer
    subclass (the benchmark's adds timestamps; a test's crashes on purpose).
    """
    use_gpu = render_uses_gpu(cfg)
    actor_cfg = cfg.model_copy(update={"device": "cuda" if use_gpu else "cpu"})
    return add_stage(ds, stage, {"cfg": actor_cfg}, **render_pool_args(cfg, use_gpu))


#: The stage's ``build_*`` name (docs/architecture.md, "The generation stream": one plain
#: function appends a stage).
build_render = add_render
