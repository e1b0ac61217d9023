"""Predictions of models over a benchmark: LLaVA folders on a Ray Data actor pool, or
OpenAI-compatible vision endpoints through raypipe's LLM client (:mod:`raypipe.evaluate.predict_local`,
:mod:`raypipe.evaluate.predict_openai`); here, what to evaluate and what a prediction row is.

What to evaluate is one string per model (:func:`parse_model`):

- ``PATH`` or ``NAME=PATH``: a local folder holding a LLaVA in the llava-hf layout (a
  raypipe export, ``OUT/export`` of ``jobs/train.py``, or a downloaded llava-hf checkpoint
  such as ``llava-hf/llava-1.5-7b-hf``): ``config.json`` of model type ``llava``,
  safetensors weights, and a processor whose chat template renders
  ``{"type": "image"}`` / ``{"type": "text"}`` parts. ``raypipe-tiny/tiny-llava`` names
  the tests' tiny random-weight LLaVA. The name defaults to the folder's name.
- ``openai:MODEL@BASE_URL`` or ``NAME=openai:MODEL@BASE_URL``: a vision model behind an
  OpenAI-compatible chat endpoint (OpenAI, a ``vllm serve`` of the export, ...); without
  ``@BASE_URL``, OpenAI's own API. The key is read from the environment variable
  ``api_key_env`` names (``OPENAI_API_KEY`` by default), never from the string; the name
  defaults to MODEL.

A local folder is checked when it is parsed and again before any Ray work
(:func:`check_local_model`: config.json, model type, safetensors weights, processor and
chat template), so a wrong path fails at once with what to give instead. Weights load
with ``use_safetensors=True``; remote code is never run.

Prediction rows (both paths) keep every item column except ``image`` and add
:data:`PREDICTION_COLUMNS`: ``model``; ``prediction`` (the decoded new tokens, stripped;
None when the item could not be answered, with ``error`` saying why); ``latency_s`` (the
item's share of its batch's wall time on the local path, the request's time on the
endpoint path, 0 for a cached answer); ``batch_latency_s`` (the whole model call, local
path; the request's time, endpoint path); ``prompt_tokens`` (image tokens included) and
``completion_tokens`` (through the first end-of-sequence token); ``cached``;
``cost_usd`` (endpoint path, 0 locally). They are what
:func:`raypipe.evaluate.report.write_report` scores.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from raypipe.config import redact_url
from raypipe.errors import ConfigError, ModelError
from raypipe.llm.config import LLMConfig

log = logging.getLogger(__name__)

__all__ = [
    "LLAVA_MODEL_TYPES",
    "PREDICTION_COLUMNS",
    "EvalModel",
    "check_local_model",
    "parse_model",
    "predict",
    "read_lineage",
]

LLAVA_MODEL_TYPES = ("llava",)
#: Columns a prediction row adds to the item's (which keep their names, less ``image``).
PREDICTION_COLUMNS = (
    "model",
    "prediction",
    "error",
    "latency_s",
    "batch_latency_s",
    "prompt_tokens",
    "completion_tokens",
    "cached",
    "cost_usd",
)
PREDICTION_TYPES = {
    "model": pa.string(),
    "prediction": pa.string(),
    "error": pa.string(),
    "latency_s": pa.float64(),
    "batch_latency_s": pa.float64(),
    "prompt_tokens": pa.int64(),
    "completion_tokens": pa.int64(),
    "cached": pa.bool_(),
    "cost_usd": pa.float64(),
}
OPENAI_PREFIX = "openai:"


# ---------------------------------------------------------------------------------------
# What to evaluate
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalModel:
    """One model to evaluate: a local LLaVA folder or an OpenAI-compatible endpoint.

    ``kind`` is ``local`` (``path`` is the folder) or ``openai`` (``model`` is the name
    sent to the endpoint, ``base_url`` its URL or None for OpenAI, ``api_key_env`` the
    variable holding the key). ``lineage`` is a raypipe export's
    ``raypipe_lineage.json``. ``repr`` and :meth:`describe` show ``base_url`` with any
    credentials in it masked.
    """

    name: str
    kind: str  # "local" or "openai"
    path: str | None = None
    model: str | None = None
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    lineage: dict[str, Any] | None = field(default=None, compare=False)

    def describe(self) -> dict[str, Any]:
        """What scores.json records for the model: where it is, and its lineage."""
        if self.kind == "local":
            return {"kind": "local", "path": self.path, "lineage": self.lineage}
        url = redact_url(self.base_url or "https://api.openai.com/v1")
        return {"kind": "openai", "path": f"openai:{self.model}@{url}", "lineage": None}

    def __repr__(self) -> str:
        where = self.path if self.kind == "local" else redact_url(self.base_url or "") or None
        model = "" if self.kind == "local" else f", model={self.model!r}"
        return f"EvalModel(name={self.name!r}, kind={self.kind!r}{model}, at={where!r})"


def parse_model(text: str, api_key_env: str = "OPENAI_API_KEY") -> EvalModel:
    """``[NAME=]PATH``, ``[NAME=]raypipe-tiny/ID`` or ``[NAME=]openai:MODEL[@BASE_URL]``.

    A local folder is checked at once (:func:`check_local_model`). A string that is itself
    an existing path is taken whole, ``=`` and all.
    """
    text = str(text).strip()
    if not text:
        raise ConfigError("an empty model: give a LLaVA folder or openai:MODEL@BASE_URL")
    name, spec = None, text
    if not Path(text).exists() and "=" in text:
        head, rest = text.split("=", 1)
        if head and "/" not in head and ":" not in head:
            name, spec = head.strip(), rest.strip()
    if spec.startswith(OPENAI_PREFIX):
        model, _, base_url = spec[len(OPENAI_PREFIX) :].partition("@")
        model = model.strip()
        if not model:
            raise ConfigError(
                f"{redact_url(text)!r} names no model: write openai:MODEL@BASE_URL "
                "(e.g. openai:llava-1.5-7b@http://localhost:8000/v1) or openai:gpt-4o-mini"
            )
        return EvalModel(
            name=name or model,
            kind="openai",
            model=model,
            base_url=base_url.strip() or None,
            api_key_env=api_key_env,
        )
    folder = check_local_model(spec)
    return EvalModel(
        name=name or default_name(spec, folder),
        kind="local",
        path=str(folder),
        lineage=read_lineage(folder),
    )


def default_name(spec: str, folder: Path) -> str:
    m = re.fullmatch(r"raypipe-tiny/([\w-]+)", spec)
    return m.group(1) if m else folder.name


def read_lineage(folder: str | Path) -> dict[str, Any] | None:
    """A raypipe export's ``raypipe_lineage.json``, or None for other checkpoints."""
    from raypipe.train.export import LINEAGE_FILE

    path = Path(folder) / LINEAGE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("%s is not readable JSON (%s): lineage left out", path, e)
        return None


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    if any(folder.glob("additional_chat_templates/*.jinja")):
        return True
    for name in ("processor_config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            try:
                if json.loads(path.read_text(encoding="utf-8")).get("chat_template"):
                    return True
            except (OSError, ValueError):
                continue
    return False


def check_local_model(model_dir: str | Path) -> Path:
    """The folder of a LLaVA checkpoint that :func:`predict_local` can run; ModelError
    saying what to give instead when it is not one. Reads only small JSON files."""
    from raypipe.models import resolve_id

    given = str(model_dir)
    folder = Path(resolve_id(given)).expanduser()
    hint = (
        "Give a folder written by save_pretrained: a raypipe export (OUT/export of "
        "jobs/train.py), a downloaded llava-hf checkpoint (e.g. llava-hf/llava-1.5-7b-hf), "
        "or raypipe-tiny/tiny-llava; an endpoint as openai:MODEL@BASE_URL."
    )
    if not folder.is_dir():
        raise ModelError(f"model folder {given!r} does not exist. {hint}")
    config_path = folder / "config.json"
    if not config_path.is_file():
        if (folder / "export" / "config.json").is_file():
            raise ModelError(
                f"{given!r} is a training run's folder; its model is {folder / 'export'}"
            )
        raise ModelError(f"{given!r} has no config.json: not a Hugging Face model folder. {hint}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{config_path} is not readable JSON ({e}). {hint}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in LLAVA_MODEL_TYPES:
        raise ModelError(
            f"{given!r} holds a {model_type!r} model, not a LLaVA (config.json model_type "
            f"must be one of {list(LLAVA_MODEL_TYPES)}: LlavaForConditionalGeneration with "
            f"a vision tower, a projector and an LLM). {hint}"
        )
    if not (
        any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()
    ):
        raise ModelError(
            f"{given!r} has no safetensors weights (model.safetensors or "
            "model.safetensors.index.json). raypipe loads safetensors only, never pickled "
            ".bin weights: re-save the model with save_pretrained(safe_serialization=True)."
        )
    if not any(
        (folder / n).is_file() for n in ("processor_config.json", "preprocessor_config.json")
    ):
        raise ModelError(
            f"{given!r} has no image processor (preprocessor_config.json or "
            "processor_config.json): save the checkpoint's processor beside the weights "
            "(processor.save_pretrained(folder))."
        )
    if not _has_chat_template(folder):
        raise ModelError(
            f"{given!r} has no chat template (chat_template.jinja, chat_template.json or "
            "'chat_template' in tokenizer_config.json), and prompts are built with it. "
            "raypipe exports carry the template they were trained with; for another "
            "checkpoint save the template of its training format with the processor."
        )
    return folder


# ---------------------------------------------------------------------------------------
# Items
# ---------------------------------------------------------------------------------------


def items_table(items: Any) -> pa.Table:
    from raypipe.evaluate.items import items_to_table, read_benchmark

    if isinstance(items, pa.Table):
        return items
    if isinstance(items, (str, Path)):
        return read_benchmark(str(items))
    return items_to_table(list(items))


def is_dataset(items: Any) -> bool:
    try:
        from ray.data import Dataset
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return isinstance(items, Dataset)


def prediction_table(batch: pa.Table, values: dict[str, list]) -> pa.Table:
    out = batch.drop_columns([c for c in ("image",) if c in batch.column_names])
    out = out.drop_columns([c for c in PREDICTION_COLUMNS if c in out.column_names])
    out = out.replace_schema_metadata(None)  # the image feature's, and the image is gone
    for name in PREDICTION_COLUMNS:
        out = out.append_column(name, pa.array(values[name], type=PREDICTION_TYPES[name]))
    return out


def image_bytes(image: Any) -> bytes | None:
    if isinstance(image, Mapping):
        image = image.get("bytes")
    return bytes(image) if image else None


# ---------------------------------------------------------------------------------------
# Either kind
# ---------------------------------------------------------------------------------------


def predict(
    items: Any,
    model: EvalModel | str,
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    device: str = "auto",
    num_actors: int = 1,
    llm: LLMConfig | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """:func:`predict_local` or :func:`predict_openai`, as ``model`` says."""
    if isinstance(model, str):
        model = parse_model(model, **({"api_key_env": llm.api_key_env} if llm else {}))
    if model.kind == "openai":
        from raypipe.evaluate.predict_openai import predict_openai

        return predict_openai(
            items, model, cache_dir, llm=llm, max_new_tokens=max_new_tokens, **kwargs
        )
    from raypipe.evaluate.predict_local import predict_local

    return predict_local(
        items,
        model.path,
        model.name,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        device=device,
        num_actors=num_actors,
        **kwargs,
    )
