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

from raypipe.train.conversation import VICUNA_V1_CHAT_TEMPLATE

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


#: The tiny Llama's chat template: LLaVA-1.5's ``vicuna_v1`` format as raypipe trains it
#: (string content or lists of image/text parts), the template its exports carry.
LLAMA_CHAT_TEMPLATE = VICUNA_V1_CHAT_TEMPLATE

#: Extra fixed text for the Llama tokenizer: the fixture dialogues' words become tokens.
_LLAMA_EXTRA = """
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.
What is in the picture? What colour is the square? Is the square red? Which shape is shown? It is a red square. It is a blue circle. Yes. No.
The image shows a green square on a white background. This is a photo of a yellow circle. It is bright.
""".strip()


def build_tiny_llama_tokenizer(path: str | Path, vocab_size: int = 1024):
    """A Llama-style BPE tokenizer trained offline, with ``<image>`` and a Vicuna chat template.

    SentencePiece layout as in Llama: words carry a ``▁`` prefix, unknown characters fall
    back to ``<0xNN>`` byte tokens, BOS ``<s>`` is added on encode, EOS is ``</s>``. PAD is
    its own ``<pad>`` token (as in llava-hf checkpoints) and ``<image>`` is a special token,
    both appended after the trained vocabulary.
    """
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    if _done(path):
        return AutoTokenizer.from_pretrained(path)
    specials = ["<unk>", "<s>", "</s>"]

    def metaspace():
        return pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)

    trained = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trained.pre_tokenizer = metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False
    )
    trained.train_from_iterator(_corpus_lines(_LLAMA_EXTRA.splitlines()), trainer)
    spec = json.loads(trained.to_str())["model"]
    # Llama's id layout: specials, then the 256 byte-fallback tokens, then learned pieces.
    vocab = {tok: i for i, tok in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for tok in sorted(spec["vocab"], key=spec["vocab"].get):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.pre_tokenizer = metaspace()
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=2048,
        extra_special_tokens={"image_token": "<image>"},
    )
    tokenizer.chat_template = LLAMA_CHAT_TEMPLATE
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    _mark_done(path)
    return AutoTokenizer.from_pretrained(path)


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


def default_models_dir() -> Path:
    """Where the demo and tests keep tiny models: $RAYPIPE_TINY_DIR or ~/.cache/raypipe/tiny."""
    return Path(os.environ.get("RAYPIPE_TINY_DIR", Path.home() / ".cache" / "raypipe" / "tiny"))


#: Bump when a builder changes, so cached folders of older builds are not reused.
TINY_VERSION = 2
TINY_IDS = {
    "tiny-sd": build_tiny_sd,
    "tiny-clip": build_tiny_clip,
    "tiny-safety-checker": build_tiny_safety_checker,
    "tiny-llava": build_tiny_llava,
    "tiny-clip-vision": build_tiny_clip_vision,
    "tiny-llama": build_tiny_llama,
    "tiny-chat-llm": build_tiny_chat_llm,
}


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


# --- Fixture data for training tests -------------------------------------------------
# Each image is one flat colour (with a little noise) and every answer names that colour,
# so a tiny LLaVA can only lower its loss by reading the image: memorisable, and a real
# test of the vision path.

_FIXTURE_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
}


