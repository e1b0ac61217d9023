"""Render throughput: raypipe's Ray Data render stage vs a bare diffusers loop.

    python benchmarks/render.py                    # CPU: tiny SD, 64 images at 64 px
    python benchmarks/render.py --smoke-test       # a few images, both paths, seconds
    python benchmarks/render.py --real-size-sd15 --images 64 --batch-size 16 --steps 20
                                                   # one CUDA GPU: random-weight SD 1.5, fp16, 512 px
    python benchmarks/render.py --no-ray ...       # no Ray: the Renderer class in-process

The random SD 1.5 is built once into $RAYPIPE_BENCH_DIR (default the temp folder).

Both paths render the same prompts with the same model, per-row seeds, batch size,
steps, guidance and image encoding, and write the images to Parquet.

(a) pipeline: ``ray.data.from_items(rows)`` in blocks of one batch each -> ``add_render``
    (one Renderer actor) -> ``write_parquet``. Ray start-up and the actor's model load are outside the timed
    window: each render call stamps its end time into the row's meta, the window opens
    when the actor's first call (the warm-up batch) ends and closes when
    ``write_parquet`` returns; the rows of that first call are not counted. So the
    window holds every later batch's scheduling, transfer, render, encode and the
    Parquet write. With ``--no-ray`` (or when Ray is not installed) the Renderer is
    called in-process on the same batches instead.
(b) bare: ``AutoPipelineForText2Image`` called on batches of prompt strings with a
    list of per-row generators, PNG/JPEG/WebP encoding with Pillow, one Parquet file
    written at the end; one warm-up batch first, untimed.

The passes alternate, bare first: bare, then ``--rounds`` times (pipeline, bare), with
Ray up (and idle) during the bare passes too, so a change in the machine's load and
Ray's own processes fall on both sides; pipeline_ips and bare_ips are over
all passes of a side (``*_by_pass`` gives each one). A single pass of each, one after
the other, gave ratios from 0.75 to 1.09 in three runs on an idle 2-core machine.

Ray starts its workers at niceness 15 by default (``RAY_worker_niceness``): on a CPU
machine busy with other work the render actor then gets less CPU time than the bare
loop in the driver, and the ratio measures the machine's load rather than the stage.
The benchmark starts Ray's workers at the bare loop's niceness, 0 (``--ray-niceness``;
``RAY_worker_niceness`` in the environment wins); ``--ray-niceness 15`` measures Ray's
default. (On a GPU the denoising runs on the device, where niceness does not reach.)

The last line printed is one JSON object: images (timed, per path), pipeline_ips,
bare_ips, ratio (= pipeline / bare), device; on CUDA also images_per_s (the
pipeline's) and mfu, from the published costs for SD 1.5 (about 803 GFLOP per UNet
call at 512 px, x2 with classifier-free guidance, plus about 2.5 TFLOP per VAE
decode, scaled by H*W/512^2) over the GPU's dense fp16/bf16 peak. mfu is given only
for SD 1.5-shaped UNets (the tiny model's FLOPs are not those).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from raypipe.generate.config import RenderConfig  # noqa: E402
from raypipe.generate.render import (  # noqa: E402
    EXTENSIONS,
    Renderer,
    check_render_model,
)
from raypipe.models import resolve_device, resolve_dtype  # noqa: E402
from raypipe.schema import WORK_SCHEMA, row_seed, rows_to_table, update_meta  # noqa: E402

#: Dense fp16/bf16 tensor-core peak, FLOP/s, by a substring of the GPU name.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "L4": 121e12,
    "V100": 125e12,
    "T4": 65e12,
}
SD15_UNET_FLOPS_512 = 803e9
SD15_VAE_DECODE_FLOPS_512 = 2.5e12

SUBJECTS = ["vintage car", "golden retriever", "bowl of ramen", "firefighter", "sunflower"]
COLOURS = ["crimson", "teal", "golden", "olive", "navy", "beige", "maroon", "silver"]


def make_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        sid = f"bench-s0-{i:07d}"
        colour, subject = COLOURS[i % len(COLOURS)], SUBJECTS[i % len(SUBJECTS)]
        prompt = f"(({colour})) {subject}, city street, realistic, dramatic lighting, 8k"
        rows.append(
            {
                "id": sid,
                "ability": "color",
                "prompt": prompt,
                "seed": row_seed(sid),
                "negative_prompt": "",
            }
        )
    return rows


def build_real_size_sd15(path: Path) -> Path:
    """Random-weight SD 1.5 from its published config, saved in fp16 (no download).

    The text encoder is CLIP ViT-L/14's (49408 vocab); the tokenizer is raypipe's small
    offline one, whose ids all fall inside that vocabulary: fine for timing.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from raypipe.tiny import build_clip_tokenizer

    if (path / ".complete").exists():
        return path
    tokenizer = build_clip_tokenizer(path / "_tokenizer_build")
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # random init on the GPU: seconds instead of a minute
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                projection_dim=768,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        unet=unet.half(),
        vae=vae.half(),
        text_encoder=text_encoder.half(),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    (path / ".complete").write_text("ok\n")
    return path


