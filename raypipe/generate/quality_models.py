"""The quality stage's optional model gates: CLIP (score, keyword grounding) and the
Stable Diffusion safety checker. Checked without loading weights before Ray starts
(:func:`check_quality_models`), loaded once per actor by
:class:`raypipe.generate.quality.QualityCheck`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raypipe.errors import ModelError
from raypipe.generate.config import QualityConfig
from raypipe.models import resolve_pretrained

#: Pipeline subfolders that hold a Stable Diffusion pipeline's own safety checker.
PIPELINE_CHECKER = ("safety_checker", "feature_extractor")


def check_quality_models(cfg: QualityConfig) -> dict[str, str]:
    """Resolve and check the quality models without loading weights: ``{field: path}``.

    Each model must be found (a folder, or a hub id in the local HF cache when offline)
    and be the right kind (its config.json names a CLIPModel / StableDiffusionSafetyChecker),
    so a wrong id fails in the job's first seconds with a ModelError that says what to do.
    Empty when no model gate is on.
    """
    out: dict[str, str] = {}
    if cfg.clip_model:
        out["clip_model"] = _checked_clip(cfg.clip_model)
    if cfg.safety_checker:
        out["safety_checker"] = _checked_safety_checker(cfg.safety_checker)[0]
    return out


def _checked_clip(model: str) -> str:
    path = resolve_pretrained(model, "config.json", "quality.clip_model")
    _check_architecture(path, "config.json", "CLIPModel", "quality.clip_model", model)
    return path


def _checked_safety_checker(model: str) -> tuple[str, str]:
    """``(path, subfolder)`` of a safety checker: a checker's own folder or hub id
    (subfolder ``""``), or a diffusers pipeline whose ``safety_checker`` subfolder holds
    one (as SD 1.x pipelines on the hub do)."""
    field = "quality.safety_checker"
    try:
        path, subfolder = resolve_pretrained(model, "config.json", field), ""
    except ModelError as standalone:
        try:
            path = resolve_pretrained(model, f"{PIPELINE_CHECKER[0]}/config.json", field)
            subfolder = PIPELINE_CHECKER[0]
        except ModelError:
            if Path(model).expanduser().is_dir():
                raise ModelError(
                    f"{field}={model!r}: the folder holds neither a safety checker "
                    "(config.json) nor a pipeline with one (safety_checker/config.json). "
                    "Point it at CompVis/stable-diffusion-safety-checker (or a local copy), "
                    "or at an SD 1.x pipeline saved with its safety checker."
                ) from None
            raise standalone from None
    marker = f"{subfolder}/config.json" if subfolder else "config.json"
    _check_architecture(path, marker, "StableDiffusionSafetyChecker", field, model)
    return path, subfolder


def _check_architecture(path: str, marker: str, wanted: str, field: str, given: str) -> None:
    config = _read_json(path, marker)
    if config is None:
        return  # resolve_pretrained found the marker; unreadable here (rare): load decides
    kinds = config.get("architectures") or []
    if config.get("model_type") != "clip" or (kinds and wanted not in kinds):
        raise ModelError(
            f"{field}={given!r} is a {', '.join(kinds) or config.get('model_type')!s}, not a "
            f"{wanted}. "
            + (
                "Use a CLIP checkpoint such as openai/clip-vit-large-patch14."
                if wanted == "CLIPModel"
                else "Use CompVis/stable-diffusion-safety-checker or an SD 1.x pipeline "
                "with a safety_checker subfolder."
            )
        )


def _read_json(path: str, marker: str) -> dict[str, Any] | None:
    local = Path(path) / marker
    if not local.is_file():
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(path, marker)
        local = Path(hit) if isinstance(hit, str) else None
    try:
        return json.loads(local.read_text()) if local else None
    except (OSError, ValueError):
        return None


def load_clip(cfg: QualityConfig, device: str = "cpu", dtype=None):
    """CLIPModel + processor for the CLIP gates -> (model, processor)."""
    from transformers import CLIPModel, CLIPProcessor

    path = _checked_clip(cfg.clip_model)
    try:
        model = CLIPModel.from_pretrained(path, use_safetensors=True, dtype=dtype)
        processor = CLIPProcessor.from_pretrained(path)
    except Exception as e:
        raise ModelError(
            f"could not load quality.clip_model={cfg.clip_model!r} ({path}) as a CLIPModel "
            f"with its processor: {type(e).__name__}: {e}. Use a CLIP checkpoint such as "
            "openai/clip-vit-large-patch14 (in the local HF cache when HF_HUB_OFFLINE=1) "
            "or a folder saved with save_pretrained."
        ) from e
    return model.to(device).eval(), processor


def load_safety_checker(cfg: QualityConfig, device: str = "cpu", dtype=None):
    """diffusers StableDiffusionSafetyChecker + its CLIP image processor -> (model, processor)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    path, subfolder = _checked_safety_checker(cfg.safety_checker)
    processor_folder = PIPELINE_CHECKER[1] if subfolder else ""
    try:
        model = StableDiffusionSafetyChecker.from_pretrained(
            path, subfolder=subfolder, use_safetensors=True, dtype=dtype
        )
        processor = CLIPImageProcessor.from_pretrained(path, subfolder=processor_folder)
    except Exception as e:
        raise ModelError(
            f"could not load quality.safety_checker={cfg.safety_checker!r} ({path}"
            f"{'/' + subfolder if subfolder else ''}) as a StableDiffusionSafetyChecker with "
            f"its image processor: {type(e).__name__}: {e}. Use "
            "CompVis/stable-diffusion-safety-checker (safetensors weights; in the local HF "
            "cache when HF_HUB_OFFLINE=1) or an SD 1.x pipeline saved with its checker."
        ) from e
    return model.to(device).eval(), processor


def features(out):
    """``get_*_features`` output -> the projected embeddings (a tensor in older
    transformers, ``pooler_output`` of a model output in newer ones)."""
    return out if hasattr(out, "shape") else out.pooler_output


def nsfw_verdicts(checker, clip_input):
    """``(flagged, score)`` per image from a diffusers ``StableDiffusionSafetyChecker``.

    The checker's own rule (its ``forward``), without blacking anything out: an image is
    flagged when its CLIP embedding's cosine to any concept exceeds that concept's
    threshold (thresholds drop by 0.01 once a "special care" concept is hit). ``score``
    is the largest cosine minus threshold: > 0 means flagged.
    """
    import torch

    with torch.inference_mode():
        pooled = checker.vision_model(clip_input)[1]
        embeds = torch.nn.functional.normalize(checker.visual_projection(pooled).float(), dim=-1)

        def cosine(concepts):
            return embeds @ torch.nn.functional.normalize(concepts.float(), dim=-1).T

        special = cosine(checker.special_care_embeds) - checker.special_care_embeds_weights.float()
        adjust = (special > 0).any(dim=1).float() * 0.01
        concept = cosine(checker.concept_embeds) - checker.concept_embeds_weights.float()
        score = (concept + adjust[:, None]).max(dim=1).values
    return (score > 0).cpu(), score.cpu()
