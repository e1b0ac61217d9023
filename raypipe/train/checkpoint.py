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

Nothing loaded from a checkpoint runs code: the loop state loads with
``torch.load(weights_only=True)`` (RNG states are saved as tensors and lists),
``trainer_state.json`` is JSON, and the DCP shards load through
:mod:`raypipe.train.dcp_reader` (``.metadata`` through a restricted unpickler, byte items
with ``weights_only=True``): a crafted file is refused with
:class:`~raypipe.train.dcp_reader.UnsafeCheckpointError`. Not protected: whoever can
write to OUT can still replace the weights themselves.

**Complete or skipped.** A checkpoint counts only when its ``trainer_state.json``, every
rank's loop state and every storage file its ``.metadata`` names are there, each storage
file with the size the metadata records. An incomplete one (an upload cut short) is
skipped with a warning naming it, and the run resumes from the one before.

Every checkpoint records the fingerprint of its run's plan (:mod:`raypipe.train.plan`).
"""

from __future__ import annotations

import json
import logging
import pickle
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
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from raypipe import storage
from raypipe.errors import ConfigError
from raypipe.train.dcp_reader import (
    UnsafeCheckpointError,
    read_metadata,
    safe_load,
    storage_sizes,
)
from raypipe.train.plan import plan_changes

STATE_JSON = "trainer_state.json"

log = logging.getLogger(__name__)


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
    plan: dict[str, Any] = field(default_factory=dict)  #: the plan's fingerprint
    plan_start: int = 0  #: the step this plan started at (0, or where --new-plan began)
    #: where each plan started: {"from_step"} and, for a --new-plan start, "new_plan",
    #: "checkpoint" (whose weights it started from) and "changes"
    plans: list[dict[str, Any]] = field(default_factory=list)

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
    path: str | Path, model, optimizer, scheduler, rank: int, expect: dict[str, Any]
) -> TrainerState:
    """Restore model, optimiser, scheduler and RNG from ``path``; return the loop state.

    ``expect`` is this run's plan fingerprint: a checkpoint of another plan would not
    resume at the same data position, so it is refused (ConfigError) before any tensor
    loads.
    """
    with local_copy(path) as local:
        return _load_checkpoint(local, str(path), model, optimizer, scheduler, rank, expect)


def _loop_state(path: Path, rank: int) -> dict[str, Any]:
    own = path / f"trainer_state_rank{rank}.pt"
    return torch.load(own if own.exists() else path / "trainer_state_rank0.pt", weights_only=True)


def _load_checkpoint(path: Path, name: str, model, optimizer, scheduler, rank: int, expect):
    # 1. Loop state first: refuse before touching the model.
    saved = _loop_state(path, rank)
    state = TrainerState(**saved["state"])
    changes = plan_changes(state.plan, expect)
    if changes:
        raise ConfigError(
            f"checkpoint {name} was written by another plan ({'; '.join(changes)}): resume "
            "with that plan, pass --new-plan to start from its weights, or write to a new "
            "--out folder (or run name) to start over."
        )
    # 2. Model and optimiser shards, resharded to this world size if needed.
    model_sd, optim_sd = get_state_dict(model, optimizer)
    loaded = {"model": model_sd, "optim": optim_sd}
    safe_load(loaded, str(path))
    set_state_dict(
        model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"]
    )
    scheduler.load_state_dict(saved["scheduler"])
    # 3. RNG: a rank's own stream if it had one, else rank 0's.
    set_rng_state(state.rng)
    return _run_totals_on_rank0(state, rank)


def _run_totals_on_rank0(state: TrainerState, rank: int) -> TrainerState:
    if rank != 0:
        # Drop counts, losses and tokens are run totals: rank 0 carries them on.
        state.drops, state.losses, state.tokens = {}, [], 0
    return state


def load_weights(path: str | Path, model, rank: int) -> TrainerState:
    """Load only the model weights of the checkpoint at ``path`` (a new plan starts from
    them: fresh optimiser, schedule and data order); its loop state, for the step count,
    losses and plan history."""
    with local_copy(path) as local:
        state = TrainerState(**_loop_state(local, rank)["state"])
        loaded = {"model": get_model_state_dict(model)}
        safe_load(loaded, str(local))
        set_model_state_dict(model, loaded["model"])
    return _run_totals_on_rank0(state, rank)


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


def incomplete(location: str | Path) -> str | None:
    """Why the checkpoint at ``location`` is not complete, or None if it is.

    Complete: ``trainer_state.json``, every rank's ``trainer_state_rank<r>.pt``, and every
    storage file ``.metadata`` names, with at least the bytes it records there. A crafted
    ``.metadata`` raises UnsafeCheckpointError (it is not merely incomplete).
    """
    fs, path = storage.open_location(str(location))
    try:
        state = json.loads(storage.read_bytes(fs, f"{path}/{STATE_JSON}"))
        metadata_bytes = storage.read_bytes(fs, f"{path}/.metadata")
    except (OSError, ValueError) as exc:
        return f"{STATE_JSON} or .metadata unreadable ({str(exc).splitlines()[0][:120]})"
    ranks = [f"trainer_state_rank{r}.pt" for r in range(int(state.get("num_workers", 1)))]
    try:
        sizes = storage_sizes(read_metadata(metadata_bytes, f"{location}/.metadata"))
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as exc:
        return f".metadata unreadable ({type(exc).__name__})"  # e.g. cut short
    names = ranks + sorted(sizes)
    for name, info in zip(names, fs.get_file_info([f"{path}/{n}" for n in names])):
        if info.type != pafs.FileType.File:
            return f"{name} is missing"
        if name in sizes and info.size != sizes[name]:
            return f"{name} has {info.size} bytes, its metadata records {sizes[name]}"
    return None


def is_complete(location: str | Path) -> bool:
    """True if every part of the checkpoint at ``location`` is there (:func:`incomplete`)."""
    return incomplete(location) is None


def latest_checkpoint(run_dir: str | Path) -> str | None:
    """Newest complete checkpoint under ``run_dir`` (a folder or a URI), or None; each
    newer incomplete one is skipped with a warning naming it."""
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
        why = incomplete(location)
        if why is None:
            return location
        log.warning("skipping checkpoint %s: %s (an upload cut short?)", location, why)
    return None


def resume_point(run_dir: str | Path, registered) -> str | None:
    """The checkpoint to resume from: the newest complete one, registered or not.

    Ray Train registers a checkpoint when its controller collects the report (about every
    2 s); a worker that dies sooner leaves a complete checkpoint on storage that Ray Train
    does not know about yet. Both are candidates; the later step wins. ``registered`` is
    what ``ray.train.get_checkpoint()`` returned (or None).
    """
    on_disk = latest_checkpoint(run_dir)
    if registered is None:
        return on_disk
    location = storage.join(run_dir, storage.name(registered.path))
    if (on_disk is None or storage.name(location) > storage.name(on_disk)) and is_complete(
        location
    ):
        return location
    return on_disk


__all__ = [
    "TrainerState",
    "checkpoint_name",
    "incomplete",
    "is_complete",
    "latest_checkpoint",
    "load_checkpoint",
    "load_weights",
    "local_copy",
    "read_state_json",
    "report_checkpoint",
    "resume_point",
    "save_checkpoint",
]
