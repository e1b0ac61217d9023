"""Help text of the jobs: the presets of a kind, the abilities and every config field."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any


class HelpParser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog is built only when help is printed."""

    def __init__(self, *args: Any, epilog_fn=None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epilog_fn = epilog_fn

    def format_help(self) -> str:
        if self._epilog_fn is not None:
            try:
                self.epilog = self._epilog_fn()
            except Exception as e:  # help must print even if a preset or ability is broken
                self.epilog = f"(could not list presets, abilities and fields: {e})"
        return super().format_help()


def _type_name(annotation: Any) -> str:
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(map(_type_name, args))}]"
    return getattr(annotation, "__name__", str(annotation))


def _wrap(text: str, indent: int, width: int = 92) -> list[str]:
    pad = " " * indent
    lines = textwrap.wrap(
        text,
        width=width,
        initial_indent=pad,
        subsequent_indent=pad,
        break_on_hyphens=False,  # keep ids such as stable-diffusion-v1-5 whole
        break_long_words=False,
    )
    return lines or [pad]


def config_reference(model: type, intro: str) -> str:
    """Every field of ``model`` (nested ones as dotted paths) with type, default and
    description, as help text."""
    from pydantic import BaseModel

    from raypipe.config import iter_fields

    lines = _wrap(intro, 0)
    for path, info, annotation in iter_fields(model):
        description = info.description or ""
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines += ["", f"  {path}.*  ({annotation.__name__}) {description}"]
            continue
        default = info.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump()
        lines.append(f"  {path}: {_type_name(info.annotation)} = {default!r}")
        lines += _wrap(description, 6)
        if isinstance(default, dict) or _type_name(annotation).startswith("dict["):
            dotted = [k for k in default or () if "." in str(k)]
            example = f" (the key may contain dots: {path}.{dotted[0]}=...)" if dotted else ""
            kept = "; the other entries keep their values" if default else ""
            lines += _wrap(f"Set one entry as {path}.KEY=VALUE{example}{kept}.", 6)
    return "\n".join(lines)


def generate_epilog() -> str:
    """The presets, the abilities and every GenerateConfig field (for ``--help``)."""
    from raypipe import presets
    from raypipe.abilities import load_catalog
    from raypipe.generate.config import GenerateConfig

    lines = [presets.listing("generate")]
    catalog = load_catalog()
    lines += ["", f"abilities (--abilities a,b,...; default: all {len(catalog)}):"]
    width = max(map(len, catalog))
    for name, ability in catalog.items():
        lines += textwrap.wrap(
            ability.description,
            width=92,
            initial_indent=f"  {name:<{width}}  ",
            subsequent_indent=" " * (width + 4),
            break_on_hyphens=False,
        )
    lines.append("")
    lines.append(
        config_reference(
            GenerateConfig,
            "config fields (override any as dotted.field=value after the options; values "
            "are YAML: 8, true, [a, b], null; a preset sets the same fields):",
        )
    )
    return "\n".join(lines)
