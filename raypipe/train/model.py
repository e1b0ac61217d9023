"""LLaVA model and processor: load or compose, freeze per stage, optional LoRA.

A model comes either from an existing llava-hf checkpoint (``model.llava``) or is
composed from a CLIP vision tower, a causal LM and a new projector
(``model.vision_tower`` + ``model.llm`` + ``model.projector``). Either way the result is a
plain ``transformers.LlavaForConditionalGeneration``, so the export is loadable by
``from_pretrained`` with no raypipe code.

The ``linear`` projector (original LLaVA) is stored in the same two-layer module the
transformers class has, with ``projector_hidden_act="linear"`` and ``linear_2`` fixed to the
identity and never trained: the map is exactly one Linear, and the checkpoint stays a
standard Llava checkpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raypipe.errors import ModelError
from raypipe.models import resolve_id

if TYPE_CHECKING:
    import torch

    from raypipe.train.config import LoraSpec, ModelSpec, TrainConfig

#: Round a grown vocabulary up to this multiple (as llava-hf checkpoints do: 32064).
VOCAB_MULTIPLE = 64


def _load_config(field: str, model_id: str):
    from transformers import AutoConfig

    path = resolve_id(model_id)
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises OSError/ValueError/EnvironmentError variants
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(
            f"model.{field}={model_id!r} does not resolve ({reason}). Give a local folder "
            "written by save_pretrained (with config.json), or a hub id that is downloadable "
            "or already in the Hugging Face cache (HF_HUB_OFFLINE=1 only finds cached ids); "
            "tests and the demo use raypipe-tiny/tiny-llava."
        ) from None


def check_model_source(cfg: TrainConfig) -> None:
    """Fail fast, before any worker starts, if a model id or folder does not resolve.

    Loads only configs (kilobytes). Raises :class:`ModelError` saying what to fix.
    """
    spec = cfg.model
    if spec.llava is not None:
        config = _load_config("llava", spec.llava)
        if getattr(config, "vision_config", None) is None or not hasattr(config, "text_config"):
            raise ModelError(
                f"model.llava={spec.llava!r} is a {config.model_type!r} model, not a LLaVA "
                "checkpoint; to build LLaVA from parts set model.vision_tower and model.llm."
            )
        return
    vision = _load_config("vision_tower", spec.vision_tower)
    vision = getattr(vision, "vision_config", None) or vision
    if vision.model_type != "clip_vision_model":
        raise ModelError(
            f"model.vision_tower={spec.vision_tower!r} is a {vision.model_type!r} model; "
            "composing supports CLIP vision towers (e.g. openai/clip-vit-large-patch14-336). "
            "For other towers start from a llava-hf checkpoint with model.llava."
        )
    text = _load_config("llm", spec.llm)
    if getattr(text, "vision_config", None) is not None or not hasattr(text, "vocab_size"):
        raise ModelError(
            f"model.llm={spec.llm!r} is a {text.model_type!r} model, not a causal language "
            "model (e.g. lmsys/vicuna-7b-v1.5)."
        )


# ---------------------------------------------------------------------------------------
# Processor
# ---------------------------------------------------------------------------------------


def _prepare_tokenizer(tokenizer, image_token: str):
    """Add the image placeholder (and a pad token, LLaVA-1.5 style) if the LLM lacks them."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    if tokenizer.pad_token is None:
        # LLaVA-1.5 pads Vicuna with <unk>; a tokenizer without one gets a new <pad>.
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def build_processor(spec: ModelSpec):
    """The ``LlavaProcessor`` (image processor + tokenizer) for ``spec``."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, LlavaProcessor

    if spec.llava is not None:
        processor = AutoProcessor.from_pretrained(resolve_id(spec.llava))
        _prepare_tokenizer(processor.tokenizer, spec.image_token)
        return processor
    vision = _load_config("vision_tower", spec.vision_tower)
    vision = getattr(vision, "vision_config", None) or vision
    tokenizer = AutoTokenizer.from_pretrained(resolve_id(spec.llm))
    _prepare_tokenizer(tokenizer, spec.image_token)
    image_processor = AutoImageProcessor.from_pretrained(resolve_id(spec.vision_tower))
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        # CLIP prepends a CLS token that the "default" strategy drops again.
        num_additional_image_tokens=1,
        image_token=spec.image_token,
        chat_template=getattr(tokenizer, "chat_template", None),
    )


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------


def _grown_vocab(old: int, needed: int) -> int:
    if needed <= old:
        return old
    return -(-needed // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def compose_config(spec: ModelSpec, tokenizer):
    """LlavaConfig for vision tower + LLM + projector (vocabulary grown for added tokens)."""
    from transformers import LlavaConfig

    vision = _load_config("vision_tower", spec.vision_tower)
    vision = getattr(vision, "vision_config", None) or vision
    text = _load_config("llm", spec.llm)
    text.vocab_size = _grown_vocab(text.vocab_size, len(tokenizer))
    patches = (vision.image_size // vision.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(spec.image_token),
        image_seq_length=patches,
        projector_hidden_act="gelu" if spec.projector == "mlp2x_gelu" else "linear",
        vision_feature_select_strategy="default",
        vision_feature_layer=spec.vision_feature_layer,
        pad_token_id=tokenizer.pad_token_id,
    )


def is_linear_projector(config) -> bool:
    """True for the one-Linear projector (``linear_2`` is a fixed identity)."""
    return getattr(config, "projector_hidden_act", "gelu") == "linear"


def _init_projector(projector, linear: bool, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    for layer in (projector.linear_1, projector.linear_2):
        bound = 1.0 / layer.in_features**0.5  # nn.Linear's default (Kaiming-uniform) range
        with torch.no_grad():
            layer.weight.copy_(
                torch.empty_like(layer.weight).uniform_(-bound, bound, generator=gen)
            )
            if layer.bias is not None:
                layer.bias.copy_(
                    torch.empty_like(layer.bias).uniform_(-bound, bound, generator=gen)
                )
    if linear:
        with torch.no_grad():
            projector.linear_2.weight.copy_(torch.eye(projector.linear_2.out_features))
            if projector.linear_2.bias is not None:
                projector.linear_2.bias.zero_()


def _compose(spec: ModelSpec, tokenizer, seed: int, on_meta: bool):
    import torch
    from transformers import AutoModelForCausalLM, CLIPVisionModel, LlavaForConditionalGeneration

    config = compose_config(spec, tokenizer)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    if on_meta:
        return model
    vision = CLIPVisionModel.from_pretrained(
        resolve_id(spec.vision_tower), dtype=torch.float32
    )
    llm = AutoModelForCausalLM.from_pretrained(resolve_id(spec.llm), dtype=torch.float32)
    if llm.get_input_embeddings().num_embeddings != config.text_config.vocab_size:
        llm.resize_token_embeddings(config.text_config.vocab_size)
    model.model.vision_tower = vision
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    projector = type(model.model.multi_modal_projector)(config)  # real tensors, small
    _init_projector(projector, is_linear_projector(config), seed)
    model.model.multi_modal_projector = projector
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def build_model(cfg: TrainConfig, *, on_meta: bool = False):
    """``(LlavaForConditionalGeneration, LlavaProcessor)`` for ``cfg.model``, fp32.

    ``on_meta=True`` builds the same architecture without weights (meta tensors): the
    other workers do this and receive rank 0's weights when sharded (see
    :func:`raypipe.train.worker.setup_model`), so a 7B model is read from disk once per run, not once per
    worker. LoRA (``cfg.lora``) and the freeze policy are applied here too.
    """
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration

    spec = cfg.model
    processor = build_processor(spec)
    tokenizer = processor.tokenizer
    if spec.llava is not None:
        path = resolve_id(spec.llava)
        if on_meta:
            config = AutoConfig.from_pretrained(path)
            vocab = config.text_config.vocab_size
            config.text_config.vocab_size = _grown_vocab(vocab, len(tokenizer))
            with torch.device("meta"):
                model = LlavaForConditionalGeneration(config)
        else:
            model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
            vocab = model.get_input_embeddings().num_embeddings
            if len(tokenizer) > vocab:
                model.resize_token_embeddings(_grown_vocab(vocab, len(tokenizer)))
    else:
        model = _compose(spec, tokenizer, cfg.seed, on_meta)
    model.config.use_cache = False
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora, cfg.seed)
    apply_freeze_policy(model, cfg.stage)
    return model, processor


def apply_lora(model, lora: LoraSpec, seed: int = 0):
    """Wrap ``model`` with peft LoRA adapters on the LLM's linear layers only."""
    import torch
    from peft import LoraConfig, get_peft_model

    names = "|".join(sorted(set(lora.targets)))
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        # A full-match regex: adapters in the language model, never the tower or projector.
        target_modules=rf".*language_model\..*\.({names})",
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def unwrap(model):
    """The ``LlavaForConditionalGeneration`` inside a peft wrapper (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def apply_freeze_policy(model, stage: int) -> dict[str, int]:
    """Set ``requires_grad`` for ``stage`` and return parameter counts by part.

    Stage 1: the projector only. Stage 2: projector and LLM (with LoRA: the projector and
    the LLM's adapters); the vision tower is frozen in both. A linear projector's fixed
    identity ``linear_2`` is never trained.
    """
    base = unwrap(model)
    lora = base is not model
    for p in model.parameters():
        p.requires_grad_(False)
    projector = base.model.multi_modal_projector
    trainable = list(projector.linear_1.parameters())
    if not is_linear_projector(base.config):
        trainable += list(projector.linear_2.parameters())
    if stage == 2:
        llm_params = [
            p
            for n, p in list(base.model.language_model.named_parameters())
            + list(base.lm_head.named_parameters())
            if not lora or "lora_" in n
        ]
        trainable += llm_params
    for p in trainable:
        p.requires_grad_(True)
    return parameter_counts(model)


def parameter_counts(model) -> dict[str, int]:
    """Parameters per part (vision, projector, llm) and trainable in total."""
    base = unwrap(model)

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    return {
        "vision": count(base.model.vision_tower),
        "projector": count(base.model.multi_modal_projector),
        "llm": count(base.model.language_model) + count(base.lm_head),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def part_of(name: str) -> str:
    """Which part a (state-dict) parameter name belongs to: vision, projector or llm."""
    if "vision_tower" in name:
        return "vision"
    if "multi_modal_projector" in name:
        return "projector"
    return "llm"


def dtype_of(name: str) -> torch.dtype:
    """``bf16``/``fp32`` -> torch dtype."""
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


__all__ = [
    "apply_freeze_policy",
    "apply_lora",
    "build_model",
    "build_processor",
    "check_model_source",
    "compose_config",
    "is_linear_projector",
    "parameter_counts",
    "part_of",
    "unwrap",
]
