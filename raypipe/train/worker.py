"""LLaVA tuning on Ray Train, worker side: ``train_loop_per_worker`` around ``train_step``.

Each worker:

1. builds the model (rank 0 with weights, the others on the meta device), shards it with
   FSDP2 (:func:`raypipe.train.parallel.parallelize_llava`) and receives rank 0's weights;
2. resumes from the latest complete checkpoint of its plan (same step, data position,
   optimiser, LR schedule and RNG), or, under ``--new-plan``, starts from the weights of
   a checkpoint of another plan (:mod:`raypipe.train.plan`);
3. reads its share of every global batch (:mod:`raypipe.train.batches`), renders and
   tokenises it, pads it;
4. per optimiser step runs ``grad_accum_steps`` micro-batches (:mod:`raypipe.train.step`):
   the loss is the sum of token losses divided by the number of supervised tokens in the
   whole global batch, so any worker count gives the same loss and gradients;
5. reports metrics (loss, lr, tokens/s, samples/s, MFU on GPUs) and sharded checkpoints
   through ``ray.train.report``;
6. at the end gathers the weights and writes a Hugging Face export with its lineage.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from raypipe.errors import ConfigError
from raypipe.train.batches import DropLog, StepBatcher, prefetch, step_rows
from raypipe.train.checkpoint import (
    TrainerState,
    load_checkpoint,
    load_weights,
    read_state_json,
    report_checkpoint,
    resume_point,
)
from raypipe.train.config import TrainConfig
from raypipe.train.flops import flops_per_sample_parts, peak_flops
from raypipe.train.plan import RunPlan, plan_changes
from raypipe.train.step import Trainee, build_optimizer, train_step


def print0(*args, rank: int) -> None:
    if rank == 0:
        print(*args, flush=True)


def setup_model(cfg: TrainConfig, rank: int, device: torch.device):
    """Build, shard and load the model on every rank; ``(model, processor)``.

    Rank 0 reads the weights; the others build the architecture on the meta device and
    get rank 0's tensors by broadcast while loading into their shards.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from raypipe.train.model import build_model
    from raypipe.train.parallel import parallelize_llava

    model, processor = build_model(cfg, on_meta=rank != 0)
    full = model.state_dict() if rank == 0 else {}
    parallelize_llava(
        model,
        device=device,
        mixed_precision=cfg.compute_dtype,
        activation_checkpointing=cfg.activation_checkpointing,
    )
    if rank != 0:
        model.to_empty(device=device)
    set_model_state_dict(
        model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    # Buffers are not sharded and some (rotary frequencies, position ids) are not in the
    # state dict: copy rank 0's.
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)
    del full
    return model, processor


@dataclass
class Attempt:
    """This worker's attempt: what the steps update and the summary reports."""

    state: TrainerState
    start_step: int  #: global step this attempt started at
    drops: DropLog
    timings: list = field(default_factory=list)  #: per step: seconds, tokens, samples, flops
    saved_at: int = 0  #: step of the last checkpoint written


def _context(config: dict[str, Any]):
    """The plan, its config, this rank, the world size and the device; libraries quiet."""
    import ray.train
    import ray.train.torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # The LM head returns a view; nothing here modifies it in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated")
    plan = RunPlan(**config)
    cfg = TrainConfig.model_validate(plan.train)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    return plan, cfg, rank, world, ray.train.torch.get_device()


def _trainee(plan: RunPlan, cfg: TrainConfig, rank: int, world: int, device) -> tuple:
    """``(Trainee, processor)``: the sharded model, its optimiser and LR schedule."""
    began = time.perf_counter()
    model, processor = setup_model(cfg, rank, device)
    print0(
        f"model built and sharded over {world} workers in {time.perf_counter() - began:.1f}s",
        rank=rank,
    )
    optimizer, scheduler = build_optimizer(model, cfg, plan.total_steps)
    trainee = Trainee(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        trainable=[p for p in model.parameters() if p.requires_grad],
        cfg=cfg,
        device=device,
        world=world,
        flop_parts=flops_per_sample_parts(model),
    )
    return trainee, processor


def _resume(plan: RunPlan, cfg: TrainConfig, t: Trainee, rank: int) -> TrainerState:
    """The loop state to start from: fresh, a checkpoint of this plan (everything
    restored), or under ``new_plan`` one of another plan (its weights only)."""
    import ray.train

    fresh = TrainerState(
        global_batch_size=cfg.global_batch_size,
        num_workers=t.world,
        steps_per_epoch=plan.steps_per_epoch,
        plan=plan.fingerprint,
        plans=[{"from_step": 0}],
    )
    checkpoint = resume_point(plan.run_dir, ray.train.get_checkpoint())
    if checkpoint is None:
        return fresh
    changes = plan_changes(read_state_json(checkpoint).get("plan"), plan.fingerprint)
    if not changes:
        state = load_checkpoint(
            checkpoint, t.model, t.optimizer, t.scheduler, rank, expect=plan.fingerprint
        )
        print0(f"resumed from {checkpoint} at step {state.step}", rank=rank)
    elif plan.new_plan:
        state = load_weights(checkpoint, t.model, rank)
        state.plans = [
            *state.plans,
            {
                "from_step": state.step,
                "new_plan": True,
                "checkpoint": checkpoint,
                "changes": changes,
            },
        ]
        state.plan, state.plan_start, state.drops = plan.fingerprint, state.step, {}
        state.global_batch_size = cfg.global_batch_size
        state.steps_per_epoch = plan.steps_per_epoch
        print0(f"new plan from the weights of {checkpoint} (step {state.step})", rank=rank)
    else:  # the driver checked the latest; this one appeared since
        raise ConfigError(f"{checkpoint} was written by another plan: {'; '.join(changes)}")
    state.num_workers = t.world
    return state


