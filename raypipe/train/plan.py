"""The run plan: what every worker is told, and the fingerprint that makes resumes exact.

A run's data order is a pure function of its *plan*: the data (which files, which rows in
which row groups, each source's mixing weight), the seed, the shuffle window, the sample
cap, the order mode, the global batch and the epochs. Resuming at step ``s`` is exact
only if steps ``s..`` come from the same order as steps ``0..s-1`` did, so every
checkpoint records :func:`plan_fingerprint` of its plan, and :func:`check_resumable`
refuses, before any worker starts, a resume whose plan differs, naming what changed.

``--new-plan`` (``setup(new_plan=True)``) takes the other way on: the run starts from the
checkpoint's weights with the new plan (its own data order, optimiser state and LR
schedule from its first step; step numbers keep counting up, so checkpoints of the new
plan sort after the old ones), and the lineage records where and why the plan changed.
``max_steps`` is not part of the plan: it is where a run stops, and a run may be
continued with a larger one.

Training on a generation run's ``OUT`` while that run still holds it (the generation
lease, :data:`raypipe.lease.LEASE_FILE`) is allowed, with a warning: new parts may land, and the next
resume would then be refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from raypipe import storage
from raypipe.errors import ConfigError
from raypipe.lease import LEASE_FILE
from raypipe.train.config import TrainConfig

log = logging.getLogger(__name__)

#: Bump when the fingerprint's layout changes (an old layout never matches a new one).
FINGERPRINT_VERSION = 1


@dataclass
class RunPlan:
    """Everything a worker needs, decided on the driver (JSON-serialisable but ``index``)."""

    train: dict[str, Any]  #: TrainConfig as a dict
    run_dir: str  #: OUT/<name>: checkpoints (Ray Train storage); a path or a URI
    export_dir: str  #: OUT/export
    num_rows: int  #: rows per epoch in the training stream
    steps_per_epoch: int
    total_steps: int  #: steps of this plan (a run that changed plans adds its start step)
    fingerprint: dict[str, Any]  #: plan_fingerprint(): what checkpoints must match
    new_plan: bool = False  #: a checkpoint of another plan starts this one (weights only)
    index: Any = None  #: deterministic_order: ObjectRef of the TrainIndex
    lineage: list | None = None  #: the data sources and their manifests


def plan_steps(cfg: TrainConfig, num_rows: int) -> tuple[int, int]:
    """``(steps per epoch, steps of the plan)``; ConfigError if an epoch has no step."""
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


# ---------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------


def _sha(parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(str(part).encode())
        digest.update(b"\x1f")
    return digest.hexdigest()[:32]


def data_fingerprint(index) -> list[dict[str, Any]]:
    """Per source: path, kind, weight and what its rows are, from a
    :class:`raypipe.train.shards.TrainIndex`.

    Parquet: per file (relative to the source) its row-group sizes and a hash of its ids
    in order (so the first and last id of every group); JSON: a hash of every record as
    the index holds it (id, turns, image). A part added, removed or rewritten, a record
    edited or a weight changed all change it.
    """
    rows = index.rows
    source = rows.column("source").to_numpy()
    file = rows.column("file").to_numpy()
    group = rows.column("group").to_numpy()
    ids = rows.column("id").to_pylist()
    members: dict[tuple[int, int], list[int]] = {}  # (source, file) -> index rows, in order
    for i, key in enumerate(zip(source.tolist(), file.tolist())):
        members.setdefault(key, []).append(i)
    out = []
    for s, meta in enumerate(index.sources):
        entry = {"path": meta["path"], "kind": meta["kind"], "weight": meta["weight"]}
        if meta["files"]:
            root = meta["path"].partition("?")[0].rstrip("/")
            files = []
            for f, fs_path in enumerate(meta["files"]):
                mine = members.get((s, f), [])
                groups = np.bincount(group[mine]) if mine else np.zeros(0, dtype=int)
                files.append(
                    {
                        "name": _relative(fs_path, root),
                        "row_groups": [int(n) for n in groups],
                        "ids": _sha(ids[i] for i in mine),
                    }
                )
            entry["files"] = files
        else:
            mine = members.get((s, -1), [])
            turns = rows.column("turns").to_pylist()
            images = rows.column("image_path").to_pylist()
            errors = rows.column("image_error").to_pylist()
            entry["rows"] = len(mine)
            entry["records"] = _sha(
                json.dumps([ids[i], turns[i], images[i], errors[i]]) for i in mine
            )
        out.append(entry)
    return out


def _relative(fs_path: str, root: str) -> str:
    root_tail = root.split("://", 1)[-1]
    for prefix in (root.rstrip("/") + "/", root_tail.rstrip("/") + "/"):
        if fs_path.startswith(prefix):
            return fs_path[len(prefix) :]
    return fs_path.rsplit("/", 1)[-1]


def plan_fingerprint(cfg: TrainConfig, index) -> dict[str, Any]:
    """What a checkpoint records of its plan (see the module doc); JSON."""
    return {
        "version": FINGERPRINT_VERSION,
        "data": data_fingerprint(index),
        "seed": cfg.seed,
        "shuffle_window_rows": cfg.data.shuffle_window_rows,
        "num_samples": cfg.data.num_samples,
        "deterministic_order": cfg.data.deterministic_order,
        "global_batch_size": cfg.global_batch_size,
        "epochs": cfg.epochs,
    }


def plan_changes(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, one line per change (empty: same plan)."""
    if not saved:
        return ["the checkpoint records no plan (written by an older raypipe)"]
    if saved.get("version") != current.get("version"):
        return [f"fingerprint version {saved.get('version')} -> {current.get('version')}"]
    out = []
    for key in current:
        if key in ("version", "data") or saved.get(key) == current[key]:
            continue
        name = key if key in ("seed", "global_batch_size", "epochs") else f"data.{key}"
        out.append(f"{name}: {saved.get(key)} -> {current[key]}")
    return _data_changes(saved.get("data") or [], current["data"]) + out


