"""The render stage with a tiny random-weight Stable Diffusion on CPU."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from raypipe.errors import ConfigError, ModelError
from raypipe.generate.config import RenderConfig
from raypipe.generate.emphasis import CHUNK_TOKENS, encode_chunks, tokenize_chunks
from raypipe.generate.render import Renderer, check_render_model, encode_image
from raypipe.matching import parse_emphasis, strip_emphasis
from raypipe.schema import WORK_SCHEMA, reject, row_seed, rows_to_table

LONG = ", ".join(
    ["a crimson vintage car parked on a city street at dusk", "golden retriever running"] * 12
    + ["oil painting"]
)


def make_rows(prompts, seeds=None):
    rows = []
    for i, prompt in enumerate(prompts):
        sid = f"color-s0-{i:07d}"
        rows.append(
            {
                "id": sid,
                "ability": "color",
                "prompt": prompt,
                "negative_prompt": "",
                "seed": seeds[i] if seeds else row_seed(sid),
            }
        )
    return rows


def render(renderer, rows):
    return renderer(rows_to_table(rows)).to_pylist()


@pytest.fixture(scope="module")
def cfg(tiny_dir):
    return RenderConfig(
        model="raypipe-tiny/tiny-sd",
        width=64,
        height=64,
        steps=2,
        guidance_scale=7.5,
        batch_size=4,
        negative_prompt="blurry, low quality",
    )


@pytest.fixture(scope="module")
def renderer(cfg):
    # One thread: tiny models gain nothing from more, and on a busy 2-core machine
    # OpenMP barriers across threads cost seconds per call.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Renderer(cfg)
    torch.set_num_threads(threads)


def test_rows_render_to_encoded_images_with_meta(renderer):
    out = render(renderer, make_rows(["((red)) car, city street", "a blue cat"]))
    assert [r["reject_stage"] for r in out] == [None, None]
    for row in out:
        img = Image.open(io.BytesIO(row["image"]["bytes"]))
        assert img.format == "PNG" and img.size == (64, 64)
        assert (row["width"], row["height"]) == (64, 64)
        assert row["image"]["path"] == f"{row['id']}.png"
        assert row["sd_model"] == "raypipe-tiny/tiny-sd"
        assert row["negative_prompt"] == "blurry, low quality"
        meta = __import__("json").loads(row["meta"])
        assert meta["steps"] == 2 and meta["guidance"] == 7.5 and meta["dtype"] == "float32"
        assert meta["scheduler"] == "EulerDiscreteScheduler" and meta["render_s"] > 0
    assert out[0]["image"]["bytes"] != out[1]["image"]["bytes"]
    assert rows_to_table(out).schema == WORK_SCHEMA


def test_row_reproduces_exactly_in_any_batch(renderer):
    target = "a crimson vintage car, teal umbrella"
    alone = render(renderer, make_rows([target], [1234]))[0]
    # Same row at another position, with other rows, in a batch split into two calls.
    mixed = render(
        renderer,
        make_rows(["dog", "a bowl of ramen", "tree", target, "bus", "x"], [5, 6, 7, 1234, 8, 9]),
    )
    assert mixed[3]["image"]["bytes"] == alone["image"]["bytes"]
    other_seed = render(renderer, make_rows([target], [1235]))[0]
    assert other_seed["image"]["bytes"] != alone["image"]["bytes"]


def test_plain_prompt_matches_diffusers_own_encoding(renderer, cfg):
    import numpy as np

    row = render(renderer, make_rows(["blue sky over a city street"], [11]))[0]
    ref = renderer.pipe(
        "blue sky over a city street",
        negative_prompt=cfg.negative_prompt,
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        width=64,
        height=64,
        generator=[torch.Generator().manual_seed(11)],
        output_type="np",
    ).images[0]
    mine = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])), dtype=np.int64)
    assert np.array_equal(mine, (ref * 255).round().astype(np.int64))


def test_parse_emphasis_rules():
    assert parse_emphasis("((red)) car") == [("red", pytest.approx(1.21)), (" car", 1.0)]
    assert parse_emphasis("[blurry] (sharp:1.5) x") == [
        ("blurry", pytest.approx(1 / 1.1)),
        (" ", 1.0),
        ("sharp", 1.5),
        (" x", 1.0),
    ]
    assert parse_emphasis(r"\(literal\) ok") == [("(literal) ok", 1.0)]
    assert parse_emphasis("(unclosed red") == [("unclosed red", pytest.approx(1.1))]
    assert parse_emphasis("time: 5pm") == [("time: 5pm", 1.0)]
    assert strip_emphasis("((crimson)) vintage car, [blurry]") == "crimson vintage car, blurry"


def test_emphasis_scales_only_emphasised_tokens(renderer):
    tok, enc = renderer.pipe.tokenizer, renderer.pipe.text_encoder
    plain = tokenize_chunks(tok, "red car, city street")
    weighted = tokenize_chunks(tok, "((red)) car, city street")
    assert weighted.ids == plain.ids  # brackets are syntax, not tokens
    red = [i for i, w in enumerate(weighted.weights[0]) if w != 1.0]
    assert red and all(weighted.weights[0][i] == pytest.approx(1.21) for i in red)
    with torch.no_grad():
        e_plain = encode_chunks(enc, [plain], "cpu")[0]
        e_weighted = encode_chunks(enc, [weighted], "cpu")[0]
    ratio = (e_weighted / e_plain).nan_to_num(1.0)
    # One common factor restores the mean; the emphasised tokens get 1.21 on top.
    common = ratio[0].median()
    others = [i for i in range(ratio.shape[0]) if i not in red]
    torch.testing.assert_close(ratio[others], torch.full_like(ratio[others], common.item()))
    torch.testing.assert_close(ratio[red], torch.full_like(ratio[red], 1.21 * common.item()))
    # And it reaches the image.
    a, b = render(renderer, make_rows(["red car, city street", "((red)) car, city street"], [3, 3]))
    assert a["image"]["bytes"] != b["image"]["bytes"]


def test_long_prompt_uses_several_chunks_and_is_not_cut(renderer):
    tok = renderer.pipe.tokenizer
    full = tok(LONG, add_special_tokens=False)["input_ids"]
    assert len(full) > 2 * CHUNK_TOKENS
    chunks = tokenize_chunks(tok, LONG)
    assert len(chunks.ids) == 3 and all(len(c) == CHUNK_TOKENS + 2 for c in chunks.ids)
    kept = [i for c in chunks.ids for i in c[1:-1] if i != tok.pad_token_id]
    assert kept == [i for i in full if i != tok.pad_token_id]  # every token, in order
    # Chunks break after a comma rather than mid-phrase.
    comma = tok.convert_tokens_to_ids(",</w>")
    first = [i for i in chunks.ids[0][1:-1] if i != tok.pad_token_id]
    assert first[-1] == comma

    changed_tail = LONG.replace("oil painting", "pixel art")
    out = render(renderer, make_rows([LONG, changed_tail, "short"], [7, 7, 7]))
    metas = [__import__("json").loads(r["meta"]) for r in out]
    assert [m["prompt_chunks"] for m in metas] == [3, 3, 1]
    # The last words (past token 150) still change the image: nothing was cut.
    assert out[0]["image"]["bytes"] != out[1]["image"]["bytes"]


def test_nan_image_becomes_reject(renderer):
    # NaN text embeddings for prompts that mention "giraffe" -> NaN latents -> NaN image.
    target = set(renderer.pipe.tokenizer("giraffe", add_special_tokens=False)["input_ids"])

    def poison(module, args, kwargs, output):
        ids = args[0] if args else kwargs["input_ids"]
        hit = torch.tensor([target <= set(r.tolist()) for r in ids])
        output.last_hidden_state[hit] = float("nan")

    handle = renderer.pipe.text_encoder.register_forward_hook(poison, with_kwargs=True)
    try:
        out = render(renderer, make_rows(["red car", "a giraffe in a corridor", "green tree"]))
    finally:
        handle.remove()
    assert out[1]["reject_stage"] == "render" and out[1]["reject_reason"] == "nan_image"
    assert out[1]["image"] is None
    assert out[0]["reject_stage"] is None and out[0]["image"]["bytes"]
    assert out[2]["reject_stage"] is None and out[2]["image"]["bytes"]


def test_rejected_and_invalid_rows(renderer):
    rows = make_rows(["red car", "blue cat", "", "tree"])
    reject(rows[0], "prompt", "malformed", "raw text")
    rows[3]["seed"] = None
    out = render(renderer, rows)
    assert out[0]["reject_reason"] == "malformed" and out[0]["image"] is None  # untouched
    assert out[1]["image"]["bytes"]
    assert (out[2]["reject_stage"], out[2]["reject_reason"]) == ("render", "empty_prompt")
    assert out[3]["reject_reason"] == "missing_seed"


@pytest.mark.parametrize("fmt,ext", [("png", "png"), ("jpeg", "jpg"), ("webp", "webp")])
def test_image_formats_decode(renderer, cfg, fmt, ext):
    renderer.cfg = cfg.model_copy(update={"image_format": fmt, "image_quality": 90})
    try:
        row = render(renderer, make_rows(["a red car"]))[0]
    finally:
        renderer.cfg = cfg
    img = Image.open(io.BytesIO(row["image"]["bytes"]))
    assert img.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
    assert img.size == (64, 64) and row["image"]["path"].endswith(f".{ext}")
    pixels = torch.randint(0, 255, (8, 8, 3), dtype=torch.uint8).numpy()
    back = Image.open(io.BytesIO(encode_image(pixels, fmt, 100)))
    assert back.size == (8, 8)


def test_bad_model_fails_fast(tmp_path, monkeypatch):
    import socket

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    dialled = []  # fast means from local files alone: no name looked up, no connection

    def refuse(*args, **kwargs):
        dialled.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(ModelError, match="no such folder"):
        check_render_model(RenderConfig(model=str(tmp_path / "missing" / "sd")))
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        check_render_model(RenderConfig(model="nobody-here/no-such-model"))
    with pytest.raises(ModelError, match="no model_index.json"):
        check_render_model(RenderConfig(model=str(tmp_path)))
    with pytest.raises(ModelError):
        Renderer(RenderConfig(model="nobody-here/no-such-model", device="cpu"))
    assert not dialled


def test_scheduler_and_emphasis_off(cfg):
    with pytest.raises(ConfigError, match="not a diffusers scheduler"):
        check_render_model(cfg.model_copy(update={"scheduler": "NoSuchScheduler"}))
    other = Renderer(
        cfg.model_copy(update={"scheduler": "DPMSolverMultistepScheduler", "emphasis": False})
    )
    assert type(other.pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    tok = other.pipe.tokenizer
    literal = tok("((red)) car", add_special_tokens=False)["input_ids"]
    assert other._tokenize(tok, "((red)) car").ids[0][1 : 1 + len(literal)] == literal
    row = render(other, make_rows(["((red)) car"]))[0]
    assert '"scheduler": "DPMSolverMultistepScheduler"' in row["meta"]


def build_tiny_sdxl(path, tokenizer_dir):
    """A tiny SDXL-layout pipeline: two CLIP text encoders, pooled + time conditioning."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from raypipe.tiny import build_clip_tokenizer, tiny_clip_text_config

    tok = build_clip_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    text_config = tiny_clip_text_config(len(tok))
    pipe = StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(
            block_out_channels=(16, 32),
            layers_per_block=1,
            sample_size=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 32,
            cross_attention_dim=64,  # both encoders' hidden states side by side
            norm_num_groups=8,
        ),
        vae=AutoencoderKL(
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8,
            sample_size=64,
        ),
        text_encoder=CLIPTextModel(text_config),
        text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=tok,
        tokenizer_2=tok,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        ),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def test_sdxl_layout_renders_long_and_plain_prompts(renderer, tmp_path):
    import numpy as np

    model = build_tiny_sdxl(tmp_path / "sdxl", tmp_path / "tok")
    cfg = RenderConfig(model=str(model), width=64, height=64, steps=2, guidance_scale=5.0)
    sdxl = Renderer(cfg)
    assert sdxl.dual
    out = render(sdxl, make_rows(["((red)) car", LONG, "blue sky"], [1, 2, 3]))
    assert all(r["reject_stage"] is None for r in out)
    assert [__import__("json").loads(r["meta"])["prompt_chunks"] for r in out] == [1, 3, 1]
    # A plain prompt gives exactly what diffusers' own prompt encoding gives
    # (empty negative prompt -> zero embeddings, as SDXL configures).
    ref = sdxl.pipe(
        "blue sky",
        num_inference_steps=2,
        guidance_scale=5.0,
        width=64,
        height=64,
        generator=[torch.Generator().manual_seed(3)],
        output_type="np",
    ).images[0]
    mine = np.asarray(Image.open(io.BytesIO(out[2]["image"]["bytes"])), dtype=np.int64)
    assert np.array_equal(mine, (ref * 255).round().astype(np.int64))


