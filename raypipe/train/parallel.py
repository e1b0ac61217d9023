"""Parallelism for LLaVA, kept apart from the model: FSDP2 and activation checkpointing."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from raypipe.train.model import unwrap


def sharded_layers(model) -> list[torch.nn.Module]:
    """The blocks that become FSDP units: each vision encoder layer and each LLM layer."""
    base = unwrap(model)
    return list(base.model.vision_tower.encoder.layers) + list(base.model.language_model.layers)


def parallelize_llava(
    model: torch.nn.Module,
    *,
    device: torch.device,
    mixed_precision: str = "fp32",
    activation_checkpointing: bool = False,
) -> torch.nn.Module:
    """Shard ``model`` with FSDP2 over all ranks of the default process group; in place.

    1. Activation checkpointing (optional): every encoder/decoder layer recomputes its
       forward in backward (non-reentrant, so it composes with FSDP2's hooks).
    2. ``fully_shard`` each vision encoder layer and each LLM decoder layer, then the root
       (embeddings, projector, norms, LM head). Never the vision tower as one unit: its
       forward must return per-layer hidden states for ``vision_feature_layer``.
    3. Mixed precision: ``bf16`` computes in bfloat16 with fp32 parameters, gradient
       reduction and optimiser state; ``fp32`` computes in float32 (the CPU default).

    The process group (NCCL on GPUs, gloo on CPU) is the one Ray Train set up. The model
    may be on the meta device (then call ``to_empty`` and load weights after this).
    """
    # 1. Activation checkpointing
    if activation_checkpointing:
        base = unwrap(model)
        enable = getattr(base, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5.2x
            enable({"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    # 2. Mesh and precision policy
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    elif mixed_precision == "fp32":
        policy = MixedPrecisionPolicy()
    else:
        raise ValueError(f"mixed_precision must be 'bf16' or 'fp32', not {mixed_precision!r}")
    # 3. Shard layer by layer, then the root
    for layer in sharded_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


__all__ = ["parallelize_llava", "sharded_layers"]
