"""LLaVA tuning on Ray Train: ``setup() -> main() -> fit()`` and the per-worker loop.

``fit(cfg, sources, out_dir)`` checks everything a user can get wrong on the driver (data
paths, an empty dataset, model ids, batch arithmetic) before any worker starts, then runs
``train_loop_per_worker`` on ``num_workers`` Ray Train workers (``TorchTrainer``).

Each worker:

1. builds the model (rank 0 with weights, the others on the meta device), shards it with
   FSDP2 (:func:`raypipe.train.parallel.parallelize_llava`) and receives rank 0's weights;
2. resumes from the latest checkpoint if Ray Train hands it one (same step, data
   position, optimiser, LR schedule and RNG);
3. reads its share of every global batch from the Ray Data stream, renders and tokenises
   it (:class:`raypipe.train.data.SampleEncoder`), pads it (``collate``);
4. per optimiser step runs ``grad_accum_steps`` micro-batches; the loss is the sum of
   token losses divided by the number of supervised tokens in the whole global batch
   (all ranks, all micro-batches), so any worker count gives the same loss and gradients
   for the same global batch;
5. clips, steps AdamW and the warm-up + cosine schedule, reports metrics (loss, lr,
   tokens/s, samples/s, MFU on GPUs) and sharded checkpoints through ``ray.train.report``;
6. at the end gathers the weights and writes a Hugging Face export.

Data order: with ``data.deterministic_order`` every worker reads the same ordered stream
and keeps rows ``[r*G/W, (r+1)*G/W)`` of each window of ``G`` rows (``G`` = global batch,
``W`` workers): global step ``s`` always trains on rows ``[s*G, (s+1)*G)`` of the epoch,
whatever ``W`` is, and resuming at step ``s`` skips exactly ``s*G`` rows. Only the owner
of a row decodes and tokenises it.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from raypipe.errors import ConfigError
from raypipe.train.checkpoint import (
    STATE_JSON,
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    report_checkpoint,
    resume_point,
)
from raypipe.train.config import TrainConfig
from raypipe.train.conversation import IGNORE_INDEX
from raypipe.train.flops import flops_per_sample_parts, peak_flops, step_flops

#: Rows an equal split between workers leaves over (deterministic_order=False only).
DROP_SPLIT_REMAINDER = "left over by the equal split between workers"

#: What a training step needs from an encoded row.
ENCODED_COLUMNS = ("input_ids", "labels", "pixel_values")


# ---------------------------------------------------------------------------------------
# Driver side: setup -> main -> fit
# ---------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """Everything a worker needs, decided on the driver (JSON-serialisable)."""

    train: dict[str, Any]  #: TrainConfig as a dict
    run_dir: str  #: OUT/<name>: checkpoints (Ray Train storage)
    export_dir: str  #: OUT/export
    num_rows: int  #: rows per epoch in the training stream
    steps_per_epoch: int
    total_steps: int


@dataclass
class TrainResult:
    """What a run did (``fit``'s return value; ``jobs/train.py`` prints it)."""

    steps: int
    losses: list[float]  #: loss of every optimiser step, 1..steps (across resumes)
    final_loss: float | None
    tokens_per_s: float | None  #: mean over the steps this attempt ran (first excluded)
    samples_per_s: float | None
    mfu: float | None
    drops: dict[str, int]  #: samples not trained on, by reason
    export_dir: str | None
    checkpoint: str | None  #: latest checkpoint folder, if any
    run_dir: str
    resumed_from_step: int  #: 0 for a fresh start
    ray_result: Any = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("ray_result")
        data.pop("losses")
        return data


def _as_sources(sources) -> list:
    from raypipe.train.data import DataSource, parse_source

    out = []
    for s in sources:
        out.append(s if isinstance(s, DataSource) else parse_source(str(s)))
    return out


def _plan_steps(cfg: TrainConfig, num_rows: int) -> tuple[int, int]:
    G, W = cfg.global_batch_size, cfg.num_workers
    if cfg.data.deterministic_order:
        steps_per_epoch = math.ceil(num_rows / G)
    else:
        # Ray Data's equal split gives each worker num_rows // W rows.
        steps_per_epoch = math.ceil((num_rows // W) / (G // W)) if num_rows >= W else 0
    if steps_per_epoch == 0:
        raise ConfigError(
            f"the training data has {num_rows} rows, fewer than num_workers ({W}); add data "
            "or use fewer workers"
        )
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    return steps_per_epoch, total


def preflight(cfg: TrainConfig, sources) -> tuple[TrainConfig, list]:
    """Check data sources and model ids without Ray; return them resolved.

    Raises :class:`ConfigError` / :class:`ModelError` saying what to do: no data, a
    missing path, an empty dataset, an unknown format, a model id that does not resolve.
    ``raypipe-tiny/<name>`` ids come back as built local folders, so workers never build.
    """
    from raypipe.train.data import check_sources
    from raypipe.train.model import check_model_source, resolve_model_id

    # 1. Data sources exist, are readable and not empty
    sources = _as_sources(list(sources) or cfg.data.sources)
    if not sources:
        raise ConfigError(
            "no training data: pass --data PATH (a raypipe output's data/ folder, a LLaVA "
            "JSON or a StableLLaVA JSON) or set data.sources in the preset"
        )
    sources = check_sources(sources)
    # 2. Model ids resolve
    check_model_source(cfg)
    model = cfg.model.model_copy(
        update={
            key: resolve_model_id(value)
            for key in ("llava", "vision_tower", "llm")
            if (value := getattr(cfg.model, key)) is not None
        }
    )
    return cfg.model_copy(update={"model": model}), sources


def setup(cfg: TrainConfig, sources, out_dir: str | Path, resume: bool = True):
    """Check inputs on the driver and plan the run: ``(RunPlan, ray.data.Dataset)``.

    Everything a user can get wrong fails here, before any worker starts (see
    :func:`preflight`; also an existing run when ``resume=False``).
    """
    from raypipe.train.data import build_train_dataset

    # 1. Inputs: data sources and model ids (no Ray needed)
    cfg, sources = preflight(cfg, sources)
    # 2. Output folders
    out_dir = Path(out_dir).resolve()
    run_dir = out_dir / cfg.name
    if not resume and latest_checkpoint(run_dir) is not None:
        raise ConfigError(
            f"{run_dir} already holds checkpoints and resume is off: resume it, delete the "
            "folder, or pick another --out or name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    # 3. The data stream and the step plan
    dataset = build_train_dataset(sources, seed=cfg.seed, num_samples=cfg.data.num_samples)
    if cfg.data.deterministic_order:
        # Read, mix and order once; every worker then replays the same blocks in order.
        dataset = dataset.materialize()
    num_rows = dataset.count()
    if num_rows == 0:
        raise ConfigError(
            f"the training data ({', '.join(str(s.path) for s in sources)}) has no rows: "
            "point --data at a folder or file with samples"
        )
    steps_per_epoch, total = _plan_steps(cfg, num_rows)
    _check_resumable(latest_checkpoint(run_dir), cfg.global_batch_size, steps_per_epoch)
    plan = RunPlan(
        train=cfg.model_dump(mode="json"),
        run_dir=str(run_dir),
        export_dir=str(out_dir / "export"),
        num_rows=num_rows,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
    )
    return plan, dataset


def _check_resumable(checkpoint: Path | None, global_batch: int, steps_per_epoch: int) -> None:
    """Refuse, before workers start, a checkpoint this run could not continue exactly."""
    if checkpoint is None:
        return
    saved = json.loads((checkpoint / STATE_JSON).read_text())
    for key, value in (("global_batch_size", global_batch), ("steps_per_epoch", steps_per_epoch)):
        if saved.get(key) != value:
            raise ConfigError(
                f"{checkpoint} was written with {key}={saved.get(key)}, this run has {value} "
                "(other data or batch settings): resume with the same settings, or write to a "
                "new --out folder (or name) to start over"
            )


def main(plan: RunPlan, dataset) -> TrainResult:
    """Run the workers (``TorchTrainer.fit``) and collect the result."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    cfg = TrainConfig.model_validate(plan.train)
    resources = {"CPU": cfg.worker_cpus}
    if cfg.use_gpu:
        resources["GPU"] = 1
    options = ExecutionOptions(preserve_order=cfg.data.deterministic_order)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(plan),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=str(Path(plan.run_dir).parent),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(
            # Deterministic order: every worker reads the whole ordered stream and keeps
            # its slice; otherwise Ray Data splits it between workers as they ask.
            datasets_to_split=[] if cfg.data.deterministic_order else "all",
            execution_options=options,
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    out = result.return_value or {}
    ckpt = latest_checkpoint(plan.run_dir)
    drops = dict(out.get("drops", {}))
    if not cfg.data.deterministic_order and cfg.max_steps is None:
        # Ray Data's equal split leaves num_rows % num_workers rows of each epoch unread.
        left = (plan.num_rows % cfg.num_workers) * cfg.epochs
        if left:
            drops[DROP_SPLIT_REMAINDER] = left
    return TrainResult(
        steps=out.get("steps", 0),
        losses=out.get("losses", []),
        final_loss=out["losses"][-1] if out.get("losses") else None,
        tokens_per_s=out.get("tokens_per_s"),
        samples_per_s=out.get("samples_per_s"),
        mfu=out.get("mfu"),
        drops=drops,
        export_dir=out.get("export_dir"),
        checkpoint=str(ckpt) if ckpt else None,
        run_dir=plan.run_dir,
        resumed_from_step=out.get("resumed_from_step", 0),
        ray_result=result,
    )


def fit(cfg: TrainConfig, sources, out_dir: str | Path, resume: bool = True) -> TrainResult:
    """Train ``cfg`` on ``sources`` (paths, specs or DataSource); outputs under ``out_dir``.

    With ``resume`` (default) a run whose ``OUT/<name>`` holds checkpoints continues from
    the latest one. Needs Ray initialised (or starts a local instance).
    """
    plan, dataset = setup(cfg, sources, out_dir, resume)
    return main(plan, dataset)


# ---------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------


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


# --- data -------------------------------------------------------------------------------


def _rows(iterator) -> Iterator[dict]:
    for batch in iterator.iter_batches(batch_size=64, batch_format="pyarrow", prefetch_batches=1):
        yield from batch.to_pylist()


def rank_step_rows(
    dataset_iterator,
    *,
    start_step: int,
    total_steps: int,
    steps_per_epoch: int,
    global_batch: int,
    world: int,
    rank: int,
    deterministic: bool,
) -> Iterator[list[dict]]:
    """This rank's rows of each optimiser step from ``start_step`` (one list per step).

    Deterministic: the iterator yields the whole ordered stream; the rank keeps rows
    ``[rank*G/W, (rank+1)*G/W)`` of every window of ``G``. Otherwise the iterator is this
    rank's own split and each step takes the next ``G/W`` rows. A list may be short or
    empty at the end of an epoch; the rank still runs the step.
    """
    share = global_batch // world
    window = global_batch if deterministic else share
    step = start_step
    while step < total_steps:
        epoch_first = (step // steps_per_epoch) * steps_per_epoch
        rows = _rows(dataset_iterator)
        for _ in range((step - epoch_first) * window):  # data position on resume
            next(rows, None)
        for _ in range(min(total_steps, epoch_first + steps_per_epoch) - step):
            chunk = [row for _, row in zip(range(window), rows)]
            yield chunk[rank * share : (rank + 1) * share] if deterministic else chunk
            step += 1


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch(iterator: Iterator, depth: int) -> Iterator:
    """Run ``iterator`` ``depth`` items ahead in a background thread."""
    if depth <= 0:
        yield from iterator
        return
    items: queue.Queue = queue.Queue(maxsize=depth)
    end = object()

    def produce():
        try:
            for item in iterator:
                items.put(item)
            items.put(end)
        except BaseException as e:  # handed to the consumer, which re-raises
            items.put(_Raised(e))

    threading.Thread(target=produce, daemon=True, name="raypipe-prefetch").start()
    while True:
        item = items.get()
        if item is end:
            return
        if isinstance(item, _Raised):
            raise item.exc
        yield item


class StepBatcher:
    """Turns a rank's rows of one step into ``grad_accum_steps`` padded micro-batches.

    Rows are encoded (decode + pad-to-square + image processor, render + tokenise) by
    :class:`raypipe.train.data.SampleEncoder`; rejected rows are counted by reason. A
    micro-batch left empty (end of epoch, or all rows rejected) becomes a stand-in batch
    with no supervised token, so every rank runs the same forward/backward calls (FSDP's
    collectives need all ranks) while contributing nothing to loss or gradients.
    """

    def __init__(self, cfg: TrainConfig, processor, model_config):
        from raypipe.train.data import SampleEncoder

        self.encoder = SampleEncoder(
            processor=processor,
            template=cfg.data.template,
            max_length=cfg.data.max_length,
            pad_to_square=cfg.data.pad_to_square,
        )
        self.micro = cfg.micro_batch_size
        self.accum = cfg.grad_accum_steps
        self.pad_id = processor.tokenizer.pad_token_id
        self._standin = self._standin_batch(model_config)

    def _standin_batch(self, config) -> dict[str, torch.Tensor]:
        vision = config.vision_config
        n = (vision.image_size // vision.patch_size) ** 2
        if config.vision_feature_select_strategy == "full":
            n += 1
        ids = torch.full((1, n + 1), self.pad_id, dtype=torch.long)
        ids[0, :n] = config.image_token_id
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.full_like(ids, IGNORE_INDEX),
            "pixel_values": torch.zeros(1, 3, vision.image_size, vision.image_size),
        }

    def __call__(self, rows: list[dict]) -> tuple[list[dict[str, torch.Tensor]], Counter]:
        """``(micro-batches, dropped rows by reason)`` for one step's rows."""
        from raypipe.train.data import collate

        kept, drops = [], Counter()
        if rows:
            encoded = self.encoder(rows)
            for i, reason in enumerate(encoded["drop_reason"]):
                if reason:
                    drops[str(reason)] += 1
                else:
                    kept.append({k: encoded[k][i] for k in ENCODED_COLUMNS})
        batches = []
        for a in range(self.accum):
            part = kept[a * self.micro : (a + 1) * self.micro]
            batches.append(collate(part, self.pad_id) if part else dict(self._standin))
        return batches, drops


# --- the loop ---------------------------------------------------------------------------


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _gather_drops(drops: Counter, base: dict[str, int]) -> dict[str, int]:
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(drops))
    total = Counter(base)
    for part in gathered:
        total.update(part)
    return dict(sorted(total.items()))


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The per-worker function given to ``TorchTrainer`` (config: a :class:`RunPlan` dict)."""
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
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed + rank)
    G, A = cfg.global_batch_size, cfg.grad_accum_steps

    # 1. Model, sharded, weights from rank 0
    began = time.perf_counter()
    model, processor = setup_model(cfg, rank, device)
    print0(
        f"model built and sharded over {world} workers in {time.perf_counter() - began:.1f}s",
        rank=rank,
    )
    optimizer, scheduler = build_optimizer(model, cfg, plan.total_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]

    # 2. Resume
    state = TrainerState(
        global_batch_size=G, num_workers=world, steps_per_epoch=plan.steps_per_epoch
    )
    registered = ray.train.get_checkpoint()
    checkpoint = resume_point(plan.run_dir, Path(registered.path) if registered else None)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, rank, expect=state)
        state.num_workers = world
        print0(f"resumed from {checkpoint} at step {state.step}", rank=rank)
    start_step = state.step
    base_drops, state.drops = dict(state.drops), {}

    # 3. This rank's micro-batches, step by step
    batcher = StepBatcher(cfg, processor, model.config)
    rows = rank_step_rows(
        ray.train.get_dataset_shard("train"),
        start_step=start_step,
        total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch,
        global_batch=G,
        world=world,
        rank=rank,
        deterministic=cfg.data.deterministic_order,
    )
    steps = prefetch((batcher(r) for r in rows), cfg.data.prefetch_steps)

    # 4. Optimiser steps
    flop_parts = flops_per_sample_parts(model)
    peak = peak_flops(cfg.peak_flops, cfg.use_gpu)
    timings: list[tuple[float, float, float, float]] = []  # seconds, tokens, samples, flops
    model.train()
    tick = time.perf_counter()
    drops: Counter = Counter()  # rows of the steps trained so far (not of prefetched ones)
    for micro_batches, step_drops in steps:
        drops.update(step_drops)
        local = [
            sum(supervised_tokens(b["labels"]) for b in micro_batches),
            sum(float(b["attention_mask"].sum()) for b in micro_batches if _real(b)),
            sum(float(b["input_ids"].shape[0]) for b in micro_batches if _real(b)),
        ]
        n_supervised, n_tokens, n_samples = _all_reduce_sum(local, device)
        scale = world / max(n_supervised, 1.0)  # FSDP averages gradients over ranks
        loss_sum = torch.zeros((), device=device)
        for i, batch in enumerate(micro_batches):
            model.set_requires_gradient_sync(i == A - 1)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
            ).logits
            part = token_loss_sum(logits, batch["labels"])
            (part * scale).backward()
            loss_sum += part.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip or float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        dist.all_reduce(loss_sum)
        loss = loss_sum.item() / max(n_supervised, 1.0)
        flops = _all_reduce_sum([step_flops(flop_parts, micro_batches)], device)[0]
        now = time.perf_counter()
        seconds, tick = now - tick, now

        state.step += 1
        state.samples_seen += G
        state.losses.append(loss)
        state.tokens += int(n_tokens)
        timings.append((seconds, n_tokens, n_samples, flops))
        metrics = {
            "step": state.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": n_tokens / seconds,
            "samples_per_s": n_samples / seconds,
            "mfu": flops / (seconds * world * peak) if peak else None,
            "step_s": seconds,
        }
        last = state.step == plan.total_steps
        if state.step % cfg.log_every == 0 or last:
            print0(
                f"step {state.step}/{plan.total_steps} loss {loss:.4f} lr {lr:.3g} "
                f"grad_norm {metrics['grad_norm']:.3g} tokens/s {metrics['tokens_per_s']:.0f}",
                rank=rank,
            )
        if cfg.checkpoint_every_steps and state.step % cfg.checkpoint_every_steps == 0:
            began = time.perf_counter()
            state.drops = _gather_drops(drops, base_drops)
            report_checkpoint(metrics, model, optimizer, scheduler, state, rank)
            tick += time.perf_counter() - began  # throughput figures leave checkpoints out
        elif state.step % cfg.report_every == 0 or last:
            ray.train.report(metrics)
        if cfg.fail_at_step == state.step and checkpoint is None and rank == world - 1:
            os._exit(1)  # fault injection for tests: a worker dies without cleanup

    # 5. Export and summary
    all_drops = _gather_drops(drops, base_drops)
    export_dir = None
    if cfg.export:
        from raypipe.train.export import export_hf

        began = time.perf_counter()
        exported = export_hf(model, processor, cfg, plan.export_dir, rank)
        export_dir = str(exported) if exported else None
        dist.barrier()
        print0(f"exported to {export_dir} in {time.perf_counter() - began:.1f}s", rank=rank)
    steady = timings[1:] or timings
    seconds = sum(t[0] for t in steady)
    return {
        "steps": state.step,
        "losses": state.losses,
        "tokens_per_s": sum(t[1] for t in steady) / seconds if steady else None,
        "samples_per_s": sum(t[2] for t in steady) / seconds if steady else None,
        "mfu": sum(t[3] for t in steady) / (seconds * world * peak) if steady and peak else None,
        "drops": all_drops,
        "export_dir": export_dir,
        "resumed_from_step": start_step,
    }


def _real(batch: dict[str, torch.Tensor]) -> bool:
    return bool((batch["labels"] != IGNORE_INDEX).any())


__all__ = [
    "RunPlan",
    "TrainResult",
    "build_optimizer",
    "fit",
    "main",
    "rank_step_rows",
    "preflight",
    "setup",
    "setup_model",
    "token_loss_sum",
    "train_loop_per_worker",
]
