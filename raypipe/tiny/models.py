"""Tiny random-weight models built from configs (SD, CLIP, safety checker, Llama, LLaVA),
saved as safetensors and loaded back with ``from_pretrained``."""

from __future__ import annotations

from pathlib import Path

from raypipe.tiny.tokenizers import (
    LLAMA_CHAT_TEMPLATE,
    _done,
    _mark_done,
    build_clip_tokenizer,
    build_tiny_llama_tokenizer,
)


def tiny_clip_text_config(vocab_size: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def build_tiny_sd(
    path: str | Path,
    seed: int = 0,
    sample_size: int = 32,
    safety_checker: str | Path | None = None,
) -> Path:
    """A tiny Stable Diffusion (1.x layout) pipeline saved as a diffusers folder.

    UNet and VAE have block_out_channels (16, 32); the text encoder is a 2-layer CLIP.
    ``sample_size`` is the latent size: the default renders 64x64 images (VAE factor 2
    here, since the tiny VAE has two blocks). ``safety_checker``: a folder from
    :func:`build_tiny_safety_checker` to ship as the pipeline's own ``safety_checker``
    and ``feature_extractor``, as SD 1.x pipelines on the hub do (default: none).
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    path = Path(path)
    if _done(path):
        return path
    tokenizer = build_clip_tokenizer(path / "_tokenizer_build")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 2,
    )
    text_encoder = CLIPTextModel(tiny_clip_text_config(len(tokenizer)))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
    )
    checker = extractor = None
    if safety_checker is not None:
        from diffusers.pipelines.stable_diffusion.safety_checker import (
            StableDiffusionSafetyChecker,
        )
        from transformers import CLIPImageProcessor

        checker = StableDiffusionSafetyChecker.from_pretrained(safety_checker)
        extractor = CLIPImageProcessor.from_pretrained(safety_checker)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=checker,
        feature_extractor=extractor,
        requires_safety_checker=checker is not None,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return _mark_done(path)


def _tiny_clip_config(path: Path, image_size: int, seed: int):
    """The tiny CLIP tokenizer (built under ``path``) and a ``CLIPConfig`` for it.

    Seeds torch with ``seed`` once the tokenizer is built, so the caller's model weights
    come from that seed.
    """
    import torch
    from transformers import CLIPConfig

    tokenizer = build_clip_tokenizer(path / "_tokenizer_build")
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=tiny_clip_text_config(len(tokenizer)).to_dict(),
        vision_config=tiny_clip_vision_config(image_size).to_dict(),
        projection_dim=32,
    )
    return tokenizer, config


def build_tiny_clip(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny CLIPModel (text + vision) with its processor, e.g. for CLIP-score filters."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    path = Path(path)
    if _done(path):
        return path
    tokenizer, config = _tiny_clip_config(path, image_size, seed)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return _mark_done(path)


def build_tiny_safety_checker(
    path: str | Path, seed: int = 0, image_size: int = 32, concept_threshold: float = 1.0
) -> Path:
    """A tiny diffusers ``StableDiffusionSafetyChecker`` with its CLIP image processor.

    A 2-layer CLIP vision tower, 17 random concept embeddings and 3 "special care" ones,
    as the real checker has. Every concept's threshold is ``concept_threshold``: an image
    is flagged when its cosine similarity to a concept exceeds the threshold, and cosines
    lie in [-1, 1], so the default 1.0 flags nothing and -2.0 flags every image.
    """
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    path = Path(path)
    if _done(path):
        return path
    _, config = _tiny_clip_config(path, image_size, seed)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn_like(checker.concept_embeds))
        checker.special_care_embeds.copy_(torch.randn_like(checker.special_care_embeds))
        checker.concept_embeds_weights.fill_(concept_threshold)
        checker.special_care_embeds_weights.fill_(concept_threshold)
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    checker.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return _mark_done(path)


def tiny_clip_vision_config(image_size: int = 32):
    """2-layer CLIP vision tower: 32 px images in 8 px patches = 16 patches + CLS."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=image_size,
        patch_size=8,
        projection_dim=32,
    )


