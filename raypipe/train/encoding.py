"""Encoding samples: rows -> token ids, labels and pixels; padded batches.

:class:`SampleEncoder` turns rows of ``{id, source, image, image_error, conversations}``
(what both readers yield) into ``input_ids``, ``labels`` and ``pixel_values``, or flags a
row it cannot train on with a ``drop_reason`` (undecodable image, missing file, no
``<image>`` in the first human turn, an empty answer, nothing left to supervise after
truncation, ...): never a crash and never silent; the training loop counts each dropped
row once. :func:`collate` pads kept rows into tensors.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa

from raypipe.errors import ConfigError, ModelError
from raypipe.train.conversation import (
    IGNORE_INDEX,
    ConversationRenderer,
    Dropped,
    normalize_image_placeholder,
)
from raypipe.train.sources import DROP_NO_IMAGE, DROP_UNDECODABLE


def load_processor(model_dir: str):
    """The model's ``LlavaProcessor`` (``raypipe-tiny/...`` ids resolve to tiny models)."""
    from transformers import AutoProcessor

    from raypipe.models import resolve_id

    try:
        processor = AutoProcessor.from_pretrained(resolve_id(model_dir))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a processor from {model_dir!r}: {exc}") from exc
    for attr in ("image_processor", "tokenizer", "patch_size", "image_token"):
        if getattr(processor, attr, None) is None:
            raise ModelError(
                f"the processor of {model_dir!r} has no {attr}; LLaVA training needs a "
                "LlavaProcessor saved with image_processor, tokenizer and patch_size"
            )
    return processor


