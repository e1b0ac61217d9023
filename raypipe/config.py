"""Typed configs, YAML presets and dotted command-line overrides.

Every config is a pydantic model that forbids unknown fields, so a typo in a preset
or an override fails at once with the field's path. Presets are YAML files in
``jobs/configs/``; a preset may name another with ``base: other.yaml`` and override
parts of it. Overrides look like ``render.batch_size=8`` (values parsed as YAML).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raypipe.errors import ConfigError

T = TypeVar("T", bound=BaseModel)


class Config(BaseModel):
    """Base: unknown fields are errors; assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# ---------------------------------------------------------------------------------------
# LLM
# ---------------------------------------------------------------------------------------


class LLMConfig(Config):
    """Which LLM writes the text, and how the client treats the endpoint."""

    backend: Literal["openai", "offline"] = Field(
        "offline",
        description="`openai`: any OpenAI-compatible endpoint. `offline`: deterministic "
        "writer that fills the templates from the ability catalog (no model, zero cost).",
    )
    model: str = Field("gpt-4o-mini", description="Model name sent to the endpoint.")
    base_url: str | None = Field(
        None, description="OpenAI-compatible base URL (e.g. http://host:8000/v1); None = OpenAI."
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="Name of the environment variable that holds the API key. The key "
        "itself is never written to a config, log, manifest or cache.",
    )
    concurrency: int = Field(32, ge=1, description="Requests in flight at once, per client.")
    requests_per_minute: float | None = Field(
        None, gt=0, description="Client-side request rate limit, per client; None = unlimited."
    )
    tokens_per_minute: float | None = Field(
        None, gt=0, description="Client-side token rate limit (prompt+completion), per client."
    )
    max_attempts: int = Field(
        6, ge=1, description="HTTP attempts per request before it is rejected."
    )
    timeout_s: float = Field(60.0, gt=0, description="Per-attempt timeout in seconds.")
    backoff_initial_s: float = Field(
        0.5, gt=0, description="First retry wait (exponential, jittered)."
    )
    backoff_max_s: float = Field(30.0, gt=0, description="Longest wait between retries.")
    temperature: float = Field(0.9, ge=0, le=2, description="Sampling temperature.")
    max_tokens: int = Field(1024, ge=1, description="Completion token limit per request.")
    prices: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {
            "gpt-4o-mini": (0.15, 0.60),
            "gpt-4o": (2.50, 10.00),
            "gpt-4.1-mini": (0.40, 1.60),
            "gpt-4.1": (2.00, 8.00),
        },
        description="USD per million (prompt, completion) tokens, by model; unknown = 0.",
    )
    cache: bool = Field(
        True, description="Cache responses on disk (OUT/cache); re-runs pay nothing."
    )


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml_preset(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a preset, resolving ``base:`` (relative to the preset's folder)."""
    path = Path(path)
    if not path.is_file():
        folder = path.parent if str(path.parent) not in ("", ".") else Path("jobs/configs")
        known = sorted(p.name for p in folder.glob("*.yaml")) if folder.is_dir() else []
        hint = f" Presets in {folder}: {', '.join(known)}." if known else ""
        raise ConfigError(f"config file {path} does not exist.{hint}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: `base:` chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of fields at the top level")
    base = data.pop("base", None)
    if base:
        parent = read_yaml_preset(path.parent / base, _seen + (path.resolve(),))
        data = _deep_merge(parent, data)
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (``8``, ``true``, ``[a, b]``)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like field.path=value")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return data


def build_config(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Validate ``data`` as ``cls``; errors name every bad field's dotted path."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {where}: {err['msg']}")
        fields = ", ".join(cls.model_fields)
        raise ConfigError(
            f"{source}: invalid {cls.__name__}:\n"
            + "\n".join(lines)
            + f"\nTop-level fields: {fields}"
        ) from None


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """Preset file (optional) + dotted overrides -> validated config."""
    data = read_yaml_preset(path) if path else {}
    data = apply_overrides(data, list(overrides))
    return build_config(cls, data, source=str(path or "overrides"))


SECRET_MARKERS = ("key", "token", "secret", "password")


def redacted(config: BaseModel | dict) -> dict[str, Any]:
    """Config as a plain dict for manifests, with any secret-looking value replaced.

    Keys are never stored in configs (only the *name* of their environment variable),
    so this is a second line of defence: it also scrubs any value equal to a secret
    held in an environment variable named like a key or token.
    """
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    secrets = {
        v
        for k, v in os.environ.items()
        if v and len(v) >= 8 and any(m in k.lower() for m in SECRET_MARKERS)
    }

    def scrub(node: Any, key: str = "") -> Any:
        if isinstance(node, dict):
            return {k: scrub(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        if isinstance(node, str):
            if node in secrets:
                return "***"
            if any(m in key.lower() for m in SECRET_MARKERS) and not key.lower().endswith("_env"):
                return "***"
        return node

    return scrub(data)


__all__ = [
    "Config",
    "LLMConfig",
    "apply_overrides",
    "build_config",
    "load_config",
    "read_yaml_preset",
    "redacted",
    "model_validator",
]
