"""Each rank's batches: its rows of every step, encoded, padded and prefetched.

``deterministic_order`` (the default): :class:`raypipe.train.shards.ShardReader` reads
this rank's rows of every step itself. Otherwise Ray Data streams the data and
:func:`split_step_rows` takes the next rows of this worker's split. :class:`StepBatcher`
encodes a step's rows into micro-batches; :func:`prefetch` runs that ahead in a thread;
:class:`DropLog` counts rows not trained on, once each.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from raypipe.train.config import TrainConfig
from raypipe.train.conversation import IGNORE_INDEX

#: What a training step needs from an encoded row.
ENCODED_COLUMNS = ("input_ids", "labels", "pixel_values")


def step_rows(plan, cfg: TrainConfig, start_step: int, rank: int, world: int):
    """This rank's rows of every step of the plan from ``start_step`` (counted within the
    plan), and the reader (or None)."""
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


__all__ = ["ENCODED_COLUMNS", "DropLog", "StepBatcher", "prefetch", "split_step_rows", "step_rows"]
