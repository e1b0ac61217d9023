"""Sharded training checkpoints (torch.distributed.checkpoint), reported through Ray Train.

A checkpoint folder holds:

- ``.metadata`` and ``__<rank>_0.distcp``: model and optimiser state, sharded as in
  training (each rank writes its own shards; any world size can load them);
- ``trainer_state_rank<r>.pt``: that rank's loop state (step, data position, scheduler,
  RNG states, drop counts, loss history);
- ``trainer_state.json``: rank 0's loop state, human readable.

Each worker writes its files to a local temporary folder and passes it to
``ray.train.report``; Ray merges the folders into ``OUT/<name>/step_<N>/`` and keeps the
latest ``keep_checkpoints``. On a restart (a worker died, or the job ran again with the
same ``OUT`` and name) ``ray.train.get_checkpoint()`` returns the latest one.
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

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
    drops: dict[str, int] = field(default_factory=dict)  #: dropped samples by reason, all ranks
    tokens: int = 0  #: valid (non-pad) tokens trained on so far, all ranks
    rng: dict[str, Any] = field(default_factory=dict)  #: this rank's RNG states

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("rng")
        return data


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy and torch (CPU and current CUDA device)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
    path = Path(path)
    # 1. Loop state first: refuse before touching the model.
    own = path / f"trainer_state_rank{rank}.pt"
    saved = torch.load(own if own.exists() else path / "trainer_state_rank0.pt", weights_only=False)
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


def is_complete(path: str | Path) -> bool:
    """True if every rank's part of the checkpoint at ``path`` is there."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_JSON).read_text())
    except (OSError, ValueError):
        return False
    ranks = range(int(state.get("num_workers", 1)))
    return (path / ".metadata").exists() and all(
        (path / f"trainer_state_rank{r}.pt").exists() for r in ranks
    )


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest complete checkpoint folder under ``run_dir``, or None."""
    done = [p for p in sorted(Path(run_dir).glob("step_*")) if is_complete(p)]
    return done[-1] if done else None


def resume_point(run_dir: str | Path, registered: Path | None) -> Path | None:
    """The checkpoint to resume from: the newest complete one, registered or not.

    Ray Train registers a checkpoint when its controller collects the report (about every
    2 s); a worker that dies sooner leaves a complete checkpoint on storage that Ray Train
    does not know about yet. Both are candidates; the later step wins.
    """
    on_disk = latest_checkpoint(run_dir)
    candidates = [p for p in (registered, on_disk) if p is not None]
    return max(candidates, key=lambda p: Path(p).name) if candidates else None


__all__ = [
    "TrainerState",
    "checkpoint_name",
    "is_complete",
    "latest_checkpoint",
    "load_checkpoint",
    "report_checkpoint",
    "resume_point",
    "save_checkpoint",
]
