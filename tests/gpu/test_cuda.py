"""CUDA paths: fp16 rendering and bf16 FSDP2 training on one GPU (marked `gpu`).

    ./scripts/test -m gpu tests/gpu        # on a CUDA machine

Skipped where torch sees no GPU. RAYPIPE_GPU_TEST_DEVICE=cpu runs them on the CPU (fp32)
to check the tests themselves. No Ray is needed: stages and the parallelize function are
called in-process, as a Ray actor or Ray Train worker would call them.
"""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.gpu

DEVICE = os.environ.get("RAYPIPE_GPU_TEST_DEVICE", "cuda")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from raypipe.tiny import build_tiny_llava, build_tiny_sd

    root = tmp_path_factory.mktemp("gpu-models")
    return {"sd": build_tiny_sd(root / "sd"), "llava": build_tiny_llava(root / "llava")}


def work_rows(n: int):
    from raypipe.schema import row_seed, rows_to_table, sample_id

    rows = []
    for i in range(n):
        sid = sample_id(0, "color", i)
        rows.append(
            {
                "id": sid,
                "ability": "color",
                "index": i,
                "seed": row_seed(sid),
                "keywords": ["crimson"],
                "prompt": f"((crimson)) vintage car number {i}, city street, realistic photo, 8k",
                "negative_prompt": "blurry",
                "meta": "{}",
            }
        )
    return rows_to_table(rows)


def test_render_half_precision_is_finite_and_reproducible(models):
    from raypipe.generate.config import RenderConfig
    from raypipe.generate.render import Renderer

    dtype = "float16" if DEVICE == "cuda" else "float32"
    cfg = RenderConfig(
        model=str(models["sd"]),
        device=DEVICE,
        dtype=dtype,
        width=64,
        height=64,
        steps=2,
        guidance_scale=5.0,
        batch_size=4,
        image_format="png",
    )
    renderer = Renderer(cfg)
    first = renderer(work_rows(4)).to_pylist()
    again = renderer(work_rows(4)).to_pylist()
    for a, b in zip(first, again):
        assert not a["reject_stage"], a["reject_reason"]
        img = np.asarray(Image.open(io.BytesIO(a["image"]["bytes"])))
        assert img.shape == (64, 64, 3) and np.isfinite(img).all() and img.std() > 0
        assert a["image"]["bytes"] == b["image"]["bytes"], "same seeds must give the same image"


def test_quality_gates_run_on_the_render_gpu(models, tmp_path):
    """The GPU path of the image stages: render, then CLIP score, grounding and the safety
    checker in the same actor, on the same device (fp16 on CUDA)."""
    import json

    from raypipe.generate.config import QualityConfig, RenderConfig
    from raypipe.generate.quality import RenderAndCheck
    from raypipe.tiny import build_tiny_clip, build_tiny_safety_checker

    render = RenderConfig(
        model=str(models["sd"]),
        device=DEVICE,
        width=64,
        height=64,
        steps=2,
        guidance_scale=5.0,
        batch_size=4,
    )
    quality = QualityConfig(
        clip_model=str(build_tiny_clip(tmp_path / "clip")),
        clip_min_score=-1.0,
        clip_batch_size=3,
        grounding_top_k=2,
        safety_checker=str(build_tiny_safety_checker(tmp_path / "checker")),
    )
    banks = {"color": ["crimson", "teal", "ochre", "olive"]}
    stage = RenderAndCheck(render, quality, banks)
    assert next(stage.quality.clip.parameters()).device.type == DEVICE
    assert next(stage.quality.safety.parameters()).device.type == DEVICE
    out = stage(work_rows(6)).to_pylist()
    ranks = []
    for r in out:
        meta = json.loads(r["meta"])
        assert np.isfinite(meta["clip_score"]) and meta["nsfw_score"] <= 0, meta
        ranks.append(meta["grounding_rank"])
        want = None if meta["grounding_rank"] <= 2 else "keyword_not_grounded"
        assert r["reject_reason"] == want, (r["reject_reason"], r["reject_raw"])
    assert all(1 <= k <= 4 for k in ranks)

    flag_all = build_tiny_safety_checker(tmp_path / "flag-all", concept_threshold=-2.0)
    strict = RenderAndCheck(
        render, quality.model_copy(update={"safety_checker": str(flag_all)}), banks
    )
    assert [r["reject_reason"] for r in strict(work_rows(2)).to_pylist()] == ["nsfw", "nsfw"]


def test_fsdp2_bf16_training_lowers_the_loss(models, tmp_path):
    import torch.distributed as dist
    from fixture_data import write_fixture_parquet

    from raypipe.train.config import load_train_config
    from raypipe.train.encoding import SampleEncoder, collate
    from raypipe.train.step import build_optimizer, token_loss_sum
    from raypipe.train.worker import setup_model

    device = torch.device(DEVICE)
    if not dist.is_initialized():
        store = tempfile.mktemp(prefix="raypipe-pg-")
        backend = "nccl" if DEVICE == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    try:
        cfg = load_train_config(
            None,
            [
                f"model.llava={models['llava']}",
                "stage=2",
                f"use_gpu={str(DEVICE == 'cuda').lower()}",
                f"mixed_precision={'bf16' if DEVICE == 'cuda' else 'fp32'}",
                "num_workers=1",
                "global_batch_size=8",
                "micro_batch_size=8",
                "lr=0.01",
                "warmup_ratio=0.0",
            ],
        )
        if DEVICE == "cuda":
            torch.cuda.set_device(0)
        model, processor = setup_model(cfg, rank=0, device=device)
        optimizer, scheduler = build_optimizer(model, cfg, total_steps=30)
        import pyarrow.parquet as pq

        rows = pq.read_table(write_fixture_parquet(tmp_path / "data", 8)).to_pylist()
        # The shape build_train_dataset gives a worker: image bytes, no image error.
        rows = [
            {**r, "image": r["image"]["bytes"], "image_error": None, "source": "fixture"}
            for r in rows
        ]
        encoded = SampleEncoder(processor=processor, template="vicuna_v1", max_length=256)(rows)
        batch = {
            k: v.to(device) for k, v in collate(encoded, processor.tokenizer.pad_token_id).items()
        }
        losses = []
        for _ in range(30):
            logits = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"],
            ).logits
            n = (batch["labels"][:, 1:] != -100).sum()
            loss = token_loss_sum(logits, batch["labels"]) / n
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        assert all(np.isfinite(losses))
        assert losses[-1] < 0.5 * losses[0], losses
    finally:
        dist.destroy_process_group()