def test_pipeline_safety_checker_never_blacks_out_images(cfg, tmp_path):
    import numpy as np

    from raypipe.tiny import build_tiny_safety_checker, build_tiny_sd

    # A pipeline shipped with a checker that flags every image: had the render stage run
    # it, every image would come back black.
    checker = build_tiny_safety_checker(tmp_path / "checker", concept_threshold=-2.0)
    model = build_tiny_sd(tmp_path / "sd", safety_checker=checker)
    with_checker = Renderer(cfg.model_copy(update={"model": str(model)}))
    assert with_checker.pipe.safety_checker is None
    out = render(with_checker, make_rows(["((red)) car", "a blue cat"]))
    for row in out:
        assert row["reject_stage"] is None
        pixels = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])))
        assert pixels.std() > 2 and pixels.mean() > 8


def _pixels(row):
    import numpy as np

    return np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])), dtype=np.int64)


@pytest.mark.parametrize("invariant", ["on", "off"])
def test_rows_of_different_chunk_counts_share_one_full_call(renderer, cfg, invariant):
    """A long prompt (3 chunks) and short ones (1) render in one pipeline call: each row
    attends to its own tokens only, so it renders as it does alone (bit for bit when
    batch-invariant; off, within the rounding of a different batch)."""
    r = renderer if invariant == "on" else Renderer(cfg.model_copy(update={"batch_invariant": "off"}))
    assert r.invariant == (invariant == "on")
    prompts, seeds = ["a blue cat", LONG, "tree", "red bus"], [3, 4, 5, 6]
    mixed = render(r, make_rows(prompts, seeds))
    metas = [__import__("json").loads(row["meta"]) for row in mixed]
    assert [m["prompt_chunks"] for m in metas] == [1, 3, 1, 1]
    assert [m["render_call_rows"] for m in metas] == [4, 4, 4, 4]  # one call, full
    for i in (0, 1):
        alone = render(r, make_rows([prompts[i]], [seeds[i]]))[0]
        if invariant == "on":
            assert mixed[i]["image"]["bytes"] == alone["image"]["bytes"], prompts[i]
        else:
            diff = abs(_pixels(mixed[i]) - _pixels(alone))
            assert diff.max() <= 2 and diff.mean() < 0.05, (prompts[i], diff.max(), diff.mean())
