"""LLM layer: OpenAI-compatible async client, offline writer, templates, parsing, curation."""

from __future__ import annotations

from pathlib import Path

from raypipe.config import LLMConfig
from raypipe.llm.base import LLMBackend


def make_backend(cfg: LLMConfig, cache_dir: str | Path | None = None) -> LLMBackend:
    """The backend ``cfg.backend`` names: ``openai`` (cached in ``cache_dir``) or ``offline``."""
    if cfg.backend == "openai":
        from raypipe.llm.client import OpenAIBackend

        return OpenAIBackend(cfg, cache_dir)
    if cfg.backend == "offline":
        from raypipe.llm.offline import OfflineBackend

        return OfflineBackend(cfg)
    raise ValueError(f"unknown llm.backend {cfg.backend!r}")  # the config's Literal forbids it
