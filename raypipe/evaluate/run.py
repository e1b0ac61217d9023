"""The whole comparison from one preset: (training data and a tuned model,) benchmarks,
predictions of every model on every benchmark, scores (``raypipe evaluate run``).

An evaluation preset (:class:`EvaluateConfig`, e.g. the ``eval-tiny`` preset)
names a generation preset that builds the synthetic benchmark, real-image benchmarks
to import, the models to compare and, optionally, a training recipe (a generation preset
for the training data and a training preset) whose export is the model called
``trained``. :func:`run_evaluation` runs the steps in order into one folder::

    OUT/train-data/          the recipe's generation run (its OUT/data is the training data)
    OUT/train/               the recipe's training run (OUT/train/export: the tuned model)
    OUT/bench/synthetic/     the synthetic benchmark (filtered against the training data)
    OUT/bench/<name>/        each imported real-image benchmark
    OUT/predictions/         predictions.parquet and models.json (paths and lineage)
    OUT/report/              scores.json, predictions.parquet, report.md, abilities.png

Everything is checked before the first step: preset files, model folders, real-image
inputs and the judge's syntax, so a typo fails in seconds rather than after the training.
Running the same command again resumes: generation and training resume by themselves,
an export trained by the preset's recipe is not trained again (one trained by another
recipe is set aside and the model trained anew), and a model's predictions are reused
only when the model's files, the predict settings that change answers and the benchmark
items are unchanged (:mod:`raypipe.evaluate.reuse`); ``predictions/models.json``,
``scores.json`` and ``report.md`` say which were reused. The preset's fields are
:class:`raypipe.evaluate.config.EvaluateConfig`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from raypipe.config import load_config
from raypipe.errors import ConfigError
from raypipe.evaluate.config import (  # the preset's types, importable from here too
    EvaluateConfig,
    PredictSettings,
    RealBenchmark,
    ScoreSettings,
    TrainingRecipe,
    benchmark_config,
    is_evaluation_preset,
    load_evaluate_config,
    preset_path,
)
from raypipe.generate.config import GenerateConfig

log = logging.getLogger(__name__)

#: The model name (in ``models``) that stands for the training recipe's export.
TRAINED = "trained"


class Plan:
    """What :func:`run_evaluation` will do, checked before any of it runs."""

    def __init__(self, cfg: EvaluateConfig, preset_dir: Path, out: Path):
        from raypipe.evaluate.inference import check_local_model, parse_model
        from raypipe.train.config import load_train_config

        self.cfg, self.out = cfg, out
        self.bench_cfg = benchmark_config(cfg, preset_dir) if cfg.benchmark else None
        self.train_gen_cfg = self.train_cfg = None
        if cfg.training is not None:
            t = cfg.training
            self.train_gen_cfg = load_config(
                GenerateConfig, preset_path(preset_dir, t.generate), t.generate_overrides
            )
            self.train_cfg = load_train_config(
                str(preset_path(preset_dir, t.train)), t.train_overrides
            )
        for bench in cfg.real:
            for what, path in (("images", bench.images), ("items", bench.items)):
                if not Path(path).exists():
                    raise ConfigError(
                        f"real benchmark {bench.name!r}: {what} {path} does not exist"
                    )
        names = [b.name for b in cfg.real] + (["synthetic"] if cfg.benchmark else [])
        if not names:
            raise ConfigError("nothing to evaluate on: give a `benchmark` preset or `real` items")
        if len(set(names)) != len(names):
            raise ConfigError(f"benchmark names must differ: {names}")
        self.bench_names = names
        if cfg.score.judge and "@" not in cfg.score.judge:
            raise ConfigError(f"score.judge {cfg.score.judge!r}: write MODEL@BASE_URL")
        self.models = {}
        for name, spec in cfg.models.items():
            if spec == TRAINED:
                if cfg.training is None:
                    raise ConfigError(
                        f"model {name!r} is `{TRAINED}`, but the preset has no `training` recipe"
                    )
                self.models[name] = None  # the export, once trained
                continue
            model = parse_model(f"{name}={spec}", api_key_env=cfg.predict.key_env)
            if model.kind == "local":
                check_local_model(model.path)
            self.models[name] = model

    @property
    def train_data(self) -> list[str]:
        extra = [str(self.out / "train-data" / "data")] if self.cfg.training else []
        return list(self.cfg.train_data) + extra

    def bench_dir(self, name: str) -> Path:
        return self.out / "bench" / name


def export_complete(export_dir: Path) -> bool:
    """An export folder written to the end (its model card is written last)."""
    return all((export_dir / f).is_file() for f in ("config.json", "README.md"))


def make_trained_model(plan: Plan) -> tuple[Path, bool]:
    """The training recipe: training data, then training; returns the export folder and
    whether an earlier run's export was reused (only one trained by the same recipe:
    :mod:`raypipe.evaluate.reuse`)."""
    from raypipe.evaluate.reuse import (
        RECIPE_FILE,
        export_recipe,
        set_aside,
        started_recipe,
        training_recipe,
    )
    from raypipe.generate.pipeline import generate
    from raypipe.train.trainer import main as fit
    from raypipe.train.trainer import preflight, setup

    data_out = plan.out / "train-data"
    log.info("training data: %s", data_out)
    generate(plan.train_gen_cfg, str(data_out))
    train_out = plan.out / "train"
    export = train_out / "export"
    cfg, sources = preflight(plan.train_cfg, [str(data_out / "data")])
    recipe = training_recipe(cfg, plan.train_gen_cfg)
    if export_complete(export):
        if export_recipe(train_out, export) == recipe:
            log.info("the tuned model is already exported by this recipe: %s", export)
            return export, True
        set_aside(train_out, "its export was trained by another recipe")
    elif train_out.exists() and started_recipe(train_out) not in (None, recipe):
        set_aside(train_out, "its checkpoints belong to another recipe")
    train_out.mkdir(parents=True, exist_ok=True)
    (train_out / RECIPE_FILE).write_text(json.dumps(recipe, indent=1) + "\n")
    run_plan, dataset = setup(cfg, sources, str(train_out), resume=True)
    result = fit(run_plan, dataset)
    if not result.export_dir:
        raise ConfigError("the training preset has `export: false`: set it true to evaluate it")
    return Path(result.export_dir), False


def predict_all(
    benches: list[str],
    models: list,
    out: Path,
    settings: PredictSettings,
    kept: list[dict[str, Any]] = (),
    reused: set[str] = frozenset(),
) -> dict[str, Any]:
    """Every model over every benchmark -> OUT/predictions.parquet and OUT/models.json.

    ``kept``: rows of an earlier run reused for the models named in ``reused`` (those
    models are not asked again); models.json says which models' predictions were reused.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raypipe.evaluate.inference import predict
    from raypipe.evaluate.items import read_benchmark

    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = list(kept)
    for bench in benches:
        items = read_benchmark(bench)
        for m in models:
            if m.name in reused:
                continue
            rows += predict(
                items,
                m,
                cache_dir=out / "cache",
                batch_size=settings.batch_size,
                max_new_tokens=settings.max_new_tokens,
                device=settings.device,
                num_actors=settings.num_actors,
            )
    failed = [r for r in rows if r.get("error")]
    for r in failed[:20]:
        print(f"raypipe: {r['model']} on {r['id']}: {r['error']}", file=sys.stderr)
    pq.write_table(pa.Table.from_pylist(rows), out / "predictions.parquet")
    facts = {
        m.name: {**m.describe(), "predictions": "reused" if m.name in reused else "made"}
        for m in models
    }
    (out / "models.json").write_text(json.dumps(facts, indent=1) + "\n")
    return {"predictions": len(rows), "failed": len(failed), "path": str(out)}


