"""Predictions of models over a benchmark: LLaVA folders on a Ray Data actor pool, or
OpenAI-compatible vision endpoints through raypipe's LLM client.

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

Local inference (:func:`predict_local`): the items go into Ray Data in blocks of
``batch_size`` rows and through an actor pool of :class:`LlavaPredictor` (appended with
:func:`raypipe.generate.stage.add_stage`; each actor loads the model once). Each actor
asks Ray for one GPU when it runs on CUDA, else for a fraction of a CPU (0.5, with
``threads`` torch threads, 1 by default), as the project's other CPU pools do. Prompts are
the model's own chat template applied to
``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]``
with ``add_generation_prompt=True``; a batch is left-padded and decoded greedily
(``do_sample=False``, one beam) for at most ``max_new_tokens`` tokens.

Endpoint inference (:func:`predict_openai`): one chat request per item, the image as a
data URL (``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``,
its stored PNG or JPEG bytes as they are) before the question, temperature 0, through
:class:`raypipe.llm.client.OpenAIBackend` with its response cache, rate limits,
concurrency and retries. A second run over the same items is answered from the cache.

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

import base64
import io
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from raypipe.config import LLMConfig, redact_url
from raypipe.errors import ConfigError, ModelError
from raypipe.generate.stage import Stage, add_stage
from raypipe.llm.base import LLMRequest, Secret

log = logging.getLogger(__name__)

__all__ = [
    "LLAVA_MODEL_TYPES",
    "PREDICTION_COLUMNS",
    "EvalModel",
    "LlavaPredictor",
    "block_rows",
    "check_local_model",
    "endpoint_config",
    "image_data_url",
    "model_dtype",
    "openai_messages",
    "parse_model",
    "predict",
    "predict_local",
    "predict_openai",
    "read_lineage",
    "vision_messages",
]

#: ``config.json`` model types this module runs (LlavaForConditionalGeneration).
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
_PREDICTION_TYPES = {
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
#: CPUs a CPU predictor actor reserves (it runs ``threads`` torch threads, 1 by default).
CPU_ACTOR_CPUS = 0.5
#: Most model calls in one Ray Data block: fewer blocks, less per-block overhead.
BATCHES_PER_BLOCK = 4
#: Endpoint requests handed to the client at once (bounds the data URLs held in memory).
OPENAI_CHUNK = 256
_OPENAI_PREFIX = "openai:"
_ROW = "_row"  # input position, carried through the pool to restore the items' order


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
    if spec.startswith(_OPENAI_PREFIX):
        model, _, base_url = spec[len(_OPENAI_PREFIX) :].partition("@")
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
        name=name or _default_name(spec, folder),
        kind="local",
        path=str(folder),
        lineage=read_lineage(folder),
    )


def _default_name(spec: str, folder: Path) -> str:
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
    from raypipe.testing import resolve_tiny

    given = str(model_dir)
    folder = Path(resolve_tiny(given)).expanduser()
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


def _items_table(items: Any) -> pa.Table:
    from raypipe.evaluate.items import items_to_table, read_benchmark

    if isinstance(items, pa.Table):
        return items
    if isinstance(items, (str, Path)):
        return read_benchmark(str(items))
    return items_to_table(list(items))


def _is_dataset(items: Any) -> bool:
    try:
        from ray.data import Dataset
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return isinstance(items, Dataset)


def _prediction_table(batch: pa.Table, values: dict[str, list]) -> pa.Table:
    out = batch.drop_columns([c for c in ("image",) if c in batch.column_names])
    out = out.drop_columns([c for c in PREDICTION_COLUMNS if c in out.column_names])
    out = out.replace_schema_metadata(None)  # the image feature's, and the image is gone
    for name in PREDICTION_COLUMNS:
        out = out.append_column(name, pa.array(values[name], type=_PREDICTION_TYPES[name]))
    return out


def _image_bytes(image: Any) -> bytes | None:
    if isinstance(image, Mapping):
        image = image.get("bytes")
    return bytes(image) if image else None


# ---------------------------------------------------------------------------------------
# Local LLaVA folders
# ---------------------------------------------------------------------------------------


def _resolve_device(device: str) -> str:
    from raypipe.generate.render import resolve_device

    return resolve_device(device, field="device")


def model_dtype(dtype: str, device: str):
    """``auto`` -> bf16 on CUDA (fp16 where the GPU has no bf16), fp32 on CPU."""
    import torch

    if dtype == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def vision_messages(question: str) -> list[dict[str, Any]]:
    """The one user turn a local model is prompted with: the image, then the question."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


