"""Render throughput: raypipe's Ray Data render stage vs a bare diffusers loop.

    python benchmarks/render.py                    # CPU: tiny SD, 64 images at 64 px
    python benchmarks/render.py --smoke-test       # a few images, both paths, seconds
    python benchmarks/render.py --real-size-sd15 --images 64 --batch-size 16 --steps 20
                                                   # one CUDA GPU: random-weight SD 1.5, fp16, 512 px
    python benchmarks/render.py --no-ray ...       # no Ray: the Renderer class in-process

Both paths render the same prompts with the same model, per-row seeds, batch size, steps,
guidance and image encoding, and write Parquet. The random SD 1.5 is built once into
$RAYPIPE_BENCH_DIR (or the temp folder).

(a) pipeline: ``ray.data.from_items`` (one batch a block) -> ``add_render`` (one Renderer
    actor) -> ``write_parquet``. Its window opens when the actor's first call ends (Ray
    start-up and model load left out, that call's rows not counted) and closes when
    ``write_parquet`` returns.
(b) bare: ``AutoPipelineForText2Image`` on batches of prompts with per-row generators,
    Pillow encoding, one Parquet file at the end; one warm-up batch untimed.

The passes alternate, bare first (:func:`common.alternate`; Ray up and idle during the bare
ones, its workers at niceness 0: ``--ray-niceness``). The last line printed is one JSON
object: images (timed, per path), pipeline_ips, bare_ips (all passes; ``*_by_pass``: each),
ratio = pipeline / bare (target >= 0.9; 0.95 on a GPU), device; on CUDA also images_per_s,
mfu and bare_mfu (SD 1.5-shaped UNets only; FLOPs and peaks in common_sd.py).
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import common
import pyarrow as pa
import pyarrow.parquet as pq
from common_sd import bare_pipeline, make_rows, render_model, sd15_mfu

from raypipe.generate.config import RenderConfig
from raypipe.generate.render import EXTENSIONS, Renderer
from raypipe.models import resolve_dtype
from raypipe.schema import WORK_SCHEMA, rows_to_table, update_meta


def bare_loop(cfg: RenderConfig, model: str, rows: list[dict], out: Path) -> tuple[float, int]:
    """Plain diffusers + Pillow + pyarrow; returns (seconds for the timed rows, rows)."""
    import torch
    from PIL import Image

    pipe, device = bare_pipeline(cfg, model)
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

    def finish(done: list[dict]) -> None:
        pq.write_table(rows_to_table(done), out / "bare.parquet")

    seconds, _, done = common.timed_batches(run, rows, cfg.batch_size, device, finish)
    return seconds, len(done)


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
    seconds, timed = common.window(ends, closed_at)
    return seconds, sum(timed), sum(1 for s in table.column("reject_stage").to_pylist() if s)


def pipeline_pass(cfg: RenderConfig, rows: list[dict], out: Path, have_ray: bool):
    """One pass of the raypipe path into ``out``: :func:`window` of its rows."""
    out.mkdir(parents=True)
    if not have_ray:  # the Renderer in-process, on the same batches
        stage, b = TimedRenderer(cfg), cfg.batch_size
        table = pa.concat_tables(
            [stage(rows_to_table(rows[s : s + b])) for s in range(0, len(rows), b)]
        )
        pq.write_table(table, out / "in_process.parquet")
        return window(table, time.time())
    import ray

    from raypipe.generate.render import add_render

    # One batch per block: the stage renders whole blocks (it has no Ray Data batch
    # size, see raypipe.stage), cfg.batch_size images per pipeline call.
    blocks = max(1, len(rows) // cfg.batch_size)
    ds = add_render(ray.data.from_items(rows, override_num_blocks=blocks), cfg, stage=TimedRenderer)
    ds.write_parquet(str(out / "pipeline"))
    closed = time.time()
    return window(pq.read_table(out / "pipeline", schema=WORK_SCHEMA), closed)


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
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

    device, threads = common.torch_device(args.threads)
    work = Path(tempfile.mkdtemp(prefix="rp-bench-"))
    model, size = render_model(args.real_size_sd15, args.model, args.size)
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
    try:  # the actor's CPUs + one for reading and writing
        with common.ray_up(have_ray, threads + 1):
            bare_passes, pipe_passes = common.alternate(
                lambda: bare_loop(cfg, model, rows, work),
                lambda i: pipeline_pass(cfg, rows, work / f"pipeline-{i}", have_ray),
                args.rounds,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures, pipeline_ips, bare_ips = common.pass_figures(
        "images", "ips", pipe_passes, bare_passes, args.rounds
    )
    result = {
        **figures,
        "device": device,
        "pipeline": common.pipeline_name(have_ray, args.no_ray),
        "model": "random-weight SD 1.5" if args.real_size_sd15 else args.model,
        "size": size,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "guidance": args.guidance,
        "dtype": str(resolve_dtype(cfg.dtype, device)).removeprefix("torch."),
        "batch_invariant": args.batch_invariant,
        "format": args.format,
        "rejected": sum(r for _, _, r in pipe_passes),
        **common.run_settings(device, threads, have_ray),
    }
    if device == "cuda":
        result.update(sd15_mfu(cfg, model, pipeline_ips))
        result["bare_mfu"] = (
            round(result["mfu"] * bare_ips / pipeline_ips, 4) if result.get("mfu") else None
        )
    return common.emit(result)


if __name__ == "__main__":
    main()
