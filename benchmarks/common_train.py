"""The training-step benchmark's models and bare path: a LLaVA-1.5-shaped model for a GPU
(as many Llama-7B layers as fit), a small LLaVA for the CPU and synthetic batches; the
single-rank process group, the Ray path's step order, the bare loop over prepared batches.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch
from common_llava import CLIP_L_336, LLAMA_7B, llava_config, llava_processor


def auto_llm_layers(free_bytes: int) -> int:
    """Llama-7B layers that fit next to the rest, at 16 bytes per parameter + headroom."""
    d, ff, vocab = LLAMA_7B["hidden_size"], LLAMA_7B["intermediate_size"], LLAMA_7B["vocab_size"]
    per_layer = 4 * d * d + 3 * d * ff
    fixed = 2 * vocab * d + 304_000_000 + 21_000_000  # embeddings + head, CLIP-L, projector
    budget = 0.85 * free_bytes - 14e9  # activations, logits, workspace
    return max(1, min(32, int((budget / 16 - fixed) // per_layer)))


def build_llava15_train_model(layers: int, device: str = "cuda"):
    """Random-weight LLaVA-1.5-shaped model on the GPU (fp32 weights), stage 2."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration

    from raypipe.train.model import apply_freeze_policy

    text = LlamaConfig(num_hidden_layers=layers, **LLAMA_7B)
    config = llava_config(CLIPVisionConfig(**CLIP_L_336), text, 32000, 576, 32001)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    model.config.use_cache = False
    apply_freeze_policy(model, 2)
    return model


def build_cpu_model(folder: Path, smoke: bool) -> Path:
    """Random-weight LLaVA + processor saved to ``folder`` (tiny tokenizer, 32 px CLIP);
    unless ``smoke``, sized so a CPU step takes ~100+ ms (Llama hidden 256, 4 layers)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from raypipe import tiny

    if (folder / "config.json").exists():
        return folder
    tokenizer = tiny.build_tiny_llama_tokenizer(folder / "_tokenizer")
    vision = tiny.tiny_clip_vision_config(32)
    text = tiny.tiny_llama_config(len(tokenizer), tokenizer)
    if not smoke:
        text.hidden_size, text.intermediate_size, text.num_hidden_layers = 256, 688, 4
        vision.hidden_size, vision.intermediate_size = 64, 256
    torch.manual_seed(0)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    config = llava_config(vision, text, image_token, 16, tokenizer.pad_token_id)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    llava_processor(tokenizer, 32, vision.patch_size).save_pretrained(folder)
    return folder


def synthetic_batch(batch: int, seq_len: int, config) -> dict:
    """576 image tokens then random text, every text token supervised."""
    import torch

    n_image = 576
    ids = torch.randint(3, 32000, (batch, seq_len))
    ids[:, 1 : 1 + n_image] = config.image_token_id
    labels = ids.clone()
    labels[:, : 1 + n_image] = -100
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "pixel_values": torch.randn(batch, 3, 336, 336),
    }


def init_single_process_group(device: torch.device) -> None:
    """This process as a world of one rank (nccl on CUDA, gloo on CPU), for FSDP2."""
    import torch.distributed as dist

    if not dist.is_initialized():
        store = tempfile.mktemp(prefix="raypipe-pg-")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)


def cpu_step_rows(parquet: Path, cfg) -> list[list[dict]]:
    """Each step's rows in the order the Ray path trains them (one worker: its reader
    sees the whole global batch), so both paths train the same batches, padding and all."""
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


def cpu_bare_batches(cfg, parquet: Path):
    """The bare path's set-up on the CPU, (model, batches, device): one torch thread, a
    single-rank process group, the model as a Ray Train worker sets it up, and the Ray
    path's step rows (:func:`cpu_step_rows`) encoded up front."""
    from raypipe.train.encoding import SampleEncoder, collate

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
    return model, batches, device


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