class LlavaPredictor(Stage):
    """The inference stage: a LLaVA loaded once, greedy answers to ``question`` about
    ``image``, ``batch_size`` items per model call (blocks are split into such calls).

    Also usable in-process: ``LlavaPredictor(folder, "name")(items_table)``.
    """

    INPUT_COLUMNS = ("id", "image", "question")
    OUTPUT_COLUMNS = PREDICTION_COLUMNS

    def __init__(
        self,
        model_dir: str,
        name: str,
        batch_size: int = 8,
        max_new_tokens: int = 32,
        device: str = "auto",
        dtype: str = "auto",
        threads: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        folder = check_local_model(model_dir)
        if batch_size < 1 or max_new_tokens < 1:
            raise ConfigError("batch_size and max_new_tokens must be at least 1")
        self.name, self.batch_size, self.max_new_tokens = name, batch_size, max_new_tokens
        self.device = _resolve_device(device)
        self.dtype = model_dtype(dtype, self.device)
        if self.device == "cpu" and threads:
            torch.set_num_threads(threads)
        self.processor = AutoProcessor.from_pretrained(folder, trust_remote_code=False)
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"  # new tokens follow every prompt's last token
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        self.model = LlavaForConditionalGeneration.from_pretrained(
            folder, dtype=self.dtype, use_safetensors=True, trust_remote_code=False
        )
        self.model.to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.pad_id = tokenizer.pad_token_id

    def prompt(self, question: str) -> str:
        """The model's chat template around one question (and its image placeholder)."""
        return self.processor.apply_chat_template(
            vision_messages(question), add_generation_prompt=True, tokenize=False
        )

    def generate(
        self, images: list, questions: list[str]
    ) -> tuple[list[str], list[int], list[int]]:
        """One batched greedy call: (answers, prompt tokens, completion tokens) per item."""
        import torch

        texts = [self.prompt(q) for q in questions]
        bos = self.processor.tokenizer.bos_token
        # A template that writes BOS itself must not get a second one from the tokenizer
        # (what processor.apply_chat_template(tokenize=True) does too).
        add_special = not (bos and texts[0].startswith(bos))
        enc = self.processor(
            images=images,
            text=texts,
            padding=True,
            return_tensors="pt",
            add_special_tokens=add_special,
        )
        enc = {k: v.to(self.device) for k, v in enc.items()}
        if "pixel_values" in enc:
            enc["pixel_values"] = enc["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model.generate(
                **enc,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=self.pad_id,
            )
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
        kept = []
        for ids in new:
            end = next((i + 1 for i, t in enumerate(ids) if t in self.eos_ids), len(ids))
            kept.append(ids[:end])
        answers = self.processor.batch_decode(kept, skip_special_tokens=True)
        return [a.strip() for a in answers], prompt_tokens, [len(k) for k in kept]

    def process(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        images = batch.column("image").to_pylist()
        questions = batch.column("question").to_pylist()
        n = batch.num_rows
        values: dict[str, list] = {k: [None] * n for k in PREDICTION_COLUMNS}
        values["model"] = [self.name] * n
        values["cached"] = [False] * n
        values["cost_usd"] = [0.0] * n
        decoded: list[tuple[int, Any]] = []
        for i, image in enumerate(images):
            data = _image_bytes(image)
            try:
                if data is None:
                    raise ValueError("no image bytes")
                with Image.open(io.BytesIO(data)) as img:
                    decoded.append((i, img.convert("RGB")))
            except Exception as e:  # noqa: BLE001 - one bad image is that item's error
                values["error"][i] = f"image: {type(e).__name__}: {e}"
                values["latency_s"][i] = values["batch_latency_s"][i] = 0.0
                values["prompt_tokens"][i] = values["completion_tokens"][i] = 0
        for start in range(0, len(decoded), self.batch_size):
            chunk = decoded[start : start + self.batch_size]
            t0 = time.perf_counter()
            answers, prompt_tokens, completion_tokens = self.generate(
                [img for _, img in chunk], [questions[i] or "" for i, _ in chunk]
            )
            elapsed = time.perf_counter() - t0
            for (i, _), answer, p, c in zip(chunk, answers, prompt_tokens, completion_tokens):
                values["prediction"][i] = answer
                values["latency_s"][i] = elapsed / len(chunk)
                values["batch_latency_s"][i] = elapsed
                values["prompt_tokens"][i] = int(p)
                values["completion_tokens"][i] = int(c)
        return _prediction_table(batch, values)


def block_rows(items: int, batch_size: int, num_actors: int = 1) -> int:
    """Rows per Ray Data block: whole batches, up to :data:`BATCHES_PER_BLOCK` of them,
    while every actor still gets two blocks or more (one running, one queued)."""
    batches = math.ceil(items / batch_size)
    per_block = math.ceil(batches / (2 * num_actors))
    return batch_size * max(1, min(BATCHES_PER_BLOCK, per_block))


def _uses_gpu(device: str) -> bool:
    from raypipe.placement import uses_gpu

    return uses_gpu(device)


def predict_local(
    items: Any,
    model_dir: str | Path,
    name: str | None = None,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    device: str = "auto",
    dtype: str = "auto",
    num_actors: int = 1,
    num_cpus: float | None = None,
    threads: int | None = None,
    resources: dict[str, float] | None = None,
    accelerator_type: str | None = None,
    max_task_retries: int = 3,
    stage: type[LlavaPredictor] | None = None,
) -> list[dict[str, Any]]:
    """A LLaVA folder's answers to benchmark items, on a Ray Data actor pool.

    Args:
        items: a benchmark folder, an item table (``read_benchmark``), item dicts, or a
            Ray Dataset of items (whose blocks the stage splits into model calls).
        model_dir: the model folder (:func:`check_local_model` runs first, before Ray).
        name: the predictions' ``model``; default the folder's name.
        batch_size: items per model call (and per Ray Data block, for tables).
        max_new_tokens: longest answer, in tokens.
        device: ``auto`` (CUDA actors when the Ray cluster has or can add GPUs:
            :func:`raypipe.placement.uses_gpu`), ``cuda`` or ``cpu``.
        dtype: ``auto`` (bf16, else fp16, on CUDA; fp32 on CPU) or a torch dtype name.
        num_actors: actors in the pool (each loads the model; one GPU each on CUDA).
        num_cpus: CPUs each actor reserves (default 1 on CUDA, 0.5 on CPU).
        threads: torch threads of a CPU actor (default: ``num_cpus`` rounded down, at
            least 1).
        resources: custom Ray resources each actor reserves (``raypipe.placement``).
        accelerator_type: the GPU model actors must run on (``A100``, ...), GPU only.
        max_task_retries: times a block is retried on a fresh actor after a crash.
        stage: a :class:`LlavaPredictor` subclass to run instead (the benchmark's adds
            timestamps).

    Returns:
        One prediction row per item (see the module doc), in the items' order (a
        Dataset's rows in the order Ray Data returns them). Ray is started here if it is
        not running yet.
    """
    folder = check_local_model(model_dir)
    name = name or _default_name(str(model_dir), folder)
    if batch_size < 1 or max_new_tokens < 1 or num_actors < 1:
        raise ConfigError("batch_size, max_new_tokens and num_actors must be at least 1")
    dataset = _is_dataset(items)
    table = None if dataset else _items_table(items)
    if table is not None and table.num_rows == 0:
        return []
    import ray

    if not ray.is_initialized():
        ray.init()  # joins the cluster under `ray job submit`, else starts a local one
    use_gpu = _uses_gpu(device)
    if num_cpus is None:
        num_cpus = 1.0 if use_gpu else CPU_ACTOR_CPUS
    kwargs = {
        "model_dir": str(folder),
        "name": name,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "device": "cuda" if use_gpu else "cpu",
        "dtype": dtype,
        "threads": threads or max(1, int(num_cpus)),
    }
    if dataset:
        ds = items
    else:
        table = table.append_column(_ROW, pa.array(range(table.num_rows), type=pa.int64()))
        step = block_rows(table.num_rows, batch_size, num_actors)
        ds = ray.data.from_arrow([table.slice(s, step) for s in range(0, table.num_rows, step)])
    from raypipe.placement import actor_resources, check_accelerator_type, check_resources

    check_resources(resources, "predict.resources", "predict.num_cpus")
    check_accelerator_type(accelerator_type, "predict.accelerator_type")
    ds = add_stage(
        ds,
        stage or LlavaPredictor,
        kwargs,
        min_actors=num_actors,
        max_actors=num_actors,
        **actor_resources(
            num_cpus=num_cpus,
            num_gpus=1 if use_gpu else None,
            resources=resources,
            accelerator_type=accelerator_type,
        ),
        max_restarts=-1,
        max_task_retries=max_task_retries,
    )
    parts = [t for t in ray.get(list(ds.to_arrow_refs())) if t.num_rows]
    if not parts:
        return []
    out = pa.concat_tables(parts, promote_options="default")
    if _ROW in out.column_names:
        out = out.sort_by(_ROW).drop_columns([_ROW])
    return out.to_pylist()


# ---------------------------------------------------------------------------------------
# OpenAI-compatible vision endpoints
# ---------------------------------------------------------------------------------------


def _image_mime(data: bytes) -> str:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return ""


def image_data_url(data: bytes) -> str:
    """``data:image/...;base64,...`` for an image's bytes: PNG, JPEG, WebP and GIF as
    they are (what vision endpoints accept), anything else PIL reads as PNG."""
    mime = _image_mime(data)
    if not mime:
        from PIL import Image

        buf = io.BytesIO()
        with Image.open(io.BytesIO(data)) as img:
            img.convert("RGB").save(buf, format="PNG")
        data, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def openai_messages(question: str, image: bytes) -> tuple[dict[str, Any], ...]:
    """The OpenAI vision form of :func:`vision_messages`: the image as a data URL."""
    return (
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                {"type": "text", "text": question},
            ],
        },
    )


