"""Export a trained (sharded) LLaVA in Hugging Face format.

The folder holds ``model.safetensors`` (or shards), ``config.json``,
``generation_config.json`` and the processor files, and loads with plain
``LlavaForConditionalGeneration.from_pretrained`` / ``AutoProcessor.from_pretrained``.
LoRA adapters are merged into the LLM's weights first, so the export needs no peft.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from raypipe.train.model import build_model, dtype_of

if TYPE_CHECKING:
    from raypipe.train.config import TrainConfig


def gather_full_state_dict(model) -> dict[str, torch.Tensor]:
    """Full (unsharded) state dict on rank 0's CPU; empty on other ranks. Collective."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def plain_model_from_state_dict(cfg: TrainConfig, state_dict: dict[str, torch.Tensor]):
    """A ``LlavaForConditionalGeneration`` (no peft, no FSDP) holding ``state_dict``.

    The architecture is rebuilt on the meta device from ``cfg`` and the tensors assigned
    (no copy); LoRA adapters, if any, are merged and removed. Non-persistent buffers
    (rotary frequencies, position ids) stay on the meta device: the model is for
    ``save_pretrained``, and ``from_pretrained`` recomputes them.
    """
    model, _ = build_model(cfg, on_meta=True)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    if unexpected or missing:
        raise RuntimeError(
            f"state dict does not match the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}"
        )
    if cfg.lora is not None:
        model = model.merge_and_unload()
    return model


def export_hf(model, processor, cfg: TrainConfig, out_dir: str | Path, rank: int) -> Path | None:
    """Gather ``model`` and write it with ``processor`` to ``out_dir`` (rank 0 writes).

    Collective: every rank must call it. Weights are saved in the run's compute dtype
    (bf16 on GPU runs, fp32 on CPU). Returns the folder on rank 0, None elsewhere.
    """
    # 1. Gather shards into one CPU state dict on rank 0.
    state_dict = gather_full_state_dict(model)
    if rank != 0:
        return None
    # 2. Rebuild a plain model around it, merging LoRA.
    plain = plain_model_from_state_dict(cfg, state_dict)
    plain = plain.to(dtype_of(cfg.compute_dtype))
    plain.config.use_cache = True
    tokenizer = processor.tokenizer
    gen = plain.generation_config
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(gen, key, None) is None:
            setattr(gen, key, getattr(tokenizer, key))
    # 3. Write weights (safetensors), config and processor.
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


__all__ = ["export_hf", "gather_full_state_dict", "plain_model_from_state_dict"]
