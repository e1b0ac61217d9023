"""Reading and validating ability files into :class:`~raypipe.abilities.model.Ability`
(the catalog format: :mod:`raypipe.abilities`). Every problem raises
:class:`~raypipe.errors.CatalogError` naming the file and the field."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from raypipe.abilities.model import (
    ABILITIES,
    CURATED_SUFFIX,
    DIALOGUE_QUESTION_TYPES,
    EXPLANATION_PLACEHOLDERS,
    MIN_ITEMS,
    PHRASE_PLACEHOLDERS,
    QUESTION_TYPES,
    TEMPLATE_PLACEHOLDERS,
    Ability,
    BenchmarkExample,
    BenchmarkTemplate,
    DialogueExample,
    curated_path_for,
    default_data_dir,
)
from raypipe.errors import CatalogError

#: libyaml's safe loader where PyYAML has it (ten times faster: every LLM actor of a run
#: reads the catalog), else the pure-Python one; they parse the same documents.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_NAME_RE = re.compile(r"^[a-z_]+$")
# A prompt starts with the emphasised keyword: "((crimson)) vintage car, ..."
_LEADING_KEYWORD_RE = re.compile(r"^\(\(([^()]+)\)\)")
_KEYWORD_MAX_CHARS = 60
_FIELDS = (
    "name",
    "display_name",
    "description",
    "cautions",
    "keywords",
    "subjects",
    "scenes",
    "styles",
    "phrase",
    "sd_examples",
    "questions",
    "dialogue_examples",
    "benchmark_examples",
    "benchmark_templates",
    "question_type",
    "dialogue_focus",
    "focus_sentences",
    "explanation_sentence",
    "keyword_is_setting",
)


def load_ability(path: str | Path) -> Ability:
    """Load and validate one ability file (and its curated sibling, when present)."""
    path = Path(path)
    raw = _read_yaml(path)
    check = _Checker(path)
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        check.fail(unknown[0], f"unknown field; the known fields are: {', '.join(_FIELDS)}")
    fields = {
        **_scalars(raw, check, path),
        **_string_lists(raw, check),
        **_records(raw, check),
        **_optional_text(raw, check),
    }
    return Ability(
        **fields,
        curated_examples=_load_curated(curated_path_for(path), fields["name"]),
        source=path,
    )


def _scalars(raw: dict, check: _Checker, path: Path) -> dict[str, Any]:
    name = check.text(raw, "name")
    if not _NAME_RE.match(name):
        check.fail("name", f"{name!r} must be lowercase letters and underscores ([a-z_]+)")
    if name != path.stem:
        check.fail(
            "name",
            f"{name!r} must equal the file name stem {path.stem!r}. "
            f"Rename the file to {name}.yaml or set name: {path.stem}",
        )
    phrase = check.text(raw, "phrase")
    check.placeholders("phrase", phrase, PHRASE_PLACEHOLDERS, required=("keyword",))
    return {
        "name": name,
        "display_name": check.text(raw, "display_name"),
        "description": check.text(raw, "description"),
        "phrase": phrase,
    }


def _string_lists(raw: dict, check: _Checker) -> dict[str, Any]:
    out = {
        key: check.texts(raw, key)
        for key in (
            "cautions",
            "keywords",
            "subjects",
            "scenes",
            "styles",
            "sd_examples",
            "questions",
        )
    }
    for i, keyword in enumerate(out["keywords"]):
        check.keyword(f"keywords[{i}]", keyword)
    for i, prompt in enumerate(out["sd_examples"]):
        check.prompt(f"sd_examples[{i}]", prompt)
    for key in ("keywords", "subjects", "scenes", "styles", "sd_examples", "questions"):
        check.distinct(key, out[key])
    return out


def _records(raw: dict, check: _Checker) -> dict[str, Any]:
    dialogue_examples = tuple(
        DialogueExample(
            prompt=check.prompt(f"dialogue_examples[{i}].prompt", check.text(item, "prompt", at)),
            description=check.text(item, "description", at),
        )
        for i, (at, item) in enumerate(check.records(raw, "dialogue_examples"))
    )
    benchmark_examples = tuple(
        BenchmarkExample(
            prompt=check.prompt(f"benchmark_examples[{i}].prompt", check.text(item, "prompt", at)),
            question=check.text(item, "question", at),
            question_type=check.question_type(item, at),
            answer=check.text(item, "answer", at),
            answer_keywords=check.answer_keywords(item, at),
        )
        for i, (at, item) in enumerate(check.records(raw, "benchmark_examples"))
    )
    check.covers_question_types("benchmark_examples", benchmark_examples)
    benchmark_templates = []
    for at, item in check.records(raw, "benchmark_templates"):
        template = BenchmarkTemplate(
            question_type=check.question_type(item, at),
            question=check.text(item, "question", at),
            answer=check.text(item, "answer", at),
            answer_keywords=check.answer_keywords(item, at, templated=True),
        )
        check.placeholders(f"{at}.question", template.question, TEMPLATE_PLACEHOLDERS)
        check.placeholders(f"{at}.answer", template.answer, TEMPLATE_PLACEHOLDERS)
        for j, keyword in enumerate(template.answer_keywords):
            check.placeholders(f"{at}.answer_keywords[{j}]", keyword, TEMPLATE_PLACEHOLDERS)
        benchmark_templates.append(template)
    check.covers_question_types("benchmark_templates", benchmark_templates)
    return {
        "dialogue_examples": dialogue_examples,
        "benchmark_examples": benchmark_examples,
        "benchmark_templates": tuple(benchmark_templates),
    }


def _optional_text(raw: dict, check: _Checker) -> dict[str, Any]:
    """The optional text particular to the ability (see the catalog format)."""
    question_type = check.optional_text(raw, "question_type") or "caption"
    if question_type not in DIALOGUE_QUESTION_TYPES:
        check.fail(
            "question_type",
            f"{question_type!r} is not one of {', '.join(DIALOGUE_QUESTION_TYPES)}.",
        )
    dialogue_focus = check.optional_text(raw, "dialogue_focus")
    check.placeholders("dialogue_focus", dialogue_focus, ("keyword",))
    focus_sentences = check.optional_texts(raw, "focus_sentences")
    for i, sentence in enumerate(focus_sentences):
        check.placeholders(f"focus_sentences[{i}]", sentence, ("keyword",), required=("keyword",))
    explanation_sentence = check.optional_text(raw, "explanation_sentence")
    check.placeholders("explanation_sentence", explanation_sentence, EXPLANATION_PLACEHOLDERS)
    return {
        "question_type": question_type,
        "dialogue_focus": dialogue_focus,
        "focus_sentences": focus_sentences,
        "explanation_sentence": explanation_sentence,
        "keyword_is_setting": check.flag(raw, "keyword_is_setting"),
    }


def load_catalog(
    dirs: list[str | Path] | None = None, names: list[str] | None = None
) -> dict[str, Ability]:
    """Load the abilities of raypipe's data directory plus any user directories.

    Args:
        dirs: extra directories of ``<name>.yaml`` files, searched after the package's own
            data directory; a file there adds an ability, or replaces the one of the same
            name (the last directory wins).
        names: load only these abilities, in this order. An unknown name raises
            :class:`CatalogError` listing the known ones. ``None`` loads them all.

    Returns:
        ``{name: Ability}``: the paper's abilities first in paper order, then the others
        sorted by name (or the order of ``names`` when given).
    """
    search = [default_data_dir()]
    for d in dirs or []:
        d = Path(d)
        if not d.is_dir():
            raise CatalogError(
                f"{d}: ability directory does not exist or is not a directory. "
                "Pass a directory holding <name>.yaml ability files."
            )
        if d.resolve() not in [s.resolve() for s in search]:
            search.append(d)

    files: dict[str, Path] = {}
    for d in search:
        for path in sorted(d.glob("*.yaml")):
            if not path.name.endswith(CURATED_SUFFIX):
                files[path.stem] = path

    if names is None:
        order = [n for n in ABILITIES if n in files] + sorted(set(files) - set(ABILITIES))
    else:
        order = list(dict.fromkeys(names))
        unknown = [n for n in order if n not in files]
        if unknown:
            known = ", ".join(sorted(files)) or "(none)"
            where = ", ".join(str(d) for d in search)
            raise CatalogError(
                f"unknown ability {unknown[0]!r}. Known abilities: {known}. "
                f"To add one, put {unknown[0]}.yaml in an ability directory (searched: {where})."
            )
    return {name: load_ability(files[name]) for name in order}


# --- validation helpers -------------------------------------------------------------------


def _display(path: Path) -> str:
    """The path as a user would type it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CatalogError(f"{_display(path)}: ability file not found.")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=SAFE_LOADER)
    except yaml.YAMLError as e:
        raise CatalogError(f"{_display(path)}: not valid YAML: {e}. Fix the syntax.") from None
    if not isinstance(raw, dict):
        raise CatalogError(
            f"{_display(path)}: expected a mapping of fields (name: ..., keywords: [...]), "
            f"got {type(raw).__name__}."
        )
    return raw


