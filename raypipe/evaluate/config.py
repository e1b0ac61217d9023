"""The evaluation preset (``jobs/evaluate.py run --config PRESET``): what to build,
import, train, predict and score, as typed config (:class:`EvaluateConfig`).

Which fields change results: ``benchmark``, ``benchmark_overrides``, ``per_ability``,
``abilities``, ``train_data``, ``real``, ``training`` and ``models`` say what is
compared; ``predict.batch_size``, ``predict.max_new_tokens`` and ``predict.device``
change the answers (a re-run with other values predicts again); ``predict.num_actors``
and the key variables are operational; ``score`` is applied on every run.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from raypipe.config import Config, load_config, read_yaml_preset
from raypipe.errors import ConfigError
from raypipe.generate.config import GenerateConfig

__all__ = [
    "PREDICTION_SETTINGS",
    "EvaluateConfig",
    "PredictSettings",
    "RealBenchmark",
    "ScoreSettings",
    "TrainingRecipe",
    "benchmark_config",
    "is_evaluation_preset",
    "load_evaluate_config",
    "preset_path",
]

#: The ``predict`` fields that change a model's answers: predictions made with other
#: values are not reused.
PREDICTION_SETTINGS = ("batch_size", "max_new_tokens", "device")


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

    batch_size: int = Field(
        8, ge=1, description="Items per model call (padding can change greedy answers)."
    )
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
        description="Generation preset that builds the synthetic benchmark (a preset name, "
        "or a path relative to this preset); none: real-image benchmarks only.",
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
    """True if ``path`` is an evaluation preset (it names ``models``), not a generation one.
    A preset name is an evaluation preset if raypipe ships an evaluation preset so named."""
    from raypipe import presets

    if presets.is_name(path) and not Path(path).is_file():
        return Path(path).stem in presets.names("evaluate")
    data = read_yaml_preset(path)
    return "models" in data


def load_evaluate_config(path: str | Path, overrides: list[str] = ()) -> EvaluateConfig:
    """An evaluation preset + dotted overrides -> :class:`EvaluateConfig`."""
    return load_config(EvaluateConfig, path, list(overrides))


def preset_path(folder: Path, name: str) -> Path:
    """A preset named in an evaluation preset: a file relative to that preset's folder,
    else a preset name (``demo``), which ``load_config`` looks up among the presets of
    the config's kind (``raypipe/configs/generate``, ``.../train``)."""
    from raypipe.presets import is_name

    path = Path(name)
    if path.is_absolute():
        return path
    if (folder / path).is_file() or not is_name(name):
        return folder / path
    return path


def benchmark_config(cfg: EvaluateConfig, folder: Path, extra: list[str] = ()) -> GenerateConfig:
    """The generation config that builds the synthetic benchmark."""
    if not cfg.benchmark:
        raise ConfigError("this evaluation preset names no `benchmark` generation preset")
    overrides = list(cfg.benchmark_overrides) + list(extra)
    if cfg.abilities:
        overrides.append(f"abilities=[{', '.join(cfg.abilities)}]")
    return load_config(GenerateConfig, preset_path(folder, cfg.benchmark), overrides)
