"""Predictions of local LLaVA folders on a Ray Data actor pool.

Local inference (:func:`predict_local`): the items go into Ray Data in blocks of
``batch_size`` rows and through an actor pool of :class:`LlavaPredictor` (appended with
:func:`raypipe.stage.add_stage`; each actor loads the model once). Each actor
asks Ray for one GPU when it runs on CUDA, else for a fraction of a CPU (0.5, with
``threads`` torch threads, 1 by default), as the project's other CPU pools do. Prompts are
the model's own chat template applied to
``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]``
with ``add_generation_prompt=True``; a batch is left-padded and decoded greedily
(``do_sample=False``, one beam) for at most ``max_new_tokens`` tokens.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from raypipe.errors import ConfigError
from raypipe.evaluate.inference import (
    PREDICTION_COLUMNS,
    check_local_model,
    default_name,
    image_bytes,
    is_dataset,
    items_table,
    prediction_table,
)
from raypipe.stage import Stage, add_stage

__all__ = [
    "BATCHES_PER_BLOCK",
    "CPU_ACTOR_CPUS",
    "LlavaPredictor",
    "block_rows",
    "model_dtype",
    "predict_local",
    "vision_messages",
]

#: CPUs a CPU predictor actor reserves (it runs ``threads`` torch threads, 1 by default).
CPU_ACTOR_CPUS = 0.5
#: Most model calls in one Ray Data block: fewer blocks, less per-block overhead.
BATCHES_PER_BLOCK = 4
_ROW = "_row"  # input position, carried through the pool to restore the items' order


def _resolve_device(device: str) -> str:
    from raypipe.models import resolve_device

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
            data = image_bytes(image)
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
        return prediction_table(batch, values)


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
    name = name or default_name(str(model_dir), folder)
    if batch_size < 1 or max_new_tokens < 1 or num_actors < 1:
        raise ConfigError("batch_size, max_new_tokens and num_actors must be at least 1")
    dataset = is_dataset(items)
    table = None if dataset else items_table(items)
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
    ds = items if dataset else _blocks(table, batch_size, num_actors)
    ds = add_stage(
        ds,
        stage or LlavaPredictor,
        kwargs,
        min_actors=num_actors,
        max_actors=num_actors,
        **_placement(num_cpus, use_gpu, resources, accelerator_type),
        max_restarts=-1,
        max_task_retries=max_task_retries,
    )
    return _in_item_order(ds)


def _placement(
    num_cpus: float, use_gpu: bool, resources: dict | None, accelerator_type: str | None
) -> dict[str, Any]:
    """Each actor's Ray request, its custom resources and GPU model checked first."""
    from raypipe.placement import actor_resources, check_accelerator_type, check_resources

    check_resources(resources, "predict.resources", "predict.num_cpus")
    check_accelerator_type(accelerator_type, "predict.accelerator_type")
    return actor_resources(
        num_cpus=num_cpus,
        num_gpus=1 if use_gpu else None,
        resources=resources,
        accelerator_type=accelerator_type,
    )


def _blocks(table: pa.Table, batch_size: int, num_actors: int):
    """The items as a Dataset of :func:`block_rows`-row blocks, each row numbered."""
    import ray

    table = table.append_column(_ROW, pa.array(range(table.num_rows), type=pa.int64()))
    step = block_rows(table.num_rows, batch_size, num_actors)
    return ray.data.from_arrow([table.slice(s, step) for s in range(0, table.num_rows, step)])


def _in_item_order(ds) -> list[dict[str, Any]]:
    """The pool's output rows, back in the items' order where they were numbered."""
    import ray

    parts = [t for t in ray.get(list(ds.to_arrow_refs())) if t.num_rows]
    if not parts:
        return []
    out = pa.concat_tables(parts, promote_options="default")
    if _ROW in out.column_names:
        out = out.sort_by(_ROW).drop_columns([_ROW])
    return out.to_pylist()
