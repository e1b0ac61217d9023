"""One optimiser step: ``train_step`` around ``forward_backward_step``, the loss, AdamW.

The loss is the sum of token losses over the whole global batch divided by its
supervised tokens (all ranks, all micro-batches), so any worker count gives the same loss
and gradients for the same batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from raypipe.train.config import TrainConfig
from raypipe.train.conversation import IGNORE_INDEX
from raypipe.train.flops import step_flops


def build_optimizer(model, cfg: TrainConfig, total_steps: int):
    """AdamW over trainable parameters (no decay on biases and norms) + warm-up/cosine."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=tuple(cfg.adam_betas),
        # One fused kernel on GPUs: +1.5 MFU points and ~20 GiB less peak memory for a
        # 7B model on an H200 than the default multi-tensor path (benchmarks/RESULTS.md).
        fused=True if cfg.use_gpu and torch.cuda.is_available() else None,
    )
    warmup = math.ceil(total_steps * cfg.warmup_ratio)

    def lr_lambda(step: int) -> float:  # as transformers' cosine schedule with warm-up
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    return optimizer, scheduler


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over supervised positions (fp32)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def supervised_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def forward_backward_step(model, micro_batches: list[dict], scale: float, device) -> torch.Tensor:
    """Forward and backward over one rank's micro-batches of a step; the summed token
    loss (detached). Gradients are synchronised on the last micro-batch only."""
    loss_sum = torch.zeros((), device=device)
    last = len(micro_batches) - 1
    for i, batch in enumerate(micro_batches):
        model.set_requires_gradient_sync(i == last)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).logits
        part = token_loss_sum(logits, batch["labels"])
        (part * scale).backward()
        loss_sum += part.detach()
    return loss_sum


@dataclass
class Trainee:
    """What one optimiser step works on."""

    model: Any
    optimizer: Any
    scheduler: Any
    trainable: list
    cfg: TrainConfig
    device: torch.device
    world: int
    flop_parts: Any


def train_step(t: Trainee, micro_batches: list[dict]) -> dict[str, Any]:
    """One optimiser step over the global batch; its metrics (all ranks agree on them).

    The loss is the sum of token losses over the whole global batch divided by its
    supervised tokens (all ranks, all micro-batches), so any worker count gives the same
    loss and gradients for the same batch.
    """
    began = time.perf_counter()
    local = [
        sum(supervised_tokens(b["labels"]) for b in micro_batches),
        sum(float(b["attention_mask"].sum()) for b in micro_batches if _real(b)),
        sum(float(b["input_ids"].shape[0]) for b in micro_batches if _real(b)),
    ]
    n_supervised, n_tokens, n_samples = _all_reduce_sum(local, t.device)
    scale = t.world / max(n_supervised, 1.0)  # FSDP averages gradients over ranks
    loss_sum = forward_backward_step(t.model, micro_batches, scale, t.device)
    grad_norm = torch.nn.utils.clip_grad_norm_(t.trainable, t.cfg.grad_clip or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    lr = t.scheduler.get_last_lr()[0]
    t.scheduler.step()
    dist.all_reduce(loss_sum)
    flops = _all_reduce_sum([step_flops(t.flop_parts, micro_batches)], t.device)[0]
    return {
        "loss": loss_sum.item() / max(n_supervised, 1.0),
        "lr": lr,
        "grad_norm": float(grad_norm),
        "tokens": n_tokens,
        "samples": n_samples,
        "flops": flops,
        "compute_s": time.perf_counter() - began,
    }


def _real(batch: dict[str, torch.Tensor]) -> bool:
    return bool((batch["labels"] != IGNORE_INDEX).any())


__all__ = [
    "Trainee",
    "build_optimizer",
    "forward_backward_step",
    "supervised_tokens",
    "token_loss_sum",
    "train_step",
]