# ---------------------------------------------------------------------------------------
# (b) the bare loop
# ---------------------------------------------------------------------------------------


def bare_loop(cfg: RenderConfig, model: str, rows: list[dict], out: Path) -> tuple[float, int]:
    """Plain diffusers + Pillow + pyarrow; returns (seconds for the timed rows, rows)."""
    import diffusers
    import torch
    from diffusers import AutoPipelineForText2Image
    from PIL import Image

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    new_kw = hasattr(diffusers.utils.deprecation_utils, "_resolve_dtype")
    kw = {"dtype": dtype} if new_kw else {"torch_dtype": dtype}
    pipe = AutoPipelineForText2Image.from_pretrained(model, use_safetensors=True, **kw)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if device == "cuda" and cfg.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    fmt = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[cfg.image_format]
    save_kw = {"compress_level": 1} if fmt == "PNG" else {"quality": cfg.image_quality}

    def run(batch_rows: list[dict]) -> list[dict]:
        images = pipe(
            [r["prompt"] for r in batch_rows],
            negative_prompt=[cfg.negative_prompt] * len(batch_rows)
            if cfg.guidance_scale > 1
            else None,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            width=cfg.width,
            height=cfg.height,
            generator=[torch.Generator("cpu").manual_seed(r["seed"]) for r in batch_rows],
            output_type="np",
        ).images
        done = []
        for r, px in zip(batch_rows, images):
            buf = io.BytesIO()
            Image.fromarray((px * 255).round().astype("uint8")).save(buf, format=fmt, **save_kw)
            image = {"bytes": buf.getvalue(), "path": f"{r['id']}.{EXTENSIONS[cfg.image_format]}"}
            done.append({**r, "image": image})
        return done

    b = cfg.batch_size
    run(rows[:b])  # warm-up, untimed
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    done = []
    for start in range(b, len(rows), b):
        done += run(rows[start : start + b])
    pq.write_table(rows_to_table(done), out / "bare.parquet")
    return time.perf_counter() - t0, len(done)


# ---------------------------------------------------------------------------------------
# (a) the render stage
# ---------------------------------------------------------------------------------------


class TimedRenderer(Renderer):
    """The render stage, stamping each call's end time into the rows' meta."""

    def process(self, batch: pa.Table) -> pa.Table:
        rows = super().process(batch).to_pylist()
        end = time.time()
        for r in rows:
            update_meta(r, bench_end=end)
        return rows_to_table(rows)


def window(table: pa.Table, closed_at: float) -> tuple[float, int, int]:
    """(seconds, timed rows, rejected rows) from the first call's end to ``closed_at``."""
    ends = [json.loads(m)["bench_end"] for m in table.column("meta").to_pylist()]
    first = min(ends)
    timed = sum(1 for e in ends if e > first)
    rejected = sum(1 for s in table.column("reject_stage").to_pylist() if s)
    return closed_at - first, timed, rejected


def start_ray(threads: int) -> None:
    import ray

    ray.init(
        num_cpus=threads + 1,  # the actor's CPUs + one for reading and writing
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=tempfile.mkdtemp(prefix="rp-bench-", dir="/tmp"),
    )
    ray.data.DataContext.get_current().enable_progress_bars = False