def tiny_llama_config(vocab_size: int, tokenizer=None):
    """2-layer Llama, hidden size 64; special token ids taken from ``tokenizer`` if given."""
    from transformers import LlamaConfig

    ids = {}
    if tokenizer is not None:
        ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **ids,
    )


def tiny_clip_image_processor(image_size: int = 32):
    """CLIP preprocessing at ``image_size`` (the PIL backend: no torchvision needed)."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def build_tiny_clip_vision(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny ``CLIPVisionModel`` plus its image processor: a vision tower for LLaVA builds."""
    import torch
    from transformers import CLIPVisionModel

    path = Path(path)
    if _done(path):
        return path
    torch.manual_seed(seed)
    model = CLIPVisionModel(tiny_clip_vision_config(image_size))
    model.save_pretrained(path, safe_serialization=True)
    tiny_clip_image_processor(image_size).save_pretrained(path)
    return _mark_done(path)


def _build_llama(path: str | Path, seed: int, config_for) -> Path:
    """A random-weight ``LlamaForCausalLM`` of ``config_for(vocab, tokenizer)`` with the
    tiny Llama tokenizer, saved to ``path`` (once)."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    path = Path(path)
    if _done(path):
        return path
    tokenizer = build_tiny_llama_tokenizer(path / "_tokenizer_build")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config_for(len(tokenizer), tokenizer))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return _mark_done(path)


def build_tiny_llama(path: str | Path, seed: int = 0) -> Path:
    """A tiny ``LlamaForCausalLM`` with the tiny Llama tokenizer: an LLM for LLaVA builds."""
    return _build_llama(path, seed, tiny_llama_config)


def tiny_chat_llama_config(vocab_size: int, tokenizer=None):
    """2-layer Llama, hidden 128 in 2 heads of 64: the smallest shape vLLM's CPU attention
    accepts (it refuses :func:`tiny_llama_config`'s head_dim 16), with room for the
    writers' long prompts (4096 positions)."""
    config = tiny_llama_config(vocab_size, tokenizer)
    config.hidden_size = 128
    config.intermediate_size = 256
    config.num_attention_heads = 2
    config.num_key_value_heads = 2
    config.head_dim = 64
    config.max_position_embeddings = 4096
    return config


def build_tiny_chat_llm(path: str | Path, seed: int = 0) -> Path:
    """A tiny random-weight chat ``LlamaForCausalLM`` (Vicuna chat template) that vLLM's
    CPU build serves: the LLM of the ``demo-vllm`` preset and the vLLM tests. Its text is
    noise; what it exercises is the real engine, sampling, structured output and parsing."""
    return _build_llama(path, seed, tiny_chat_llama_config)


def build_tiny_llava(
    path: str | Path, seed: int = 0, projector: str = "mlp2x_gelu", image_size: int = 32
) -> Path:
    """A tiny ``LlavaForConditionalGeneration`` with its ``LlavaProcessor``, LLaVA-1.5 layout.

    2-layer CLIP vision tower (32 px, patch 8: 16 image tokens after dropping CLS, the
    "default" feature strategy, features from layer -2), the LLaVA-1.5 ``mlp2x_gelu``
    projector and a 2-layer Llama. ``projector`` must be "mlp2x_gelu": the transformers
    Llava class has no single-linear projector (build other layouts with raypipe.train.model).
    """
    import torch
    from transformers import (
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    if projector != "mlp2x_gelu":
        raise ValueError(
            f"build_tiny_llava builds the mlp2x_gelu projector only, not {projector!r}; "
            "build a linear projector from the tiny vision tower and LLM with raypipe.train.model"
        )
    path = Path(path)
    if _done(path):
        return path
    tokenizer = build_tiny_llama_tokenizer(path / "_tokenizer_build")
    vision = tiny_clip_vision_config(image_size)
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=tiny_llama_config(len(tokenizer), tokenizer).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    processor = LlavaProcessor(
        image_processor=tiny_clip_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        # CLIP prepends a CLS token that the "default" strategy drops again.
        num_additional_image_tokens=1,
        chat_template=LLAMA_CHAT_TEMPLATE,
    )
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return _mark_done(path)