def endpoint_config(model: EvalModel, llm: LLMConfig | None, max_new_tokens: int) -> LLMConfig:
    """The LLM client's config for an endpoint model: ``llm``'s concurrency, limits,
    retries, timeouts and prices, with the model, URL and key variable of ``model``,
    temperature 0 and ``max_tokens`` = ``max_new_tokens``."""
    base = llm or LLMConfig()
    return base.model_copy(
        update={
            "backend": "openai",
            "model": model.model,
            "base_url": model.base_url,
            "api_key_env": model.api_key_env,
            "temperature": 0.0,
            "max_tokens": max_new_tokens,
        }
    )


def predict_openai(
    items: Any,
    model: EvalModel | str,
    cache_dir: str | Path | None,
    *,
    llm: LLMConfig | None = None,
    max_new_tokens: int = 32,
    api_key: Secret | None = None,
    limiter: Any = None,
    check: bool | None = None,
) -> list[dict[str, Any]]:
    """An OpenAI-compatible vision endpoint's answers to benchmark items.

    Args:
        items: a benchmark folder, an item table or item dicts.
        model: an ``openai`` :class:`EvalModel` (or its string, for :func:`parse_model`).
        cache_dir: the response cache (a folder or URI; None: no cache). A re-run with
            the same items, model and settings is answered from it, no HTTP call made.
        llm: client settings (concurrency, requests/tokens per minute, max_attempts,
            timeout_s, prices, cache on/off); its backend, model, URL, key variable,
            temperature and max_tokens are replaced.
        max_new_tokens: the completion limit per answer.
        api_key: a key for processes where the variable is not set (see make_backend).
        limiter: a job-wide limiter handle (:func:`raypipe.llm.limits.start_limiter`).
        check: ask the endpoint first whether it serves the model and takes the
            request parameters (:meth:`OpenAIBackend.check`: fails fast with
            EndpointError, at the cost of one one-token request). None: check unless the
            cache answers every item of the first chunk, so a re-run served from the
            cache sends nothing.

    Returns:
        One prediction row per item, in the items' order; a request that failed after
        every retry has ``prediction`` None and ``error`` set.
    """
    from raypipe.llm import make_backend

    if isinstance(model, str):
        model = parse_model(model)
    if model.kind != "openai":
        raise ConfigError(f"{model.name}: predict_openai needs an openai:MODEL@BASE_URL model")
    table = _items_table(items)
    if table.num_rows == 0:
        return []
    cfg = endpoint_config(model, llm, max_new_tokens)
    backend = make_backend(cfg, cache_dir=cache_dir, api_key=api_key, limiter=limiter)
    rows: list[dict[str, Any]] = []
    try:
        for start in range(0, table.num_rows, OPENAI_CHUNK):
            chunk = table.slice(start, OPENAI_CHUNK)
            values, requests, where = _openai_requests(model.name, chunk, max_new_tokens)
            if start == 0 and (check or (check is None and not _all_cached(backend, requests))):
                backend.check()
            results = backend.complete_batch(requests) if requests else []
            rows += _openai_rows(chunk, values, where, results)
        stats = backend.stats()
    finally:
        backend.close()
    log.info(
        "%s: %d answers, %d from the cache, %d HTTP calls, %d failed, %.4f USD",
        model.name,
        stats["requests"],
        stats["cache_hits"],
        stats["http_calls"],
        stats["failures"],
        stats["cost_usd"],
    )
    return rows


