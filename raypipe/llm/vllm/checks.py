"""Fail-fast checks of ``llm.model`` for the engines, before any engine or render actor
starts."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from raypipe.errors import ConfigError, ModelError
from raypipe.llm.config import LLMConfig
from raypipe.llm.vllm.settings import engines_use_gpu, model_path

log = logging.getLogger(__name__)

#: Bytes of RAM left to the rest of the node when a CPU engine's fit is checked.
CPU_HEADROOM_BYTES = 2 * 2**30


def _weights_bytes(path: str) -> int:
    folder = Path(path)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(path, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the local cache: size unknown here
            return 0
    return sum(
        f.stat().st_size
        for pattern in ("*.safetensors", "*.bin", "*.pt")
        for f in folder.glob(pattern)
    )


def check_model(cfg: LLMConfig) -> dict[str, Any]:
    """Fail in seconds, with what to do, for a model the engines could not serve.

    Checks: the model resolves (folder with config.json, or a cached/fetchable hub id);
    its tokenizer has a chat template (raypipe sends chat requests); its architecture
    is one vLLM implements and ``max_model_len`` is within its positions; on CPU engines
    its attention head size is one vLLM's CPU attention supports; its weights fit the
    memory of one engine (GPU memory where this process sees the GPU, RAM for CPU
    engines). The last checks import vLLM (about ten seconds) and are skipped, with a
    log line, where vLLM is not installed in the driver's environment.
    """
    path = model_path(cfg)
    hf = _read_model(cfg, path)
    info: dict[str, Any] = {"path": path, "architectures": list(hf.architectures or [])}
    max_pos = getattr(hf, "max_position_embeddings", None)
    if cfg.vllm.max_model_len and max_pos and cfg.vllm.max_model_len > max_pos:
        raise ConfigError(
            f"llm.vllm.max_model_len={cfg.vllm.max_model_len} is more than {cfg.model!r} "
            f"has positions for ({max_pos}). Set llm.vllm.max_model_len<={max_pos}."
        )
    weights = _weights_bytes(path)
    info["weights_gib"] = round(weights / 2**30, 3)
    _check_memory(cfg, weights / cfg.vllm.tensor_parallel_size)
    _check_engine_support(cfg, hf, info)
    return info


def _read_model(cfg: LLMConfig, path: str):
    """The model's transformers config, once its config and chat tokenizer are readable."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        hf = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(
            f"llm.model={cfg.model!r}: cannot read its config or tokenizer ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Point llm.model at a folder written "
            "by save_pretrained (config.json, tokenizer files, weights) or at a hub id."
        ) from None
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"llm.model={cfg.model!r} is not a chat model: its tokenizer has no chat "
            "template, and raypipe sends chat requests (system + user messages). Use an "
            "instruct/chat model (e.g. Qwen/Qwen2.5-7B-Instruct), or add a chat_template "
            "to its tokenizer_config.json."
        )
    return hf


def _check_memory(cfg: LLMConfig, per_engine: float) -> None:
    """The weights of one engine (worker) plus its KV cache fit the node's RAM (CPU
    engines) or the GPU share ``gpu_memory_utilization`` gives it."""
    v = cfg.vllm
    if not engines_use_gpu(cfg):
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        kv = v.gpu_memory_utilization * ram
        if per_engine + kv + CPU_HEADROOM_BYTES > ram:
            raise ModelError(
                f"llm.model={cfg.model!r} needs {per_engine / 2**30:.1f} GiB for weights plus "
                f"{kv / 2**30:.1f} GiB of KV cache (llm.vllm.gpu_memory_utilization="
                f"{v.gpu_memory_utilization} of {ram / 2**30:.0f} GiB RAM) per CPU engine, "
                "more than this node has. Lower gpu_memory_utilization (0.1 reserves a tenth "
                "of RAM) or use a smaller model."
            )
        return
    try:
        import torch
    except ImportError:  # pragma: no cover - torch ships with raypipe
        return
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_properties(0).total_memory * v.gpus_per_worker
        if per_engine > v.gpu_memory_utilization * gpu:
            raise ModelError(
                f"llm.model={cfg.model!r}: {per_engine / 2**30:.1f} GiB of weights per "
                f"engine worker do not fit in {v.gpu_memory_utilization} of "
                f"{gpu / 2**30:.0f} GiB GPU memory. Raise llm.vllm.tensor_parallel_size "
                "or gpu_memory_utilization, or use a smaller (or quantized) model."
            )


def _check_engine_support(cfg: LLMConfig, hf, info: dict[str, Any]) -> None:
    """vLLM implements the model's architecture and, on CPU, its attention head size."""
    try:
        from vllm.model_executor.models import ModelRegistry
    except ImportError:
        log.info("vllm is not installed here: architecture checks left to the engines")
        return
    supported = set(ModelRegistry.get_supported_archs())
    if info["architectures"] and not set(info["architectures"]) & supported:
        raise ModelError(
            f"llm.model={cfg.model!r} is a {', '.join(info['architectures'])}, which this "
            "vLLM does not implement. Choose a model vLLM supports (its docs list them) or "
            "use llm.backend=openai with a server that serves it."
        )
    if engines_use_gpu(cfg):
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    heads = getattr(hf, "num_attention_heads", None)
    head_dim = getattr(hf, "head_dim", None) or (
        hf.hidden_size // heads if heads and getattr(hf, "hidden_size", None) else None
    )
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim is not None and head_dim not in sizes:
        raise ModelError(
            f"llm.model={cfg.model!r} has attention heads of size {head_dim}; vLLM's CPU "
            f"attention supports {sizes} (llm.vllm.gpus_per_worker=0 runs the engines on "
            "CPU). Use a model with a supported head size, or GPU engines."
        )
