"""Inference throughput: raypipe's Ray Data actor pool vs a bare ``generate`` loop.

    python benchmarks/inference.py                   # CPU: tiny LLaVA, 1024 items, batch 8
    python benchmarks/inference.py --smoke-test      # a few items, both paths, seconds
    python benchmarks/inference.py --real-size-llava15 --items 512 --batch-size 32 --no-ray
                                                     # one CUDA GPU: random-weight LLaVA-1.5-7B

The random LLaVA-1.5-7B (fp16, about 14 GB) is built once into $RAYPIPE_BENCH_DIR
(default the temp folder).

Both paths answer the same items (noisy colour squares with wh, yes/no and either-or
questions) with the same model, in the same batches of ``--batch-size``, greedily, for at
most ``--max-new-tokens`` tokens, through the model's chat template, and end with one
prediction dict per item. The random-weight models seldom stop early, so both decode
about ``--max-new-tokens`` tokens per item; their answers are compared item by item
(``same_predictions``).

(a) pipeline: :func:`raypipe.evaluate.predict_local.predict_local` with one
    :class:`LlavaPredictor` actor of ``--threads`` torch threads (and as many CPUs
    reserved); items go in as :func:`predict_local` blocks them (up to four batches a
    block). Ray is started once; each pass is one ``predict_local`` call, with its own
    actor pool. Ray start-up and the actor's model load are outside the timed window:
    each model call stamps its end time into its rows, the window opens when the
    actor's first call (the first block) ends and closes when ``predict_local`` returns
    its rows; the rows of that first call are not counted. So the window holds every
    later block's scheduling, transfer, preprocessing, generation and decoding, and the
    gathering of every row in the items' order; with the default 1024 items that last
    fixed cost (tens of milliseconds) is under 1% of it. With ``--no-ray`` the
    predictor is called in-process on the same blocks instead.
(b) bare: ``LlavaForConditionalGeneration.generate`` on left-padded batches from
    ``processor(images, texts)``, decoded with ``batch_decode``, one warm-up batch
    first, untimed; ``--threads`` torch threads; the model loaded once, in the driver.

The passes alternate, bare first (:func:`common.alternate`; the bare passes run while
Ray is up and idle). Each side's figure is its items over its timed seconds, all passes
together (``*_by_pass``: each). Ray's workers run at the bare loop's niceness, 0
(``--ray-niceness``; Ray's own default is 15).

The last line printed is one JSON object: items (timed, per path),
pipeline_items_per_s, bare_items_per_s, ratio (= pipeline / bare), and the settings; on
CUDA also items_per_s (the pipeline's) and the GPU's name.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import common
import pyarrow as pa
from common_models import build_real_size_llava15

from raypipe.evaluate.inference import check_local_model
from raypipe.evaluate.items import items_to_table
from raypipe.evaluate.predict_local import (
    LlavaPredictor,
    block_rows,
    model_dtype,
    predict_local,
    vision_messages,
)

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
}


def make_items(n: int, size: int = 32) -> pa.Table:
    """``n`` benchmark items: a noisy colour square each, and a question about it."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    names = sorted(COLOURS)
    rows = []
    for i in range(n):
        colour, other = names[i % len(names)], names[(i + 1) % len(names)]
        noise = rng.integers(-12, 13, size=(size, size, 3))
        pixels = np.clip(np.array(COLOURS[colour]) + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        kind = ("wh", "yes_no", "either_or")[i % 3]
        question, keywords = {
            "wh": ("What colour is the square?", [colour]),
            "yes_no": (f"Is the square {other}?", ["no"]),
            "either_or": (f"Is the square {colour} or {other}?", [colour]),
        }[kind]
        rows.append(
            {
                "id": f"bench-color-{i:06d}",
                "benchmark": "synthetic",
                "ability": "color",
                "image": buf.getvalue(),
                "question": question,
                "question_type": kind,
                "answer_keywords": keywords,
            }
        )
    return items_to_table(rows)


# ---------------------------------------------------------------------------------------
# (b) the bare loop
# ---------------------------------------------------------------------------------------


class BareLoop:
    """Plain transformers: the model and processor loaded once, then timed passes."""

    def __init__(self, folder: str, batch_size: int, max_new_tokens: int, device: str, dtype):
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(folder)
        self.processor.tokenizer.padding_side = "left"
        self.model = LlavaForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, use_safetensors=True
        ).to(device)
        self.model.eval()
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.device, self.dtype = device, dtype

    def run(self, batch: list[dict]) -> list[dict]:
        import torch
        from PIL import Image

        processor = self.processor
        texts = [
            processor.apply_chat_template(
                vision_messages(r["question"]), add_generation_prompt=True, tokenize=False
            )
            for r in batch
        ]
        images = [Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB") for r in batch]
        enc = processor(
            images=images, text=texts, padding=True, return_tensors="pt", add_special_tokens=False
        ).to(self.device)
        enc["pixel_values"] = enc["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model.generate(
                **enc, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1
            )
        answers = processor.batch_decode(
            out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )
        keep = ("id", "ability", "question", "question_type", "answer_keywords")
        return [
            {**{k: r[k] for k in keep}, "prediction": a.strip()} for r, a in zip(batch, answers)
        ]

    def timed_pass(self, items: pa.Table) -> tuple[float, int, list[dict]]:
        """(seconds, timed rows, every row): one warm-up batch first, untimed."""
        import torch

        rows, b = items.to_pylist(), self.batch_size
        warm = self.run(rows[:b])
        if self.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        done = []
        for start in range(b, len(rows), b):
            done += self.run(rows[start : start + b])
        return time.perf_counter() - t0, len(done), warm + done


# ---------------------------------------------------------------------------------------
# (a) the actor pool
# ---------------------------------------------------------------------------------------


class TimedPredictor(LlavaPredictor):
    """The inference stage, stamping each call's end time into its rows."""

    def process(self, batch: pa.Table) -> pa.Table:
        out = super().process(batch)
        return out.append_column("bench_end", pa.array([time.time()] * out.num_rows))


def window(rows: list[dict], closed_at: float) -> tuple[float, list[dict]]:
    """(seconds, timed rows) from the first call's end to ``closed_at``."""
    first = min(r["bench_end"] for r in rows)
    return closed_at - first, [r for r in rows if r["bench_end"] > first]


def ray_pipeline(folder: str, items: pa.Table, args, device: str, threads: int):
    """One predict_local call (a fresh actor pool): (window seconds, timed rows)."""
    rows = predict_local(
        items,
        folder,
        "bench",
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        device=device,
        dtype=args.dtype,
        num_cpus=1.0 if device == "cuda" else float(threads),
        threads=threads,
        stage=TimedPredictor,
    )
    return window(rows, time.time())


class InProcess:
    """The predictor called in-process on predict_local's blocks (``--no-ray``)."""

    def __init__(self, folder: str, args, device: str, threads: int):
        self.stage = TimedPredictor(
            folder,
            "bench",
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            device=device,
            dtype=args.dtype,
            threads=threads,
        )

    def __call__(self, items: pa.Table) -> tuple[float, list[dict]]:
        step = block_rows(items.num_rows, self.stage.batch_size)
        parts = [self.stage(items.slice(s, step)) for s in range(0, items.num_rows, step)]
        return window(pa.concat_tables(parts).to_pylist(), time.time())


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="raypipe-tiny/tiny-llava", help="LLaVA folder or tiny id")
    p.add_argument("--real-size-llava15", action="store_true", help="random LLaVA-1.5-7B, fp16")
    p.add_argument("--items", type=int, default=1024, help="items per path")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    common.add_pass_args(p, smoke="8 items, 4 tokens: seconds", what="predictor")
    args = p.parse_args(argv)
    common.bench_env(args.ray_niceness)
    if args.smoke_test:
        args.items, args.batch_size, args.max_new_tokens, args.rounds = 8, 4, 4, 1

    import torch

    from raypipe.models import resolve_device

    device = resolve_device("auto", field="device")
    threads = args.threads or 1
    if device == "cpu":
        torch.set_num_threads(threads)
    if args.real_size_llava15:
        # Kept between runs (about 14 GB): building it takes longer than a benchmark run.
        cache = Path(os.environ.get("RAYPIPE_BENCH_DIR", tempfile.gettempdir()))
        folder = str(build_real_size_llava15(cache / "raypipe-llava15-7b-random"))
    else:
        folder = str(check_local_model(args.model))
    items = make_items(args.items + args.batch_size)  # + one warm-up batch
    have_ray = common.ray_wanted(args.no_ray)
    dtype = model_dtype(args.dtype, device)
    bare = BareLoop(folder, args.batch_size, args.max_new_tokens, device, dtype)
    if have_ray:
        common.start_ray(threads + 1, 1 if device == "cuda" else 0)  # + one for Ray Data
        how = "ray-data"

        def pipeline(_: int):
            return ray_pipeline(folder, items, args, device, threads)
    else:
        in_process = InProcess(folder, args, device, threads)
        how = "in-process" + ("" if args.no_ray else " (ray not installed)")

        def pipeline(_: int):
            return in_process(items)

    try:
        bare_passes, pipe_passes = common.alternate(
            lambda: bare.timed_pass(items), pipeline, args.rounds
        )
    finally:
        if have_ray:
            import ray

            ray.shutdown()
    pipe_rows = [r for _, rows in pipe_passes for r in rows]
    pipe_s = sum(t for t, _ in pipe_passes)
    bare_n, bare_s = sum(n for _, n, _ in bare_passes), sum(t for t, _, _ in bare_passes)
    pipeline_ips, bare_ips = len(pipe_rows) / pipe_s, bare_n / bare_s
    # Ray Data may run any block first: the pipeline's untimed call need not hold the
    # bare loop's warm-up batch, so answers are compared by item over every row.
    bare_answers = {r["id"]: r["prediction"] for r in bare_passes[0][2]}
    same = all(bare_answers.get(r["id"]) == r["prediction"] for r in pipe_rows)
    tokens = sum(r["completion_tokens"] for r in pipe_rows) / max(1, len(pipe_rows))
    result = {
        "items": len(pipe_rows),
        "bare_items": bare_n,
        "pipeline_items_per_s": round(pipeline_ips, 3),
        "bare_items_per_s": round(bare_ips, 3),
        "ratio": round(pipeline_ips / bare_ips, 3),
        "rounds": args.rounds,
        "pipeline_items_per_s_by_pass": [round(len(r) / t, 3) for t, r in pipe_passes],
        "bare_items_per_s_by_pass": [round(n / t, 3) for t, n, _ in bare_passes],
        "same_predictions": same,
        "completion_tokens_per_item": round(tokens, 2),
        "device": device,
        "pipeline": how,
        "model": "random-weight LLaVA-1.5-7B" if args.real_size_llava15 else args.model,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": threads if device == "cpu" else None,
        "ray_worker_niceness": common.niceness(have_ray),
        "torch": torch.__version__,
    }
    if device == "cuda":
        result.update(gpu=torch.cuda.get_device_name(), items_per_s=round(pipeline_ips, 3))
    return common.emit(result)


if __name__ == "__main__":
    main()
