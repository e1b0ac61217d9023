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
   it (:class:`raypipe.train.encoding.SampleEncoder`), pads it (``collate``);
4. per optimiser step runs ``grad_accum_steps`` micro-batches; the loss is the sum of
   token losses divided by the number of supervised tokens in the whole global batch
   (all ranks, all micro-batches), so any worker count gives the same loss and gradients
   for the same global batch;
5. clips, steps AdamW and the warm-up + cosine schedule, reports metrics (loss, lr,
   tokens/s, samples/s, MFU on GPUs) and sharded checkpoints through ``ray.train.report``;
6. at the end gathers the weights and writes a Hugging Face export.

Data order: with ``data.deterministic_order`` the driver builds a light index of the
data (:mod:`raypipe.train.shards`) and each worker reads, itself, only the row groups
holding its slice of each global batch: global step ``s`` of an epoch always trains on
the same ``G`` rows whatever the worker count ``W``, each epoch has its own order from
(seed, epoch), each worker reads about 1/W of the image bytes, and resuming at step ``s``
reads nothing the steps before ``s`` needed alone. Otherwise Ray Data streams the data
and splits it between workers as they ask.

``OUT`` may be a local folder or a URI (``s3://bucket/train1``): checkpoints go there
through Ray Train's storage, and the export is written under it.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from raypipe import storage
from raypipe.errors import ConfigError
from raypipe.train.checkpoint import (
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    read_state_json,
    report_checkpoint,
    resume_point,
)
from raypipe.train.config import TrainConfig
from raypipe.train.conversation import IGNORE_INDEX
from raypipe.train.flops import flops_per_sample_parts, peak_flops, step_flops

#: Rows an equal split between workers leaves over (deterministic_order=False only).
DROP_SPLIT_REMAINDER = "left over in each epoch by the equal split between workers"

#: What a training step needs from an encoded row.
ENCODED_COLUMNS = ("input_ids", "labels", "pixel_values")


# ---------------------------------------------------------------------------------------
# Driver side: setup -> main -> fit
# ---------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """Everything a worker needs, decided on the driver (JSON-serialisable)."""

    train: dict[str, Any]  #: TrainConfig as a dict
    run_dir: str  #: OUT/<name>: checkpoints (Ray Train storage); a path or a URI
    export_dir: str  #: OUT/export
    num_rows: int  #: rows per epoch in the training stream
    steps_per_epoch: int
    total_steps: int
    index: Any = None  #: deterministic_order: ObjectRef of the TrainIndex
    lineage: list = field(default_factory=list)  #: the data sources and their manifests
    on_step: Any = None  #: callable(step, rank, resumed) after each step (tests: faults)


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
    #: deterministic_order: compressed image bytes each rank read (this attempt), and
    #: the image bytes of one epoch of the data
    image_bytes_by_rank: list[int] = field(default_factory=list)
    image_bytes_epoch: int | None = None
    ray_result: Any = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("ray_result")
        data.pop("losses")
        return data


def _as_sources(sources) -> list:
    from raypipe.train.sources import DataSource, parse_source

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
    from raypipe.train.model import check_model_source, resolve_model_id
    from raypipe.train.sources import check_sources

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


def setup(cfg: TrainConfig, sources, out_dir: str | Path, resume: bool = True, on_step=None):
    """Plan the run on the driver: ``(RunPlan, ray.data.Dataset or None)``.

    ``cfg`` and ``sources`` are what :func:`preflight` returned (checks run once). Fails,
    before any worker starts, on an existing run when ``resume=False``, an empty dataset,
    or a checkpoint this run could not continue exactly. ``on_step(step, rank,
    resumed)``, if given, runs on every worker after each optimiser step.
    """
    import ray

    from raypipe.train.export import dataset_lineage

    # 1. Output locations (a folder or a URI)
    out = str(out_dir) if storage.is_uri(str(out_dir)) else str(Path(out_dir).resolve())
    run_dir = storage.join(out, cfg.name)
    if not resume and latest_checkpoint(run_dir) is not None:
        raise ConfigError(
            f"{run_dir} already holds checkpoints and resume is off: resume it, delete the "
            "folder, or pick another --out or name"
        )
    fs, path = storage.open_location(run_dir)
    fs.create_dir(path, recursive=True)
    # 2. The data and the step plan
    dataset, index = None, None
    if cfg.data.deterministic_order:
        from raypipe.train.shards import build_index, rows_per_epoch

        built = build_index(sources)
        num_rows = rows_per_epoch(built, cfg.seed, cfg.data.num_samples)
        index = ray.put(built)
    else:
        from raypipe.train.reading import build_train_dataset

        dataset = build_train_dataset(sources, seed=cfg.seed, num_samples=cfg.data.num_samples)
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
        run_dir=run_dir,
        export_dir=storage.join(out, "export"),
        num_rows=num_rows,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        index=index,
        lineage=dataset_lineage([s.path for s in sources]),
        on_step=on_step,
    )
    return plan, dataset


