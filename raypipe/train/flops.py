"""Model FLOPs of a LLaVA training step, and accelerator peaks, for MFU.

MFU = model FLOPs per second / (accelerators x peak FLOP/s). Model FLOPs count the
matrix multiplications the step needs (not recomputation from activation checkpointing):

- LLM: ``6·N`` per token when its weights train (forward 2, backward 4), ``4·N`` when
  frozen (backward still carries gradients through it to the projector), plus
  ``12·L·d·T`` per token for attention scores and values (``T`` = padded length);
  ``N`` = decoder layers + LM head (the embedding lookup is free).
- Vision tower: frozen and first in the graph, so forward only: ``2·N`` per patch plus
  ``4·L·d·P`` per patch for attention (``P`` patches incl. CLS).
- Projector: ``6·N`` per image token.
"""

from __future__ import annotations

import torch

from raypipe.train.conversation import IGNORE_INDEX

#: Peak dense bf16 FLOP/s per accelerator (vendor figures, without sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def flops_per_sample_parts(model) -> dict[str, float]:
    """Per-part constants for :func:`step_flops`, from the model's (unsharded) config."""
    from raypipe.train.model import unwrap

    base = unwrap(model)
    text, vision = base.config.text_config, base.config.vision_config

    def numel(module) -> int:
        # Counted from the config's shapes, so sharded (DTensor) parameters count in full.
        return sum(p.numel() for p in module.parameters())

    layers = base.model.language_model.layers
    full_llm = all(p.requires_grad for p in layers.parameters())  # False: stage 1, LoRA
    return {
        "llm_params": float(numel(layers) + numel(base.lm_head)),
        "llm_factor": 6.0 if full_llm else 4.0,
        "llm_attn": 12.0 * text.num_hidden_layers * text.hidden_size,
        "vision_params": float(numel(base.model.vision_tower.encoder)),
        "vision_attn": 4.0 * vision.num_hidden_layers * vision.hidden_size,
        "patches": float((vision.image_size // vision.patch_size) ** 2 + 1),
        "projector_params": float(numel(base.model.multi_modal_projector)),
    }


def step_flops(parts: dict[str, float], micro_batches: list[dict[str, torch.Tensor]]) -> float:
    """Model FLOPs of one rank's micro-batches (forward + backward); stand-ins count 0."""
    total = 0.0
    for b in micro_batches:
        if not (b["labels"] != IGNORE_INDEX).any():
            continue  # stand-in batches do no useful work
        tokens = float(b["attention_mask"].sum())
        length = float(b["input_ids"].shape[1])
        images = float(b["pixel_values"].shape[0])
        patches = parts["patches"]
        total += tokens * (parts["llm_factor"] * parts["llm_params"] + parts["llm_attn"] * length)
        total += images * patches * (2.0 * parts["vision_params"] + parts["vision_attn"] * patches)
        total += 6.0 * parts["projector_params"] * images * (patches - 1)
    return total


def peak_flops(override: float | None = None, use_gpu: bool = True) -> float | None:
    """Peak FLOP/s of this process's accelerator: ``override``, a known GPU, or None."""
    if override is not None:
        return override
    if not (use_gpu and torch.cuda.is_available()):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


__all__ = ["PEAK_FLOPS", "flops_per_sample_parts", "peak_flops", "step_flops"]