def score_all(
    predictions: str | Path,
    out: str | Path,
    *,
    review: str | None = None,
    sheet: bool = False,
    judge: str | None = None,
    judge_key_env: str = "OPENAI_API_KEY",
) -> dict[str, Any]:
    """Predictions -> the report folder (scores.json, predictions.parquet, report.md,
    charts; a review sheet with ``sheet``; human marks with ``review``; LLM-judge grades
    with ``judge``). Returns scores.json's content."""
    from raypipe.evaluate.report import (
        apply_review,
        read_predictions,
        read_review_sheet,
        write_report,
        write_review_sheet,
    )

    rows, problems = read_predictions(predictions)
    for problem in problems:
        print(f"raypipe: skipped {predictions} {problem}", file=sys.stderr)
    if not rows:
        raise ConfigError(f"{predictions} holds no usable prediction rows")
    if review:
        if not Path(review).exists():
            raise ConfigError(f"review sheet {review} does not exist")
        marks, bad = read_review_sheet(review)
        problems += bad
        apply_review(rows, marks)
    summary = None
    if judge:
        from raypipe.evaluate.judge import judge_rows, judge_summary
        from raypipe.llm.config import LLMConfig

        model, sep, base_url = judge.partition("@")
        if not model or not sep or not base_url:
            raise ConfigError(f"judge {judge!r}: write MODEL@BASE_URL, e.g. gpt-4o@https://...")
        llm = LLMConfig(backend="openai", model=model, base_url=base_url, api_key_env=judge_key_env)
        rows = judge_rows(rows, llm, Path(out) / "cache")
        summary = judge_summary(rows)
    facts = Path(predictions).parent / "models.json"  # predict's: path and lineage
    models = json.loads(facts.read_text()) if facts.exists() else None
    result = write_report(rows, out, models=models, problems=problems)
    if summary is not None:
        result["judge"] = summary
        (Path(out) / "scores.json").write_text(json.dumps(result, indent=1) + "\n")
    if sheet:
        images = {r["id"]: r["image"]["bytes"] for r in rows if isinstance(r.get("image"), dict)}
        write_review_sheet(rows, out, images)
    return result


