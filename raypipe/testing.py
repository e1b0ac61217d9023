"""Tiny random-weight models and offline tokenizers for tests and the offline demo.

Nothing here downloads anything. Each ``build_*`` function creates a model from a
config with random weights, saves it to a directory with ``save_pretrained``
(safetensors), and returns the directory, so callers load it back through the same
``from_pretrained`` path that real hub models use. Builds are deterministic (fixed
seeds) and cached: calling a builder twice with the same directory reuses it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

#: Text the offline tokenizers are trained on: generic prompt and dialogue English, so
#: common words become single tokens as with real vocabularies.
_CORPUS = """
a photo of a red car parked on a city street at dusk, realistic, dramatic lighting, 8k, highly detailed
a crimson vintage car, teal umbrella, golden retriever running on the beach, soft morning light
an orange tabby cat sleeping on a wooden windowsill, cozy interior, warm sunlight, sharp focus
a firefighter holding a hose in front of a burning building, smoke, cinematic lighting
a bowl of ramen with a soft boiled egg on a wooden table, studio lighting, food photography
a woman with a french braid wearing a yellow raincoat in a bamboo forest, misty, film grain
a giraffe walking through a narrow corridor, surreal, strange, impossible, funny, unusual
describe the image in detail. what colour is the main object? what is the person doing?
the image shows a scene with people, animals, plants, vehicles, food, clothes and furniture
is the car red or blue? yes, it is. no, it is not. the answer is. what is unusual in this picture?
oil painting, watercolor, pixel art, anime style, ukiyo-e woodblock print, art nouveau, sketch
green blue yellow purple white black brown pink grey gray silver gold beige navy maroon olive
dog cat horse bird fish lion tiger bear elephant monkey rabbit deer fox wolf owl eagle
tree flower rose tulip sunflower cactus fern palm oak pine maple bamboo lotus orchid daisy
bus train bicycle motorcycle truck boat airplane tractor scooter van taxi helicopter ship
pizza burger sushi salad cake bread pasta soup apple banana coffee tea sandwich noodles
shirt dress jacket coat hat scarf boots sneakers jeans skirt sweater hoodie suit tie
chair table sofa bed desk shelf lamp cabinet stool bench wardrobe armchair dresser
USER: ASSISTANT: <image> Human: Assistant: ### user assistant system
""".strip()

CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _corpus_lines(extra: list[str] | None = None) -> list[str]:
    # Fixed text only, so a tokenizer (and every image rendered with it) is the same on
    # every machine whatever else changes in the checkout.
    return _CORPUS.splitlines() + list(extra or [])


def _done(path: Path) -> bool:
    return (path / ".raypipe-complete").exists()


def _mark_done(path: Path) -> Path:
    (path / ".raypipe-complete").write_text("ok\n")
    return path


def build_clip_tokenizer(path: str | Path, vocab_size: int = 2048):
    """A CLIP-style BPE tokenizer (lower-cased, `</w>` word ends, 77 tokens) trained offline."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    path = Path(path)
    if _done(path):
        return CLIPTokenizer.from_pretrained(path)
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        end_of_word_suffix="</w>",
        initial_alphabet=ByteLevel.alphabet(),
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer)
    spec = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(spec["vocab"])
    # Every byte, word-final or not, must be in the vocabulary so no text maps to <unk>.
    for ch in sorted(ByteLevel.alphabet()):
        for t in (ch, ch + "</w>"):
            vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    _mark_done(path)
    return CLIPTokenizer.from_pretrained(path)


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


def build_tiny_sd(path: str | Path, seed: int = 0, sample_size: int = 32) -> Path:
    """A tiny Stable Diffusion (1.x layout) pipeline saved as a diffusers folder.

    UNet and VAE have block_out_channels (16, 32); the text encoder is a 2-layer CLIP.
    ``sample_size`` is the latent size: the default renders 64x64 images (VAE factor 2
    here, since the tiny VAE has two blocks).
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
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return _mark_done(path)


def build_tiny_clip(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny CLIPModel (text + vision) with its processor, e.g. for CLIP-score filters."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPVisionConfig,
    )

    path = Path(path)
    if _done(path):
        return path
    tokenizer = build_clip_tokenizer(path / "_tokenizer_build")
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=image_size,
        patch_size=8,
        projection_dim=32,
    )
    config = CLIPConfig(
        text_config=tiny_clip_text_config(len(tokenizer)).to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=32,
    )
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return _mark_done(path)


def default_models_dir() -> Path:
    """Where the demo and tests keep tiny models: $RAYPIPE_TINY_DIR or ~/.cache/raypipe/tiny."""
    return Path(os.environ.get("RAYPIPE_TINY_DIR", Path.home() / ".cache" / "raypipe" / "tiny"))


#: Bump when a builder changes, so cached folders of older builds are not reused.
TINY_VERSION = 1
TINY_IDS = {"tiny-sd": build_tiny_sd, "tiny-clip": build_tiny_clip}


def resolve_tiny(model_id: str) -> str:
    """Map ``raypipe-tiny/<name>`` ids (used by the demo and test presets) to a built folder."""
    m = re.fullmatch(r"raypipe-tiny/([\w-]+)", model_id)
    if not m:
        return model_id
    name = m.group(1)
    if name not in TINY_IDS:
        from raypipe.errors import ModelError

        raise ModelError(f"unknown tiny model {model_id!r}; known: {sorted(TINY_IDS)}")
    return str(TINY_IDS[name](default_models_dir() / f"{name}-v{TINY_VERSION}"))
