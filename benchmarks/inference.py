"""Inference throughput: raypipe's Ray Data actor pool vs a bare ``generate`` loop.

    python benchmarks/inference.py                   # CPU: tiny LLaVA, 1024 items, batch 8
    python benchmarks/inference.py --smoke-test      # a few items, both paths, seconds
    python benchmarks/inference.py --real-size-llava15 --items 512 --batch-size 32 --no-ray
                                                     # one CUDA GPU: random-weight LLaVA-1.5-7B

Both paths answer the same items (noisy colour squares, wh, yes/no and either-or
questions) with the same model and batches, greedily, up to ``--max-new-tokens`` tokens,
through the chat template; ``same_predictions`` compares their answers item by item.
The random LLaVA-1.5-7B (fp16, 14 GB) is built once into $RAYPIPE_BENCH_DIR (or the temp
folder).

(a) pipeline: ``predict_local``, one ``LlavaPredictor`` actor of ``--threads`` threads
    (``--no-ray``: in-process, same blocks). Its window opens when the actor's first call
    ends (Ray start-up and model load left out, that call's rows not counted) and closes
    when ``predict_local`` returns its rows.
(b) bare: ``generate`` on left-padded batches, ``batch_decode``; one warm-up batch untimed.

The passes alternate, bare first (:func:`common.alternate`; Ray up and idle during the bare
ones, its workers at niceness 0: ``--ray-niceness``). The last line printed is one JSON
object: pipeline_items_per_s, bare_items_per_s (all passes; ``*_by_pass``: each), ratio =
pipeline / bare (target >= 0.9), the settings; on CUDA also items_per_s and the GPU.
"""

from __future__ import annotations

import io
import time

import common
import pyarrow as pa
from common_llava import build_real_size_llava15, make_items

import raypipe.evaluate.predict_local as pl
from raypipe.evaluate.inference import check_local_model


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
                pl.vision_messages(r["question"]), add_generation_prompt=True, tokenize=False
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
        t, warm, done = common.timed_batches(
            self.run, items.to_pylist(), self.batch_size, self.device
        )
        return t, len(done), warm + done


class TimedPredictor(pl.LlavaPredictor):
    """The inference stage, stamping each call's end time into its rows."""

    def process(self, batch: pa.Table) -> pa.Table:
        out = super().process(batch)
        return out.append_column("bench_end", pa.array([time.time()] * out.num_rows))


def timed_rows(rows: list[dict], closed_at: float) -> tuple[float, int, list[dict]]:
    """A pass's window (:func:`common.window`): (seconds, timed rows, those rows)."""
    seconds, timed = common.window([r["bench_end"] for r in rows], closed_at)
    rows = [r for r, t in zip(rows, timed) if t]
    return seconds, len(rows), rows


def make_pipeline(folder: str, items: pa.Table, args, device: str, threads: int, ray: bool):
    """The raypipe path's pass, as :func:`timed_rows`: one predict_local call (a
    fresh actor pool each), or the predictor called in-process on its blocks."""
    kw = dict(
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        device=device,
        dtype=args.dtype,
        threads=threads,
    )
    if ray:
        cpus = 1.0 if device == "cuda" else float(threads)

        def ray_pass(_: int):
            rows = pl.predict_local(
                items, folder, "bench", num_cpus=cpus, stage=TimedPredictor, **kw
            )
            return timed_rows(rows, time.time())

        return ray_pass
    stage = TimedPredictor(folder, "bench", **kw)

    def in_process(_: int):
        step = pl.block_rows(items.num_rows, stage.batch_size)
        parts = [stage(items.slice(s, step)) for s in range(0, items.num_rows, step)]
        return timed_rows(pa.concat_tables(parts).to_pylist(), time.time())

    return in_process


def main(argv: list[str] | None = None) -> dict:
    p = common.parser(__doc__)
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

    device, threads = common.torch_device(args.threads)
    if args.real_size_llava15:
        folder = str(build_real_size_llava15(common.bench_dir() / "raypipe-llava15-7b-random"))
    else:
        folder = str(check_local_model(args.model))
    items = make_items(args.items + args.batch_size)  # + one warm-up batch
    have_ray = common.ray_wanted(args.no_ray)
    dtype = pl.model_dtype(args.dtype, device)
    bare = BareLoop(folder, args.batch_size, args.max_new_tokens, device, dtype)
    pipeline = make_pipeline(folder, items, args, device, threads, have_ray)
    with common.ray_up(have_ray, threads + 1, 1 if device == "cuda" else 0):  # + one for Ray Data
        bare_passes, pipe_passes = common.alternate(
            lambda: bare.timed_pass(items), pipeline, args.rounds
        )
    pipe_rows = [r for _, _, rows in pipe_passes for r in rows]
    figures, pipeline_ips, _ = common.pass_figures(
        "items", "items_per_s", pipe_passes, bare_passes, args.rounds
    )
    # Ray Data may run any block first: the pipeline's untimed call need not hold the
    # bare loop's warm-up batch, so answers are compared by item over every row.
    bare_answers = {r["id"]: r["prediction"] for r in bare_passes[0][2]}
    same = all(bare_answers.get(r["id"]) == r["prediction"] for r in pipe_rows)
    tokens = sum(r["completion_tokens"] for r in pipe_rows) / max(1, len(pipe_rows))
    result = {
        **figures,
        "same_predictions": same,
        "completion_tokens_per_item": round(tokens, 2),
        "device": device,
        "pipeline": common.pipeline_name(have_ray, args.no_ray),
        "model": "random-weight LLaVA-1.5-7B" if args.real_size_llava15 else args.model,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "dtype": str(dtype).removeprefix("torch."),
        **common.run_settings(device, threads, have_ray),
    }
    if device == "cuda":
        import torch

        result.update(gpu=torch.cuda.get_device_name(), items_per_s=round(pipeline_ips, 3))
    return common.emit(result)


if __name__ == "__main__":
    main()
