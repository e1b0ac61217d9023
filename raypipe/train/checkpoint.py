"""Sharded training checkpoints (torch.distributed.checkpoint), reported through Ray Train.

A checkpoint folder holds:

- ``.metadata`` and ``__<rank>_0.distcp``: model and optimiser state, sharded as in
  training (each rank writes its own shards; any world size can load them);
- ``trainer_state_rank<r>.pt``: that rank's loop state (step, data position, scheduler,
  RNG states, drop counts, loss history);
- ``trainer_state.json``: rank 0's loop state, human readable.

Each worker writes its files to a local temporary folder and passes it to
``ray.train.report``; Ray merges the folders into ``OUT/<name>/step_<N>/`` (a local
folder or a URI: Ray Train's storage) and keeps the latest ``keep_checkpoints``. On a
restart (a worker died, or the job ran again with the same ``OUT`` and name) the newest
complete checkpoint is copied to a local folder and loaded from there.

Loop state loads with ``torch.load(weights_only=True)``: RNG states are saved as
tensors and lists, so loading a checkpoint from shared storage runs no pickled code.
"""

from __future__ import annotations

import json
import random
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from raypipe import storage
from raypipe.errors import ConfigError

STATE_JSON = "trainer_state.json"


@dataclass
class TrainerState:
    """Loop state saved with every checkpoint (besides model and optimiser)."""

    step: int = 0  #: optimiser steps completed
    samples_seen: int = 0  #: data position: samples (global) consumed so far
    global_batch_size: int = 0
    num_workers: int = 0
    steps_per_epoch: int = 0
    losses: list[float] = field(default_factory=list)  #: per-step loss, steps 1..step
    drops: dict[str, Any] = field(default_factory=dict)  #: dropped rows by reason, all ranks
    tokens: int = 0  #: valid (non-pad) tokens trained on so far, all ranks
    rng: dict[str, Any] = field(default_factory=dict)  #: this rank's RNG states

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("rng")
        return data


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy and torch (CPU and current CUDA device), as tensors,
    lists and numbers only (what ``torch.load(weights_only=True)`` accepts)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if not state:
        return
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(path: str | Path, model, optimizer, scheduler, state: TrainerState, rank: int):
    """Write this rank's part of a checkpoint to ``path`` (collective: all ranks call it)."""
    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    state.rng = rng_state()
    torch.save(
        {"state": asdict(state), "scheduler": scheduler.state_dict()},
        path / f"trainer_state_rank{rank}.pt",
    )
    if rank == 0:
        (path / STATE_JSON).write_text(json.dumps(state.to_json(), indent=1) + "\n")


def load_checkpoint(
    path: str | Path, model, optimizer, scheduler, rank: int, expect: TrainerState
) -> TrainerState:
    """Restore model, optimiser, scheduler and RNG from ``path``; return the loop state.

    ``expect`` carries this run's global batch size and epoch length: a checkpoint written
    with different ones would not resume at the same data position, so it is refused.
    """
    with local_copy(path) as path:
        return _load_checkpoint(path, model, optimizer, scheduler, rank, expect)


def _load_checkpoint(path: Path, model, optimizer, scheduler, rank: int, expect: TrainerState):
    # 1. Loop state first: refuse before touching the model.
    own = path / f"trainer_state_rank{rank}.pt"
    saved = torch.load(own if own.exists() else path / "trainer_state_rank0.pt", weights_only=True)
    state = TrainerState(**saved["state"])
    for key in ("global_batch_size", "steps_per_epoch"):
        if getattr(state, key) != getattr(expect, key):
            raise ConfigError(
                f"checkpoint {path} was written with {key}={getattr(state, key)}, this run "
                f"has {getattr(expect, key)}: resume with the same data and batch settings, "
                "or write to a new --out folder (or run name) to start over."
            )
    # 2. Model and optimiser shards, resharded to this world size if needed.
    model_sd, optim_sd = get_state_dict(model, optimizer)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=str(path))
    set_state_dict(
        model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"]
    )
    scheduler.load_state_dict(saved["scheduler"])
    # 3. RNG: a rank's own stream if it had one, else rank 0's.
    set_rng_state(state.rng)
    if rank != 0:
        # Drop counts, losses and tokens are run totals: rank 0 carries them on.
        state.drops, state.losses, state.tokens = {}, [], 0
    return state


def report_checkpoint(metrics: dict, model, optimizer, scheduler, state: TrainerState, rank: int):
    """Save a checkpoint on every rank and hand it to Ray Train (which persists it)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="raypipe-ckpt-") as tmp:
        save_checkpoint(tmp, model, optimizer, scheduler, state, rank)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=checkpoint_name(state.step),
        )


@contextmanager
def local_copy(location: str | Path):
    """A local folder holding the checkpoint at ``location`` (copied if it is a URI)."""
    location = str(location)
    fs, path = storage.open_location(location)
    if isinstance(fs, pafs.LocalFileSystem):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="raypipe-resume-") as tmp:
        pafs.copy_files(
            path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
        yield Path(tmp)


def read_state_json(location: str | Path) -> dict[str, Any]:
    """``trainer_state.json`` of the checkpoint at ``location`` (a folder or a URI)."""
    fs, path = storage.open_location(str(location))
    return json.loads(storage.read_bytes(fs, f"{path}/{STATE_JSON}"))


def is_complete(location: str | Path) -> bool:
    """True if every rank's part of the checkpoint at ``location`` is there."""
    fs, path = storage.open_location(str(location))
    try:
        state = json.loads(storage.read_bytes(fs, f"{path}/{STATE_JSON}"))
    except (OSError, ValueError):
        return False
    names = {".metadata"} | {
        f"trainer_state_rank{r}.pt" for r in range(int(state.get("num_workers", 1)))
    }
    infos = fs.get_file_info([f"{path}/{n}" for n in names])
    return all(info.type == pafs.FileType.File for info in infos)


def latest_checkpoint(run_dir: str | Path) -> str | None:
    """Newest complete checkpoint under ``run_dir`` (a folder or a URI), or None."""
    run_dir = str(run_dir)
    fs, path = storage.open_location(run_dir)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(
        i.base_name
        for i in infos
        if i.type == pafs.FileType.Directory and i.base_name.startswith("step_")
    )
    for name in reversed(names):
        location = storage.join(run_dir, name)
        if is_complete(location):
            return location
    return None


def resume_point(run_dir: str | Path, registered) -> str | None:
    """The checkpoint to resume from: the newest complete one, registered or not.

    Ray Train registers a checkpoint when its controller collects the report (about every
    2 s); a worker that dies sooner leaves a complete checkpoint on storage that Ray Train
    does not know about yet. Both are candidates; the later step wins. ``registered`` is
    what ``ray.train.get_checkpoint()`` returned (or None).
    """
    on_disk = latest_checkpoint(run_dir)
    if registered is not None and (
        on_disk is None or storage.name(registered.path) > storage.name(on_disk)
    ):
        return storage.join(run_dir, storage.name(registered.path))
    return on_disk


__all__ = [
    "TrainerState",
    "checkpoint_name",
    "is_complete",
    "latest_checkpoint",
    "load_checkpoint",
    "local_copy",
    "read_state_json",
    "report_checkpoint",
    "resume_point",
    "save_checkpoint",
]