def _after_step(plan: RunPlan, t: Trainee, run: Attempt, out: dict, seconds: float, rank: int):
    """Log, report and checkpoint after a step; the seconds the checkpoint took."""
    import ray.train

    cfg, state = t.cfg, run.state
    peak = peak_flops(cfg.peak_flops, cfg.use_gpu)
    metrics = {
        "step": state.step,
        "loss": out["loss"],
        "lr": out["lr"],
        "grad_norm": out["grad_norm"],
        "tokens_per_s": out["tokens"] / seconds,
        "samples_per_s": out["samples"] / seconds,
        "mfu": out["flops"] / (seconds * t.world * peak) if peak else None,
        "step_s": seconds,
    }
    last = state.step == state.plan_start + plan.total_steps
    if state.step % cfg.log_every == 0 or last:
        print0(
            f"step {state.step}/{state.plan_start + plan.total_steps} loss {out['loss']:.4f} "
            f"lr {out['lr']:.3g} grad_norm {out['grad_norm']:.3g} "
            f"tokens/s {metrics['tokens_per_s']:.0f}",
            rank=rank,
        )
    every = cfg.checkpoint_every_steps
    if every and (state.step % every == 0 or last):  # periodic, and always the last step
        began = time.perf_counter()
        state.drops = run.drops.gathered().saved()
        report_checkpoint(metrics, t.model, t.optimizer, t.scheduler, state, rank)
        run.saved_at = state.step
        return time.perf_counter() - began
    if state.step % cfg.report_every == 0 or last:
        ray.train.report(metrics)
    return 0.0


def _train(plan: RunPlan, t: Trainee, run: Attempt, steps, rank: int) -> None:
    """Every optimiser step of this attempt."""
    state = run.state
    t.model.train()
    tick = time.perf_counter()
    for micro_batches, step_drops in steps:
        run.drops.add(step_drops)
        out = train_step(t, micro_batches)
        now = time.perf_counter()
        seconds, tick = now - tick, now
        state.step += 1
        state.samples_seen += t.cfg.global_batch_size
        state.losses.append(out["loss"])
        state.tokens += int(out["tokens"])
        run.timings.append((seconds, out["tokens"], out["samples"], out["flops"]))
        tick += _after_step(plan, t, run, out, seconds, rank)  # throughput leaves it out


def export_lineage(plan: RunPlan, state: TrainerState, saved_at: int | None) -> dict:
    """What the export records of this run beside its config: the datasets (path and
    manifest hash), where each plan started (``--new-plan`` starts and their changes),
    the steps and the last checkpoint."""
    return {
        "datasets": plan.lineage or [],
        "plans": state.plans,
        "steps": state.step,
        "last_checkpoint_step": saved_at,
        "train_config": plan.train,
    }


def _finish(plan: RunPlan, t: Trainee, processor, run: Attempt, reader, rank: int) -> dict:
    """Export (collective) and this attempt's summary."""
    cfg, state, world = t.cfg, run.state, t.world
    all_drops = run.drops.gathered()
    export_dir = None
    if cfg.export:
        from raypipe.train.export import export_hf

        began = time.perf_counter()
        saved_at = run.saved_at if cfg.checkpoint_every_steps else None
        lineage = export_lineage(plan, state, saved_at)
        exported = export_hf(t.model, processor, cfg, plan.export_dir, rank, lineage=lineage)
        export_dir = str(exported) if exported else None
        dist.barrier()
        print0(f"exported to {export_dir} in {time.perf_counter() - began:.1f}s", rank=rank)
    image_bytes = [None] * world
    dist.all_gather_object(image_bytes, reader.image_bytes if reader else None)
    steady = run.timings[1:] or run.timings
    seconds = sum(s[0] for s in steady)
    peak = peak_flops(cfg.peak_flops, cfg.use_gpu)
    return {
        "steps": state.step,
        "losses": state.losses,
        "tokens_per_s": sum(s[1] for s in steady) / seconds if steady else None,
        "samples_per_s": sum(s[2] for s in steady) / seconds if steady else None,
        "mfu": sum(s[3] for s in steady) / (seconds * world * peak) if steady and peak else None,
        "drops": all_drops.counts(),
        "export_dir": export_dir,
        "resumed_from_step": run.start_step,
        "image_bytes_by_rank": image_bytes if reader else [],
    }


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The per-worker function given to ``TorchTrainer`` (config: a :class:`RunPlan`'s
    fields): build and shard the model, resume, then step, report and checkpoint."""
    # 1. The plan, this rank, its device
    plan, cfg, rank, world, device = _context(config)
    # 2. Model, sharded, weights from rank 0; optimiser and LR schedule
    trainee, processor = _trainee(plan, cfg, rank, world, device)
    # 3. Resume: this plan's latest checkpoint, or another plan's weights (new_plan)
    state = _resume(plan, cfg, trainee, rank)
    run = Attempt(state=state, start_step=state.step, drops=DropLog(state.drops))
    run.saved_at = state.step
    # 4. This rank's micro-batches, step by step, from the plan's own step count
    batcher = StepBatcher(cfg, processor, trainee.model.config)
    rows, reader = step_rows(plan, cfg, state.step - state.plan_start, rank, world)
    steps = prefetch((batcher(r) for r in rows), cfg.data.prefetch_steps)
    # 5. Optimiser steps, with reports and checkpoints
    _train(plan, trainee, run, steps, rank)
    # 6. Export and summary
    return _finish(plan, trainee, processor, run, reader, rank)


__all__ = ["export_lineage", "setup_model", "train_loop_per_worker"]