def image_token_count(processor, height: int, width: int) -> int:
    """Image tokens for pixel values of ``height`` x ``width`` (LlavaProcessor's formula)."""
    patch = processor.patch_size
    count = (height // patch) * (width // patch) + (processor.num_additional_image_tokens or 0)
    if processor.vision_feature_select_strategy == "default":
        count -= 1
    return count


def expand_to_square(image, background: tuple[int, int, int]):
    """Pad a PIL image to a square, centred, as LLaVA-1.5 does (``expand2square``)."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


class SampleEncoder:
    """Ray Data stage: normalised rows -> ``input_ids``, ``labels``, ``pixel_values``.

    Input columns: ``id``, ``source``, ``image`` (bytes or null), ``image_error``,
    ``conversations`` (:data:`TRAIN_ROW_SCHEMA`). Output columns: ``id``, ``source``,
    ``input_ids`` (int32, variable length), ``labels`` (int32, same length),
    ``pixel_values`` (float32 [3, H, W]), ``drop_reason`` ("" when kept, else why the row
    cannot be trained on) and ``drop_detail``. Dropped rows keep zero-length ids and zero
    pixels; the training loop counts them (each row once) and leaves them out.

    Args:
        model_dir: directory or id of a model with a saved LlavaProcessor.
        template: "vicuna_v1", "plain" or "chat_template" (see raypipe.train.conversation).
        max_length: token limit per sample (text is cut, image tokens never).
        pad_to_square: pad images to a square with the processor's mean colour first.
        processor: use this processor instead of loading one from ``model_dir``.
        system: system prompt override (see ConversationRenderer).
    """

    def __init__(
        self,
        model_dir: str | None = None,
        template: str = "vicuna_v1",
        max_length: int = 2048,
        pad_to_square: bool = True,
        *,
        processor: Any = None,
        system: str | None = None,
    ):
        if processor is None:
            if model_dir is None:
                raise ConfigError("SampleEncoder needs a model_dir or a processor")
            processor = load_processor(model_dir)
        self.processor = processor
        self.max_length = max_length
        self.pad_to_square = pad_to_square
        tokenizer = processor.tokenizer
        self.renderer = ConversationRenderer(
            tokenizer,
            template,
            image_token=processor.image_token,
            system=system,
            chat_template=getattr(tokenizer, "chat_template", None)
            or getattr(processor, "chat_template", None),
        )
        mean = getattr(processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        self.background = tuple(int(x * 255) for x in mean)
        # Every image comes out at the processor's crop size: learn it once.
        from PIL import Image

        probe = self._pixels([Image.new("RGB", (8, 8))])
        self.pixel_shape = probe.shape[1:]
        self.num_image_tokens = image_token_count(processor, *self.pixel_shape[-2:])

    def __call__(self, batch: dict[str, Any] | pa.Table) -> dict[str, np.ndarray]:
        rows = _batch_rows(batch)
        out = [self.encode_text(row) for row in rows]
        images, where = [], []
        for i, (row, enc) in enumerate(zip(rows, out)):
            if enc["drop_reason"]:
                continue
            image = self._decode(row)
            if isinstance(image, Dropped):
                out[i] = _dropped_row(image)
            else:
                images.append(image)
                where.append(i)
        pixels = np.zeros((len(rows), *self.pixel_shape), dtype=np.float32)
        if images:
            pixels[where] = self._pixels(images)
        return {
            "id": np.array([r.get("id") for r in rows], dtype=object),
            "source": np.array([r.get("source") for r in rows], dtype=object),
            "input_ids": _object_array([e["input_ids"] for e in out]),
            "labels": _object_array([e["labels"] for e in out]),
            "pixel_values": pixels,
            "drop_reason": np.array([e["drop_reason"] for e in out], dtype=object),
            "drop_detail": np.array([e["drop_detail"] for e in out], dtype=object),
        }

    def encode_text(self, row: dict[str, Any]) -> dict[str, Any]:
        """Token ids and labels of one row (or its drop reason); no image decoding."""
        if row.get("image_error"):
            reason, _, detail = str(row["image_error"]).partition(": ")
            return _dropped_row(Dropped(reason, detail))
        turns = normalize_image_placeholder(
            list(row.get("conversations") or []), self.processor.image_token
        )
        if isinstance(turns, Dropped):
            return _dropped_row(turns)
        rendered = self.renderer.render(turns, self.num_image_tokens, self.max_length)
        if isinstance(rendered, Dropped):
            return _dropped_row(rendered)
        return {
            "input_ids": np.asarray(rendered.input_ids, dtype=np.int32),
            "labels": np.asarray(rendered.labels, dtype=np.int32),
            "drop_reason": "",
            "drop_detail": "",
        }

    def _decode(self, row: dict[str, Any]):
        from PIL import Image

        data = row.get("image")
        if not data:
            return Dropped(DROP_NO_IMAGE)
        try:
            with Image.open(io.BytesIO(data)) as img:
                image = img.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            return Dropped(DROP_UNDECODABLE, f"{type(exc).__name__}: {exc}"[:200])
        if self.pad_to_square:
            image = expand_to_square(image, self.background)
        return image

    def _pixels(self, images: list) -> np.ndarray:
        out = self.processor.image_processor(images=images, return_tensors="np")
        return np.asarray(out["pixel_values"], dtype=np.float32)


def _batch_rows(batch: dict[str, Any] | pa.Table | list[dict]) -> list[dict[str, Any]]:
    if isinstance(batch, list):
        return batch
    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    columns = list(batch)
    n = len(batch[columns[0]]) if columns else 0
    rows = []
    for i in range(n):
        row = {c: batch[c][i] for c in columns}
        conv = row.get("conversations")
        if conv is not None and not isinstance(conv, list):
            row["conversations"] = list(conv)  # numpy batches hold turns in object arrays
        rows.append(row)
    return rows


def _dropped_row(dropped: Dropped) -> dict[str, Any]:
    return {
        "input_ids": np.zeros(0, dtype=np.int32),
        "labels": np.zeros(0, dtype=np.int32),
        "drop_reason": dropped.reason,
        "drop_detail": dropped.detail,
    }


def _object_array(items: list[np.ndarray]) -> np.ndarray:
    # Element-wise, so equal-length arrays do not collapse into a 2-D array.
    arr = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        arr[i] = item
    return arr


def collate(
    rows: list[dict[str, Any]] | dict[str, Any],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int | None = None,
) -> dict[str, Any]:
    """Encoded rows -> tensors: ``input_ids`` and ``attention_mask`` [B, T] (right-padded
    with ``pad_token_id`` / 0), ``labels`` [B, T] (padded with -100), ``pixel_values``
    [B, 3, H, W] float32. Rows must be kept rows (no drop_reason)."""
    import torch

    if isinstance(rows, dict):
        if "drop_reason" in rows and any(r for r in rows["drop_reason"]):
            raise ValueError("collate got dropped rows; filter rows with a drop_reason first")
        ids = [np.asarray(x) for x in rows["input_ids"]]
        labels = [np.asarray(x) for x in rows["labels"]]
        pixels = np.stack([np.asarray(p, dtype=np.float32) for p in rows["pixel_values"]])
    else:
        if any(r.get("drop_reason") for r in rows):
            raise ValueError("collate got dropped rows; filter rows with a drop_reason first")
        ids = [np.asarray(r["input_ids"]) for r in rows]
        labels = [np.asarray(r["labels"]) for r in rows]
        pixels = np.stack([np.asarray(r["pixel_values"], dtype=np.float32) for r in rows])
    if not ids:
        raise ValueError("collate got an empty batch")
    width = max(len(x) for x in ids)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
    batch_labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        if len(x) != len(y):
            raise ValueError(f"row {i}: {len(x)} input ids but {len(y)} labels")
        batch_ids[i, : len(x)] = torch.from_numpy(x.astype(np.int64))
        batch_labels[i, : len(y)] = torch.from_numpy(y.astype(np.int64))
        mask[i, : len(x)] = 1
    return {
        "input_ids": batch_ids,
        "attention_mask": mask,
        "labels": batch_labels,
        "pixel_values": torch.from_numpy(pixels),
    }


__all__ = ["SampleEncoder", "collate", "expand_to_square", "image_token_count", "load_processor"]
