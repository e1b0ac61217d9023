"""Training-step throughput: raypipe's Ray Train loop vs a bare single-process loop.

    python benchmarks/train_step.py                  # CPU: small LLaVA, 1 Ray worker vs bare
    python benchmarks/train_step.py --smoke-test     # tiny LLaVA, a few steps, both paths
    python benchmarks/train_step.py --gpu-real-size  # one CUDA GPU: CLIP ViT-L/14-336 + a
                                                     # Llama-7B-shaped LLM, bf16, MFU

Both paths train the same random-weight model (stage 2: projector + LLM, vision tower
frozen) with the same per-worker micro-batch, AdamW, gradient clipping and loss (summed
token losses over supervised tokens), sharded with FSDP2 by
``raypipe.train.parallel.parallelize_llava`` (one rank here):

(a) ray: ``raypipe.train.trainer.fit`` with one TorchTrainer worker (1 CPU) on fixture
    Parquet: the worker reads its rows (raypipe.train.shards), decodes, pads to square, tokenises
    and pads them (one step ahead in a thread), and trains. tokens/s is the loop's own:
    non-pad tokens over the wall time from the end of step 1 to the end of the last
    step (checkpoints off, one metrics report at the end). Ray start-up, the worker's
    start and the model build are outside it.
(b) bare: the same rows, in the same step order as the Ray path
    (``raypipe.train.shards``), encoded up front in this process, then the same steps in a
    plain loop over those tensors (no Ray, no data work in the timed window), timed the
    same way; torch gets as many threads as the Ray worker has CPUs (1).

On CPU the model is sized (Llama hidden 256, 4 layers; CLIP 2 layers, 16 patches) so a
step takes ~100+ ms rather than ~10 ms: the fixed costs a step always has (Ray Data
batches, collectives, logging) then don't dominate. The ratio is ray / bare.

``--gpu-real-size`` builds CLIP ViT-L/14-336's vision config (24 layers, 576 patches) and
a Llama-2-7B-shaped LLM (hidden 4096, FFN 11008, 32 heads, vocab 32064) with as many of
its 32 layers as fit the GPU next to fp32 master weights and AdamW state (16 bytes per
parameter; ``--llm-layers`` to choose), bf16 compute, activation checkpointing (unless
``--no-activation-checkpointing``). It runs the bare path only, on synthetic batches
(576 image tokens + text, ``--seq-len`` in all), and needs no Ray: one GPU is one
worker, and Ray's overhead is what the CPU run measures. MFU = model FLOPs (raypipe.train.flops: 6·N per trained token,
2·N per frozen vision patch, attention) / (seconds x peak); peak 989 TFLOP/s (H100/H200
bf16 dense).

The last line printed is one JSON object: ray_tokens_per_s, bare_tokens_per_s, ratio,
mfu (null on CPU) and the settings.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import common
import torch
from common_llava import (
    auto_llm_layers,
    build_cpu_model,
    build_llava15_train_model,
    synthetic_batch,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke-test", action="store_true", help="tiny model, 4 steps")
    p.add_argument("--gpu-real-size", action="store_true", help="CLIP-L/336 + Llama-7B shape")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per path")
    p.add_argument("--micro-batch", type=int, default=None, help="samples per step")
    p.add_argument("--llm-layers", type=int, default=None, help="GPU: LLM layers (auto)")
    p.add_argument("--seq-len", type=int, default=1024, help="GPU: tokens per sample")
    p.add_argument("--no-activation-checkpointing", action="store_true", help="GPU only")
    p.add_argument("--no-ray", action="store_true", help="bare path only")
    p.add_argument("--fused-adamw", action="store_true", help="GPU: fused AdamW kernel")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------
# The bare loop
# ---------------------------------------------------------------------------------------


def init_single_process_group(device: torch.device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        store = tempfile.mktemp(prefix="raypipe-pg-")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)


def bare_loop(
    model, batches, steps: int, lr: float, device: torch.device, fused: bool = False
) -> dict:
    """Steps over prepared micro-batches (one per step); timing from the end of step 1."""
    from raypipe.train.flops import flops_per_sample_parts, step_flops
    from raypipe.train.step import token_loss_sum

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, fused=fused or None)
    parts = flops_per_sample_parts(model)
    model.train()
    tokens = flops = 0.0
    start = None
    for step in range(steps):
        batch = {
            k: v.to(device, non_blocking=True) for k, v in batches[step % len(batches)].items()
        }
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).logits
        n = (batch["labels"][:, 1:] != -100).sum().clamp(min=1)
        (token_loss_sum(logits, batch["labels"]) / n).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step == 0:
            start = time.perf_counter()
            continue
        tokens += float(batch["attention_mask"].sum())
        flops += step_flops(parts, [batch])
    seconds = time.perf_counter() - start
    return {"tokens_per_s": tokens / seconds, "flops_per_s": flops / seconds, "seconds": seconds}


# ---------------------------------------------------------------------------------------
# CPU: Ray vs bare
# ---------------------------------------------------------------------------------------


def cpu_step_rows(parquet: Path, cfg) -> list[list[dict]]:
    """Each step's rows in the order the Ray path trains them (one worker: its reader
    sees the whole global batch), so both paths train the same batches, padding and all."""
    import math

    from raypipe.train.shards import ShardReader, build_index, rows_per_epoch

    index = build_index([str(parquet)])
    per_epoch = math.ceil(rows_per_epoch(index, cfg.seed, None) / cfg.global_batch_size)
    reader = ShardReader(
        index,
        seed=cfg.seed,
        window_rows=cfg.data.shuffle_window_rows,
        num_samples=None,
        global_batch=cfg.global_batch_size,
        world=1,
        rank=0,
    )
    return list(reader.steps(0, cfg.max_steps, per_epoch))


def run_cpu(args) -> dict:
    from fixture_data import write_fixture_parquet

    from raypipe.config import build_config
    from raypipe.train.config import TrainConfig
    from raypipe.train.encoding import SampleEncoder, collate

    steps = args.steps or (4 if args.smoke_test else 30)
    micro = args.micro_batch or (2 if args.smoke_test else 16)
    work = Path(os.environ.get("RAYPIPE_BENCH_DIR", tempfile.gettempdir())) / "raypipe-train-bench"
    model_dir = build_cpu_model(work / ("tiny" if args.smoke_test else "small"), args.smoke_test)
    parquet = write_fixture_parquet(work / f"data-{steps * micro}", steps * micro, seed=0)
    cfg = build_config(
        TrainConfig,
        {
            "name": "bench",
            "model": {"llava": str(model_dir)},
            "stage": 2,
            "data": {"max_length": 256, "deterministic_order": True, "prefetch_steps": 1},
            "num_workers": 1,
            "cpus_per_worker": 1.0,
            "global_batch_size": micro,
            "micro_batch_size": micro,
            "lr": 1e-4,
            "warmup_ratio": 0.0,
            "max_steps": steps,
            "export": False,
            "log_every": steps,
            "report_every": steps,
        },
    )
    result = {
        "device": "cpu",
        "steps": steps,
        "micro_batch": micro,
        "threads": 1,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }

    # (a) Ray Train
    ray_tps = None
    if not args.no_ray:
        import ray

        from raypipe.train.trainer import fit

        common.start_ray(os.cpu_count())
        out = fit(cfg, [str(parquet)], tempfile.mkdtemp(prefix="raypipe-train-bench-"))
        ray_tps = out.tokens_per_s
        result["ray_final_loss"] = out.final_loss
        ray.shutdown()

    # (b) bare loop over the same rows, encoded up front
    torch.set_num_threads(1)
    device = torch.device("cpu")
    init_single_process_group(device)
    from raypipe.train.worker import setup_model

    model, processor = setup_model(cfg, 0, device)
    encoder = SampleEncoder(
        processor=processor, template="vicuna_v1", max_length=256, pad_to_square=True
    )
    batches = [
        collate(encoder(rows), processor.tokenizer.pad_token_id)
        for rows in cpu_step_rows(parquet, cfg)
    ]
    bare = bare_loop(model, batches, steps, cfg.lr, device)
    result.update(
        ray_tokens_per_s=round(ray_tps, 1) if ray_tps else None,
        bare_tokens_per_s=round(bare["tokens_per_s"], 1),
        ratio=round(ray_tps / bare["tokens_per_s"], 3) if ray_tps else None,
        mfu=None,
        bare_step_s=round(bare["seconds"] / (steps - 1), 4),
    )
    return result


# ---------------------------------------------------------------------------------------
# GPU: real-size model, bare loop, MFU
# ---------------------------------------------------------------------------------------


def run_gpu(args) -> dict:
    from raypipe.train.flops import peak_flops
    from raypipe.train.parallel import parallelize_llava

    device = torch.device("cuda")
    torch.cuda.set_device(0)
    init_single_process_group(device)
    free, total = torch.cuda.mem_get_info()
    layers = args.llm_layers or auto_llm_layers(free)
    micro = args.micro_batch or 16
    steps = args.steps or (3 if args.smoke_test else 10)
    ac = not args.no_activation_checkpointing
    model = build_llava15_train_model(layers)
    params = sum(p.numel() for p in model.parameters())
    parallelize_llava(model, device=device, mixed_precision="bf16", activation_checkpointing=ac)
    batches = [synthetic_batch(micro, args.seq_len, model.config) for _ in range(2)]
    torch.cuda.reset_peak_memory_stats()
    bare = bare_loop(model, batches, steps, 2e-5, device, fused=args.fused_adamw)
    peak = peak_flops()
    return {
        "device": "cuda",
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "ray_tokens_per_s": None,
        "bare_tokens_per_s": round(bare["tokens_per_s"], 1),
        "ratio": None,
        "mfu": round(bare["flops_per_s"] / peak, 4) if peak else None,
        "peak_tflops": peak / 1e12 if peak else None,
        "model_tflop_per_s": round(bare["flops_per_s"] / 1e12, 1),
        "llm_layers": layers,
        "params_b": round(params / 1e9, 3),
        "micro_batch": micro,
        "seq_len": args.seq_len,
        "steps": steps,
        "activation_checkpointing": ac,
        "dtype": "bf16",
        "fused_adamw": args.fused_adamw,
        "step_s": round(bare["seconds"] / (steps - 1), 3),
        "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        "gpu_memory_gib": round(total / 2**30, 1),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    common.bench_env()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if args.gpu_real_size:
        if not torch.cuda.is_available():
            print("--gpu-real-size needs a CUDA GPU", file=sys.stderr)
            return 2
        result = run_gpu(args)
    else:
        try:
            import ray  # noqa: F401
        except ImportError:
            args.no_ray = True
        result = run_cpu(args)
    common.emit(result)
    return 0 if all(not isinstance(v, float) or math.isfinite(v) for v in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