def _check_resumable(checkpoint: str | None, global_batch: int, steps_per_epoch: int) -> None:
    """Refuse, before workers start, a checkpoint this run could not continue exactly."""
    if checkpoint is None:
        return
    saved = read_state_json(checkpoint)
    for key, value in (("global_batch_size", global_batch), ("steps_per_epoch", steps_per_epoch)):
        if saved.get(key) != value:
            raise ConfigError(
                f"{checkpoint} was written with {key}={saved.get(key)}, this run has {value} "
                "(other data or batch settings): resume with the same settings, or write to a "
                "new --out folder (or name) to start over"
            )


def main(plan: RunPlan, dataset=None) -> TrainResult:
    """Run the workers (``TorchTrainer.fit``) and collect the result."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    cfg = TrainConfig.model_validate(plan.train)
    resources = {"CPU": cfg.worker_cpus}
    if cfg.use_gpu:
        resources["GPU"] = 1
    storage_fs, storage_path = storage.open_location(storage.parent(plan.run_dir))
    data = {}
    if dataset is not None:  # Ray Data splits the stream between workers as they ask
        data = dict(
            datasets={"train": dataset},
            dataset_config=ray.train.DataConfig(
                datasets_to_split="all", execution_options=ExecutionOptions()
            ),
        )
    trainer = TorchTrainer(
        train_loop_per_worker,
        # Not asdict(): the index's ObjectRef and the callback travel as they are.
        train_loop_config={f.name: getattr(plan, f.name) for f in fields(plan)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
        **data,
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    out = result.return_value or {}
    ckpt = latest_checkpoint(plan.run_dir)
    drops = dict(out.get("drops", {}))
    image_bytes_epoch = None
    if plan.index is not None:
        from raypipe.train.shards import epoch_image_bytes

        image_bytes_epoch = epoch_image_bytes(ray.get(plan.index))
    if not cfg.data.deterministic_order and cfg.max_steps is None:
        # Ray Data's equal split leaves num_rows % num_workers rows of each epoch unread.
        left = plan.num_rows % cfg.num_workers
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
        image_bytes_by_rank=out.get("image_bytes_by_rank", []),
        image_bytes_epoch=image_bytes_epoch,
        ray_result=result,
    )


def fit(
    cfg: TrainConfig, sources, out_dir: str | Path, resume: bool = True, on_step=None
) -> TrainResult:
    """Train ``cfg`` on ``sources`` (paths, specs or DataSource); outputs under ``out_dir``
    (a folder or a URI): ``preflight -> setup -> main``.

    With ``resume`` (default) a run whose ``OUT/<name>`` holds checkpoints continues from
    the latest one. Needs Ray initialised (or starts a local instance).
    """
    cfg, sources = preflight(cfg, sources)
    plan, dataset = setup(cfg, sources, out_dir, resume, on_step=on_step)
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


def split_step_rows(
    dataset_shard,
    *,
    start_step: int,
    total_steps: int,
    steps_per_epoch: int,
    share: int,
    seed: int,
) -> Iterator[list[dict]]:
    """``deterministic_order: false``: this rank's rows of each step from its Ray Data
    split (the next ``share`` rows; a list may be short or empty at an epoch's end).

    Each epoch is a new pass over the stream with a local shuffle seeded by (seed, epoch).
    Resume skips the same number of rows of the epoch, not the same rows.
    """
    step = start_step
    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        batches = dataset_shard.iter_batches(
            batch_size=64,
            batch_format="pyarrow",
            prefetch_batches=1,
            local_shuffle_buffer_size=256,
            local_shuffle_seed=seed * 100_003 + epoch,
        )
        rows = (row for batch in batches for row in batch.to_pylist())
        for _ in range(first * share):  # data position on resume
            next(rows, None)
        for _ in range(min(total_steps - epoch * steps_per_epoch, steps_per_epoch) - first):
            yield [row for _, row in zip(range(share), rows)]
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
    :class:`raypipe.train.encoding.SampleEncoder`; rejected rows are counted by reason. A
    micro-batch left empty (end of epoch, or all rows rejected) becomes a stand-in batch
    with no supervised token, so every rank runs the same forward/backward calls (FSDP's
    collectives need all ranks) while contributing nothing to loss or gradients.
    """

    def __init__(self, cfg: TrainConfig, processor, model_config):
        from raypipe.train.encoding import SampleEncoder

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

    def __call__(self, rows: list[dict]) -> tuple[list[dict[str, torch.Tensor]], list]:
        """``(micro-batches, dropped rows as (reason, source, id))`` for one step's rows."""
        from raypipe.train.encoding import collate

        kept, drops = [], []
        if rows:
            encoded = self.encoder(rows)
            for i, reason in enumerate(encoded["drop_reason"]):
                if reason:
                    drops.append((str(reason), str(encoded["source"][i]), str(encoded["id"][i])))
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


class DropLog:
    """Rows not trained on, by reason, each row counted once however many epochs (and
    whichever rank) met it. Saved with checkpoints as ``{reason: [source\x1fid, ...]}``."""

    def __init__(self, saved: dict[str, Any] | None = None):
        self.rows: dict[str, set[str]] = {}
        for reason, keys in (saved or {}).items():
            if isinstance(keys, list):  # counts from before ids were kept cannot merge
                self.rows.setdefault(reason, set()).update(keys)

    def add(self, drops: list[tuple[str, str, str]]) -> None:
        for reason, source, row_id in drops:
            self.rows.setdefault(reason, set()).add(f"{source}\x1f{row_id}")

    def gathered(self) -> DropLog:
        """The union over all ranks (collective)."""
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, {r: sorted(k) for r, k in self.rows.items()})
        out = DropLog()
        for part in parts:
            for reason, keys in part.items():
                out.rows.setdefault(reason, set()).update(keys)
        return out

    def saved(self) -> dict[str, list[str]]:
        return {r: sorted(k) for r, k in sorted(self.rows.items())}

    def counts(self) -> dict[str, int]:
        return {r: len(k) for r, k in sorted(self.rows.items())}


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


