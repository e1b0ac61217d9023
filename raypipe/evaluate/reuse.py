"""What an evaluation run may take from an earlier run into the same OUT, and what it
must make again.

- **Predictions** of a model are reused only when the model, the predict settings that
  change answers (:data:`raypipe.evaluate.config.PREDICTION_SETTINGS`) and the
  benchmark items (ids and questions) are all the same as when they were made
  (:func:`prediction_key`). A local model is the same when its folder's files have the
  same sizes and modification times and its export lineage (``raypipe_lineage.json``)
  the same content; the weights are never hashed. An endpoint is the same model name at
  the same URL.
- **A trained export** is reused only when it was trained by the same recipe: the
  training config recorded in its lineage equals the preset's, and the training data's
  generation config recorded beside it (``OUT/train/recipe.json``) equals the preset's
  (:func:`training_recipe`). Otherwise the old training folder is set aside
  (``OUT/train.replaced-<time>``, never deleted) and the model is trained again.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

__all__ = [
    "RECIPE_FILE",
    "benchmark_digest",
    "export_recipe",
    "model_identity",
    "prediction_key",
    "set_aside",
    "training_recipe",
]

#: Beside the training run (OUT/train/recipe.json): the recipe it was started with.
RECIPE_FILE = "recipe.json"


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples as lists, keys as strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def model_identity(model: Any) -> dict[str, Any]:
    """What makes ``model`` (an :class:`raypipe.evaluate.inference.EvalModel`) the same
    model: a local folder's lineage id and its files' sizes and modification times; an
    endpoint's model name and (credential-free) URL."""
    described = model.describe()
    if model.kind != "local":
        return {"kind": model.kind, "path": described["path"]}
    from raypipe.train.export import LINEAGE_FILE

    folder = Path(model.path)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        files[str(path.relative_to(folder))] = [stat.st_size, stat.st_mtime_ns]
    lineage = folder / LINEAGE_FILE
    lineage_id = hashlib.sha256(lineage.read_bytes()).hexdigest() if lineage.is_file() else None
    return {"kind": "local", "path": str(folder), "lineage_id": lineage_id, "files": files}


def benchmark_digest(bench: str) -> str:
    """A digest of a benchmark's item ids and questions (what the models are asked)."""
    from raypipe.evaluate.items import read_benchmark

    table = read_benchmark(bench, columns=["id", "question"])
    pairs = sorted(zip(table.column("id").to_pylist(), table.column("question").to_pylist()))
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def prediction_key(model: Any, settings: Any, digests: dict[str, str]) -> dict[str, Any]:
    """Everything a model's predictions depend on; equal keys mean reusable predictions.

    ``settings``: the run's :class:`raypipe.evaluate.config.PredictSettings`;
    ``digests``: :func:`benchmark_digest` of each benchmark."""
    from raypipe.evaluate.config import PREDICTION_SETTINGS

    return _plain(
        {
            "model": model_identity(model),
            "predict": {k: getattr(settings, k) for k in PREDICTION_SETTINGS},
            "benchmarks": digests,
        }
    )


def training_recipe(train_cfg: Any, generate_cfg: Any) -> dict[str, Any]:
    """The training recipe as the export's lineage records it (``train``: the training
    config, secrets redacted) and the training data's generation config (``data``)."""
    from raypipe.config import redacted
    from raypipe.train.export import lineage_record

    return _plain({"train": lineage_record(train_cfg)["config"], "data": redacted(generate_cfg)})


def export_recipe(train_out: Path, export: Path) -> dict[str, Any] | None:
    """The recipe an export was trained by: its lineage's config, and the data recipe of
    ``train_out/recipe.json``; None when either is missing."""
    from raypipe.evaluate.inference import read_lineage

    lineage = read_lineage(export)
    recorded = train_out / RECIPE_FILE
    if not lineage or "config" not in lineage or not recorded.is_file():
        return None
    data = json.loads(recorded.read_text()).get("data")
    return _plain({"train": lineage["config"], "data": data})


def started_recipe(train_out: Path) -> dict[str, Any] | None:
    """The recipe a training folder was started with (``recipe.json``), if any."""
    recorded = train_out / RECIPE_FILE
    return json.loads(recorded.read_text()) if recorded.is_file() else None


def set_aside(folder: Path, why: str) -> Path:
    """Renames ``folder`` to ``<folder>.replaced-<UTC time>`` (kept, not deleted)."""
    import logging

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = folder.with_name(f"{folder.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.replaced-{stamp}-{n}")
    folder.rename(target)
    logging.getLogger(__name__).warning("%s: %s; set aside as %s", folder, why, target)
    return target