def _fixture_image(rng, colour: str, width: int, height: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    base = np.array(_FIXTURE_COLOURS[colour], dtype=np.int16)
    noise = rng.integers(-12, 13, size=(height, width, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _fixture_dialogue(rng, index: int) -> tuple[str, list[dict[str, str]]]:
    """(colour, LLaVA turns): one turn, or two for every third row."""
    colours = sorted(_FIXTURE_COLOURS)
    colour = colours[int(rng.integers(len(colours)))]
    turns = [
        {"from": "human", "value": "<image>\nWhat colour is the square?"},
        {"from": "gpt", "value": f"It is a {colour} square."},
    ]
    if index % 3 == 2:
        asked = colours[int(rng.integers(len(colours)))]
        turns += [
            {"from": "human", "value": f"Is the square {asked}?"},
            {"from": "gpt", "value": "Yes." if asked == colour else "No."},
        ]
    return colour, turns


def write_fixture_parquet(
    out_dir: str | Path, n: int, seed: int = 0, image_size: int = 32, rows_per_file: int = 64
) -> Path:
    """Write ``n`` raypipe-schema samples (SAMPLE_SCHEMA) as Parquet files in ``out_dir``.

    Images are ``image_size`` px PNGs of one colour; dialogues ask about that colour (every
    third row has a second turn). Same ``seed`` -> same bytes. Returns ``out_dir``.
    """
    import numpy as np
    import pyarrow.parquet as pq

    from raypipe.schema import SAMPLE_SCHEMA, rows_to_table, sample_id

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        colour, turns = _fixture_dialogue(rng, i)
        sid = sample_id(seed, "color", i)
        prompt = f"a (({colour})) square, flat colour"
        rows.append(
            {
                "id": sid,
                "ability": "color",
                "keywords": [colour],
                "prompt": prompt,
                "negative_prompt": "",
                "seed": i,
                "image": {
                    "bytes": _fixture_image(rng, colour, image_size, image_size),
                    "path": None,
                },
                "width": image_size,
                "height": image_size,
                "conversations": turns,
                "answer_keywords": [colour],
                "question_type": "wh",
                "sd_model": "raypipe-tiny/tiny-sd",
                "llm_model": "offline",
                "meta": "{}",
            }
        )
    for part, start in enumerate(range(0, max(n, 1), rows_per_file)):
        table = rows_to_table(rows[start : start + rows_per_file], SAMPLE_SCHEMA)
        pq.write_table(table, out_dir / f"part-{part:05d}.parquet")
    return out_dir


def write_fixture_run(
    out: str, n: int, seed: int = 0, image_size: int = 32, rows_per_part: int = 256
) -> str:
    """``n`` fixture samples written as a generation run writes them: through
    :class:`raypipe.generate.store.OutputStore` into ``OUT/data`` (parts of
    ``rows_per_part`` rows, the store's row groups), plus a ``manifest.json``. ``out`` may
    be a local folder or a URI. Returns ``out``."""
    import tempfile

    import pyarrow.parquet as pq

    from raypipe.generate.store import OutputStore

    store = OutputStore(out)
    store.makedirs()
    with tempfile.TemporaryDirectory() as tmp:
        write_fixture_parquet(tmp, n, seed=seed, image_size=image_size, rows_per_file=max(n, 1))
        table = pq.read_table(Path(tmp) / "part-00000.parquet")
    for start in range(0, n, rows_per_part):
        store.write_table("data", table.slice(start, rows_per_part))
    store.write_json("manifest.json", {"raypipe_manifest": 2, "accepted": n, "fixture": True})
    return out


def _write_fixture_images(folder: Path, rng, n: int, image_size: int):
    """n images under folder/images/ -> list of (relative path, colour, turns)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        colour, turns = _fixture_dialogue(rng, i)
        # Non-square images, so pad-to-square and crops have something to do.
        data = _fixture_image(rng, colour, image_size + 8 * (i % 2), image_size)
        rel = f"images/{i:05d}.png"
        (folder / rel).write_bytes(data)
        items.append((rel, colour, turns))
    return items


def _write_corrupt_images(folder: Path) -> tuple[str, str]:
    """(undecodable image, missing image) paths relative to folder."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "images" / "corrupt.png").write_bytes(b"this is not an image")
    return "images/corrupt.png", "images/missing.png"


def write_fixture_llava_json(
    out_dir: str | Path, n: int, seed: int = 0, image_size: int = 32, corrupt: bool = False
) -> Path:
    """LLaVA-format JSON (``[{"id","image","conversations"}]``) + images; returns the JSON path.

    Image paths are relative to ``out_dir`` (the JSON's folder, the default image folder).
    Every other row has ``<image>`` at the end of the first human turn instead of the start.
    With ``corrupt=True`` three bad rows follow: an undecodable image, a missing file, and a
    row whose conversation has no ``<image>``.
    """
    import numpy as np

    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    records = []
    for i, (rel, _colour, turns) in enumerate(_write_fixture_images(out_dir, rng, n, image_size)):
        if i % 2 == 1:
            question = turns[0]["value"].replace("<image>\n", "")
            turns = [{"from": "human", "value": f"{question}\n<image>"}] + turns[1:]
        records.append({"id": f"llava-{i:05d}", "image": rel, "conversations": turns})
    if corrupt:
        bad, missing = _write_corrupt_images(out_dir)
        turns = [
            {"from": "human", "value": "<image>\nWhat colour is the square?"},
            {"from": "gpt", "value": "It is a red square."},
        ]
        records += [
            {"id": "llava-undecodable", "image": bad, "conversations": turns},
            {"id": "llava-missing", "image": missing, "conversations": turns},
            {
                "id": "llava-no-image-token",
                "image": records[0]["image"] if records else bad,
                "conversations": [{"from": "human", "value": "What colour is it?"}, turns[1]],
            },
        ]
    path = out_dir / "llava.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def write_fixture_stablellava_json(
    out_dir: str | Path, n: int, seed: int = 0, image_size: int = 32, corrupt: bool = False
) -> Path:
    """StableLLaVA release rows (``{"id","image","prompt","question","answer"}``) + images.

    Returns the JSON path; image paths are relative to its folder. ``corrupt=True`` adds an
    undecodable image and a missing file.
    """
    import numpy as np

    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    records = []
    for i, (rel, colour, turns) in enumerate(_write_fixture_images(out_dir, rng, n, image_size)):
        records.append(
            {
                "id": f"stablellava-{i:05d}",
                "image": rel,
                "prompt": f"a (({colour})) square, flat colour",
                "question": turns[0]["value"].replace("<image>\n", ""),
                "answer": turns[1]["value"],
            }
        )
    if corrupt:
        bad, missing = _write_corrupt_images(out_dir)
        for sid, rel in (("stablellava-undecodable", bad), ("stablellava-missing", missing)):
            records.append(
                {
                    "id": sid,
                    "image": rel,
                    "prompt": "a ((red)) square",
                    "question": "What colour is the square?",
                    "answer": "It is a red square.",
                }
            )
    path = out_dir / "stablellava.json"
    path.write_text(json.dumps(records, indent=1))
    return path
