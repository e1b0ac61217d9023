"""The whole comparison from one preset: (training data and a tuned model,) benchmarks,
predictions of every model on every benchmark, scores (``jobs/evaluate.py run``).

An evaluation preset (:class:`EvaluateConfig`, e.g. ``jobs/configs/eval-tiny.yaml``)
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
a complete export is not trained again, and predictions are made again only when the
models or benchmarks changed.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from raypipe.config import Config, GenerateConfig, load_config, read_yaml_preset
from raypipe.errors import ConfigError

log = logging.getLogger(__name__)

#: The model name (in ``models``) that stands for the training recipe's export.
TRAINED = "trained"


class RealBenchmark(Config):
    """A real-image benchmark: a folder of images plus a JSONL of items (``import``)."""

    images: str = Field(description="Folder the JSONL's image paths are relative to.")
    items: str = Field(description="JSONL of {image, ability, question, question_type, ...}.")
    name: str = Field("real", description="Benchmark name (its folder: OUT/bench/NAME).")


class TrainingRecipe(Config):
    """How the tuned model is made: training data by a generation preset, then training."""

    generate: str = Field(description="Generation preset for the training data (OUT/train-data).")
    generate_overrides: list[str] = Field(
        default_factory=list, description="dotted.field=value overrides of that preset."
    )
    train: str = Field(description="Training preset (OUT/train; the model is OUT/train/export).")
    train_overrides: list[str] = Field(
        default_factory=list, description="dotted.field=value overrides of that preset."
    )


class PredictSettings(Config):
    """How models answer (``predict``)."""

    batch_size: int = Field(8, ge=1, description="Items per model call.")
    max_new_tokens: int = Field(32, ge=1, description="Longest answer, in tokens.")
    device: str = Field("auto", description="auto, cuda or cpu (local models).")
    num_actors: int = Field(1, ge=1, description="Model actors per local model (GPUs).")
    key_env: str = Field("OPENAI_API_KEY", description="Key variable of openai: endpoints.")


class ScoreSettings(Config):
    """How answers are graded (``score``)."""

    sheet: bool = Field(False, description="Also write a human-review sheet (html + csv).")
    judge: str | None = Field(None, description="MODEL@BASE_URL of an LLM judge, or none.")
    judge_key_env: str = Field("OPENAI_API_KEY", description="The judge's key variable.")


class EvaluateConfig(Config):
    """The evaluation job's preset (``jobs/evaluate.py run``)."""

    benchmark: str | None = Field(
        None,
        description="Generation preset that builds the synthetic benchmark (a path relative "
        "to this preset); none: real-image benchmarks only.",
    )
    benchmark_overrides: list[str] = Field(
        default_factory=list, description="dotted.field=value overrides of that preset."
    )
    per_ability: int = Field(50, ge=1, description="Synthetic items per ability (paper: 50).")
    abilities: list[str] | None = Field(None, description="Abilities to evaluate (all).")
    train_data: list[str] = Field(
        default_factory=list,
        description="Training data (raypipe OUT or OUT/data) the synthetic items must not "
        "overlap; the recipe's training data is added by itself.",
    )
    real: list[RealBenchmark] = Field(default_factory=list, description="Real-image benchmarks.")
    training: TrainingRecipe | None = Field(
        None, description="Make training data and train the model called `trained` first."
    )
    models: dict[str, str] = Field(
        description="NAME: a LLaVA folder, raypipe-tiny/ID, openai:MODEL@BASE_URL, or "
        "`trained` (the training recipe's export)."
    )
    predict: PredictSettings = Field(default_factory=PredictSettings)
    score: ScoreSettings = Field(default_factory=ScoreSettings)

    @field_validator("models")
    @classmethod
    def _some_models(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("name at least one model, e.g. {baseline: llava-hf/llava-1.5-7b-hf}")
        return value


def is_evaluation_preset(path: str | Path) -> bool:
    """True if ``path`` is an evaluation preset (it names ``models``), not a generation one."""
    data = read_yaml_preset(path)
    return "models" in data


def load_evaluate_config(path: str | Path, overrides: list[str] = ()) -> EvaluateConfig:
    """An evaluation preset + dotted overrides -> :class:`EvaluateConfig`."""
    return load_config(EvaluateConfig, path, list(overrides))


def _preset(folder: Path, name: str) -> Path:
    """A preset named in an evaluation preset: relative to that preset's folder."""
    path = Path(name)
    return path if path.is_absolute() else folder / path


def benchmark_config(cfg: EvaluateConfig, folder: Path, extra: list[str] = ()) -> GenerateConfig:
    """The generation config that builds the synthetic benchmark."""
    if not cfg.benchmark:
        raise ConfigError("this evaluation preset names no `benchmark` generation preset")
    overrides = list(cfg.benchmark_overrides) + list(extra)
    if cfg.abilities:
        overrides.append(f"abilities=[{', '.join(cfg.abilities)}]")
    return load_config(GenerateConfig, _preset(folder, cfg.benchmark), overrides)


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
                GenerateConfig, _preset(preset_dir, t.generate), t.generate_overrides
            )
            self.train_cfg = load_train_config(str(_preset(preset_dir, t.train)), t.train_overrides)
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


