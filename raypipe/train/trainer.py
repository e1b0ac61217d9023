"""LLaVA tuning on Ray Train, driver side: ``preflight -> setup -> main`` (``fit`` runs all).

``preflight`` checks what a user can get wrong (data paths, an empty dataset, model ids)
without Ray; ``setup`` builds the data index and the step plan, and refuses a checkpoint
of another plan (:mod:`raypipe.train.plan`) before any worker starts; ``main`` runs
:func:`raypipe.train.worker.train_loop_per_worker` on ``num_workers`` Ray Train workers
(``TorchTrainer``) and collects a :class:`TrainResult`.

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

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from raypipe import storage
from raypipe.errors import ConfigError
from raypipe.train import worker
from raypipe.train.checkpoint import latest_checkpoint
from raypipe.train.config import TrainConfig
from raypipe.train.plan import (
    RunPlan,
    check_resumable,
    plan_fingerprint,
    plan_steps,
    warn_if_growing,
)

#: Rows an equal split between workers leaves over (deterministic_order=False only).
DROP_SPLIT_REMAINDER = "left over in each epoch by the equal split between workers"


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

    return [s if isinstance(s, DataSource) else parse_source(str(s)) for s in sources]


def preflight(cfg: TrainConfig, sources) -> tuple[TrainConfig, list]:
    """Check data sources and model ids without Ray; return them resolved.

    Raises :class:`ConfigError` / :class:`ModelError` saying what to do: no data, a
    missing path, an empty dataset, an unknown format, a model id that does not resolve.
    ``raypipe-tiny/<name>`` ids come back as built local folders, so workers never build.
    """
    from raypipe.models import resolve_id
    from raypipe.train.model import check_model_source
    from raypipe.train.sources import check_sources

    # 1. Data sources exist, are readable and not empty
    sources = _as_sources(list(sources) or cfg.data.sources)
    if not sources:
        raise ConfigError(
            "no training data: pass --data PATH (a raypipe output's data/ folder, a LLaVA "
            "JSON or a StableLLaVA JSON) or set data.sources in the preset"
        )
    external = cfg.data.allow_external_paths
    sources = check_sources([replace(s, allow_external_paths=external) for s in sources])
    # 2. Model ids resolve
    check_model_source(cfg)
    model = cfg.model.model_copy(
        update={
            key: resolve_id(value)
            for key in ("llava", "vision_tower", "llm")
            if (value := getattr(cfg.model, key)) is not None
        }
    )
    return cfg.model_copy(update={"model": model}), sources


def setup(
    cfg: TrainConfig,
    sources,
    out_dir: str | Path,
    resume: bool = True,
    new_plan: bool = False,
):
    """Plan the run on the driver: ``(RunPlan, ray.data.Dataset or None)``.

    ``cfg`` and ``sources`` are what :func:`preflight` returned (checks run once). Fails,
    before any worker starts, on an existing run when ``resume=False``, an empty dataset,
    or a checkpoint of another plan (unless ``new_plan``: then the run starts from that
    checkpoint's weights with this plan; see :mod:`raypipe.train.plan`).
    """
    import ray

    from raypipe.train.export import dataset_lineage
    from raypipe.train.shards import build_index, rows_per_epoch

    # 1. Output locations (a folder or a URI)
    out = str(out_dir) if storage.is_uri(str(out_dir)) else str(Path(out_dir).resolve())
    run_dir = storage.join(out, cfg.name)
    latest = latest_checkpoint(run_dir)
    if not resume and latest is not None:
        raise ConfigError(
            f"{run_dir} already holds checkpoints and resume is off: resume it, delete the "
            "folder, or pick another --out or name"
        )
    fs, path = storage.open_location(run_dir)
    fs.create_dir(path, recursive=True)
    # 2. The data: its light index (the plan's fingerprint, and the order when
    #    deterministic) and, for Ray Data's dynamic split, the dataset
    warn_if_growing(sources)
    index = build_index(sources)
    dataset = None
    if cfg.data.deterministic_order:
        num_rows = rows_per_epoch(index, cfg.seed, cfg.data.num_samples)
    else:
        from raypipe.train.reading import build_train_dataset

        dataset = build_train_dataset(sources, seed=cfg.seed, num_samples=cfg.data.num_samples)
        num_rows = dataset.count()
    if num_rows == 0:
        raise ConfigError(
            f"the training data ({', '.join(str(s.path) for s in sources)}) has no rows: "
            "point --data at a folder or file with samples"
        )
    # 3. The step plan, checked against the checkpoint it would resume
    steps_per_epoch, total = plan_steps(cfg, num_rows)
    fingerprint = plan_fingerprint(cfg, index)
    check_resumable(latest, fingerprint, new_plan)
    plan = RunPlan(
        train=cfg.model_dump(mode="json"),
        run_dir=run_dir,
        export_dir=storage.join(out, "export"),
        num_rows=num_rows,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        fingerprint=fingerprint,
        new_plan=new_plan,
        index=ray.put(index) if cfg.data.deterministic_order else None,
        lineage=dataset_lineage([s.path for s in sources]),
    )
    return plan, dataset


def _trainer(plan: RunPlan, cfg: TrainConfig, dataset):
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

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
    return TorchTrainer(
        worker.train_loop_per_worker,
        # Not asdict(): the index's ObjectRef travels as it is.
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


def main(plan: RunPlan, dataset=None) -> TrainResult:
    """Run the workers (``TorchTrainer.fit``) and collect the result."""
    import ray

    cfg = TrainConfig.model_validate(plan.train)
    result = _trainer(plan, cfg, dataset).fit()
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
    cfg: TrainConfig,
    sources,
    out_dir: str | Path,
    resume: bool = True,
    new_plan: bool = False,
) -> TrainResult:
    """Train ``cfg`` on ``sources`` (paths, specs or DataSource); outputs under ``out_dir``
    (a folder or a URI): ``preflight -> setup -> main``.

    With ``resume`` (default) a run whose ``OUT/<name>`` holds checkpoints continues from
    the latest complete one, if it was written by the same plan; ``new_plan`` starts from
    its weights with this plan instead. Needs Ray initialised (or starts a local instance).
    """
    cfg, sources = preflight(cfg, sources)
    plan, dataset = setup(cfg, sources, out_dir, resume, new_plan=new_plan)
    return main(plan, dataset)


__all__ = ["DROP_SPLIT_REMAINDER", "TrainResult", "fit", "main", "preflight", "setup"]
