"""The presets shipped with raypipe (package data in ``raypipe/configs/<kind>/``).

Presets are sorted by the job that reads them: ``generate`` (GenerateConfig),
``train`` (TrainConfig) and ``evaluate`` (EvaluateConfig). Wherever a job takes
``--config``, it takes a preset name (``demo``, ``tiny``, ``eval-tiny``) or the path of a
YAML file; a name is looked up among the presets of that job's kind, so the same command
works from a checkout and from an installed wheel.
"""

from __future__ import annotations

from pathlib import Path

from raypipe.errors import ConfigError

ROOT = Path(__file__).resolve().parent / "configs"
KINDS = ("generate", "train", "evaluate")
#: config class name -> the preset kind it reads (names, so this module imports no config)
KIND_OF = {"GenerateConfig": "generate", "TrainConfig": "train", "EvaluateConfig": "evaluate"}


def folder(kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown preset kind {kind!r}; kinds: {', '.join(KINDS)}")
    return ROOT / kind


def names(kind: str) -> list[str]:
    """The presets of ``kind`` by name (``base`` excluded: the others derive from it)."""
    return sorted(p.stem for p in folder(kind).glob("*.yaml") if p.stem != "base")


def is_name(spec: str | Path) -> bool:
    """True if ``spec`` names a preset rather than a file: no folder part."""
    return "/" not in str(spec) and "\\" not in str(spec)


def resolve(spec: str | Path, kind: str) -> Path:
    """The file of preset ``spec`` (a name such as ``demo`` or ``demo.yaml``, or a path).

    A path is returned as given (read later; a missing one fails there). A bare name
    that is a file in the working directory is that file; otherwise it is looked up
    among the ``kind`` presets, and an unknown name fails listing the known ones.
    """
    path = Path(spec)
    if not is_name(spec) or path.is_file():
        return path
    candidate = folder(kind) / (path.name if path.suffix == ".yaml" else path.name + ".yaml")
    if candidate.is_file():
        return candidate
    import difflib

    known = names(kind)
    if not known:  # a broken install: the package data did not come with it
        raise ConfigError(
            f"no {kind} presets in {folder(kind)}: this raypipe installation lacks its "
            "package data; reinstall raypipe, or give the path of a YAML file."
        )
    close = difflib.get_close_matches(path.stem, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"no {kind} preset named {str(spec)!r}.{hint} {kind} presets: {', '.join(known)} "
        f"(`raypipe {kind} --help` lists them), or give the path of a YAML file."
    )


def first_comment(path: Path, limit: int = 110) -> str:
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


def listing(kind: str) -> str:
    """``kind``'s presets with their first comment line, as help text."""
    known = names(kind)
    width = max(map(len, known), default=0)
    lines = [f"presets (--config NAME or a YAML path; {kind} presets shipped with raypipe):"]
    for name in known:
        lines.append(f"  {name:<{width}}  {first_comment(folder(kind) / (name + '.yaml'))}")
    return "\n".join(lines)


__all__ = ["KINDS", "ROOT", "first_comment", "folder", "is_name", "listing", "names", "resolve"]
