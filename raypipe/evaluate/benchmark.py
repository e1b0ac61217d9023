"""Benchmark items: their Parquet form, real-image imports, and the training-overlap filter.

A benchmark folder ``BENCH`` (a local path or any URI pyarrow opens) holds:

- ``BENCH/items/*.parquet``: items in :data:`BENCHMARK_SCHEMA`, one question per image,
  with its reference answer keywords, the image bytes, and where the item came from;
- ``BENCH/rejects/*.parquet``: what was turned away, in :data:`raypipe.schema.REJECT_SCHEMA`
  (stage ``import`` for bad JSONL lines, ``overlap`` for items too close to the
  training data), ``raw`` holding the line as given or what the item overlaps;
- ``BENCH/report.json``: counts per ability and question type, the problems found, and
  the list of parts that make up the benchmark.

Parts are written whole or not at all (:class:`raypipe.generate.store.OutputStore`) and
``report.json`` is written last, listing the parts: readers take exactly those, so a
benchmark rewritten into the same folder (a re-import after fixing lines) never mixes
old and new items, even if the writer was killed before it removed the old parts.

Real images (:func:`import_real`): a folder of images plus a JSONL, one item a line::

    {"image": "cat.jpg", "ability": "animal", "question": "Is this a cat or a dog?",
     "question_type": "either_or", "answer_keywords": ["cat"]}

with optional ``"options"`` (the choices of an either-or question), ``"match"``
(``"any"`` keyword suffices, the default, or ``"all"`` are needed) and ``"synonyms"``
(``{keyword: [other words that count]}``). Every line is checked; a bad line (not JSON,
a field missing or of the wrong type, an unknown question type or ability, a yes/no item
whose keywords are not yes or no, an either-or item with fewer than two choices, a
missing or undecodable image, a repeat of an earlier line) is reported with its line
number in the report and in the rejects, and the import goes on. An either-or item
without ``options`` needs a question the scorer reads two choices from
(:func:`raypipe.evaluate.score.question_options`, "Is it X or Y?"); its ``options``
stay empty, and scoring parses the question the same way. PNG and JPEG images are
stored as given; other formats PIL reads are stored as PNG.

Overlap (:func:`overlap_filter`, the paper's check that benchmark items are absent from
the training data), per ability:

1. ``keyword_overlap``: the item's emphasised keyword (the ``((...))`` terms of its
   prompt, else its answer keywords) and a training row's keyword (its ``keywords``
   column and the ``((...))`` terms of its prompt) name each other
   (:func:`raypipe.matching.mentions_keyword`, either way round), and the rest of the
   two prompts overlap strongly: the Jaccard similarity of their content words (stems,
   stopwords and both keywords left out) is at least ``threshold``.
2. ``near_duplicate_prompt``: the item's prompt repeats a training prompt, exactly or
   nearly (:class:`raypipe.generate.dedup.NearDuplicateIndex`, word-bigram Jaccard at
   least ``near_duplicate_threshold``).

Training rows are indexed by ability and by the stems of their keywords, so an item is
compared only with the rows that share a keyword word. Items without a prompt (real
images) have nothing to compare and are kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raypipe import storage
from raypipe.errors import ConfigError
from raypipe.evaluate.score import question_options
from raypipe.generate.dedup import NearDuplicateIndex, jaccard, shingles
from raypipe.generate.store import OutputStore
from raypipe.matching import (
    STOPWORDS,
    emphasized_keywords,
    mentions_keyword,
    stem,
    strip_emphasis,
    words,
)
from raypipe.schema import IMAGE_TYPE, REJECT_COLUMNS, REJECT_SCHEMA, SAMPLE_SCHEMA, rows_to_table
from raypipe.train.sources import parquet_files

__all__ = [
    "BENCHMARK_COLUMNS",
    "BENCHMARK_QUESTION_TYPES",
    "BENCHMARK_SCHEMA",
    "MATCH_RULES",
    "BenchmarkWriter",
    "ImportReport",
    "import_real",
    "item_id",
    "items_from_samples",
    "items_to_table",
    "overlap_filter",
    "read_benchmark",
    "read_benchmark_rejects",
    "read_benchmark_report",
    "read_training_prompts",
    "validate_items",
    "write_benchmark",
]

#: Question types a benchmark item may carry (the paper's yes/no, wh- and either-or).
BENCHMARK_QUESTION_TYPES = ("yes_no", "wh", "either_or")
#: How an item's answer keywords combine: one of them suffices, or all are needed.
MATCH_RULES = ("any", "all")

BENCHMARK_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("benchmark", pa.string()),  # "synthetic", "real", ...
        ("ability", pa.string()),
        ("image", IMAGE_TYPE),
        ("question", pa.string()),
        ("question_type", pa.string()),  # one of BENCHMARK_QUESTION_TYPES
        ("answer_keywords", pa.list_(pa.string())),
        ("options", pa.list_(pa.string())),  # either-or choices; may be empty
        ("match", pa.string()),  # one of MATCH_RULES
        ("synonyms", pa.string()),  # JSON {keyword: [synonym, ...]}
        ("prompt", pa.string()),  # the SD prompt of a synthetic item; "" for real images
        ("source", pa.string()),  # where the item came from ("items.jsonl:12")
    ],
    metadata={
        b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}}).encode()
    },
)
BENCHMARK_COLUMNS = tuple(BENCHMARK_SCHEMA.names)

ITEMS, REJECTS, REPORT = "items", "rejects", "report.json"
#: Items per Parquet part (the store's row groups split them further).
PART_ROWS = 1024
#: Rejects ``stage`` of bad import lines and of items dropped for overlap.
IMPORT_STAGE, OVERLAP_STAGE = "import", "overlap"
KEYWORD_OVERLAP, NEAR_DUPLICATE = "keyword_overlap", "near_duplicate_prompt"

_REQUIRED = ("image", "ability", "question", "question_type", "answer_keywords")
_OPTIONAL = ("options", "match", "synonyms")
_KEPT_FORMATS = ("PNG", "JPEG", "MPO")  # MPO: a JPEG with extra frames (phone cameras)
_RAW_MAX = 20000


# ---------------------------------------------------------------------------------------
# Items and tables
# ---------------------------------------------------------------------------------------


def item_id(benchmark: str, ability: str, content: Any) -> str:
    """Stable id ``<benchmark>-<ability>-<12 hex>`` from what defines the item.

    ``content`` is hashed as canonical JSON (sorted keys), so the same line gives the
    same id wherever it sits in the file and however it is spaced.
    """
    text = json.dumps(content, sort_keys=True, ensure_ascii=False, default=str)
    return f"{benchmark}-{ability}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _item_defaults(row: Mapping[str, Any]) -> dict[str, Any]:
    out = {name: row.get(name) for name in BENCHMARK_COLUMNS}
    image = out["image"]
    if isinstance(image, (bytes, bytearray)):
        out["image"] = {"bytes": bytes(image), "path": None}
    out["options"] = list(out["options"] or [])
    out["match"] = out["match"] or "any"
    synonyms = out["synonyms"]
    if synonyms is None or synonyms == "":
        out["synonyms"] = "{}"
    elif not isinstance(synonyms, str):
        out["synonyms"] = json.dumps(synonyms, sort_keys=True, ensure_ascii=False)
    out["prompt"] = out["prompt"] or ""
    out["source"] = out["source"] or ""
    return out


def items_to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Item dicts -> a :data:`BENCHMARK_SCHEMA` table.

    Defaults: ``options`` [], ``match`` "any", ``synonyms`` "{}" (a dict is written as
    JSON), ``prompt`` and ``source`` "". An ``image`` given as bytes becomes the struct.
    """
    return rows_to_table([_item_defaults(r) for r in rows], BENCHMARK_SCHEMA)


