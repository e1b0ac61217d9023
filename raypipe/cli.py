"""The ``raypipe`` command: one entry point for the job scripts in ``jobs/``.

    raypipe generate --config jobs/configs/demo.yaml --out out/demo
    raypipe train --config jobs/configs/tiny.yaml --data out/demo/data --out out/train-tiny
    raypipe evaluate score --predictions PRED/predictions.parquet --out REPORT
    raypipe export-llava --data out/demo/data --out out/demo-llava
    raypipe curate --abilities color --out my_abilities

Each command runs the ``main(argv)`` of its script in ``jobs/`` (the same code that
``ray job submit -- python jobs/<script>.py`` runs on a cluster), so the two take the same
arguments and give the same exit status. ``raypipe COMMAND --help`` shows a command's
arguments; ``raypipe generate --help`` also lists the presets, the abilities and every
config field with its default and description.

The scripts live in the checkout next to the package (``pip install -e .``, as
``scripts/bootstrap.sh`` installs it).
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

#: command -> (script in jobs/, one line for ``raypipe --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("generate.py", "make an image-dialogue dataset (StableLLaVA method) into OUT"),
    "train": ("train.py", "tune LLaVA on raypipe Parquet (Ray Train + FSDP2)"),
    "evaluate": ("evaluate.py", "per-ability benchmarks: run, build, import, predict, score"),
    "export-llava": ("export_llava.py", "export a dataset to LLaVA's llava.json + images/"),
    "curate": ("curate.py", "curate in-context SD prompt examples per ability"),
}

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
PRESETS = JOBS / "configs"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: raypipe COMMAND [ARGS...]",
        "",
        "Synthesize visual-instruction data with Ray (StableLLaVA method) and tune LLaVA on it.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()),
        "",
        "`raypipe COMMAND --help` shows a command's arguments (`raypipe generate --help`:",
        "also the presets, abilities and config fields). Each command runs jobs/<script>.py,",
        "which `ray job submit --working-dir . -- python jobs/<script>.py ...` runs on a cluster.",
    ]
    return "\n".join(lines)


def load_job(command: str) -> ModuleType:
    """The module of ``command``'s script in ``jobs/`` (imported from the checkout)."""
    script = JOBS / COMMANDS[command][0]
    if not script.is_file():
        raise FileNotFoundError(
            f"raypipe: {script} is missing: the `raypipe` command runs the job scripts of a "
            "raypipe checkout. Install raypipe from the checkout with `pip install -e .` "
            "(scripts/bootstrap.sh does), or run `python jobs/<script>.py` there."
        )
    name = "raypipe_job_" + script.stem
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import version

        print(f"raypipe {version('raypipe')}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" Did you mean `raypipe {close[0]}`?" if close else ""
        print(
            f"raypipe: unknown command {command!r}.{hint} Commands: {', '.join(COMMANDS)}.",
            file=sys.stderr,
        )
        return 2
    try:
        job = load_job(command)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    # argparse names the program after sys.argv[0]: `raypipe generate`, not `raypipe`.
    saved, sys.argv = sys.argv, [f"raypipe {command}", *rest]
    try:
        return job.main(rest)
    finally:
        sys.argv = saved


# ---------------------------------------------------------------------------------------
# `generate --help`: presets, abilities and config fields
# ---------------------------------------------------------------------------------------


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


def _first_comment(path: Path, limit: int = 110) -> str:
    """The first sentence of the comment block that opens a preset file."""
    words = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        words += line.lstrip("#").split()
    text = " ".join(words)
    if ". " in text:
        text = text.split(". ", 1)[0] + "."
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def generation_presets() -> list[Path]:
    """The presets in ``jobs/configs/`` that are generation configs (they validate)."""
    from raypipe.config import GenerateConfig, build_config, read_yaml_preset
    from raypipe.errors import ConfigError

    found = []
    for path in sorted(PRESETS.glob("*.yaml")):
        try:
            build_config(GenerateConfig, read_yaml_preset(path), str(path))
        except ConfigError:
            continue
        found.append(path)
    return found


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
    from raypipe.abilities import load_catalog
    from raypipe.config import GenerateConfig

    lines = [f"presets (--config; {PRESETS.relative_to(REPO)}/):"]
    presets = generation_presets()
    width = max((len(p.name) for p in presets), default=0)
    for path in presets:
        lines.append(f"  {path.name:<{width}}  {_first_comment(path)}")
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


if __name__ == "__main__":
    sys.exit(main())