def _all_cached(backend, requests: list[LLMRequest]) -> bool:
    """Whether the backend's cache holds an answer to every one of ``requests``."""
    from raypipe.llm.cache import request_key

    cache = getattr(backend, "cache", None)
    if cache is None or not requests:
        return False
    return all(cache.get(request_key(backend._body(r))) is not None for r in requests)


def _openai_requests(
    name: str, chunk: pa.Table, max_new_tokens: int
) -> tuple[dict[str, list], list[LLMRequest], list[int]]:
    """The chunk's requests, their row positions, and the rows' columns so far (filled
    in for items whose image cannot be sent)."""
    n = chunk.num_rows
    values: dict[str, list] = {k: [None] * n for k in PREDICTION_COLUMNS}
    values["model"] = [name] * n
    requests, where = [], []
    for i, row in enumerate(chunk.select(["id", "ability", "image", "question"]).to_pylist()):
        data = _image_bytes(row["image"])
        try:
            if data is None:
                raise ValueError("no image bytes")
            messages = openai_messages(row["question"] or "", data)
        except Exception as e:  # noqa: BLE001 - one bad image is that item's error
            values["error"][i] = f"image: {type(e).__name__}: {e}"
            for k in ("latency_s", "batch_latency_s", "prompt_tokens", "completion_tokens"):
                values[k][i] = 0
            values["cached"][i], values["cost_usd"][i] = False, 0.0
            continue
        requests.append(
            LLMRequest(
                key=f"predict/{name}/{row['id']}",
                task="predict",
                ability=row["ability"] or "",
                messages=messages,
                temperature=0.0,
                max_tokens=max_new_tokens,
            )
        )
        where.append(i)
    return values, requests, where


def _openai_rows(chunk: pa.Table, values: dict[str, list], where: list[int], results) -> list:
    for i, res in zip(where, results):
        values["prediction"][i] = res.text.strip() if res.text is not None else None
        values["error"][i] = res.error
        values["latency_s"][i] = values["batch_latency_s"][i] = float(res.latency_s)
        values["prompt_tokens"][i] = int(res.prompt_tokens or res.cached_prompt_tokens)
        values["completion_tokens"][i] = int(res.completion_tokens or res.cached_completion_tokens)
        values["cached"][i] = bool(res.cached)
        values["cost_usd"][i] = float(res.cost_usd)
    return _prediction_table(chunk, values).to_pylist()


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
        return predict_openai(
            items, model, cache_dir, llm=llm, max_new_tokens=max_new_tokens, **kwargs
        )
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