def items_from_samples(samples: pa.Table | Iterable[Mapping[str, Any]], benchmark: str) -> pa.Table:
    """Benchmark items from generated samples (SAMPLE_SCHEMA rows whose
    ``question_type`` and ``answer_keywords`` are filled): the first human turn, without
    its ``<image>`` marker, is the question; the prompt and image are kept."""
    rows = samples.to_pylist() if isinstance(samples, pa.Table) else list(samples)
    items = []
    for r in rows:
        turns = r.get("conversations") or []
        question = next((t["value"] for t in turns if t["from"] == "human"), "")
        question = question.replace("<image>", "").strip()
        items.append(
            {
                "id": r["id"],
                "benchmark": benchmark,
                "ability": r["ability"],
                "image": r["image"],
                "question": question,
                "question_type": r["question_type"],
                "answer_keywords": list(r.get("answer_keywords") or []),
                "prompt": r.get("prompt") or "",
                "source": f"sd_model={r.get('sd_model') or ''}; llm_model="
                f"{r.get('llm_model') or ''}; seed={r.get('seed')}",
            }
        )
    return items_to_table(items)


def validate_items(table: pa.Table) -> list[str]:
    """Problems with an item table (empty list = valid): schema, ids, fields, images."""
    if not table.schema.equals(BENCHMARK_SCHEMA, check_metadata=False):
        return [f"schema differs: {table.schema} != {BENCHMARK_SCHEMA}"]
    problems = []
    seen: set[str] = set()
    for row in table.to_pylist():
        rid = row["id"]
        if not rid:
            problems.append("an item has no id")
        elif rid in seen:
            problems.append(f"{rid}: id repeated")
        seen.add(rid)
        if row["question_type"] not in BENCHMARK_QUESTION_TYPES:
            problems.append(f"{rid}: question_type {row['question_type']!r}")
        if not row["question"]:
            problems.append(f"{rid}: no question")
        if not row["answer_keywords"] or not all(k.strip() for k in row["answer_keywords"]):
            problems.append(f"{rid}: answer_keywords must be non-empty strings")
        if row["match"] not in MATCH_RULES:
            problems.append(f"{rid}: match {row['match']!r}")
        try:
            ok = isinstance(json.loads(row["synonyms"] or ""), dict)
        except json.JSONDecodeError:
            ok = False
        if not ok:
            problems.append(f"{rid}: synonyms is not a JSON object")
        if not row["image"] or not row["image"]["bytes"]:
            problems.append(f"{rid}: no image bytes")
    return problems


