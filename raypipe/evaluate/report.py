"""Predictions -> verdicts -> the report: ``scores.json``, ``predictions.parquet``,
``report.md``, Figure-6-style charts, and a human-review sheet that comes back as scores.

Predictions are rows of ``id``, ``model``, ``benchmark``, ``ability``, ``question``,
``question_type``, ``answer_keywords``, ``prediction`` (optional: ``options``,
``match``, ``synonyms``, ``latency_s``, tokens, ``judge_correct``). They come from
``jobs/evaluate.py predict`` or from anyone: a JSONL of the same fields with no images
and no model name (the model is then called ``predictions``) re-scores published
answers. Each row gets the keyword verdict of :func:`raypipe.evaluate.score.score_answer`
(``correct``, ``matched``, ``verdict_reason``). Every item counts: a failed prediction
(``prediction`` null, ``error`` saying why) is a wrong answer, reason ``error``, and an
item one model answered but another has no row for is a failed prediction of the other.

``scores.json``::

    {"models": {MODEL: {"benchmarks": {BENCH: {"overall": S, "abilities": {ABILITY: S}}},
                        "path": ..., "lineage": ...}}}

where each S holds ``n``, ``errors`` (failed predictions among the n, scored wrong),
``correct``, ``accuracy`` and its Wilson 95% interval (``ci_low``, ``ci_high``), plus ``judge_accuracy`` / ``human_accuracy`` where those
verdicts exist.

The review sheet (``review.html`` with thumbnails, ``review.csv`` to fill in) has one row
per (item, model) and a ``human_correct`` column to mark 1 or 0; reading the marked CSV
back (:func:`read_review_sheet`) adds ``human_correct`` to the predictions, so the next
report carries human scores beside the keyword scores, as the paper's user study.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raypipe.errors import ConfigError
from raypipe.evaluate.score import (
    accuracy_table,
    agreement,
    canonical_question_type,
    score_answer,
)

#: Fields a prediction row must have (``model`` and ``benchmark`` have defaults).
PREDICTION_FIELDS = ("id", "ability", "question", "question_type", "answer_keywords", "prediction")
#: The model name of predictions that name none (re-scored published answers).
UNNAMED_MODEL = "predictions"
UNNAMED_BENCHMARK = "benchmark"
# A row's fields that belong to one model's answer, not to the item.
_ANSWER_FIELDS = frozenset(
    "prediction error latency_s batch_latency_s prompt_tokens completion_tokens cached "
    "cost_usd judge_correct judge_raw judge_error judge_model human_correct correct matched "
    "verdict_reason".split()
)
#: The ``error`` of an item a model has no prediction for (another model has one).
NO_PREDICTION = "no prediction for this item"


# ---------------------------------------------------------------------------------------
# Reading predictions
# ---------------------------------------------------------------------------------------


def read_predictions(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a ``predictions.parquet`` or a JSONL of the same fields; bad lines are
    returned as messages with their line numbers (never fatal)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"predictions file {path} does not exist: give --predictions FILE")
    problems: list[str] = []
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        rows = [r for r in table.to_pylist()]
        start = 1
    else:
        rows, start = [], 1
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"line {n}: not JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                problems.append(f"line {n}: not a JSON object")
                continue
            row["_line"] = n
            rows.append(row)
    good = []
    for i, row in enumerate(rows, start=start):
        where = f"line {row.pop('_line', i)}"
        # A null prediction is a failed one (its ``error`` says why): scored wrong.
        missing = [
            f for f in PREDICTION_FIELDS if f not in row or (row[f] is None and f != "prediction")
        ]
        if missing:
            problems.append(f"{where}: missing {', '.join(missing)}")
            continue
        keywords = row["answer_keywords"]
        if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
            problems.append(f"{where}: answer_keywords must be a list of strings")
            continue
        if isinstance(row.get("synonyms"), str):
            try:
                row["synonyms"] = json.loads(row["synonyms"])
            except json.JSONDecodeError:
                problems.append(f"{where}: synonyms is not a JSON object")
                continue
        row.setdefault("model", UNNAMED_MODEL)
        row["model"] = row["model"] or UNNAMED_MODEL
        row["benchmark"] = row.get("benchmark") or UNNAMED_BENCHMARK
        good.append(row)
    return good, problems


# ---------------------------------------------------------------------------------------
# Scoring and the report
# ---------------------------------------------------------------------------------------


def score_rows(
    rows: Iterable[dict[str, Any]], problems: list[str] | None = None
) -> list[dict[str, Any]]:
    """Each row with its keyword verdict: ``correct``, ``matched``, ``verdict_reason``.

    A failed prediction (``error`` set) is wrong, reason ``error``. The answer keywords
    of a benchmark's items of one ability are candidates that compete with each wh
    item's reference (an answer listing them is wrong), beside the item's own bank. A
    row the scorer cannot judge (an unknown question type, no reference keyword, an
    either-or item with no options) is left out and described in ``problems``: it is a
    fault of the item, so it is left out for every model alike.
    """
    rows = list(rows)
    pools: dict[tuple[Any, Any], set[str]] = {}
    for row in rows:
        if _question_type(row) != "yes_no":
            pool = pools.setdefault((row.get("benchmark"), row.get("ability")), set())
            pool.update(str(k) for k in row.get("answer_keywords") or [] if isinstance(k, str))
    out = []
    for row in rows:
        pool = sorted(pools.get((row.get("benchmark"), row.get("ability")), ()))
        try:
            verdict = score_answer(row, row.get("prediction"), pool, row.get("error"))
        except ValueError as e:
            if problems is None:
                raise
            problems.append(f"item {row.get('id')} ({row.get('model')}): {e}")
            continue
        out.append(
            {
                **row,
                "correct": bool(verdict.correct),
                "matched": verdict.matched,
                "verdict_reason": verdict.reason,
            }
        )
    return out


def _question_type(row: dict[str, Any]) -> str | None:
    try:
        return canonical_question_type(row.get("question_type"))
    except ValueError:
        return None  # reported when the row is scored


def same_items(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` plus, for every model, a failed row for each item of a benchmark that
    another model answered and it did not: every model is scored on the same items."""
    items: dict[str, dict[Any, dict[str, Any]]] = {}
    have: set[tuple[str, str, Any]] = set()
    for row in rows:
        items.setdefault(row["benchmark"], {}).setdefault(row["id"], row)
        have.add((row["model"], row["benchmark"], row["id"]))
    models = sorted({r["model"] for r in rows})
    added = []
    for bench, by_id in items.items():
        for model in models:
            for ident, item in by_id.items():
                if (model, bench, ident) not in have:
                    fields = {k: v for k, v in item.items() if k not in _ANSWER_FIELDS}
                    added.append(
                        {**fields, "model": model, "prediction": None, "error": NO_PREDICTION}
                    )
    return rows + added


