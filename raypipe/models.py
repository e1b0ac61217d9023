"""Model ids, devices and dtypes: the one place that turns what a config names into what
``from_pretrained`` loads, checked without loading weights.

- :func:`resolve_id`: ``raypipe-tiny/<name>`` -> a built tiny model's folder (see
  :mod:`raypipe.tiny`); anything else unchanged.
- :func:`resolve_pretrained`: a hub id or folder, checked (a folder holds the marker file,
  a hub id is cached when offline or its marker is fetched), with a message that says
  what to do; jobs call it before any expensive work.
- :func:`resolve_device` and :func:`resolve_dtype`: ``auto`` -> cuda/fp16 where torch
  sees a GPU, else cpu/fp32.
"""

from __future__ import annotations

import os
from pathlib import Path

from raypipe.errors import ConfigError, ModelError

OFFLINE_HINT = (
    "With HF_HUB_OFFLINE=1 (no internet) a hub model must already be in the local HF "
    "cache (HF_HOME, default ~/.cache/huggingface): download it on a machine with "
    "internet (`hf download <id>`) and copy the cache over, or point the field at a "
    "local folder saved with save_pretrained. For a quick offline run use the tiny "
    "models (raypipe-tiny/tiny-sd, raypipe-tiny/tiny-clip)."
)


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_id(model_id: str) -> str:
    """``raypipe-tiny/<name>`` -> a built local folder; anything else unchanged."""
    from raypipe.tiny import resolve_tiny

    return resolve_tiny(model_id)


def resolve_pretrained(model: str, marker: str, field: str) -> str:
    """A hub id or folder -> what ``from_pretrained`` loads, checked without loading.

    ``raypipe-tiny/<name>`` ids are built (see raypipe.tiny). A folder must contain
    ``marker`` (``model_index.json`` for diffusers, ``config.json`` for transformers);
    a hub id must be cached when offline, else ``marker`` is fetched. ``field`` names
    the config field in error messages.
    """
    resolved = resolve_id(model)
    path = Path(resolved).expanduser()
    if path.exists():
        if not (path / marker).is_file():
            raise ModelError(
                f"{field}={model!r}: folder {path} has no {marker}, so it is not a saved "
                "model. Point it at a folder written by `save_pretrained(...)` or at a hub id."
            )
        return str(path)
    if resolved.startswith(("/", "./", "../", "~")) or resolved.count("/") != 1:
        raise ModelError(
            f"{field}={model!r}: no such folder, and not a hub id of the form `owner/name`. "
            "Check the path, or name a hub model."
        )
    _check_hub_model(resolved, marker, field)
    return resolved


def _check_hub_model(repo_id: str, marker: str, field: str) -> None:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    if _hub_offline():
        if not isinstance(try_to_load_from_cache(repo_id, marker), str):
            raise ModelError(
                f"{field}={repo_id!r} is not in the local Hugging Face cache. " + OFFLINE_HINT
            )
        return
    try:
        hf_hub_download(repo_id, marker, etag_timeout=5)
    except Exception as e:  # RepositoryNotFound, gated repo, no network, ...
        first = str(e).splitlines()[0] if str(e) else ""
        raise ModelError(
            f"{field}={repo_id!r}: could not fetch its {marker} from the hub "
            f"({type(e).__name__}: {first}). Check the id (and HF_TOKEN for gated "
            "models). " + OFFLINE_HINT
        ) from None


def resolve_device(name: str, field: str = "render.device") -> str:
    """``auto`` -> cuda when torch sees a GPU, else cpu; ``cuda`` without one is an error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"{field}=cuda but torch sees no CUDA device here. Run on a GPU node (the actor "
            f"pool asks Ray for GPUs) or set {field}=cpu."
        )
    return name


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return getattr(torch, name)
