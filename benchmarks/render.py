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

The passes alternate, bare first (:func:`common.alternate`), with Ray up (and idle)
during the bare passes too, so the machine's load and Ray's own processes fall on both
sides; pipeline_ips and bare_ips are over all passes of a side (``*_by_pass``: each).
Ray's workers run at the bare loop's niceness, 0 (``--ray-niceness``; Ray's own default
is 15, which on a busy CPU machine measures the load rather than the stage).

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
import tempfile
import time
from pathlib import Path

import common
import pyarrow as pa
import pyarrow.parquet as pq
from common_sd import build_real_size_sd15, sd15_mfu

from raypipe.generate.config import RenderConfig
from raypipe.generate.render import EXTENSIONS, Renderer, check_render_model
from raypipe.models import resolve_device, resolve_dtype
from raypipe.schema import WORK_SCHEMA, row_seed, rows_to_table, update_meta

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


def ray_pipeline(cfg: RenderConfig, rows: list[dict], out: Path):
    import ray

    from raypipe.generate.render import add_render

    # One batch per block: the stage renders whole blocks (it has no Ray Data batch
    # size, see raypipe.stage), cfg.batch_size images per pipeline call.
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
    p.add_argument("--batch-invariant", default="off", choices=["auto", "on", "off"])
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA)")
    common.add_pass_args(p, smoke="4 images, 1 step: seconds", what="Renderer")
    args = p.parse_args(argv)
    common.bench_env(args.ray_niceness)
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
    have_ray = common.ray_wanted(args.no_ray)
    how = "ray-data" if have_ray else "in-process" + ("" if args.no_ray else " (ray not installed)")

    def pipeline(i: int):
        out = work / f"pipeline-{i}"
        out.mkdir(parents=True)
        return (ray_pipeline if have_ray else in_process)(cfg, rows, out)

    try:
        if have_ray:  # up (and idle) during the bare passes too
            common.start_ray(threads + 1)  # the actor's CPUs + one for reading and writing
        bare_passes, pipe_passes = common.alternate(
            lambda: bare_loop(cfg, model, rows, work), pipeline, args.rounds
        )
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
        "ray_worker_niceness": common.niceness(have_ray),
        "torch": torch.__version__,
    }
    if device == "cuda":
        result.update(sd15_mfu(cfg, model, pipeline_ips))
        result["bare_mfu"] = (
            round(result["mfu"] * bare_ips / pipeline_ips, 4) if result.get("mfu") else None
        )
    return common.emit(result)


if __name__ == "__main__":
    main()
