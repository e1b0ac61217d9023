"""Benchmark items: their Parquet form and the benchmark folder (:mod:`raypipe.evaluate.import_real`
imports real images, :mod:`raypipe.evaluate.overlap` filters items against the training data).

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
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raypipe import storage
from raypipe.errors import ConfigError
from raypipe.generate.store import OutputStore
from raypipe.schema import IMAGE_TYPE, REJECT_COLUMNS, REJECT_SCHEMA, rows_to_table

__all__ = [
    "BENCHMARK_COLUMNS",
    "BENCHMARK_QUESTION_TYPES",
    "BENCHMARK_SCHEMA",
    "MATCH_RULES",
    "BenchmarkWriter",
    "item_id",
    "items_from_samples",
    "items_to_table",
    "read_benchmark",
    "read_benchmark_rejects",
    "read_benchmark_report",
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
        # Other answers of the item's ability (its keyword bank): a wh answer that lists
        # one of them beside the reference is wrong (raypipe.evaluate.score). May be empty.
        ("candidates", pa.list_(pa.string())),
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
# Item columns that parts written by earlier raypipe versions lack (read as empty).
_ADDED_LATER = ("candidates",)
#: Longest ``raw`` text a reject keeps.
RAW_MAX = 20000


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
    out["candidates"] = list(out["candidates"] or [])
    return out


def items_to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Item dicts -> a :data:`BENCHMARK_SCHEMA` table.

    Defaults: ``options`` and ``candidates`` [], ``match`` "any", ``synonyms`` "{}" (a
    dict is written as JSON), ``prompt`` and ``source`` "". An ``image`` given as bytes becomes the struct.
    """
    return rows_to_table([_item_defaults(r) for r in rows], BENCHMARK_SCHEMA)


def items_from_samples(
    samples: pa.Table | Iterable[Mapping[str, Any]],
    benchmark: str,
    banks: Mapping[str, Sequence[str]] | None = None,
) -> pa.Table:
    """Benchmark items from generated samples (SAMPLE_SCHEMA rows whose
    ``question_type`` and ``answer_keywords`` are filled): the first human turn, without
    its ``<image>`` marker, is the question; the prompt and image are kept; ``banks``
    (ability -> keywords of the generation run) give each item its ``candidates``."""
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
                "candidates": list((banks or {}).get(r["ability"], ())),
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
        missing = [c for c in wanted if c not in names and c not in _ADDED_LATER]
        if missing:
            raise ConfigError(
                f"{out}: {sub}/{storage.name(path)} lacks columns {missing}: not a raypipe "
                "benchmark part (see raypipe.evaluate.items)"
            )
        t = pq.read_table(path, columns=[c for c in wanted if c in names], filesystem=store.fs)
        for name in (c for c in wanted if c not in names):  # a part older than the column
            t = t.append_column(name, pa.array([[]] * t.num_rows, schema.field(name).type))
        t = t.select(wanted)
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
