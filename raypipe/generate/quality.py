"""The quality stage: reject bad images and off-topic dialogues, optionally by CLIP score.

Checks, in order, each a reject reason (stage ``quality``):

- ``bad_image``: no image bytes, or the bytes don't decode (or decode to nothing);
- ``nan_image``: the decoded pixels hold NaN/inf (float images);
- ``black_image``: mean pixel value <= ``max_mean_dark``;
- ``blank_image``: pixel standard deviation < ``min_std`` (a flat colour);
- ``dialogue_missing_keyword``: no assistant turn names any of the row's keywords
  (:func:`raypipe.matching.mentions_keyword`: ``sunflowers``/``sunflower``,
  ``t-shirt``/``t shirt`` match);
- ``low_clip_score``: CLIP cosine similarity of image and prompt (emphasis removed)
  below ``clip_min_score``, when ``clip_model`` is set.

Image statistics and the CLIP score are written to ``meta``.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import pyarrow as pa

from raypipe.config import QualityConfig
from raypipe.errors import ModelError
from raypipe.matching import mentions_any, strip_emphasis
from raypipe.schema import is_rejected, reject, rows_to_table, update_meta

log = logging.getLogger(__name__)

STAGE = "quality"
#: Speaker names of the assistant in LLaVA conversations.
ASSISTANT = ("gpt", "assistant")


# ---------------------------------------------------------------------------------------
# Checks (plain functions, reused by tests and tools)
# ---------------------------------------------------------------------------------------


def decode_image(data: bytes | None):
    """Image bytes -> PIL image, or None when they are missing or don't decode."""
    from PIL import Image

    if not data:
        return None
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception:
        return None
    if img.width == 0 or img.height == 0:
        return None
    return img


def pixel_check(img, cfg: QualityConfig) -> tuple[str | None, str, dict[str, float]]:
    """``(reason, detail, stats)`` for a decoded image; reason is None when it passes.

    ``stats`` holds the RGB mean and standard deviation (0-255), empty for NaN images.
    """
    if img.mode == "F":  # only float images can hold NaN; 8-bit ones can't
        raw = np.asarray(img, dtype=np.float32)
        if not np.isfinite(raw).all():
            return "nan_image", f"{int((~np.isfinite(raw)).sum())} non-finite pixel values", {}
    stats = image_stats(img)
    if stats["mean"] <= cfg.max_mean_dark:
        detail = f"mean={stats['mean']:.2f} <= max_mean_dark={cfg.max_mean_dark}"
        return "black_image", detail, stats
    if stats["std"] < cfg.min_std:
        return "blank_image", f"std={stats['std']:.2f} < min_std={cfg.min_std}", stats
    return None, "", stats


def image_stats(img) -> dict[str, float]:
    """Mean and standard deviation of the RGB pixels on a 0-255 scale."""
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    return {"mean": float(rgb.mean()), "std": float(rgb.std())}


def assistant_text(conversations: list[dict[str, str]]) -> str:
    return "\n".join(t.get("value") or "" for t in conversations if t.get("from") in ASSISTANT)


# ---------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------