def make_trained_model(plan: Plan) -> Path:
    """The training recipe: training data, then training; returns the export folder."""
    from raypipe.generate.pipeline import generate
    from raypipe.train.trainer import main as fit
    from raypipe.train.trainer import preflight, setup

    data_out = plan.out / "train-data"
    log.info("training data: %s", data_out)
    generate(plan.train_gen_cfg, str(data_out))
    train_out = plan.out / "train"
    export = train_out / "export"
    if export_complete(export):
        log.info("the tuned model is already exported: %s", export)
        return export
    cfg, sources = preflight(plan.train_cfg, [str(data_out / "data")])
    run_plan, dataset = setup(cfg, sources, str(train_out), resume=True)
    result = fit(run_plan, dataset)
    if not result.export_dir:
        raise ConfigError("the training preset has `export: false`: set it true to evaluate it")
    return Path(result.export_dir)


def predict_all(
    benches: list[str], models: list, out: Path, settings: PredictSettings
) -> dict[str, Any]:
    """Every model over every benchmark -> OUT/predictions.parquet and OUT/models.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raypipe.evaluate.benchmark import read_benchmark
    from raypipe.evaluate.inference import predict

    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for bench in benches:
        items = read_benchmark(bench)
        for m in models:
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
    (out / "models.json").write_text(
        json.dumps({m.name: m.describe() for m in models}, indent=1) + "\n"
    )
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
        from raypipe.config import LLMConfig
        from raypipe.evaluate.judge import judge_rows, judge_summary

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


def _predictions_current(out: Path, models: list, benches: list[str]) -> bool:
    """True if OUT holds predictions of exactly these models over these benchmarks."""
    facts, table = out / "models.json", out / "predictions.parquet"
    done = out / "inputs.json"
    if not (facts.is_file() and table.is_file() and done.is_file()):
        return False
    return json.loads(done.read_text()) == _prediction_inputs(models, benches)


def _prediction_inputs(models: list, benches: list[str]) -> dict[str, Any]:
    from raypipe.evaluate.benchmark import read_benchmark

    return {
        "models": {m.name: m.describe()["path"] for m in models},
        "benchmarks": {
            b: sorted(read_benchmark(b, columns=["id"]).column("id").to_pylist()) for b in benches
        },
    }


def run_evaluation(
    cfg: EvaluateConfig, out: str | Path, preset_dir: str | Path = "jobs/configs"
) -> dict[str, Any]:
    """Run (or resume) the whole evaluation into ``out``; returns a summary."""
    import ray

    from raypipe.evaluate.benchmark import import_real
    from raypipe.evaluate.build import build_benchmark
    from raypipe.evaluate.inference import parse_model

    out = Path(out)
    plan = Plan(cfg, Path(preset_dir), out)  # everything checked before any work
    summary: dict[str, Any] = {"out": str(out), "benchmarks": {}}
    if not ray.is_initialized():
        address = plan.bench_cfg.ray_address if plan.bench_cfg else None
        ray.init(address=address)
    if cfg.training is not None:
        export = make_trained_model(plan)
        summary["trained_model"] = str(export)
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
    if _predictions_current(pred_out, models, benches):
        log.info("predictions are up to date: %s", pred_out)
    else:
        predict_all(benches, models, pred_out, cfg.predict)
        (pred_out / "inputs.json").write_text(
            json.dumps(_prediction_inputs(models, benches), indent=1) + "\n"
        )
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
