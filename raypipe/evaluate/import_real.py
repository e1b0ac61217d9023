"""Importing a real-image benchmark: a folder of images plus a JSONL of items.

Real images (:func:`import_real`): a folder of images plus a JSONL, one item a line::

    {"image": "cat.jpg", "ability": "animal", "question": "Is this a cat or a dog?",
     "question_type": "either_or", "answer_keywords": ["cat"]}

with optional ``"options"`` (the choices of an either-or question), ``"match"``
(``"any"`` keyword suffices, the default, or ``"all"`` are needed), ``"synonyms"``
(``{keyword: [other words that count]}``) and ``"candidates"`` (other answers of the
ability: a wh answer listing one beside the reference is wrong; the catalog's keywords
of the ability are added). Every line is checked; a bad line (not JSON, a field missing
or of the wrong type, an unknown question type or ability, a yes/no item whose first
keyword is not yes or no, an either-or item with fewer than two choices, a
missing or undecodable image, a repeat of an earlier line) is reported with its line
number in the report and in the rejects, and the import goes on. An either-or item
without ``options`` needs a question the scorer reads two choices from
(:func:`raypipe.evaluate.score.question_options`, "Is it X or Y?"); its ``options``
stay empty, and scoring parses the question the same way. PNG and JPEG images are
stored as given; other formats PIL reads are stored as PNG.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs

from raypipe import storage
from raypipe.errors import ConfigError
from raypipe.evaluate.items import (
    BENCHMARK_QUESTION_TYPES,
    IMPORT_STAGE,
    MATCH_RULES,
    PART_ROWS,
    RAW_MAX,
    BenchmarkWriter,
    item_id,
)
from raypipe.evaluate.score import question_options
from raypipe.matching import mentions_keyword

__all__ = ["ImportReport", "import_real"]

_REQUIRED = ("image", "ability", "question", "question_type", "answer_keywords")
_OPTIONAL = ("options", "match", "synonyms", "candidates")
_KEPT_FORMATS = ("PNG", "JPEG", "MPO")  # MPO: a JPEG with extra frames (phone cameras)


@dataclass
class ImportReport:
    """What :func:`import_real` did: counts, and every bad line with its number."""

    benchmark: str
    out: str
    #: Non-blank lines read.
    lines: int = 0
    imported: int = 0
    rejected: int = 0
    per_ability: dict[str, int] = field(default_factory=dict)
    per_question_type: dict[str, int] = field(default_factory=dict)
    #: ``{"line": N, "reason": CODE, "message": TEXT}`` per bad line, in file order.
    bad_lines: list[dict[str, Any]] = field(default_factory=list)
    #: Fields no item has (ignored), with the lines that carry them: typos show here.
    ignored_fields: dict[str, list[int]] = field(default_factory=dict)


class _Line:
    """Problems of one JSONL line: ``(code, message)``, the first code is its reason."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def fail(self, code: str, message: str) -> None:
        self.problems.append((code, message))


def _text_field(rec: dict, key: str, check: _Line, spaces: bool = True) -> str | None:
    """A non-empty string field; ``spaces``: runs of whitespace become one space."""
    value = rec.get(key)
    if key not in rec or value is None:
        check.fail(f"missing_field:{key}", f'missing field "{key}"; add it')
        return None
    if not isinstance(value, str):
        check.fail(f"bad_type:{key}", f'field "{key}" must be a string, got {type(value).__name__}')
        return None
    if not value.strip():
        check.fail(f"empty_field:{key}", f'field "{key}" is empty; write a value')
        return None
    return " ".join(value.split()) if spaces else value.strip()


