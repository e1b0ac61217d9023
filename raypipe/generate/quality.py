"""The quality stage: reject bad images and off-topic dialogues; optional model gates.

Checks, in order, each a reject reason (stage ``quality``):

- ``bad_image``: no image bytes, or the bytes don't decode (or decode to nothing);
- ``nan_image``: the decoded pixels hold NaN/inf (float images);
- ``black_image``: mean pixel value <= ``max_mean_dark``;
- ``blank_image``: pixel standard deviation < ``min_std`` (a flat colour);
- ``dialogue_missing_keyword``: no assistant turn names any of the row's keywords
  (:func:`raypipe.matching.mentions_keyword`: ``sunflowers``/``sunflower``,
  ``t-shirt``/``t shirt`` match);
- ``nsfw``: the Stable Diffusion safety checker flags the image, when
  ``safety_checker`` is set (used as a classifier: the image is never altered);
- ``low_clip_score``: CLIP cosine similarity of image and prompt (emphasis removed)
  below ``clip_min_score``, when ``clip_model`` is set;
- ``keyword_not_grounded``: CLIP zero-shot over the ability's keyword bank does not put
  the row's keyword (``keywords[0]``) in the top ``grounding_top_k``, when set.

Image statistics and the model scores are written to ``meta``.

:func:`add_image_stages` appends render and quality to a Ray Dataset. When render runs
on GPUs the checks run *inside the render actors* (:class:`RenderAndCheck`), on the
same device: CLIP ViT-L and the safety checker cost well under 1% of a diffusion
model's work per image and fit beside it in GPU memory, so the checks scale with the
render pool, ask Ray for no GPUs of their own, and no separate CPU pool can cap the
GPUs' throughput. On CPU they run in their own actor pool, as a separate stage.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import pyarrow as pa

from raypipe.errors import ConfigError
from raypipe.generate.config import QualityConfig, RenderConfig
from raypipe.generate.quality_models import (
    features,
    load_clip,
    load_safety_checker,
    nsfw_verdicts,
)
from raypipe.generate.render import (
    Renderer,
    add_render,
    render_pool_args,
    render_uses_gpu,
)
from raypipe.matching import mentions_any, phrase_key, strip_emphasis
from raypipe.placement import actor_resources
from raypipe.schema import is_rejected, reject, rows_to_table, update_meta
from raypipe.stage import Stage, add_stage

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


class QualityCheck(Stage):
    """Reject bad images and dialogues that miss their keyword; optional model gates.

    Input columns: ``id``, ``prompt``, ``keywords``, ``image``, ``conversations`` (a row
    whose ``conversations`` is null skips the dialogue check: no dialogue stage ran), and
    ``ability`` when grounding is on. Output columns: ``meta`` (merged: ``image_mean``,
    ``image_std``, ``nsfw_score``, ``clip_score``, ``grounding_rank``) and the reject
    columns (stage ``quality``; reasons in the module docstring). Already-rejected rows
    pass through untouched.

    Args:
        cfg: the checks and their models.
        banks: ability -> keyword bank, for grounding (required when it is on).
        device: where the models run (``cuda`` inside a GPU render actor).
    """

    INPUT_COLUMNS = ("id", "prompt", "keywords", "image", "conversations")
    OUTPUT_COLUMNS = ("meta",)

    def __init__(
        self,
        cfg: QualityConfig,
        banks: dict[str, list[str]] | None = None,
        device: str = "cpu",
    ):
        self.cfg = cfg
        self.device = device
        self.dtype = None
        self.clip = self.safety = None
        if cfg.clip_model or cfg.safety_checker:  # without a model the checks need no torch
            import torch

            self.dtype = torch.float16 if device == "cuda" else torch.float32
        if cfg.clip_model:
            self.clip, self.processor = load_clip(cfg, device, self.dtype)
        if cfg.safety_checker:
            self.safety, self.safety_processor = load_safety_checker(cfg, device, self.dtype)
        self.banks = dict(banks or {})
        if cfg.grounding_top_k is not None:
            self.INPUT_COLUMNS = (*QualityCheck.INPUT_COLUMNS, "ability")
        # ability -> (bank keys, L2-normalised text embeddings), encoded once per actor.
        self._bank_embeds: dict[str, tuple[list[str], Any]] = {}

    def process(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        passed: list[tuple[dict[str, Any], Any]] = []
        for row in rows:
            if is_rejected(row):
                continue
            img = self._check_row(row)
            if img is not None:
                passed.append((row, img))
        # Model gates in model-sized calls (the stage gets whole blocks).
        size = self.cfg.clip_batch_size
        for start in range(0, len(passed), size):
            part = passed[start : start + size]
            if self.safety is not None:
                self._safety_gate(part)
                part = [(r, im) for r, im in part if not is_rejected(r)]
            if self.clip is not None and part:
                self._clip_gates(part)
        return rows_to_table(rows)

    def _check_row(self, row: dict[str, Any]):
        """Pixel and dialogue checks for one row; its decoded RGB image if it passed."""
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
        return img.convert("RGB")

    # -- model gates ---------------------------------------------------------------------

    def _safety_gate(self, part: list[tuple[dict[str, Any], Any]]) -> None:
        pixels = self.safety_processor(images=[im for _, im in part], return_tensors="pt")
        clip_input = pixels["pixel_values"].to(self.device, self.dtype)
        flagged, scores = nsfw_verdicts(self.safety, clip_input)
        for (row, _), bad, score in zip(part, flagged.tolist(), scores.tolist()):
            update_meta(row, nsfw_score=round(score, 4))
            if bad:
                reject(
                    row,
                    STAGE,
                    "nsfw",
                    f"safety checker flagged the image (concept score {score:.4f} > 0) "
                    f"for prompt {row.get('prompt')!r}",
                )

    def _clip_gates(self, part: list[tuple[dict[str, Any], Any]]) -> None:
        """CLIP score against the prompt; then, if on, keyword grounding. One image pass."""
        import torch

        rows = [r for r, _ in part]
        with torch.inference_mode():
            pixels = self.processor(images=[im for _, im in part], return_tensors="pt")
            image = features(
                self.clip.get_image_features(
                    pixel_values=pixels["pixel_values"].to(self.device, self.dtype)
                )
            )
            image = torch.nn.functional.normalize(image.float(), dim=-1)
            text = self._encode_texts([strip_emphasis(r["prompt"] or "") for r in rows])
        scores = (image * text).sum(-1).tolist()
        for row, score in zip(rows, scores):
            update_meta(row, clip_score=round(score, 4))
            if score < self.cfg.clip_min_score:
                reject(
                    row,
                    STAGE,
                    "low_clip_score",
                    f"clip_score={score:.4f} < clip_min_score={self.cfg.clip_min_score}",
                )
        if self.cfg.grounding_top_k is not None:
            for row, emb in zip(rows, image):
                if not is_rejected(row):
                    self._ground(row, emb)

    def _ground(self, row: dict[str, Any], image) -> None:
        """Rank the row's keyword among its ability's bank for this image (zero-shot)."""
        keywords = [k for k in (row.get("keywords") or []) if k and k.strip()]
        if not keywords:
            return
        keyword, k = keywords[0], self.cfg.grounding_top_k
        bank, embeds = self._bank(row.get("ability"))
        key = phrase_key(keyword)
        sims = embeds @ image
        if key in bank:
            own = sims[bank.index(key)]
            others = [i for i in range(len(bank)) if bank[i] != key]
        else:  # a keyword the bank lacks still competes against all of it
            own = self._encode_texts([self.cfg.grounding_prompt.format(keyword=keyword)])[0] @ image
            others = list(range(len(bank)))
        rank = 1 + int((sims[others] > own).sum())
        update_meta(row, grounding_rank=rank)
        if rank > k:
            order = sorted(range(len(bank)), key=lambda i: -float(sims[i]))
            top = [self.banks[row["ability"]][i] for i in order[:k]]
            reject(
                row,
                STAGE,
                "keyword_not_grounded",
                f"{keyword!r} ranks {rank} of {len(others) + 1} {row['ability']} keywords for "
                f"its image (grounding_top_k={k}); top {k}: {', '.join(top)}",
            )

    def _bank(self, ability: str | None) -> tuple[list[str], Any]:
        if ability not in self._bank_embeds:
            if ability not in self.banks:
                raise ConfigError(
                    f"quality.grounding_top_k is set but there is no keyword bank for ability "
                    f"{ability!r} (banks: {sorted(self.banks)}). Pass every ability's bank to "
                    "add_image_stages, or turn grounding off."
                )
            bank = self.banks[ability]
            texts = [self.cfg.grounding_prompt.format(keyword=kw) for kw in bank]
            size = self.cfg.clip_batch_size
            parts = [self._encode_texts(texts[i : i + size]) for i in range(0, len(texts), size)]
            import torch

            self._bank_embeds[ability] = ([phrase_key(kw) for kw in bank], torch.cat(parts))
        return self._bank_embeds[ability]

    def _encode_texts(self, texts: list[str]):
        """L2-normalised CLIP text embeddings (float32, on the device)."""
        import torch

        tokens = self.processor.tokenizer(
            texts, padding=True, truncation=True, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            out = features(self.clip.get_text_features(**tokens))
        return torch.nn.functional.normalize(out.float(), dim=-1)


class RenderAndCheck(Stage):
    """Render, then check, in one actor on one device: the GPU path of the image stages.

    Input columns: the renderer's and the quality check's (less what rendering makes);
    output columns: both stages' (see :class:`~raypipe.generate.render.Renderer` and
    :class:`QualityCheck`). Rows rejected by the renderer pass through the checks.
    """

    OUTPUT_COLUMNS = Renderer.OUTPUT_COLUMNS

    def __init__(
        self,
        render: RenderConfig,
        quality: QualityConfig,
        banks: dict[str, list[str]] | None = None,
        renderer: type[Renderer] = Renderer,
    ):
        self.renderer = renderer(render)
        self.quality = QualityCheck(quality, banks, device=self.renderer.device)
        made = set(self.renderer.OUTPUT_COLUMNS)
        needed = self.renderer.INPUT_COLUMNS + tuple(
            c for c in self.quality.INPUT_COLUMNS if c not in made
        )
        self.INPUT_COLUMNS = tuple(dict.fromkeys(needed))

    def process(self, batch: pa.Table) -> pa.Table:
        return self.quality(self.renderer(batch))


# ---------------------------------------------------------------------------------------
# Ray Data
# ---------------------------------------------------------------------------------------


def add_quality(ds, cfg: QualityConfig, banks: dict[str, list[str]] | None = None):
    """Append the quality stage as its own CPU actor pool (models load once per actor)."""
    return add_stage(
        ds,
        QualityCheck,
        {"cfg": cfg, "banks": banks if cfg.grounding_top_k is not None else None},
        min_actors=1,
        max_actors=cfg.max_actors,
        **actor_resources(num_cpus=cfg.cpus_per_actor, resources=cfg.resources),
    )


def add_image_stages(
    ds,
    render: RenderConfig,
    quality: QualityConfig,
    banks: dict[str, list[str]],
):
    """Append rendering and the quality checks to a Ray Dataset; returns the new Dataset.

    ``banks`` maps each ability to its keyword bank (used when grounding is on). On GPUs
    one pool of :class:`RenderAndCheck` actors does both, on each actor's GPU; on CPU a
    render pool is followed by a quality pool. See the module docstring for why.
    """
    if quality.grounding_top_k is not None and not banks:
        raise ConfigError(
            "quality.grounding_top_k is set but no keyword banks were given: pass "
            "ability -> keywords for every ability, or set quality.grounding_top_k: null"
        )
    use_gpu = render_uses_gpu(render)
    if not use_gpu:
        return add_quality(add_render(ds, render), quality, banks)
    kwargs = {
        "render": render.model_copy(update={"device": "cuda"}),
        "quality": quality,
        "banks": banks if quality.grounding_top_k is not None else None,
    }
    return add_stage(ds, RenderAndCheck, kwargs, **render_pool_args(render, use_gpu))


#: The stages' ``build_*`` name (docs/architecture.md, "The generation stream": one plain
#: function appends stages).
build_image_stages = add_image_stages
build_quality = add_quality
