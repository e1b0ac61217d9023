"""Tiny random-weight models and offline tokenizers for tests and the offline demo.

Nothing here downloads anything. Each ``build_*`` function creates a model from a
config with random weights, saves it to a directory with ``save_pretrained``
(safetensors), and returns the directory, so callers load it back through the same
``from_pretrained`` path that real hub models use. Builds are deterministic (fixed
seeds) and cached: calling a builder twice with the same directory reuses it.

The builders live in :mod:`raypipe.tiny.models` and :mod:`raypipe.tiny.tokenizers`;
``raypipe-tiny/<name>`` ids resolve here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from raypipe.tiny.models import (
    build_tiny_chat_llm,
    build_tiny_clip,
    build_tiny_clip_vision,
    build_tiny_llama,
    build_tiny_llava,
    build_tiny_safety_checker,
    build_tiny_sd,
    tiny_chat_llama_config,
    tiny_clip_image_processor,
    tiny_clip_text_config,
    tiny_clip_vision_config,
    tiny_llama_config,
)
from raypipe.tiny.tokenizers import (
    LLAMA_CHAT_TEMPLATE,
    build_clip_tokenizer,
    build_tiny_llama_tokenizer,
)


def default_models_dir() -> Path:
    """Where the demo and tests keep tiny models: $RAYPIPE_TINY_DIR or ~/.cache/raypipe/tiny."""
    return Path(os.environ.get("RAYPIPE_TINY_DIR", Path.home() / ".cache" / "raypipe" / "tiny"))


#: Bump when a builder changes, so cached folders of older builds are not reused.
TINY_VERSION = 2


TINY_IDS = {
    "tiny-sd": build_tiny_sd,
    "tiny-clip": build_tiny_clip,
    "tiny-safety-checker": build_tiny_safety_checker,
    "tiny-llava": build_tiny_llava,
    "tiny-clip-vision": build_tiny_clip_vision,
    "tiny-llama": build_tiny_llama,
    "tiny-chat-llm": build_tiny_chat_llm,
}


def resolve_tiny(model_id: str) -> str:
    """Map ``raypipe-tiny/<name>`` ids (used by the demo and test presets) to a built folder."""
    m = re.fullmatch(r"raypipe-tiny/([\w-]+)", model_id)
    if not m:
        return model_id
    name = m.group(1)
    if name not in TINY_IDS:
        from raypipe.errors import ModelError

        raise ModelError(f"unknown tiny model {model_id!r}; known: {sorted(TINY_IDS)}")
    return str(TINY_IDS[name](default_models_dir() / f"{name}-v{TINY_VERSION}"))


__all__ = [
    "LLAMA_CHAT_TEMPLATE",
    "TINY_IDS",
    "TINY_VERSION",
    "build_clip_tokenizer",
    "build_tiny_chat_llm",
    "build_tiny_clip",
    "build_tiny_clip_vision",
    "build_tiny_llama",
    "build_tiny_llama_tokenizer",
    "build_tiny_llava",
    "build_tiny_safety_checker",
    "build_tiny_sd",
    "default_models_dir",
    "resolve_tiny",
    "tiny_chat_llama_config",
    "tiny_clip_image_processor",
    "tiny_clip_text_config",
    "tiny_clip_vision_config",
    "tiny_llama_config",
]