def predict_step(
    models: list, benches: list[str], out: Path, settings: PredictSettings
) -> dict[str, str]:
    """Predictions of every model, reusing an earlier run's for a model only when its
    :func:`raypipe.evaluate.reuse.prediction_key` is unchanged; returns each model's
    ``reused`` or ``made``."""
    import pyarrow.parquet as pq

    from raypipe.evaluate.reuse import benchmark_digest, prediction_key

    digests = {b: benchmark_digest(b) for b in benches}
    keys = {m.name: prediction_key(m, settings, digests) for m in models}
    inputs, table = out / "inputs.json", out / "predictions.parquet"
    before = json.loads(inputs.read_text()).get("keys", {}) if inputs.is_file() else {}
    kept: list[dict[str, Any]] = []
    if table.is_file() and before:
        same = {name for name, key in keys.items() if before.get(name) == key}
        kept = [r for r in pq.read_table(table).to_pylist() if r["model"] in same]
    reused = {r["model"] for r in kept}
    if inputs.is_file():
        inputs.unlink()  # written again once the predictions are whole
    if reused == set(keys) and (out / "models.json").is_file():
        log.info("predictions are up to date: %s", out)
        facts = json.loads((out / "models.json").read_text())
        for name in facts:
            facts[name]["predictions"] = "reused"
        (out / "models.json").write_text(json.dumps(facts, indent=1) + "\n")
    else:
        predict_all(benches, models, out, settings, kept=kept, reused=reused)
    inputs.write_text(json.dumps({"keys": keys}, indent=1) + "\n")
    return {name: "reused" if name in reused else "made" for name in keys}


def run_evaluation(
    cfg: EvaluateConfig, out: str | Path, preset_dir: str | Path = "."
) -> dict[str, Any]:
    """Run (or resume) the whole evaluation into ``out``; returns a summary."""
    import ray

    from raypipe.evaluate.build import build_benchmark
    from raypipe.evaluate.import_real import import_real
    from raypipe.evaluate.inference import parse_model

    out = Path(out)
    plan = Plan(cfg, Path(preset_dir), out)  # everything checked before any work
    summary: dict[str, Any] = {"out": str(out), "benchmarks": {}}
    if not ray.is_initialized():  # a local Ray with room for the generation runs' pools
        from raypipe.generate.pipeline import local_cpus
        from raypipe.placement import start_ray

        gen = [c for c in (plan.bench_cfg, plan.train_gen_cfg) if c is not None]
        address = plan.bench_cfg.ray_address if plan.bench_cfg else None
        start_ray(address, max((local_cpus(c) for c in gen), default=None))
    if cfg.training is not None:
        export, reused = make_trained_model(plan)
        summary["trained_model"] = str(export)
        summary["trained_model_reused"] = reused
        for name, model in plan.models.items():
            if model is None:
                plan.models[name] = parse_model(f"{name}={export}")
    if plan.bench_cfg is not None:
        report = build_benchmark(
            plan.bench_cfg,
            str(plan.bench_dir("synthetic")),
            cfg.per_ability,
            plan.train_data,
            benchmark="synthetic",
        )
        summary["benchmarks"]["synthetic"] = {
            "items_per_ability": report["items_per_ability"],
            "short_abilities": report["short_abilities"],
        }
    if cfg.real:
        from raypipe.abilities import load_catalog

        catalog = load_catalog(plan.bench_cfg.catalog_dirs or None if plan.bench_cfg else None)
        for bench in cfg.real:
            imported = import_real(
                bench.images,
                bench.items,
                str(plan.bench_dir(bench.name)),
                benchmark=bench.name,
                abilities=catalog,
            )
            summary["benchmarks"][bench.name] = {
                "imported": imported.imported,
                "rejected": imported.rejected,
            }
    benches = [str(plan.bench_dir(n)) for n in plan.bench_names]
    models = list(plan.models.values())
    pred_out = out / "predictions"
    summary["predictions"] = predict_step(models, benches, pred_out, cfg.predict)
    result = score_all(
        pred_out / "predictions.parquet",
        out / "report",
        sheet=cfg.score.sheet,
        judge=cfg.score.judge,
        judge_key_env=cfg.score.judge_key_env,
    )
    summary["scores"] = {
        model: {bench: entry["overall"] for bench, entry in m["benchmarks"].items()}
        for model, m in result["models"].items()
    }
    summary["report"] = str(out / "report" / "report.md")
    return summary


__all__ = [
    "TRAINED",
    "EvaluateConfig",
    "PredictSettings",
    "RealBenchmark",
    "ScoreSettings",
    "TrainingRecipe",
    "benchmark_config",
    "is_evaluation_preset",
    "load_evaluate_config",
    "predict_all",
    "run_evaluation",
    "score_all",
]