def scores(rows: list[dict[str, Any]], models: dict[str, dict] | None = None) -> dict:
    """The ``scores.json`` layout from scored rows (see the module doc)."""
    out: dict[str, Any] = {"models": {}}
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        entry: dict[str, Any] = {"benchmarks": {}}
        for bench in sorted({r["benchmark"] for r in mine}):
            entry["benchmarks"][bench] = accuracy_table(
                [r for r in mine if r["benchmark"] == bench]
            )
        judged = [r for r in mine if r.get("judge_correct") is not None]
        if judged:
            entry["judge_agreement"] = agreement(
                [r["correct"] for r in judged], [bool(r["judge_correct"]) for r in judged]
            )
        entry.update((models or {}).get(model, {}))
        out["models"][model] = entry
    return out


def write_report(
    rows: list[dict[str, Any]],
    out_dir: str | Path,
    models: dict[str, dict] | None = None,
    problems: list[str] | None = None,
) -> dict[str, Any]:
    """Score ``rows`` and write scores.json, predictions.parquet, report.md, charts.

    ``models`` adds per-model facts to scores.json (``path``, ``lineage``). Returns the
    scores.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    problems = list(problems or [])
    scored = score_rows(same_items(rows), problems)
    result = scores(scored, models)
    if problems:
        result["problems"] = problems
    (out_dir / "scores.json").write_text(json.dumps(result, indent=1) + "\n")
    pq.write_table(_predictions_table(scored), out_dir / "predictions.parquet")
    charts = write_charts(result, out_dir)
    (out_dir / "report.md").write_text(report_markdown(result, charts))
    return result


def _predictions_table(rows: list[dict[str, Any]]) -> pa.Table:
    """predictions.parquet: the input columns (images left out) plus the verdict."""
    drop = {"image", "_line"}
    columns: dict[str, list] = {}
    names = [k for k in rows[0] if k not in drop] if rows else list(PREDICTION_FIELDS)
    for row in rows:
        for k in row:
            if k not in drop and k not in names:
                names.append(k)
    for name in names:
        values = [row.get(name) for row in rows]
        if any(isinstance(v, dict) for v in values):  # synonyms: a JSON string per row
            values = [None if v is None else json.dumps(v) for v in values]
        columns[name] = values
    return pa.table(columns)


def report_markdown(result: dict, charts: list[str]) -> str:
    """report.md: one table per benchmark, abilities by models (accuracy % and n)."""
    lines = ["# Evaluation report", ""]
    models = result["models"]
    benches = sorted({b for m in models.values() for b in m["benchmarks"]})
    for bench in benches:
        lines += [f"## {bench}", ""]
        names = [m for m in models if bench in models[m]["benchmarks"]]
        abilities = sorted({a for m in names for a in models[m]["benchmarks"][bench]["abilities"]})
        lines.append("| ability | " + " | ".join(names) + " |")
        lines.append("|---|" + "---|" * len(names))
        for ability in [*abilities, "overall"]:
            cells = []
            for m in names:
                table = models[m]["benchmarks"][bench]
                s = table["overall"] if ability == "overall" else table["abilities"].get(ability)
                cells.append(_cell(s))
            label = "**overall**" if ability == "overall" else ability
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(
        "Accuracy by keyword matching (raypipe.evaluate.score), with the Wilson 95% interval "
        "and the number of items; every model is scored on the same items, and a failed "
        "prediction (errors) counts as a wrong answer; judge and human accuracy beside it "
        "where they exist."
    )
    lines += _models_section(models)
    for chart in charts:
        lines += ["", f"![{chart}]({chart})"]
    if result.get("problems"):
        lines += ["", "## Input lines left out", ""] + [f"- {p}" for p in result["problems"]]
    return "\n".join(lines) + "\n"


def _models_section(models: dict[str, dict]) -> list[str]:
    """Where each model is, and whether its predictions were made by this run or reused
    from an earlier one (``predictions`` of models.json)."""
    known = {m: e for m, e in models.items() if e.get("path") or e.get("predictions")}
    if not known:
        return []
    lines = ["", "## Models", ""]
    for name, entry in known.items():
        made = {"reused": "predictions reused from an earlier run", "made": "predicted now"}
        status = made.get(entry.get("predictions"), "")
        path = f"`{entry['path']}`" if entry.get("path") else ""
        lines.append(f"- **{name}**: " + "; ".join(x for x in (path, status) if x))
    return lines


def _cell(s: dict | None) -> str:
    if not s:
        return "-"
    if s.get("accuracy") is None:
        return f"- (n={s['n']})"
    errors = f", {s['errors']} errors" if s.get("errors") else ""
    text = (
        f"{100 * s['accuracy']:.0f}% [{100 * s['ci_low']:.0f}-{100 * s['ci_high']:.0f}] "
        f"(n={s['n']}{errors})"
    )
    if s.get("judge_accuracy") is not None:
        text += f", judge {100 * s['judge_accuracy']:.0f}%"
    if s.get("human_accuracy") is not None:
        text += f", human {100 * s['human_accuracy']:.0f}%"
    return text


def write_charts(result: dict, out_dir: Path) -> list[str]:
    """One PNG of grouped bars per ability (models side by side), one panel per
    benchmark (synthetic and real side by side), as the paper's Figure 6."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    benches = sorted({b for m in models.values() for b in m["benchmarks"]})
    if not benches:
        return []
    fig, axes = plt.subplots(
        1, len(benches), figsize=(max(8, 7 * len(benches)), 4.5), squeeze=False
    )
    names = list(models)
    width = 0.8 / max(1, len(names))
    for ax, bench in zip(axes[0], benches):
        abilities = sorted(
            {a for m in names for a in models[m]["benchmarks"].get(bench, {}).get("abilities", {})}
        )
        for k, model in enumerate(names):
            table = models[model]["benchmarks"].get(bench, {"abilities": {}})
            values = [100 * table["abilities"].get(a, {}).get("accuracy", 0.0) for a in abilities]
            ax.bar([i + k * width for i in range(len(abilities))], values, width, label=model)
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(abilities))])
        ax.set_xticklabels(abilities, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(bench)
        ax.legend(fontsize=8)
    fig.tight_layout()
    name = "abilities.png"
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return [name]


# ---------------------------------------------------------------------------------------
# Human review sheet
# ---------------------------------------------------------------------------------------

REVIEW_COLUMNS = [
    "id",
    "benchmark",
    "ability",
    "question",
    "reference",
    "model",
    "prediction",
    "keyword_correct",
    "human_correct",
]


def write_review_sheet(
    rows: list[dict[str, Any]], out_dir: str | Path, images: dict[str, bytes] | None = None
) -> tuple[Path, Path]:
    """``review.csv`` (fill ``human_correct`` with 1 or 0) and ``review.html`` (the same
    rows with image thumbnails, self-contained). ``images``: item id -> image bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scored = score_rows(rows, [])
    table = [
        {
            "id": r["id"],
            "benchmark": r["benchmark"],
            "ability": r["ability"],
            "question": r["question"],
            "reference": ", ".join(r["answer_keywords"]),
            "model": r["model"],
            "prediction": r["prediction"],
            "keyword_correct": int(r["correct"]),
            "human_correct": "",
        }
        for r in sorted(scored, key=lambda r: (r["benchmark"], r["ability"], r["id"], r["model"]))
    ]
    csv_path = out_dir / "review.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=REVIEW_COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    html_path = out_dir / "review.html"
    html_path.write_text(_review_html(table, images or {}), encoding="utf-8")
    return csv_path, html_path


def _thumbnail(data: bytes, size: int = 160) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=80)
    except Exception:  # noqa: BLE001 - an unreadable image shows as a blank cell
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _review_html(table: list[dict[str, Any]], images: dict[str, bytes]) -> str:
    from html import escape

    head = "".join(f"<th>{escape(c)}</th>" for c in ["image", *REVIEW_COLUMNS])
    body = []
    for r in table:
        src = _thumbnail(images[r["id"]]) if r["id"] in images else ""
        img = f'<img src="{src}" alt="">' if src else ""
        cells = "".join(f"<td>{escape(str(r[c]))}</td>" for c in REVIEW_COLUMNS)
        body.append(f"<tr><td>{img}</td>{cells}</tr>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>raypipe review</title>"
        "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px;"
        "vertical-align:top}table{border-collapse:collapse}</style></head><body>"
        "<h1>Review sheet</h1><p>Mark each answer in review.csv's <code>human_correct</code>"
        " column: 1 if it answers the question correctly, 0 if not; leave blank to skip. "
        "Then: <code>jobs/evaluate.py score --predictions predictions.parquet --review "
        "review.csv --out DIR</code>.</p>"
        f"<table><tr>{head}</tr>{''.join(body)}</table></body></html>"
    )


def read_review_sheet(path: str | Path) -> tuple[dict[tuple[str, str], bool], list[str]]:
    """``{(id, model): human verdict}`` from a marked review.csv, and the rows whose mark
    is neither 1 nor 0 (with their line numbers); blank marks are skipped."""
    marks: dict[tuple[str, str], bool] = {}
    problems = []
    with open(path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.DictReader(f), start=2):
            mark = (row.get("human_correct") or "").strip().lower()
            if not mark:
                continue
            if mark in ("1", "yes", "y", "true", "correct"):
                marks[(row["id"], row["model"])] = True
            elif mark in ("0", "no", "n", "false", "wrong"):
                marks[(row["id"], row["model"])] = False
            else:
                problems.append(f"{path} line {n}: human_correct {mark!r} is not 1 or 0")
    return marks, problems


def apply_review(rows: list[dict[str, Any]], marks: dict[tuple[str, str], bool]) -> None:
    """Adds ``human_correct`` to the rows a reviewer marked."""
    for row in rows:
        mark = marks.get((row["id"], row["model"]))
        if mark is not None:
            row["human_correct"] = mark


__all__ = [
    "apply_review",
    "read_predictions",
    "read_review_sheet",
    "report_markdown",
    "same_items",
    "score_rows",
    "scores",
    "write_charts",
    "write_report",
    "write_review_sheet",
]
