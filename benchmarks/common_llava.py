"""The LLaVA models and inputs the benchmarks build: the Llama-7B and CLIP-L/336 shapes,
LLaVA configs and processors, LLaVA-1.5-7B for inference (random weights from its
published config, nothing downloaded, saved in fp16) and the inference benchmark's items.
The training models are in common_train.py, the Stable Diffusion ones in common_sd.py.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

#: Llama-2-7B / Vicuna-7B with LLaVA-1.5's 32064-token vocabulary.
LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32064,
    max_position_embeddings=4096,
)
#: CLIP ViT-L/14 at 336 px (576 patches), LLaVA-1.5's vision tower.
CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=24,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)


def llava_config(vision, text, image_token: int, image_tokens: int, pad: int, **extra):
    """LLaVA over ``vision`` and ``text`` configs, image features from CLIP's second-last
    layer without the CLS token (``image_tokens`` per image)."""
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=image_token,
        image_seq_length=image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=pad,
        **extra,
    )


def llava_processor(tokenizer, image_size: int, patch_size: int):
    """A LLaVA processor: CLIP preprocessing at ``image_size`` px, one ``<image>`` token
    per patch, Llama's chat template."""
    from transformers import LlavaProcessor

    from raypipe.tiny import LLAMA_CHAT_TEMPLATE, tiny_clip_image_processor

    return LlavaProcessor(
        image_processor=tiny_clip_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by "default"
        chat_template=LLAMA_CHAT_TEMPLATE,
    )


def real_size_llava15_config(tokenizer):
    """LLaVA-1.5-7B's published config: CLIP ViT-L/14 at 336 px (576 image tokens), the
    mlp2x_gelu projector, a 32-layer Llama-2-7B with LLaVA-1.5's 32064-token vocabulary;
    special token ids from ``tokenizer``."""
    from transformers import CLIPVisionConfig, LlamaConfig

    text = LlamaConfig(
        **LLAMA_7B,
        num_hidden_layers=32,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return llava_config(
        CLIPVisionConfig(**CLIP_L_336, hidden_act="quick_gelu"),
        text,
        tokenizer.convert_tokens_to_ids("<image>"),
        576,
        tokenizer.pad_token_id,
        projector_hidden_act="gelu",
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
    llava_processor(tokenizer, 336, 14).save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    (path / ".complete").write_text("ok\n")
    return path


def make_items(n: int, size: int = 32) -> pa.Table:
    """``n`` benchmark items: a noisy colour square each (the fixture data's), and a
    question about it."""
    import numpy as np
    from fixture_data import FIXTURE_COLOURS, fixture_image

    from raypipe.evaluate.items import items_to_table

    rng = np.random.default_rng(0)
    names = sorted(FIXTURE_COLOURS)
    rows = []
    for i in range(n):
        colour, other = names[i % len(names)], names[(i + 1) % len(names)]
        image = fixture_image(rng, colour, size, size)
        kind = ("wh", "yes_no", "either_or")[i % 3]
        question, keywords = {
            "wh": ("What colour is the square?", [colour]),
            "yes_no": (f"Is the square {other}?", ["no"]),
            "either_or": (f"Is the square {colour} or {other}?", [colour]),
        }[kind]
        rows.append(
            {
                "id": f"bench-color-{i:06d}",
                "benchmark": "synthetic",
                "ability": "color",
                "image": image,
                "question": question,
                "question_type": kind,
                "answer_keywords": keywords,
            }
        )
    return items_to_table(rows)