# ---------------------------------------------------------------------------------------
# The benchmark folder
# ---------------------------------------------------------------------------------------


def _as_table(rows: pa.Table | Iterable[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows
    rows = list(rows)
    if schema is BENCHMARK_SCHEMA:
        return items_to_table(rows)
    return rows_to_table([dict(r) for r in rows], schema)


class BenchmarkWriter:
    """Writes one benchmark into ``out``: parts as items arrive, then ``report.json``.

    ``close`` writes the report (which lists this writer's parts, so readers see the new
    benchmark whole from then on) and removes parts an earlier benchmark left in the
    folder. A folder whose report names another benchmark is refused unless
    ``overwrite``.
    """

    def __init__(self, out: str, benchmark: str, overwrite: bool = False):
        if not benchmark:
            raise ValueError("a benchmark needs a name (e.g. 'synthetic' or 'real')")
        self.out, self.benchmark = str(out), benchmark
        self.store = OutputStore(self.out)
        old = self.store.read_json(REPORT)
        if old and old.get("benchmark") not in (None, benchmark) and not overwrite:
            raise ConfigError(
                f"{self.out} holds benchmark {old.get('benchmark')!r}, not {benchmark!r}; "
                "write to another folder, or pass overwrite=True to replace it"
            )
        self.parts: dict[str, list[str]] = {ITEMS: [], REJECTS: []}
        self.ids: set[str] = set()
        self.per_ability: Counter[str] = Counter()
        self.per_question_type: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def add_items(self, rows: pa.Table | Iterable[Mapping[str, Any]]) -> None:
        table = _as_table(rows, BENCHMARK_SCHEMA)
        if table.num_rows == 0:
            return
        problems = validate_items(table)
        if problems and problems[0].startswith("schema differs"):
            raise ValueError(f"benchmark items must be in BENCHMARK_SCHEMA: {problems[0]}")
        names = set(table.column("benchmark").to_pylist())
        if names - {self.benchmark}:
            raise ValueError(
                f"items of benchmark {sorted(names - {self.benchmark})} written into "
                f"benchmark {self.benchmark!r}: a folder holds one benchmark"
            )
        ids = table.column("id").to_pylist()
        problems += [f"{i}: id already written" for i in ids if i in self.ids]
        if problems:
            raise ValueError("bad benchmark items: " + "; ".join(problems[:5]))
        self.ids.update(ids)
        self.per_ability.update(table.column("ability").to_pylist())
        self.per_question_type.update(table.column("question_type").to_pylist())
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= PART_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        self._pending, self._pending_rows = [], 0
        for start in range(0, table.num_rows, PART_ROWS):
            self._write(ITEMS, table.slice(start, PART_ROWS))

    def add_rejects(self, rows: pa.Table | Iterable[Mapping[str, Any]]) -> None:
        table = _as_table(rows, REJECT_SCHEMA).select(list(REJECT_COLUMNS))
        if table.num_rows:
            self.rejected.update(table.column("reason").to_pylist())
            self._write(REJECTS, table)

    def _write(self, sub: str, table: pa.Table) -> None:
        path = self.store.write_table(sub, table)
        name = storage.name(path)
        if name not in self.parts[sub]:
            self.parts[sub].append(name)

    def close(self, report: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write the remaining items and ``report.json`` (``report`` merged in); returns it."""
        self._flush()
        summary = {
            **dict(report or {}),
            "benchmark": self.benchmark,
            "items": len(self.ids),
            "rejects": sum(self.rejected.values()),
            "per_ability": dict(sorted(self.per_ability.items())),
            "per_question_type": dict(sorted(self.per_question_type.items())),
            "reject_reasons": dict(sorted(self.rejected.items())),
            "parts": {sub: sorted(names) for sub, names in self.parts.items()},
        }
        self.store.write_json(REPORT, summary)
        for sub, keep in self.parts.items():
            for path in _part_paths(self.store, sub):
                if storage.name(path) not in keep:
                    self.store.fs.delete_file(path)
        if self.store.local:  # temporary files of a killed writer
            for sub in self.parts:
                for leftover in _hidden_parts(self.store, sub):
                    self.store.fs.delete_file(leftover)
        return summary


def _part_paths(store: OutputStore, sub: str) -> list[str]:
    return storage.list_files(store.fs, store.path(sub), ".parquet", recursive=False)


def _hidden_parts(store: OutputStore, sub: str) -> list[str]:
    sel = pafs.FileSelector(store.path(sub), allow_not_found=True)
    return [
        i.path
        for i in store.fs.get_file_info(sel)
        if i.type == pafs.FileType.File and i.base_name.startswith(".tmp-")
    ]


def write_benchmark(
    out: str,
    items: pa.Table | Iterable[Mapping[str, Any]],
    rejects: pa.Table | Iterable[Mapping[str, Any]] = (),
    report: Mapping[str, Any] | None = None,
    *,
    benchmark: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a whole benchmark folder (items, rejects, ``report.json``); returns the report.

    ``benchmark`` defaults to the items' ``benchmark`` column (one name). Items are
    checked (:func:`validate_items`); a bad one raises ValueError naming it.
    """
    table = _as_table(items, BENCHMARK_SCHEMA)
    if benchmark is None:
        names = sorted(set(table.column("benchmark").to_pylist()))
        if len(names) != 1 or not names[0]:
            raise ValueError(
                f"items name benchmarks {names}; give benchmark=NAME (one name per folder)"
            )
        benchmark = names[0]
    writer = BenchmarkWriter(out, benchmark, overwrite=overwrite)
    writer.add_items(table)
    writer.add_rejects(rejects)
    return writer.close(report)


def _listed_parts(out: str, sub: str) -> tuple[OutputStore, list[str]]:
    store = OutputStore(str(out))
    report = store.read_json(REPORT)
    if report is not None and isinstance(report.get("parts"), dict):
        paths = [store.path(sub, n) for n in report["parts"].get(sub, [])]
        for path in paths:
            if store.fs.get_file_info(path).type != pafs.FileType.File:
                raise ConfigError(
                    f"{out}: {sub}/{storage.name(path)}, listed in {REPORT}, is missing; "
                    "the folder was changed after it was written: write the benchmark again"
                )
        return store, paths
    return store, _part_paths(store, sub)


def _read_parts(out: str, sub: str, schema: pa.Schema, columns: list[str] | None) -> pa.Table:
    store, paths = _listed_parts(out, sub)
    wanted = list(columns or schema.names)
    unknown = [c for c in wanted if c not in schema.names]
    if unknown:
        raise ValueError(f"unknown columns {unknown}; a benchmark has {list(schema.names)}")
    tables = []
    for path in paths:
        names = pq.read_schema(path, filesystem=store.fs).names
        missing = [c for c in wanted if c not in names]
        if missing:
            raise ConfigError(
                f"{out}: {sub}/{storage.name(path)} lacks columns {missing}: not a raypipe "
                "benchmark part (see raypipe.evaluate.benchmark)"
            )
        t = pq.read_table(path, columns=wanted, filesystem=store.fs)
        tables.append(t.cast(pa.schema([schema.field(c) for c in wanted])))
    if not tables:
        return pa.schema([schema.field(c) for c in wanted]).empty_table()
    return pa.concat_tables(tables)


def read_benchmark(out: str, columns: list[str] | None = None) -> pa.Table:
    """The items of a benchmark folder (only ``columns`` if given: leave out ``image``
    for bookkeeping). A folder with no items gives an empty table."""
    store = OutputStore(str(out))
    if store.fs.get_file_info(store.path()).type == pafs.FileType.NotFound:
        raise ConfigError(
            f"benchmark folder {out} does not exist; build one (jobs/evaluate.py build) or "
            "import real images (jobs/evaluate.py import)"
        )
    table = _read_parts(out, ITEMS, BENCHMARK_SCHEMA, columns)
    if columns is None:
        table = table.replace_schema_metadata(BENCHMARK_SCHEMA.metadata)
    return table


def read_benchmark_rejects(out: str) -> pa.Table:
    """The rejects of a benchmark folder (REJECT_SCHEMA)."""
    return _read_parts(out, REJECTS, REJECT_SCHEMA, None)


def read_benchmark_report(out: str) -> dict[str, Any] | None:
    """``report.json`` of a benchmark folder, or None if it has none."""
    return OutputStore(str(out)).read_json(REPORT)


# ---------------------------------------------------------------------------------------
# Real-image import
# ---------------------------------------------------------------------------------------


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


def _check_record(rec: dict, abilities: frozenset[str] | None, check: _Line) -> dict | None:
    """The item fields of a parsed line (no image yet), or None with problems noted."""
    image = _text_field(rec, "image", check, spaces=False)
    ability = _text_field(rec, "ability", check, spaces=False)
    question = _text_field(rec, "question", check)
    qtype = _text_field(rec, "question_type", check)
    keywords = _string_list(rec, "answer_keywords", check, required=True)
    options = _string_list(rec, "options", check, required=False) or []

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

    synonyms: dict[str, list[str]] = {}
    raw_syn = rec.get("synonyms")
    if raw_syn is not None:
        if not isinstance(raw_syn, dict) or not all(
            isinstance(v, list) and all(isinstance(s, str) and s.strip() for s in v)
            for v in raw_syn.values()
        ):
            check.fail(
                "bad_type:synonyms",
                '"synonyms" must map each keyword to a list of strings: {"car": ["auto"]}',
            )
        else:
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

    if keywords is not None and qtype == "yes_no":
        said = {k.strip().lower() for k in keywords} & {"yes", "no"}
        if len(said) != 1:
            check.fail(
                "bad_yes_no",
                'a yes_no item\'s answer_keywords must hold "yes" or "no" (one of them), '
                f"got {keywords}",
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
        abilities: the names an item's ``ability`` must be one of (e.g. the keys of
            :func:`raypipe.abilities.load_catalog`); None accepts any name.
        overwrite: replace a benchmark of another name in ``out``.

    Bad lines never stop the import: each is in the returned report's ``bad_lines`` and
    in ``out/rejects`` (stage ``import``, id ``<benchmark>-line-<N>``, ``raw`` the line).
    Item ids are :func:`item_id` of the line's item fields; ``source`` is
    ``<jsonl file name>:<line>``.
    """
    images_dir = str(images_dir)
    fs, path = storage.open_location(images_dir)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise ConfigError(
            f"image folder {images_dir} does not exist or is not a folder; give the folder "
            "the JSONL's image paths are relative to"
        )
    lines = _read_lines(str(jsonl_path))
    known = frozenset(abilities) if abilities is not None else None
    writer = BenchmarkWriter(out, benchmark, overwrite=overwrite)
    report = ImportReport(benchmark=benchmark, out=str(out))
    source_name = storage.name(str(jsonl_path))
    first_line: dict[str, int] = {}
    rejects: list[dict[str, Any]] = []
    batch: list[dict[str, Any]] = []
    ignored: dict[str, list[int]] = defaultdict(list)

    def bad(n: int, raw: str, ability: str, check: _Line) -> None:
        code = check.problems[0][0]
        message = "; ".join(m for _, m in check.problems)
        report.bad_lines.append({"line": n, "reason": code, "message": message})
        rejects.append(
            {
                "id": f"{benchmark}-line-{n}",
                "ability": ability,
                "stage": IMPORT_STAGE,
                "reason": code,
                "raw": raw[:_RAW_MAX],
            }
        )

    for n, raw_bytes in enumerate(lines, start=1):
        check = _Line()
        try:
            raw = raw_bytes.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            raw = raw_bytes.decode("utf-8", errors="replace").rstrip("\r")
            check.fail("not_utf8", f"line is not UTF-8 text ({e.reason} at byte {e.start})")
            report.lines += 1
            bad(n, raw, "", check)
            continue
        if not raw.strip():
            continue
        report.lines += 1
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            check.fail("bad_json", f"not valid JSON ({e.msg} at column {e.colno})")
            bad(n, raw, "", check)
            continue
        if not isinstance(rec, dict):
            check.fail("not_an_object", f"expected a JSON object {{...}}, got {type(rec).__name__}")
            bad(n, raw, "", check)
            continue
        for key in rec:
            if key not in _REQUIRED and key not in _OPTIONAL:
                ignored[key].append(n)
        ability = rec.get("ability") if isinstance(rec.get("ability"), str) else ""
        fields = _check_record(rec, known, check)
        if fields is None:
            bad(n, raw, ability, check)
            continue
        iid = item_id(benchmark, fields["ability"], fields)
        if iid in first_line:
            check.fail("duplicate_item", f"same item as line {first_line[iid]}")
            bad(n, raw, ability, check)
            continue
        location = (
            fields["image"]
            if storage.is_uri(fields["image"]) or fields["image"].startswith("/")
            else storage.join(images_dir, fields["image"])
        )
        data, code, message = _load_image(location)
        if data is None:
            check.fail(code, message)
            bad(n, raw, ability, check)
            continue
        first_line[iid] = n
        batch.append(
            {
                **fields,
                "id": iid,
                "benchmark": benchmark,
                "image": {"bytes": data, "path": fields["image"]},
                "prompt": "",
                "source": f"{source_name}:{n}",
            }
        )
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
    summary = asdict(report)
    summary.update(images=images_dir, items_file=str(jsonl_path))
    writer.close(summary)
    return report


# ---------------------------------------------------------------------------------------
# Overlap with the training data
# ---------------------------------------------------------------------------------------


def _stems_of(text: str) -> list[str]:
    """Content-word stems of a keyword (all its words if it has only stopwords)."""
    ws = words(strip_emphasis(text))
    content = [w for w in ws if w not in STOPWORDS] or ws
    return [stem(w) for w in content]


def _index_keys(keyword: str) -> set[str]:
    """Keys a keyword is filed under: its content stems, and adjacent words written
    together (``t shirt`` / ``t-shirt`` -> ``tshirt``), as mentions_keyword meets them."""
    ws = words(strip_emphasis(keyword))
    keys = set(_stems_of(keyword))
    keys |= {stem(a + b) for a, b in zip(ws, ws[1:])}
    if len(ws) > 1:
        keys.add(stem("".join(ws)))
    return keys


@lru_cache(maxsize=65536)
def _same_keyword(a: str, b: str) -> bool:
    return mentions_keyword(a, b) or mentions_keyword(b, a)


@lru_cache(maxsize=65536)
def _word_stems(keyword: str) -> frozenset[str]:
    """Stems of every word of a keyword: what is left out of prompts compared on it."""
    return frozenset(stem(w) for w in words(strip_emphasis(keyword)))


def _prompt_stems(prompt: str) -> frozenset[str]:
    """Content-word stems of a prompt's plain text."""
    return frozenset(stem(w) for w in words(strip_emphasis(prompt)) if w not in STOPWORDS)


def _row_keywords(row: Mapping[str, Any]) -> list[str]:
    kws = [k for k in (row.get("keywords") or []) if k and k.strip()]
    for k in emphasized_keywords(row.get("prompt") or ""):
        if k not in kws:
            kws.append(k)
    return kws


class _AbilityIndex:
    """Training rows of one ability: by keyword key, and a near-duplicate index."""

    def __init__(self, rows: list[Mapping[str, Any]], near_threshold: float):
        self.rows = rows
        self.keywords = [_row_keywords(r) for r in rows]
        self.by_key: dict[str, list[int]] = defaultdict(list)
        for i, kws in enumerate(self.keywords):
            for key in {k for kw in kws for k in _index_keys(kw)}:
                self.by_key[key].append(i)
        self.stems: dict[int, frozenset[str]] = {}  # filled as rows become candidates
        self.near = NearDuplicateIndex(threshold=near_threshold)
        self.by_id: dict[str, int] = {}
        for i, r in enumerate(rows):
            plain = strip_emphasis(r.get("prompt") or "")
            if plain:
                self.near.add(r["id"], plain)
                self.by_id.setdefault(r["id"], i)

    def keyword_overlap(
        self, prompt: str, item_keywords: list[str], threshold: float
    ) -> dict[str, Any] | None:
        """The training row whose keyword the item shares and whose other words overlap
        it most (at least ``threshold``), as reject details; None if none does."""
        best: tuple[float, dict[str, Any]] | None = None
        item_stems = _prompt_stems(prompt)
        for kw in item_keywords:
            candidates = sorted({i for key in _index_keys(kw) for i in self.by_key.get(key, ())})
            for i in candidates:
                shared = next((rk for rk in self.keywords[i] if _same_keyword(kw, rk)), None)
                if shared is None:
                    continue
                if i not in self.stems:
                    self.stems[i] = _prompt_stems(self.rows[i].get("prompt") or "")
                drop = _word_stems(kw) | _word_stems(shared)
                score = jaccard(item_stems - drop, self.stems[i] - drop)
                if score >= threshold and (best is None or score > best[0]):
                    best = (
                        score,
                        {
                            "overlaps": self.rows[i]["id"],
                            "keyword": kw,
                            "training_keyword": shared,
                            "training_prompt": self.rows[i].get("prompt") or "",
                            "jaccard": round(score, 4),
                        },
                    )
        return best[1] if best else None

    def near_duplicate(self, prompt: str) -> dict[str, Any] | None:
        plain = strip_emphasis(prompt)
        hit = self.near.check("", plain)
        if hit is None:
            return None
        other = self.rows[self.by_id[hit[1]]]
        other_prompt = other.get("prompt") or ""
        return {
            "overlaps": other["id"],
            "training_prompt": other_prompt,
            "jaccard": round(jaccard(shingles(plain), shingles(strip_emphasis(other_prompt))), 4),
        }


def _rows(rows: pa.Table | Iterable[Mapping[str, Any]], columns: Sequence[str]) -> list[dict]:
    if isinstance(rows, pa.Table):
        present = [c for c in columns if c in rows.column_names]
        return rows.select(present).to_pylist()
    return [dict(r) for r in rows]


def overlap_filter(
    items: pa.Table | Iterable[Mapping[str, Any]],
    training_rows: pa.Table | Iterable[Mapping[str, Any]],
    threshold: float = 0.5,
    near_duplicate_threshold: float = 0.8,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split benchmark items into ``(kept, dropped)`` by overlap with the training rows.

    ``items``: rows with ``id``, ``ability``, ``prompt`` and ``answer_keywords`` (other
    fields, images included, are carried through untouched). ``training_rows``: rows
    with ``id``, ``ability``, ``prompt`` and optionally ``keywords`` (a raypipe run's
    samples; :func:`read_training_prompts` reads just these). ``kept`` holds the items
    in their order; ``dropped`` holds a rejects row (REJECT_SCHEMA columns, stage
    ``overlap``) per dropped item, its reason ``keyword_overlap`` or
    ``near_duplicate_prompt`` and its ``raw`` a JSON object naming the training row it
    overlaps (``overlaps``), that row's prompt and the similarity found. The keyword
    check comes first; rules in the module docstring.
    """
    for name, value in (
        ("threshold", threshold),
        ("near_duplicate_threshold", near_duplicate_threshold),
    ):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= 1):
            raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    items = items.to_pylist() if isinstance(items, pa.Table) else [dict(r) for r in items]
    wanted = {r.get("ability") for r in items}
    by_ability: dict[str, list[dict]] = defaultdict(list)
    for r in _rows(training_rows, ("id", "ability", "prompt", "keywords")):
        if r.get("ability") in wanted:
            by_ability[r["ability"]].append(r)
    indexes = {ab: _AbilityIndex(rows, near_duplicate_threshold) for ab, rows in by_ability.items()}

    kept: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    for item in items:
        prompt = item.get("prompt") or ""
        index = indexes.get(item.get("ability"))
        if index is None or not words(strip_emphasis(prompt)):
            kept.append(item)
            continue
        keywords = emphasized_keywords(prompt) or [
            k for k in (item.get("answer_keywords") or []) if k and k.strip()
        ]
        reason, detail = KEYWORD_OVERLAP, index.keyword_overlap(prompt, keywords, threshold)
        if detail is None:
            reason, detail = NEAR_DUPLICATE, index.near_duplicate(prompt)
        if detail is None:
            kept.append(item)
            continue
        dropped.append(
            {
                "id": item.get("id"),
                "ability": item.get("ability"),
                "stage": OVERLAP_STAGE,
                "reason": reason,
                "raw": json.dumps({"prompt": prompt, **detail}, sort_keys=True)[:_RAW_MAX],
            }
        )
    return kept, dropped


def read_training_prompts(locations: str | Sequence[str]) -> pa.Table:
    """``id``, ``ability``, ``prompt`` and ``keywords`` of raypipe training samples.

    ``locations``: one or more generation runs (OUT, OUT/data or one Parquet file, local
    or URIs), as training's ``--data`` names them. Only those columns are read: no image
    bytes leave the files. A part without ``keywords`` gives empty lists.
    """
    columns = ["id", "ability", "prompt", "keywords"]
    schema = pa.schema([SAMPLE_SCHEMA.field(c) for c in columns])
    tables = []
    for location in [locations] if isinstance(locations, str) else list(locations):
        fs, files = parquet_files(str(location))
        for path in files:
            names = pq.read_schema(path, filesystem=fs).names
            missing = [c for c in columns[:3] if c not in names]
            if missing:
                raise ConfigError(
                    f"{path} lacks columns {missing}: not raypipe samples; give a generation "
                    "run's OUT (or OUT/data)"
                )
            t = pq.read_table(path, columns=[c for c in columns if c in names], filesystem=fs)
            if "keywords" not in t.column_names:
                t = t.append_column(
                    "keywords", pa.array([[]] * t.num_rows, type=pa.list_(pa.string()))
                )
            tables.append(t.select(columns).cast(schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()
