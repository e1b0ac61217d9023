"""The quality stage: pixel checks, dialogue keyword check, CLIP-score filter (tiny CLIP)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from raypipe.config import QualityConfig
from raypipe.errors import ModelError
from raypipe.generate.quality import QualityCheck, check_quality_models
from raypipe.matching import mentions_any
from raypipe.schema import reject, rows_to_table


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def noise(seed: int, size: int = 32) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def nan_tiff() -> bytes:
    pixels = np.full((16, 16), 0.5, dtype=np.float32)
    pixels[3, 4] = np.nan
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="F").save(buf, format="TIFF")
    return buf.getvalue()


def row(sid, image, answer="A crimson car on a street.", keywords=("crimson",), prompt=None):
    return {
        "id": sid,
        "ability": "color",
        "keywords": list(keywords),
        "prompt": prompt or "((crimson)) vintage car, city street",
        "image": None if image is None else {"bytes": image, "path": f"{sid}.png"},
        "conversations": None
        if answer is None
        else [
            {"from": "human", "value": "<image>\nWhat colour is the car?"},
            {"from": "gpt", "value": answer},
        ],
    }


def run(stage, rows):
    return {r["id"]: r for r in stage(rows_to_table(rows)).to_pylist()}


def test_bad_images_and_dialogues_are_rejected_with_reasons():
    stage = QualityCheck(QualityConfig())
    rows = [
        row("good", noise(0)),
        row("black", png(np.zeros((32, 32, 3), np.uint8))),
        row("dark", png(np.full((32, 32, 3), 5, np.uint8))),
        row("blank", png(np.full((32, 32, 3), 128, np.uint8))),
        row("nan", nan_tiff()),
        row("garbage", b"not an image at all"),
        row("missing", None),
        row("off-topic", noise(1), answer="A blue bicycle leaning on a wall."),
        row("plural", noise(2), answer="Two Sunflowers in a vase.", keywords=["sunflower"]),
        row("hyphen", noise(3), answer="He wears a t shirt.", keywords=["T-shirt"]),
        row("no-dialogue-yet", noise(4), answer=None),
    ]
    already = row("already", b"junk")
    reject(already, "prompt", "malformed", "raw")
    out = run(stage, rows + [already])

    reasons = {sid: r["reject_reason"] for sid, r in out.items()}
    assert reasons == {
        "good": None,
        "black": "black_image",
        "dark": "black_image",
        "blank": "blank_image",
        "nan": "nan_image",
        "garbage": "bad_image",
        "missing": "bad_image",
        "off-topic": "dialogue_missing_keyword",
        "plural": None,
        "hyphen": None,
        "no-dialogue-yet": None,
        "already": "malformed",
    }
    rejected_here = [s for s, why in reasons.items() if why and s != "already"]
    assert all(out[s]["reject_stage"] == "quality" for s in rejected_here)
    assert out["already"]["reject_stage"] == "prompt"  # passed through untouched
    assert "std=0.00 < min_std" in out["blank"]["reject_raw"]
    assert "blue bicycle" in out["off-topic"]["reject_raw"]
    meta = json.loads(out["good"]["meta"])
    assert meta["image_std"] > 50 and 100 < meta["image_mean"] < 160


def test_keyword_check_can_be_off():
    stage = QualityCheck(QualityConfig(check_dialogue_keyword=False))
    out = run(stage, [row("off-topic", noise(1), answer="A blue bicycle.")])
    assert out["off-topic"]["reject_reason"] is None


@pytest.mark.parametrize(
    "keyword,text,hit",
    [
        ("crimson", "The car is Crimson.", True),
        ("crimson", "The car is crimsonish.", False),
        ("berry", "A bowl of berries.", True),
        ("bus", "Two buses wait.", True),
        ("T-shirt", "a tshirt", True),
        ("t shirt", "A T-Shirt on a chair.", True),
        ("((teal))", "a teal umbrella", True),
        ("fox", "a firefox logo", False),
    ],
)
def test_keyword_matching(keyword, text, hit):
    assert mentions_any(text, [keyword]) is hit
    assert mentions_any(text, ["   "]) is False  # a blank keyword names nothing


@pytest.fixture(scope="module")
def clip_stage(tiny_dir):
    return QualityCheck(QualityConfig(clip_model="raypipe-tiny/tiny-clip", clip_batch_size=3))


def test_clip_score_threshold(clip_stage):
    prompts = ["((red)) car", "a cat on a sofa", "blue sky", "green tree", "pizza", "a dog"]
    rows = [row(f"r{i}", noise(10 + i), prompt=p, answer=None) for i, p in enumerate(prompts)]
    clip_stage.cfg = QualityConfig(clip_model="raypipe-tiny/tiny-clip", clip_min_score=-1.0)
    scored = run(clip_stage, rows)
    scores = {sid: json.loads(r["meta"])["clip_score"] for sid, r in scored.items()}
    assert all(r["reject_reason"] is None for r in scored.values())
    assert all(-1 <= s <= 1 for s in scores.values()) and len(set(scores.values())) > 1

    # A threshold between the scores rejects exactly the rows below it.
    threshold = float(np.median(list(scores.values())))
    clip_stage.cfg = QualityConfig(clip_model="raypipe-tiny/tiny-clip", clip_min_score=threshold)
    out = run(clip_stage, rows)
    for sid, s in scores.items():
        expected = "low_clip_score" if s < threshold else None
        assert out[sid]["reject_reason"] == expected
        assert json.loads(out[sid]["meta"])["clip_score"] == pytest.approx(s, abs=1e-4)

    # The score is the cosine of CLIP's image and text embeddings (emphasis stripped).
    model, processor = clip_stage.clip, clip_stage.processor
    img = Image.open(io.BytesIO(rows[0]["image"]["bytes"]))
    inputs = processor(text=["red car"], images=[img], return_tensors="pt", padding=True)
    with torch.no_grad():
        o = model(**inputs)
    cos = torch.nn.functional.cosine_similarity(o.image_embeds, o.text_embeds).item()
    assert scores["r0"] == pytest.approx(cos, abs=1e-4)


def test_bad_clip_model_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert check_quality_models(QualityConfig()) is None
    with pytest.raises(ModelError, match="quality.clip_model"):
        check_quality_models(QualityConfig(clip_model="nobody-here/no-clip"))
    with pytest.raises(ModelError, match="no config.json"):
        QualityCheck(QualityConfig(clip_model=str(tmp_path)))