class QualityCheck:
    """Reject bad images and dialogues that miss their keyword; optional CLIP-score filter.

    Input columns: ``id``, ``prompt``, ``keywords``, ``image``, ``conversations`` (a row
    whose ``conversations`` is null skips the dialogue check: no dialogue stage ran).
    Output columns: ``meta`` (merged: ``image_mean``, ``image_std``, ``clip_score``)
    and the reject columns (stage ``quality``; reasons in the module docstring).
    Already-rejected rows pass through untouched.
    """

    INPUT_COLUMNS = ("id", "prompt", "keywords", "image", "conversations")
    OUTPUT_COLUMNS = ("meta",)

    def __init__(self, cfg: QualityConfig):
        self.cfg = cfg
        self.clip = None
        if cfg.clip_model:
            self.clip, self.processor, self.device = load_clip(cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        images = {}
        for i, row in enumerate(rows):
            if is_rejected(row):
                continue
            img = self._check_row(row)
            if img is not None:
                images[i] = img
        if self.clip is not None and images:
            self._clip_filter([rows[i] for i in images], list(images.values()))
        return rows_to_table(rows)

    def _check_row(self, row: dict[str, Any]):
        """Pixel and dialogue checks for one row; its decoded image if it passed."""
        img = decode_image((row.get("image") or {}).get("bytes"))
        if img is None:
            reject(row, STAGE, "bad_image", "image bytes missing or not decodable")
            return None
        reason, detail, stats = pixel_check(img, self.cfg)
        if stats:
            update_meta(row, image_mean=round(stats["mean"], 2), image_std=round(stats["std"], 2))
        if reason:
            reject(row, STAGE, reason, detail)
            return None

        conversations = row.get("conversations")
        keywords = [k for k in (row.get("keywords") or []) if k and k.strip()]
        if self.cfg.check_dialogue_keyword and conversations is not None and keywords:
            answer = assistant_text(conversations)
            if not mentions_any(answer, keywords):
                reject(
                    row,
                    STAGE,
                    "dialogue_missing_keyword",
                    f"keywords {keywords} not in answer: {answer[:2000]}",
                )
                return None
        return img

    def _clip_filter(self, rows: list[dict[str, Any]], images: list) -> None:
        import torch

        size = self.cfg.clip_batch_size
        for start in range(0, len(rows), size):
            part_rows, part_images = rows[start : start + size], images[start : start + size]
            texts = [strip_emphasis(r["prompt"] or "") for r in part_rows]
            inputs = self.processor(
                text=texts,
                images=[im.convert("RGB") for im in part_images],
                return_tensors="pt",
                padding=True,
                truncation=True,
            ).to(self.device)
            with torch.inference_mode():
                out = self.clip(**inputs)
            img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
            txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
            scores = (img * txt).sum(-1).tolist()
            for row, score in zip(part_rows, scores):
                update_meta(row, clip_score=round(score, 4))
                if score < self.cfg.clip_min_score:
                    reject(
                        row,
                        STAGE,
                        "low_clip_score",
                        f"clip_score={score:.4f} < clip_min_score={self.cfg.clip_min_score}",
                    )


def check_quality_models(cfg: QualityConfig) -> str | None:
    """Resolve ``cfg.clip_model`` without loading it (None when the filter is off)."""
    from raypipe.generate.render import resolve_pretrained

    if not cfg.clip_model:
        return None
    return resolve_pretrained(cfg.clip_model, "config.json", "quality.clip_model")


def load_clip(cfg: QualityConfig):
    """CLIPModel + processor for the CLIP-score filter -> (model, processor, device)."""
    from transformers import CLIPModel, CLIPProcessor

    from raypipe.generate.render import resolve_device

    path = check_quality_models(cfg)
    device = resolve_device(cfg.device, "quality.device")
    try:
        model = CLIPModel.from_pretrained(path, use_safetensors=True).to(device).eval()
        processor = CLIPProcessor.from_pretrained(path)
    except Exception as e:
        raise ModelError(
            f"could not load quality.clip_model={cfg.clip_model!r} ({path}) as a CLIPModel "
            f"with its processor: {type(e).__name__}: {e}. Use a CLIP checkpoint such as "
            "openai/clip-vit-large-patch14 (in the local HF cache when HF_HUB_OFFLINE=1) "
            "or a folder saved with save_pretrained."
        ) from e
    return model, processor, device


# ---------------------------------------------------------------------------------------
# Ray Data
# ---------------------------------------------------------------------------------------


def add_quality(ds, cfg: QualityConfig):
    """Append the quality stage to a Ray Dataset (an actor pool: the CLIP model loads once)."""
    import ray

    use_gpu = bool(cfg.clip_model) and cfg.gpus_per_actor > 0
    return ds.map_batches(
        QualityCheck,
        fn_constructor_kwargs={"cfg": cfg},
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.max_actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor if use_gpu else None,
    )


#: The stage's ``build_*`` name (DESIGN.md: one plain function appends a stage).
build_quality = add_quality
