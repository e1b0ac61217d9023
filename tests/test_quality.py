"""The quality stage: pixel checks, dialogue keyword check, CLIP-score filter (tiny CLIP)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from raypipe.errors import ConfigError, ModelError
from raypipe.generate.config import QualityConfig, RenderConfig
from raypipe.generate.quality import QualityCheck, RenderAndCheck
from raypipe.generate.quality_models import check_quality_models, nsfw_verdicts
from raypipe.matching import mentions_any
from raypipe.schema import reject, row_seed, rows_to_table
from raypipe.tiny import build_tiny_safety_checker, build_tiny_sd, resolve_tiny


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
    assert check_quality_models(QualityConfig()) == {}
    with pytest.raises(ModelError, match="quality.clip_model"):
        check_quality_models(QualityConfig(clip_model="nobody-here/no-clip"))
    with pytest.raises(ModelError, match="no config.json"):
        QualityCheck(QualityConfig(clip_model=str(tmp_path)))


# --- keyword grounding ------------------------------------------------------------------

BANK = ["crimson", "teal", "ochre", "navy blue", "olive", "maroon"]


def test_grounding_rejects_keywords_outside_the_top_k(clip_stage):
    # One image, each bank keyword on its own row: their ranks are a permutation of 1..6,
    # so top-3 grounding keeps exactly three rows.
    image = noise(42)
    rows = [row(f"g{i}", image, keywords=[kw], answer=None) for i, kw in enumerate(BANK)]
    extra = row("not-in-bank", image, keywords=["periwinkle"], answer=None)
    cfg = QualityConfig(clip_model="raypipe-tiny/tiny-clip", clip_min_score=-1.0, grounding_top_k=3)
    stage = QualityCheck(cfg, banks={"color": BANK})
    calls = []
    original = stage.clip.get_text_features
    stage.clip.get_text_features = lambda **kw: calls.append(1) or original(**kw)
    out = run(stage, rows + [extra])

    # Reference ranks straight from CLIP's own forward (logits order = cosine order).
    model, processor = clip_stage.clip, clip_stage.processor
    texts = [f"a photo of {kw}" for kw in BANK + ["periwinkle"]]
    pil = Image.open(io.BytesIO(image)).convert("RGB")
    with torch.no_grad():
        inputs = processor(text=texts, images=[pil], return_tensors="pt", padding=True)
        logits = model(**inputs).logits_per_image[0]
    ranks = {kw: 1 + int((logits[:6] > logits[i]).sum()) for i, kw in enumerate(BANK)}
    ranks["periwinkle"] = 1 + int((logits[:6] > logits[6]).sum())
    order = [BANK[i] for i in logits[:6].argsort(descending=True).tolist()]

    for r in rows + [extra]:
        got, kw = out[r["id"]], r["keywords"][0]
        assert json.loads(got["meta"])["grounding_rank"] == ranks[kw]
        if ranks[kw] <= 3:
            assert got["reject_reason"] is None
        else:
            assert got["reject_reason"] == "keyword_not_grounded"
            assert f"ranks {ranks[kw]} of" in got["reject_raw"]
            assert f"top 3: {', '.join(order[:3])}" in got["reject_raw"]
    assert sum(out[r["id"]]["reject_reason"] is None for r in rows) == 3

    # The bank's text embeddings were encoded once; a second block reuses them.
    first = len(calls)
    run(stage, rows)
    assert len(calls) == first + 1  # only the prompts of the new block


def test_grounding_needs_clip_and_banks(clip_stage):
    with pytest.raises(ValueError, match="needs quality.clip_model"):
        QualityConfig(grounding_top_k=3)
    stage = QualityCheck(
        QualityConfig(clip_model="raypipe-tiny/tiny-clip", clip_min_score=-1, grounding_top_k=1),
        banks={"animal": ["fox"]},
    )
    assert "ability" in stage.INPUT_COLUMNS
    with pytest.raises(ConfigError, match="no keyword bank for ability 'color'"):
        run(stage, [row("c", noise(1), answer=None)])


# --- safety checker ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def flag_all(tmp_path_factory):
    return build_tiny_safety_checker(tmp_path_factory.mktemp("sc") / "all", concept_threshold=-2.0)


def test_safety_checker_rejects_flagged_images_without_touching_them(tiny_dir, flag_all):
    rows = [row(f"s{i}", noise(20 + i), answer=None) for i in range(3)]
    kept = run(QualityCheck(QualityConfig(safety_checker="raypipe-tiny/tiny-safety-checker")), rows)
    assert all(r["reject_reason"] is None for r in kept.values())
    assert all(json.loads(r["meta"])["nsfw_score"] <= 0 for r in kept.values())

    flagged = run(QualityCheck(QualityConfig(safety_checker=str(flag_all))), rows)
    for r in rows:
        got = flagged[r["id"]]
        assert (got["reject_stage"], got["reject_reason"]) == ("quality", "nsfw")
        assert "safety checker flagged" in got["reject_raw"]
        assert got["image"]["bytes"] == r["image"]["bytes"]  # classified, never blacked out


def test_nsfw_verdicts_follow_the_checkers_own_rule(flag_all):
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )

    checker = StableDiffusionSafetyChecker.from_pretrained(flag_all).eval()
    clip_input = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    seen = set()
    for threshold in (-2.0, 0.0, 0.2, 1.0):
        with torch.no_grad():
            checker.concept_embeds_weights.fill_(threshold)
            checker.special_care_embeds_weights.fill_(threshold + 0.1)
        flagged, scores = nsfw_verdicts(checker, clip_input)
        _, reference = checker(clip_input, [np.zeros(1)] * 16)
        assert flagged.tolist() == list(reference)
        assert ((scores > 0) == flagged).all()
        seen |= set(flagged.tolist())
    assert seen == {True, False}


def test_pipeline_safety_checker_subfolder(tiny_dir, flag_all, tmp_path):
    sd = build_tiny_sd(tmp_path / "sd-with-checker", safety_checker=flag_all)
    cfg = QualityConfig(safety_checker=str(sd))
    assert check_quality_models(cfg) == {"safety_checker": str(sd)}
    out = run(QualityCheck(cfg), [row("p", noise(5), answer=None)])
    assert out["p"]["reject_reason"] == "nsfw"


def test_bad_quality_models_fail_fast_with_what_to_do(monkeypatch, tiny_dir, tmp_path, flag_all):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    clip = resolve_tiny("raypipe-tiny/tiny-clip")
    with pytest.raises(ModelError, match="not a StableDiffusionSafetyChecker"):
        check_quality_models(QualityConfig(safety_checker=clip))
    with pytest.raises(ModelError, match="not a CLIPModel"):
        check_quality_models(QualityConfig(clip_model=str(flag_all)))
    with pytest.raises(ModelError, match="neither a safety checker"):
        check_quality_models(QualityConfig(safety_checker=resolve_tiny("raypipe-tiny/tiny-sd")))
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        check_quality_models(QualityConfig(safety_checker="nobody-here/no-checker"))
    with pytest.raises(ModelError, match="quality.safety_checker"):
        QualityCheck(QualityConfig(safety_checker=str(tmp_path)))


# --- render and check in one actor (the GPU path, here on CPU) --------------------------


def test_render_and_check_in_one_stage(tiny_dir):
    render = RenderConfig(
        model="raypipe-tiny/tiny-sd", device="cpu", width=64, height=64, steps=2, batch_size=2
    )
    quality = QualityConfig(
        clip_model="raypipe-tiny/tiny-clip",
        clip_min_score=-1.0,
        safety_checker="raypipe-tiny/tiny-safety-checker",
    )
    stage = RenderAndCheck(render, quality)
    assert stage.quality.device == stage.renderer.device == "cpu"
    assert set(stage.INPUT_COLUMNS) == {
        "id",
        "prompt",
        "negative_prompt",
        "seed",
        "keywords",
        "conversations",
    }
    rows = [
        {
            "id": f"color-s0-{i:07d}",
            "ability": "color",
            "keywords": ["crimson"],
            "prompt": "((crimson)) vintage car, city street",
            "negative_prompt": "",
            "seed": row_seed(f"color-s0-{i:07d}"),
            "conversations": [{"from": "gpt", "value": "A crimson car." if i else "A car."}],
        }
        for i in range(3)
    ]
    out = stage(rows_to_table(rows)).to_pylist()
    assert out[0]["reject_reason"] == "dialogue_missing_keyword"
    for r in out[1:]:
        assert r["reject_reason"] is None and r["image"]["bytes"]
        assert {"render_s", "image_std", "nsfw_score", "clip_score"} <= set(json.loads(r["meta"]))
    stage._columns_checked = False  # as a fresh actor's first block
    with pytest.raises(ConfigError, match=r"required input columns \['keywords'\]"):
        stage(rows_to_table(rows).drop_columns(["keywords"]))