def _data_changes(saved: list[dict], current: list[dict]) -> list[str]:
    # Sources compare by position and content, not path: a dataset copied or moved
    # elsewhere yields the same order.
    if len(saved) != len(current):
        listed = ", ".join(d["path"] for d in current)
        return [f"data: {len(saved)} sources -> {len(current)} ({listed})"]
    out = []
    for old, new in zip(saved, current):
        path = new["path"]
        for key in ("kind", "weight"):
            if old.get(key) != new.get(key):
                out.append(f"data: {path}: {key} {old.get(key)} -> {new.get(key)}")
        files_old = {f["name"]: f for f in old.get("files", [])}
        files_new = {f["name"]: f for f in new.get("files", [])}
        for label, names in (
            ("added", [n for n in files_new if n not in files_old]),
            ("removed", [n for n in files_old if n not in files_new]),
            (
                "rewritten",
                [n for n in files_new if n in files_old and files_old[n] != files_new[n]],
            ),
        ):
            if names:
                more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
                out.append(f"data: {path}: files {label}: {', '.join(names[:5])}{more}")
        if (old.get("rows"), old.get("records")) != (new.get("rows"), new.get("records")):
            out.append(
                f"data: {path}: records changed ({old.get('rows')} -> {new.get('rows')} rows)"
            )
    return out


def check_resumable(
    checkpoint: str | None, fingerprint: dict[str, Any], new_plan: bool
) -> list[str]:
    """Refuse, before any worker starts, a checkpoint of another plan (unless ``new_plan``).

    Returns the changes (empty when the plan is the same or there is no checkpoint); with
    ``new_plan`` they are logged and the run starts from the checkpoint's weights.
    """
    from raypipe.train.checkpoint import read_state_json

    if checkpoint is None:
        return []
    changes = plan_changes(read_state_json(checkpoint).get("plan"), fingerprint)
    if not changes:
        return []
    listed = "\n  - ".join(changes)
    if not new_plan:
        raise ConfigError(
            f"{checkpoint} was written by another plan, so resuming it would train some rows "
            f"twice and others never:\n  - {listed}\nRun with the plan it was written with; "
            "or pass --new-plan to start from its weights with this plan (recorded in the "
            "export's lineage); or write to a new --out folder (or name) to start over."
        )
    log.warning(
        "--new-plan: starting from the weights of %s with a new plan:\n  - %s", checkpoint, listed
    )
    return changes


# ---------------------------------------------------------------------------------------
# A generation still writing
# ---------------------------------------------------------------------------------------


def generation_lease(out: str) -> dict[str, Any] | None:
    """The lease a generation run holds on ``out`` (a folder or a URI), or None.

    Tolerant of the lease's format: any readable file named :data:`LEASE_FILE` counts,
    its JSON fields (holder, renewal time, ...) are returned as found, plus ``"age_s"``
    since the store last saw it written.
    """
    try:
        fs, path = storage.open_location(out)
        info = fs.get_file_info(f"{path.rstrip('/')}/{LEASE_FILE}")
    except (OSError, ValueError):
        return None
    if info.type != pafs.FileType.File:
        return None
    try:
        lease = json.loads(storage.read_bytes(fs, info.path))
    except (OSError, ValueError):
        lease = {}
    lease = lease if isinstance(lease, dict) else {"lease": lease}
    if info.mtime is not None:
        lease["age_s"] = round(time.time() - info.mtime.timestamp(), 1)
    return lease


def warn_if_growing(sources) -> list[str]:
    """Warn about each raypipe source whose generation OUT is leased; their paths."""
    held = []
    for src in sources:
        if src.kind != "raypipe":
            continue
        folder = src.path.partition("?")[0].rstrip("/")
        query = src.path.partition("?")[2]
        candidates = [folder]
        if not folder.endswith(".parquet"):
            candidates.append(folder.rsplit("/", 1)[0])
        else:
            candidates += [folder.rsplit("/", 1)[0], folder.rsplit("/", 2)[0]]
        for candidate in candidates:
            location = f"{candidate}?{query}" if query else candidate
            lease = generation_lease(location)
            if lease is not None:
                log.warning(
                    "training data %s belongs to a generation run that holds %s (%s): its "
                    "data may still grow. This run trains on the rows there now; a resume "
                    "after the data grew is refused unless --new-plan.",
                    src.path,
                    storage.join(location, LEASE_FILE),
                    ", ".join(f"{k}={v}" for k, v in lease.items()) or "no details",
                )
                held.append(src.path)
                break
    return held


__all__ = [
    "LEASE_FILE",
    "RunPlan",
    "check_resumable",
    "data_fingerprint",
    "generation_lease",
    "plan_changes",
    "plan_fingerprint",
    "plan_steps",
    "warn_if_growing",
]
