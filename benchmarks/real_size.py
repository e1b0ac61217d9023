"""Random-weight models at real sizes, built from their published configs (nothing is
downloaded), for timing on a GPU: Stable Diffusion 1.5 (with its MFU model), LLaVA-1.5-7B
for inference, and a LLaVA-1.5-shaped model for a training step. Built once into
$RAYPIPE_BENCH_DIR (default the temp folder) where they are saved.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import CLIP_L_336, LLAMA_7B

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


def real_size_llava15_config(tokenizer):
    """LLaVA-1.5-7B's published config: CLIP ViT-L/14 at 336 px (576 image tokens), the
    mlp2x_gelu projector, a 32-layer Llama-2-7B with LLaVA-1.5's 32064-token vocabulary;
    special token ids from ``tokenizer``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(**CLIP_L_336, hidden_act="quick_gelu")
    text = LlamaConfig(
        **LLAMA_7B,
        num_hidden_layers=32,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=576,
        pad_token_id=tokenizer.pad_token_id,
    )


def real_size_llava15_processor(tokenizer):
    """The processor of LLaVA-1.5 (336 px CLIP preprocessing, 576 ``<image>`` tokens)."""
    from transformers import LlavaProcessor

    from raypipe.tiny import LLAMA_CHAT_TEMPLATE, tiny_clip_image_processor

    return LlavaProcessor(
        image_processor=tiny_clip_image_processor(336),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by "default"
        chat_template=LLAMA_CHAT_TEMPLATE,
    )


def build_real_size_llava15(path: Path) -> Path:
    """Random-weight LLaVA-1.5-7B (:func:`real_size_llava15_config`) saved in fp16, with
    raypipe's small offline tokenizer, whose ids all fall inside the 32064-token
    vocabulary: fine for timing. Needs a CUDA GPU (the weights are initialised there)."""
    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    from raypipe.tiny import build_tiny_llama_tokenizer

    if (path / ".complete").exists():
        return path
    if not torch.cuda.is_available():
        raise SystemExit("--real-size-llava15 needs a CUDA GPU (about 14 GB of fp16 weights)")
    tokenizer = build_tiny_llama_tokenizer(path / "_tokenizer_build")
    torch.manual_seed(0)
    with torch.device("cuda"):  # random init on the GPU: seconds instead of minutes
        model = LlavaForConditionalGeneration(real_size_llava15_config(tokenizer)).half()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path, safe_serialization=True)
    real_size_llava15_processor(tokenizer).save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    (path / ".complete").write_text("ok\n")
    return path


def auto_llm_layers(free_bytes: int) -> int:
    """Llama-7B layers that fit next to the rest, at 16 bytes per parameter + headroom."""
    d, ff, vocab = LLAMA_7B["hidden_size"], LLAMA_7B["intermediate_size"], LLAMA_7B["vocab_size"]
    per_layer = 4 * d * d + 3 * d * ff
    fixed = 2 * vocab * d + 304_000_000 + 21_000_000  # embeddings + head, CLIP-L, projector
    budget = 0.85 * free_bytes - 14e9  # activations, logits, workspace
    return max(1, min(32, int((budget / 16 - fixed) // per_layer)))


def build_llava15_train_model(layers: int, device: str = "cuda"):
    """Random-weight LLaVA-1.5-shaped model on the GPU (fp32 weights), stage 2."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from raypipe.train.model import apply_freeze_policy

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**CLIP_L_336).to_dict(),
        text_config=LlamaConfig(num_hidden_layers=layers, **LLAMA_7B).to_dict(),
        image_token_index=32000,
        image_seq_length=576,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=32001,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    model.config.use_cache = False
    apply_freeze_policy(model, 2)
    return model
