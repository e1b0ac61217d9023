"""The Stable Diffusion models the benchmarks build: SD 1.5 at its real size, random
weights from its published config (nothing is downloaded) for timing on a GPU, built once
into $RAYPIPE_BENCH_DIR (default the temp folder); and its MFU model. The LLaVA models are
in common_llava.py.
"""

from __future__ import annotations

import json
from pathlib import Path

#: Dense fp16/bf16 tensor-core peak, FLOP/s, by a substring of the GPU name.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "L4": 121e12,
    "V100": 125e12,
    "T4": 65e12,
}
SD15_UNET_FLOPS_512 = 803e9
SD15_VAE_DECODE_FLOPS_512 = 2.5e12


def build_real_size_sd15(path: Path) -> Path:
    """Random-weight SD 1.5 from its published config, saved in fp16 (no download).

    The text encoder is CLIP ViT-L/14's (49408 vocab); the tokenizer is raypipe's small
    offline one, whose ids all fall inside that vocabulary: fine for timing.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from raypipe.tiny import build_clip_tokenizer

    if (path / ".complete").exists():
        return path
    tokenizer = build_clip_tokenizer(path / "_tokenizer_build")
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # random init on the GPU: seconds instead of a minute
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                projection_dim=768,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        unet=unet.half(),
        vae=vae.half(),
        text_encoder=text_encoder.half(),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    (path / ".complete").write_text("ok\n")
    return path


def render_model(real_size_sd15: bool, name: str, size: int | None) -> tuple[str, int]:
    """(model, width = height) of the render benchmark: the random SD 1.5 (kept in
    :func:`common.bench_dir`, 512 px), or ``name`` resolved (64 px if tiny, else 512)."""
    from common import bench_dir

    from raypipe.generate.config import RenderConfig
    from raypipe.generate.render import check_render_model

    if real_size_sd15:
        return str(build_real_size_sd15(bench_dir() / "raypipe-sd15-random")), size or 512
    model = check_render_model(RenderConfig(model=name))
    return model, size or (64 if name.startswith("raypipe-tiny/") else 512)


def sd15_mfu(cfg, model: str, ips: float) -> dict:
    import torch

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    index = json.loads((Path(model) / "unet" / "config.json").read_text())
    sd15 = (
        tuple(index.get("block_out_channels", ())) == (320, 640, 1280, 1280)
        and index.get("cross_attention_dim") == 768
    )
    out = {"gpu": name, "peak_tflops": peak and peak / 1e12, "images_per_s": round(ips, 3)}
    if not (sd15 and peak):
        out["mfu"] = None
        return out
    scale = cfg.width * cfg.height / (512 * 512)
    guided = 2 if cfg.guidance_scale > 1 else 1
    flops = (cfg.steps * guided * SD15_UNET_FLOPS_512 + SD15_VAE_DECODE_FLOPS_512) * scale
    out.update(tflop_per_image=round(flops / 1e12, 2), mfu=round(ips * flops / peak, 4))
    return out


SUBJECTS = ["vintage car", "golden retriever", "bowl of ramen", "firefighter", "sunflower"]
COLOURS = ["crimson", "teal", "golden", "olive", "navy", "beige", "maroon", "silver"]


def make_rows(n: int) -> list[dict]:
    """``n`` rows to render: StableLLaVA-style prompts of a colour and a subject."""
    from raypipe.schema import row_seed

    rows = []
    for i in range(n):
        sid = f"bench-s0-{i:07d}"
        colour, subject = COLOURS[i % len(COLOURS)], SUBJECTS[i % len(SUBJECTS)]
        prompt = f"(({colour})) {subject}, city street, realistic, dramatic lighting, 8k"
        rows.append(
            {
                "id": sid,
                "ability": "color",
                "prompt": prompt,
                "seed": row_seed(sid),
                "negative_prompt": "",
            }
        )
    return rows


def bare_pipeline(cfg, model: str):
    """(diffusers pipeline, device) of the render benchmark's bare loop: ``model`` at the
    config's dtype on its device, no progress bars, channels-last UNet and VAE on CUDA when
    the config asks."""
    import diffusers
    import torch
    from diffusers import AutoPipelineForText2Image

    from raypipe.models import resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    new_kw = hasattr(diffusers.utils.deprecation_utils, "_resolve_dtype")
    kw = {"dtype": dtype} if new_kw else {"torch_dtype": dtype}
    pipe = AutoPipelineForText2Image.from_pretrained(model, use_safetensors=True, **kw)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if device == "cuda" and cfg.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    return pipe, device
