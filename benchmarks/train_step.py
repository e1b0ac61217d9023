"""Training-step throughput: raypipe's Ray Train loop vs a bare single-process loop.

    python benchmarks/train_step.py                  # CPU: small LLaVA, 1 Ray worker vs bare
    python benchmarks/train_step.py --smoke-test     # tiny LLaVA, a few steps, both paths
    python benchmarks/train_step.py --gpu-real-size  # one CUDA GPU: CLIP ViT-L/14-336 + a
                                                     # Llama-7B-shaped LLM, bf16, MFU

Both paths train the same random-weight model (stage 2: projector + LLM) with the same
micro-batch, AdamW, clipping and loss, sharded with FSDP2 (``parallelize_llava``, one rank):

(a) ray: ``raypipe.train.trainer.fit``, one TorchTrainer worker (1 CPU) on fixture Parquet,
    reading, decoding and tokenising its rows itself. tokens/s is the loop's own: non-pad
    tokens from the end of step 1 to the end of the last step (Ray start-up, the worker's
    start and the model build are outside it; checkpoints off).
(b) bare: the same rows in the same step order, encoded up front, then the same steps in a
    plain loop (common_train.py), timed the same way, with 1 torch thread.

On CPU the model is sized so a step takes ~100+ ms (Llama hidden 256, 4 layers).
``--gpu-real-size`` runs the bare path only (one GPU is one worker), on synthetic batches
(576 image tokens + text, ``--seq-len`` in all): CLIP-L/336 and as many Llama-2-7B layers as
fit (``--llm-layers``), bf16, activation checkpointing (``--no-activation-checkpointing``).
MFU = model FLOPs (raypipe.train.flops) / (seconds x peak), peak 989 TFLOP/s on H100/H200.

The last line printed is one JSON object: ray_tokens_per_s, bare_tokens_per_s, ratio =
ray / bare (target >= 0.9), mfu (null on CPU) and the settings.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile

import common
import torch
from common_train import (
    auto_llm_layers,
    bare_loop,
    build_cpu_model,
    build_llava15_train_model,
    cpu_bare_batches,
    init_single_process_group,
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


def run_cpu(args) -> dict:
    from fixture_data import write_fixture_parquet

    from raypipe.config import build_config
    from raypipe.train.config import TrainConfig

    steps = args.steps or (4 if args.smoke_test else 30)
    micro = args.micro_batch or (2 if args.smoke_test else 16)
    work = common.bench_dir() / "raypipe-train-bench"
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
        from raypipe.train.trainer import fit

        with common.ray_up(True, os.cpu_count()):
            out = fit(cfg, [str(parquet)], tempfile.mkdtemp(prefix="raypipe-train-bench-"))
        ray_tps = out.tokens_per_s
        result["ray_final_loss"] = out.final_loss

    # (b) bare loop over the same rows, encoded up front
    model, batches, device = cpu_bare_batches(cfg, parquet)
    bare = bare_loop(model, batches, steps, cfg.lr, device)
    result.update(
        ray_tokens_per_s=round(ray_tps, 1) if ray_tps else None,
        bare_tokens_per_s=round(bare["tokens_per_s"], 1),
        ratio=round(ray_tps / bare["tokens_per_s"], 3) if ray_tps else None,
        mfu=None,
        bare_step_s=round(bare["seconds"] / (steps - 1), 4),
    )
    return result


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
    common.quiet_transformers()
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