def _string_list(rec: dict, key: str, check: _Line, required: bool) -> list[str] | None:
    if key not in rec or rec[key] is None:
        if required:
            check.fail(f"missing_field:{key}", f'missing field "{key}"; add a list of strings')
        return None
    value = rec[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        check.fail(f"bad_type:{key}", f'field "{key}" must be a list of non-empty strings')
        return None
    if required and not value:
        check.fail(f"empty_field:{key}", f'field "{key}" is empty; give at least one keyword')
        return None
    return [" ".join(v.split()) for v in value]


def _synonyms(rec: dict, keywords: list[str] | None, check: _Line) -> dict[str, list[str]]:
    """A line's ``synonyms``, each keyed by one of its answer keywords."""
    raw_syn = rec.get("synonyms")
    if raw_syn is None:
        return {}
    if not isinstance(raw_syn, dict) or not all(
        isinstance(v, list) and all(isinstance(s, str) and s.strip() for s in v)
        for v in raw_syn.values()
    ):
        check.fail(
            "bad_type:synonyms",
            '"synonyms" must map each keyword to a list of strings: {"car": ["auto"]}',
        )
        return {}
    synonyms = {k.strip(): [" ".join(s.split()) for s in v] for k, v in raw_syn.items()}
    if keywords is not None:
        known = {k.lower() for k in keywords}
        stray = [k for k in synonyms if k.lower() not in known]
        if stray:
            check.fail(
                "bad_synonyms",
                f"synonyms for {stray[0]!r}, which is not one of answer_keywords "
                f"{keywords}; key synonyms by an answer keyword",
            )
    return synonyms


def _check_record(rec: dict, abilities: frozenset[str] | None, check: _Line) -> dict | None:
    """The item fields of a parsed line (no image yet), or None with problems noted."""
    image = _text_field(rec, "image", check, spaces=False)
    ability = _text_field(rec, "ability", check, spaces=False)
    question = _text_field(rec, "question", check)
    qtype = _text_field(rec, "question_type", check)
    keywords = _string_list(rec, "answer_keywords", check, required=True)
    options = _string_list(rec, "options", check, required=False) or []
    candidates = _string_list(rec, "candidates", check, required=False) or []

    if ability is not None and abilities is not None and ability not in abilities:
        known = ", ".join(sorted(abilities))
        check.fail(
            "unknown_ability",
            f"ability {ability!r} is not in the catalog ({known}); use one of those names",
        )
    if qtype is not None and qtype not in BENCHMARK_QUESTION_TYPES:
        check.fail(
            "unknown_question_type",
            f"question_type {qtype!r} is not one of {', '.join(BENCHMARK_QUESTION_TYPES)}",
        )
    match = rec.get("match", "any")
    if match is None:
        match = "any"
    if match not in MATCH_RULES:
        check.fail("bad_match", f'"match" is {match!r}; use "any" or "all"')

    synonyms = _synonyms(rec, keywords, check)

    if keywords is not None and qtype == "yes_no":
        said = {k.strip().lower() for k in keywords} & {"yes", "no"}
        if len(said) != 1 or keywords[0].strip().lower() not in said:
            check.fail(
                "bad_yes_no",
                'a yes_no item\'s answer_keywords must start with "yes" or "no" (and not '
                f"hold both), the answer it is scored by; got {keywords}",
            )
    if question is not None and qtype == "either_or":
        if options:
            if len({o.lower() for o in options}) < 2:
                check.fail("bad_options", '"options" must give at least 2 different choices')
            elif keywords is not None and not any(
                mentions_keyword(o, k) or mentions_keyword(k, o) for o in options for k in keywords
            ):
                check.fail(
                    "answer_not_an_option",
                    f"answer_keywords {keywords} name none of the options {options}",
                )
        elif len(question_options(question, keywords or ())) < 2:
            check.fail(
                "no_options",
                'an either_or question needs 2 choices: write it as "X or Y?" or give '
                '"options": ["X", "Y"]',
            )
    if check.problems:
        return None
    return {
        "image": image,
        "ability": ability,
        "question": question,
        "question_type": qtype,
        "answer_keywords": keywords,
        "options": options,
        "match": match,
        "synonyms": synonyms,
        "candidates": candidates,
    }


def _load_image(location: str) -> tuple[bytes | None, str, str]:
    """``(bytes to store, code, message)``: bytes None with the reason when unusable."""
    from PIL import Image

    try:
        fs, path = storage.open_location(location)
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None, "missing_image", f"image file {location} not found"
        data = storage.read_bytes(fs, path)
    except (OSError, ValueError) as e:
        return None, "missing_image", f"image file {location} cannot be read: {e}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.format in _KEPT_FORMATS:
                return data, "", ""
            if img.mode not in ("RGB", "RGBA", "L", "LA", "P", "1", "I", "I;16"):
                img = img.convert("RGBA" if "A" in img.mode else "RGB")
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return buf.getvalue(), "", ""
    except Exception as e:  # PIL raises many kinds for bad data
        return None, "bad_image", f"image {location} cannot be decoded ({type(e).__name__}: {e})"


def _read_lines(jsonl_path: str) -> list[bytes]:
    try:
        fs, path = storage.open_location(jsonl_path)
        info = fs.get_file_info(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"items file {jsonl_path} cannot be opened: {e}") from None
    if info.type != pafs.FileType.File:
        raise ConfigError(
            f"items file {jsonl_path} does not exist; give a JSONL of "
            '{"image", "ability", "question", "question_type", "answer_keywords"} lines'
        )
    data = storage.read_bytes(fs, path)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.split(b"\n")


def _decode(raw_bytes: bytes, check: _Line) -> tuple[str, dict | None]:
    """A line's text and JSON object; None for a blank line, or with the problem noted."""
    try:
        raw = raw_bytes.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as e:
        raw = raw_bytes.decode("utf-8", errors="replace").rstrip("\r")
        check.fail("not_utf8", f"line is not UTF-8 text ({e.reason} at byte {e.start})")
        return raw, None
    if not raw.strip():
        return raw, None
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError as e:
        check.fail("bad_json", f"not valid JSON ({e.msg} at column {e.colno})")
        return raw, None
    if not isinstance(rec, dict):
        check.fail("not_an_object", f"expected a JSON object {{...}}, got {type(rec).__name__}")
        return raw, None
    return raw, rec


def _line_item(
    rec: dict,
    known: frozenset[str] | None,
    check: _Line,
    images_dir: str,
    benchmark: str,
    first_line: dict[str, int],
) -> dict[str, Any] | None:
    """The item of a parsed line, image loaded; None with the problems noted."""
    fields = _check_record(rec, known, check)
    if fields is None:
        return None
    iid = item_id(benchmark, fields["ability"], fields)
    if iid in first_line:
        check.fail("duplicate_item", f"same item as line {first_line[iid]}")
        return None
    image = fields["image"]
    location = (
        image if storage.is_uri(image) or image.startswith("/") else storage.join(images_dir, image)
    )
    data, code, message = _load_image(location)
    if data is None:
        check.fail(code, message)
        return None
    return {
        **fields,
        "id": iid,
        "benchmark": benchmark,
        "image": {"bytes": data, "path": image},
        "prompt": "",
    }


def _bad_line(report: ImportReport, n: int, raw: str, ability: str, check: _Line) -> dict:
    """Notes line ``n``'s problems in ``report``; returns its rejects row."""
    code = check.problems[0][0]
    message = "; ".join(m for _, m in check.problems)
    report.bad_lines.append({"line": n, "reason": code, "message": message})
    return {
        "id": f"{report.benchmark}-line-{n}",
        "ability": ability,
        "stage": IMPORT_STAGE,
        "reason": code,
        "raw": raw[:RAW_MAX],
    }


def _check_folder(images_dir: str) -> None:
    fs, path = storage.open_location(images_dir)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise ConfigError(
            f"image folder {images_dir} does not exist or is not a folder; give the folder "
            "the JSONL's image paths are relative to"
        )


def _catalog(abilities: Iterable[str] | None) -> Mapping[str, Any]:
    return abilities if isinstance(abilities, Mapping) else {}


def import_real(
    images_dir: str,
    jsonl_path: str,
    out: str,
    benchmark: str = "real",
    abilities: Iterable[str] | None = None,
    overwrite: bool = False,
) -> ImportReport:
    """Import real images and a JSONL of items (module docstring) into benchmark ``out``.

    Args:
        images_dir: folder (local or URI) the lines' ``image`` paths are relative to; an
            absolute path or a URI in a line is used as it is.
        jsonl_path: the items, one JSON object a line (blank lines are skipped).
        out: benchmark folder to write; a benchmark of the same name there is replaced.
        benchmark: the items' ``benchmark`` name.
        abilities: the names an item's ``ability`` must be one of; a catalog
            (:func:`raypipe.abilities.load_catalog`) also gives each item its ability's
            seed keywords as ``candidates``; None accepts any name.
        overwrite: replace a benchmark of another name in ``out``.

    Bad lines never stop the import: each is in the returned report's ``bad_lines`` and
    in ``out/rejects`` (stage ``import``, id ``<benchmark>-line-<N>``, ``raw`` the line).
    Item ids are :func:`item_id` of the line's item fields; ``source`` is
    ``<jsonl file name>:<line>``.
    """
    images_dir = str(images_dir)
    _check_folder(images_dir)
    lines = _read_lines(str(jsonl_path))
    known = frozenset(abilities) if abilities is not None else None
    # A catalog's seed keywords are the candidate answers of each ability.
    banks = {n: list(getattr(a, "keywords", ())) for n, a in _catalog(abilities).items()}
    writer = BenchmarkWriter(out, benchmark, overwrite=overwrite)
    report = ImportReport(benchmark=benchmark, out=str(out))
    source_name = storage.name(str(jsonl_path))
    first_line: dict[str, int] = {}
    rejects: list[dict[str, Any]] = []
    batch: list[dict[str, Any]] = []
    ignored: dict[str, list[int]] = defaultdict(list)

    def bad(n: int, raw: str, ability: str, check: _Line) -> None:
        rejects.append(_bad_line(report, n, raw, ability, check))

    for n, raw_bytes in enumerate(lines, start=1):
        check = _Line()
        raw, rec = _decode(raw_bytes, check)
        if rec is None and not check.problems:
            continue  # a blank line
        report.lines += 1
        if rec is None:
            bad(n, raw, "", check)
            continue
        for key in rec:
            if key not in _REQUIRED and key not in _OPTIONAL:
                ignored[key].append(n)
        ability = rec.get("ability") if isinstance(rec.get("ability"), str) else ""
        item = _line_item(rec, known, check, images_dir, benchmark, first_line)
        if item is None:
            bad(n, raw, ability, check)
            continue
        first_line[item["id"]] = n
        item["candidates"] = list(dict.fromkeys(item["candidates"] + banks.get(ability, [])))
        batch.append({**item, "source": f"{source_name}:{n}"})
        if len(batch) >= PART_ROWS:
            writer.add_items(batch)
            batch = []
    writer.add_items(batch)
    writer.add_rejects(rejects)
    report.imported = len(writer.ids)
    report.rejected = len(rejects)
    report.per_ability = dict(sorted(writer.per_ability.items()))
    report.per_question_type = dict(sorted(writer.per_question_type.items()))
    report.ignored_fields = {k: v for k, v in sorted(ignored.items())}
    writer.close({**asdict(report), "images": images_dir, "items_file": str(jsonl_path)})
    return report