def ray_pipeline(cfg: RenderConfig, rows: list[dict], out: Path):
    import ray

    from raypipe.generate.render import add_render

    # One batch per block: the stage renders whole blocks (it has no Ray Data batch
    # size, see raypipe.generate.stage), cfg.batch_size images per pipeline call.
    blocks = max(1, len(rows) // cfg.batch_size)
    ds = add_render(ray.data.from_items(rows, override_num_blocks=blocks), cfg, stage=TimedRenderer)
    ds.write_parquet(str(out / "pipeline"))
    closed = time.time()
    return window(pq.read_table(out / "pipeline", schema=WORK_SCHEMA), closed)


def in_process(cfg: RenderConfig, rows: list[dict], out: Path):
    stage = TimedRenderer(cfg)
    parts = []
    for start in range(0, len(rows), cfg.batch_size):
        parts.append(stage(rows_to_table(rows[start : start + cfg.batch_size])))
    table = pa.concat_tables(parts)
    pq.write_table(table, out / "in_process.parquet")
    return window(table, time.time())


# ---------------------------------------------------------------------------------------


def mfu_figures(cfg: RenderConfig, model: str, ips: float) -> dict:
    import torch

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    index = json.loads((Path(model) / "unet" / "config.json").read_text())
    sd15 = (
        tuple(index.get("block_out_channels", ())) == (320, 640, 1280, 1280)
        and index.get("cross_attention_dim") == 768
    )
    out = {"gpu": name, "peak_tflops": peak and peak / 1e12, "images_per_s": round(ips, 3)}
    if not (sd15 and peak):
        out["mfu"] = None
        return out
    scale = cfg.width * cfg.height / (512 * 512)
    guided = 2 if cfg.guidance_scale > 1 else 1
    flops = (cfg.steps * guided * SD15_UNET_FLOPS_512 + SD15_VAE_DECODE_FLOPS_512) * scale
    out.update(tflop_per_image=round(flops / 1e12, 2), mfu=round(ips * flops / peak, 4))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="raypipe-tiny/tiny-sd", help="hub id, folder or tiny id")
    p.add_argument("--real-size-sd15", action="store_true", help="random-weight SD 1.5, 512 px")
    p.add_argument("--images", type=int, default=64, help="timed images per path")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--size", type=int, help="width = height (default 64 tiny, 512 SD 1.5)")
    p.add_argument("--format", default="png", choices=["png", "jpeg", "webp"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    p.add_argument("--batch-invariant", default="off", choices=["auto", "on", "off"])
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA)")
    p.add_argument("--threads", type=int, help="CPU: torch threads per path (default 1)")
    p.add_argument("--no-ray", action="store_true", help="call the Renderer in-process")
    p.add_argument("--rounds", type=int, default=2, help="pipeline passes (bare: one more)")
    p.add_argument(
        "--ray-niceness", type=int, default=0, help="niceness of Ray's workers (Ray's own: 15)"
    )
    p.add_argument("--smoke-test", action="store_true", help="4 images, 1 step: seconds")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_worker_niceness", str(args.ray_niceness))
    if args.smoke_test:
        args.images, args.batch_size, args.steps, args.rounds = 4, 2, 1, 1

    import torch

    device = resolve_device("auto")
    threads = args.threads or 1
    if device == "cpu":
        torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="rp-bench-"))
    if args.real_size_sd15:
        # Kept between runs (about 2 GB): building it takes longer than a benchmark run.
        cache = Path(os.environ.get("RAYPIPE_BENCH_DIR", tempfile.gettempdir()))
        model = str(build_real_size_sd15(cache / "raypipe-sd15-random"))
        size = args.size or 512
    else:
        model = check_render_model(RenderConfig(model=args.model))
        size = args.size or (64 if args.model.startswith("raypipe-tiny/") else 512)
    cfg = RenderConfig(
        model=model,
        device=device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        batch_invariant=args.batch_invariant,
        steps=args.steps,
        guidance_scale=args.guidance,
        width=size,
        height=size,
        negative_prompt="blurry, low quality",
        image_format=args.format,
        compile=args.compile,
        cpus_per_actor=threads,
    )
    rows = make_rows(args.images + args.batch_size)  # + one warm-up batch
    try:
        import ray  # noqa: F401

        have_ray = not args.no_ray
    except ImportError:
        have_ray = False

    how = "ray-data" if have_ray else "in-process" + ("" if args.no_ray else " (ray not installed)")
    # Bare, then (pipeline, bare) x rounds, with Ray up (and idle) during the bare passes
    # too: a change in the machine's load, and Ray's own share of the CPU, fall on both
    # sides of the ratio.
    bare_passes, pipe_passes = [], []
    try:
        if have_ray:
            start_ray(threads)
        bare_passes.append(bare_loop(cfg, model, rows, work))
        for i in range(args.rounds):
            out = work / f"pipeline-{i}"
            out.mkdir(parents=True)
            if have_ray:
                pipe_passes.append(ray_pipeline(cfg, rows, out))
            else:
                pipe_passes.append(in_process(cfg, rows, out))
            bare_passes.append(bare_loop(cfg, model, rows, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if have_ray:
            import ray

            ray.shutdown()
    pipe_s, pipe_n = sum(t for t, _, _ in pipe_passes), sum(n for _, n, _ in pipe_passes)
    bare_s, bare_n = sum(t for t, _ in bare_passes), sum(n for _, n in bare_passes)
    rejected = sum(r for _, _, r in pipe_passes)
    pipeline_ips, bare_ips = pipe_n / pipe_s, bare_n / bare_s
    result = {
        "images": pipe_n,
        "bare_images": bare_n,
        "pipeline_ips": round(pipeline_ips, 3),
        "bare_ips": round(bare_ips, 3),
        "ratio": round(pipeline_ips / bare_ips, 3),
        "rounds": args.rounds,
        "pipeline_ips_by_pass": [round(n / t, 3) for t, n, _ in pipe_passes],
        "bare_ips_by_pass": [round(n / t, 3) for t, n in bare_passes],
        "device": device,
        "pipeline": how,
        "model": "random-weight SD 1.5" if args.real_size_sd15 else args.model,
        "size": size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "guidance": args.guidance,
        "dtype": str(resolve_dtype(cfg.dtype, device)).removeprefix("torch."),
        "batch_invariant": args.batch_invariant,
        "format": args.format,
        "rejected": rejected,
        "threads": threads if device == "cpu" else None,
        "ray_worker_niceness": int(os.environ["RAY_worker_niceness"]) if have_ray else None,
        "torch": torch.__version__,
    }
    if device == "cuda":
        result.update(mfu_figures(cfg, model, pipeline_ips))
        result["bare_mfu"] = (
            round(result["mfu"] * bare_ips / pipeline_ips, 4) if result.get("mfu") else None
        )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