def _type_hint(value: Any) -> str:
    if isinstance(value, (bool, int, float)):
        # YAML reads yes/no/on/off/true and bare numbers as non-strings.
        return f"got {type(value).__name__} ({value!r}); put the value in quotes"
    return f"got {type(value).__name__}"


def _placeholders(text: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as e:
        raise ValueError(f"bad braces ({e}); write a literal brace as {{{{ or }}}}") from None


class _Checker:
    """Field checks for one file; every failure names the file and the field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, field: str, problem: str) -> None:
        raise CatalogError(f"{_display(self.path)}: field {field!r}: {problem}")

    def text(self, raw: dict, key: str, at: str = "") -> str:
        field = f"{at}.{key}" if at else key
        if key not in raw:
            self.fail(field, "missing. Add it (see the ability file format).")
        value = raw[key]
        if not isinstance(value, str):
            self.fail(field, f"expected a string, {_type_hint(value)}.")
        if not value.strip():
            self.fail(field, "is empty. Write a value.")
        return value.strip()

    def optional_text(self, raw: dict, key: str) -> str:
        """An optional string field: "" when absent or null."""
        if raw.get(key) is None:
            return ""
        if not isinstance(raw[key], str):
            self.fail(key, f"expected a string, {_type_hint(raw[key])}.")
        return " ".join(raw[key].split())

    def optional_texts(self, raw: dict, key: str) -> tuple[str, ...]:
        """An optional list of non-empty strings: () when absent or null."""
        value = raw.get(key)
        if value is None:
            return ()
        if not isinstance(value, list):
            self.fail(key, f"expected a list of strings, {_type_hint(value)}.")
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                self.fail(f"{key}[{i}]", f"expected a non-empty string, {_type_hint(item)}.")
            out.append(" ".join(item.split()))
        return tuple(out)

    def flag(self, raw: dict, key: str) -> bool:
        """An optional true/false field: False when absent."""
        value = raw.get(key, False)
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {type(value).__name__} ({value!r}).")
        return value

    def _list(self, raw: dict, key: str) -> list:
        if key not in raw:
            self.fail(key, f"missing. Add a list of at least {MIN_ITEMS[key]} items.")
        value = raw[key]
        if not isinstance(value, list):
            self.fail(key, f"expected a list, {_type_hint(value)}.")
        if len(value) < MIN_ITEMS[key]:
            self.fail(
                key,
                f"needs at least {MIN_ITEMS[key]} items, got {len(value)}. "
                f"Add {key} or remove the file to drop the ability.",
            )
        return value

    def texts(self, raw: dict, key: str) -> tuple[str, ...]:
        out = []
        for i, item in enumerate(self._list(raw, key)):
            if not isinstance(item, str):
                self.fail(f"{key}[{i}]", f"expected a string, {_type_hint(item)}.")
            if not item.strip():
                self.fail(f"{key}[{i}]", "is empty. Write a value or remove the item.")
            out.append(item.strip())
        return tuple(out)

    def records(self, raw: dict, key: str) -> list[tuple[str, dict]]:
        out = []
        for i, item in enumerate(self._list(raw, key)):
            if not isinstance(item, dict):
                self.fail(f"{key}[{i}]", f"expected a mapping of fields, {_type_hint(item)}.")
            out.append((f"{key}[{i}]", item))
        return out

    def distinct(self, key: str, items: Iterable[str]) -> None:
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            norm = " ".join(item.lower().split())
            if norm in seen:
                self.fail(
                    f"{key}[{i}]",
                    f"duplicate of {key}[{seen[norm]}] ({item!r}). Remove or replace it.",
                )
            seen[norm] = i

    def keyword(self, field: str, keyword: str) -> None:
        if keyword != keyword.lower():
            self.fail(field, f"{keyword!r} must be lowercase.")
        if any(c in keyword for c in ",()\n"):
            # Keywords are spliced into comma-separated, ((bracketed)) prompts.
            self.fail(field, f"{keyword!r} must not contain commas, brackets or newlines.")
        if len(keyword) > _KEYWORD_MAX_CHARS:
            self.fail(field, f"{keyword!r} is longer than {_KEYWORD_MAX_CHARS} characters.")

    def prompt(self, field: str, prompt: str) -> str:
        match = _LEADING_KEYWORD_RE.match(prompt)
        if not match or not match.group(1).strip():
            self.fail(
                field,
                f"{prompt[:60]!r} must start with the ability keyword in double brackets, "
                "e.g. '((crimson)) vintage car, city street, realistic photo, 8k'.",
            )
        return prompt

    def question_type(self, item: dict, at: str) -> str:
        value = self.text(item, "question_type", at)
        if value not in QUESTION_TYPES:
            self.fail(
                f"{at}.question_type", f"{value!r} is not one of {', '.join(QUESTION_TYPES)}."
            )
        return value

    def answer_keywords(self, item: dict, at: str, templated: bool = False) -> tuple[str, ...]:
        field = f"{at}.answer_keywords"
        if "answer_keywords" not in item:
            self.fail(field, "missing. Add at least one keyword a correct answer contains.")
        value = item["answer_keywords"]
        if not isinstance(value, list) or not value:
            self.fail(field, f"expected a non-empty list of strings, {_type_hint(value)}.")
        out = []
        for j, keyword in enumerate(value):
            if not isinstance(keyword, str) or not keyword.strip():
                self.fail(f"{field}[{j}]", f"expected a non-empty string, {_type_hint(keyword)}.")
            if not templated and keyword != keyword.lower():
                self.fail(f"{field}[{j}]", f"{keyword!r} must be lowercase.")
            out.append(keyword.strip())
        return tuple(out)

    def covers_question_types(self, key: str, items: Iterable[Any]) -> None:
        missing = [t for t in QUESTION_TYPES if t not in {x.question_type for x in items}]
        if missing:
            self.fail(
                key,
                f"no item of question_type {', '.join(missing)}. "
                f"Cover all of {', '.join(QUESTION_TYPES)}.",
            )

    def placeholders(
        self, field: str, text: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()
    ) -> None:
        try:
            found = _placeholders(text)
        except ValueError as e:
            self.fail(field, str(e))
        for name in found:
            if name not in allowed:
                self.fail(
                    field,
                    f"unknown placeholder {{{name}}}; allowed: "
                    + ", ".join(f"{{{a}}}" for a in allowed)
                    + ".",
                )
        for name in required:
            if name not in found:
                self.fail(field, f"must contain the placeholder {{{name}}}.")


def _load_curated(path: Path, name: str) -> tuple[str, ...] | None:
    if not path.exists():
        return None
    raw = _read_yaml(path)
    check = _Checker(path)
    ability = check.text(raw, "ability")
    if ability != name:
        check.fail("ability", f"{ability!r} must equal {name!r}, the ability file's name.")
    examples = raw.get("examples")
    if not isinstance(examples, list) or len(examples) < MIN_ITEMS["sd_examples"]:
        got = len(examples) if isinstance(examples, list) else _type_hint(examples)
        check.fail(
            "examples",
            f"needs a list of at least {MIN_ITEMS['sd_examples']} prompts, got {got}. "
            f"Re-run curation, or delete {path.name} to use the seed examples.",
        )
    out = []
    for i, prompt in enumerate(examples):
        if not isinstance(prompt, str):
            check.fail(f"examples[{i}]", f"expected a string, {_type_hint(prompt)}.")
        out.append(check.prompt(f"examples[{i}]", prompt.strip()))
    check.distinct("examples", out)
    return tuple(out)
