"""LLM layer: OpenAI-compatible async client, offline writer, vLLM through Ray Data LLM,
templates, parsing, structured output, curation."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from raypipe.llm.base import LLMBackend, Secret
from raypipe.llm.config import LLMConfig

if TYPE_CHECKING:
    from raypipe.abilities import Ability
    from raypipe.llm.limits import LimiterHandle


def make_backend(
    cfg: LLMConfig,
    cache_dir: str | Path | None = None,
    catalog: Mapping[str, Ability] | None = None,
    api_key: Secret | None = None,
    limiter: LimiterHandle | None = None,
) -> LLMBackend:
    """The backend ``cfg.backend`` names: ``openai``, ``offline`` or ``vllm``.

    ``cache_dir`` is where ``openai`` caches answers: a local folder or a pyarrow
    filesystem URI (``s3://bucket/run/cache?endpoint_override=...``). ``catalog`` is the
    run's ability catalog (user abilities included); the offline writer answers from it.
    ``api_key`` is used when neither ``cfg.api_key_env`` nor ``cfg.api_key_file`` holds a
    key in this process (in-process callers only: a key cannot be pickled, so Ray actors
    read theirs on their node). ``limiter`` is the job's limiter from
    :func:`raypipe.llm.limits.start_limiter`: every backend given it shares the job's
    ``requests_per_minute``/``tokens_per_minute``; without it they apply per backend.
    """
    if cfg.backend == "openai":
        from raypipe.llm.client import OpenAIBackend

        return OpenAIBackend(cfg, cache_dir, api_key, limiter)
    if cfg.backend == "offline":
        from raypipe.llm.offline import OfflineBackend

        return OfflineBackend(cfg, catalog)
    if cfg.backend == "vllm":
        from raypipe.llm.vllm import VLLMBackend

        return VLLMBackend(cfg, cache_dir)
    raise ValueError(f"unknown llm.backend {cfg.backend!r}")  # the config's Literal forbids it