def _step_rows(plan: RunPlan, cfg: TrainConfig, start_step: int, rank: int, world: int):
    """This rank's rows of every step from ``start_step``, and the reader (or None)."""
    import ray
    import ray.train

    if plan.index is not None:
        from raypipe.train.shards import ShardReader

        reader = ShardReader(
            ray.get(plan.index),
            seed=cfg.seed,
            window_rows=cfg.data.shuffle_window_rows,
            num_samples=cfg.data.num_samples,
            global_batch=cfg.global_batch_size,
            world=world,
            rank=rank,
        )
        return reader.steps(start_step, plan.total_steps, plan.steps_per_epoch), reader
    rows = split_step_rows(
        ray.train.get_dataset_shard("train"),
        start_step=start_step,
        total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch,
        share=cfg.global_batch_size // world,
        seed=cfg.seed,
    )
    return rows, None


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The per-worker function given to ``TorchTrainer`` (config: a :class:`RunPlan`'s
    fields): build and shard the model, resume, then step, report and checkpoint."""
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

    # 1. Model, sharded, weights from rank 0
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

    # 2. Resume
    state = TrainerState(
        global_batch_size=cfg.global_batch_size,
        num_workers=world,
        steps_per_epoch=plan.steps_per_epoch,
    )
    registered = ray.train.get_checkpoint()
    checkpoint = resume_point(plan.run_dir, registered)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, rank, expect=state)
        state.num_workers = world
        print0(f"resumed from {checkpoint} at step {state.step}", rank=rank)
    start_step = state.step
    drops = DropLog(state.drops)

    # 3. This rank's micro-batches, step by step
    batcher = StepBatcher(cfg, processor, model.config)
    rows, reader = _step_rows(plan, cfg, start_step, rank, world)
    steps = prefetch((batcher(r) for r in rows), cfg.data.prefetch_steps)

    # 4. Optimiser steps; checkpoints, reports and the step hook around them
    peak = peak_flops(cfg.peak_flops, cfg.use_gpu)
    timings: list[tuple[float, float, float, float]] = []  # seconds, tokens, samples, flops
    model.train()
    tick = time.perf_counter()
    saved_at = start_step
    for micro_batches, step_drops in steps:
        drops.add(step_drops)
        out = train_step(trainee, micro_batches)
        now = time.perf_counter()
        seconds, tick = now - tick, now
        state.step += 1
        state.samples_seen += cfg.global_batch_size
        state.losses.append(out["loss"])
        state.tokens += int(out["tokens"])
        timings.append((seconds, out["tokens"], out["samples"], out["flops"]))
        metrics = {
            "step": state.step,
            "loss": out["loss"],
            "lr": out["lr"],
            "grad_norm": out["grad_norm"],
            "tokens_per_s": out["tokens"] / seconds,
            "samples_per_s": out["samples"] / seconds,
            "mfu": out["flops"] / (seconds * world * peak) if peak else None,
            "step_s": seconds,
        }
        last = state.step == plan.total_steps
        if state.step % cfg.log_every == 0 or last:
            print0(
                f"step {state.step}/{plan.total_steps} loss {out['loss']:.4f} "
                f"lr {out['lr']:.3g} grad_norm {out['grad_norm']:.3g} "
                f"tokens/s {metrics['tokens_per_s']:.0f}",
                rank=rank,
            )
        every = cfg.checkpoint_every_steps
        if (every and state.step % every == 0) or (last and every):
            # Periodic checkpoints, and always one of the last step.
            began = time.perf_counter()
            state.drops = drops.gathered().saved()
            report_checkpoint(metrics, model, optimizer, scheduler, state, rank)
            saved_at = state.step
            tick += time.perf_counter() - began  # throughput figures leave checkpoints out
        elif state.step % cfg.report_every == 0 or last:
            ray.train.report(metrics)
        if plan.on_step is not None:
            plan.on_step(state.step, rank, checkpoint is not None)

    # 5. Export and summary
    all_drops = drops.gathered()
    export_dir = None
    if cfg.export:
        from raypipe.train.export import export_hf

        began = time.perf_counter()
        lineage = {
            "sources": plan.lineage,
            "steps": state.step,
            "last_checkpoint_step": saved_at if cfg.checkpoint_every_steps else None,
            "train_config": plan.train,
        }
        exported = export_hf(model, processor, cfg, plan.export_dir, rank, lineage=lineage)
        export_dir = str(exported) if exported else None
        dist.barrier()
        print0(f"exported to {export_dir} in {time.perf_counter() - began:.1f}s", rank=rank)
    image_bytes = [None] * world
    dist.all_gather_object(image_bytes, reader.image_bytes if reader else None)
    steady = timings[1:] or timings
    seconds = sum(t[0] for t in steady)
    return {
        "steps": state.step,
        "losses": state.losses,
        "tokens_per_s": sum(t[1] for t in steady) / seconds if steady else None,
        "samples_per_s": sum(t[2] for t in steady) / seconds if steady else None,
        "mfu": sum(t[3] for t in steady) / (seconds * world * peak) if steady and peak else None,
        "drops": all_drops.counts(),
        "export_dir": export_dir,
        "resumed_from_step": start_step,
        "image_bytes_by_rank": image_bytes if reader else [],
    }


def _real(batch: dict[str, torch.Tensor]) -> bool:
    return bool((batch["labels"] != IGNORE_INDEX).any())


__all__ = [
    "RunPlan",
    "TrainResult",
    "build_optimizer",
    "fit",
    "main",
    "split_step_rows",
    "train_step",
    "forward_backward_step",
    "preflight",
    "setup",
    "setup_model",
    "token_loss_sum",
    "train_loop_per_worker",
]
