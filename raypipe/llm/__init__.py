"""LLM layer: OpenAI-compatible async client, offline writer, templates, parsing, curation."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from raypipe.config import LLMConfig
from raypipe.llm.base import LLMBackend, Secret

if TYPE_CHECKING:
    from raypipe.abilities import Ability


def make_backend(
    cfg: LLMConfig,
    cache_dir: str | Path | None = None,
    catalog: Mapping[str, Ability] | None = None,
    api_key: Secret | None = None,
) -> LLMBackend:
    """The backend ``cfg.backend`` names: ``openai`` (cached in ``cache_dir``) or ``offline``.

    ``catalog`` is the run's ability catalog (user abilities included); the offline
    writer answers from it. ``api_key`` is used when ``cfg.api_key_env`` is not set in
    this process (a driver passes its key to Ray actors this way).
    """
    if cfg.backend == "openai":
        from raypipe.llm.client import OpenAIBackend

        return OpenAIBackend(cfg, cache_dir, api_key)
    if cfg.backend == "offline":
        from raypipe.llm.offline import OfflineBackend

        return OfflineBackend(cfg, catalog)
    raise ValueError(f"unknown llm.backend {cfg.backend!r}")  # the config's Literal forbids it
