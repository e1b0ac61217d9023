"""Parquet schemas: the single source of truth for column names.

What each column means: docs/data-contract.md.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

#: Question types a sample or benchmark item may carry.
QUESTION_TYPES = ("caption", "yes_no", "wh", "either_or", "unusual")

#: Same layout as the Hugging Face `datasets` Image feature, so `load_dataset("parquet")`
#: reads the column as images.
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TURN_TYPE = pa.struct([("from", pa.string()), ("value", pa.string())])

SAMPLE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("ability", pa.string()),
        ("keywords", pa.list_(pa.string())),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        ("image", IMAGE_TYPE),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("conversations", pa.list_(TURN_TYPE)),
        ("answer_keywords", pa.list_(pa.string())),
        ("question_type", pa.string()),
        ("sd_model", pa.string()),
        ("llm_model", pa.string()),
        ("meta", pa.string()),
    ],
    metadata={
        # What `datasets` reads to type the image column as Image.
        b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}}).encode()
    },
)
SAMPLE_COLUMNS = tuple(SAMPLE_SCHEMA.names)

REJECT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("ability", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("raw", pa.string()),
    ]
)
REJECT_COLUMNS = tuple(REJECT_SCHEMA.names)

#: Columns a row carries while it flows through the generation stages, in addition to
#: the sample columns. A row whose ``reject_stage`` is set is passed through untouched
#: by later stages and written to OUT/rejects at the end.
WORK_EXTRA = pa.schema(
    [
        ("index", pa.int64()),  # position within its ability; part of the id
        ("reject_stage", pa.string()),
        ("reject_reason", pa.string()),
        ("reject_raw", pa.string()),
    ]
)
WORK_SCHEMA = pa.schema(list(SAMPLE_SCHEMA) + list(WORK_EXTRA))


def sample_id(run_seed: int, ability: str, index: int) -> str:
    """Stable id from (run seed, ability, index): re-runs reproduce it."""
    return f"{ability}-s{run_seed}-{index:07d}"


def row_seed(sample_id_: str) -> int:
    """Per-row generator seed derived from the id (fits in int64, stable across machines)."""
    return int.from_bytes(hashlib.sha256(sample_id_.encode()).digest()[:8], "big") & (2**62 - 1)


def is_rejected(row: dict[str, Any]) -> bool:
    return bool(row.get("reject_stage"))


def reject(row: dict[str, Any], stage: str, reason: str, raw: str | None = "") -> dict[str, Any]:
    """Mark a work row rejected (first rejection wins)."""
    if not is_rejected(row):
        row["reject_stage"] = stage
        row["reject_reason"] = reason
        row["reject_raw"] = (raw or "")[:20000]
    return row


def update_meta(row: dict[str, Any], **fields: Any) -> None:
    """Merge fields into the row's JSON ``meta`` column."""
    meta = json.loads(row["meta"]) if row.get("meta") else {}
    meta.update(fields)
    row["meta"] = json.dumps(meta, sort_keys=True)


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema = WORK_SCHEMA) -> pa.Table:
    """Rows (dicts) -> table with exactly ``schema``'s columns (missing ones are null)."""
    cols = {name: [r.get(name) for r in rows] for name in schema.names}
    return pa.Table.from_pydict(cols, schema=schema)


def split_accepted(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Work table -> (accepted samples in SAMPLE_SCHEMA, rejects in REJECT_SCHEMA)."""
    rows = table.to_pylist()
    ok = [r for r in rows if not is_rejected(r)]
    bad = [
        {
            "id": r["id"],
            "ability": r["ability"],
            "stage": r["reject_stage"],
            "reason": r["reject_reason"],
            "raw": r.get("reject_raw") or "",
        }
        for r in rows
        if is_rejected(r)
    ]
    return rows_to_table(ok, SAMPLE_SCHEMA), rows_to_table(bad, REJECT_SCHEMA)


def validate_samples(table: pa.Table) -> list[str]:
    """Problems with a sample table (empty list = valid): schema, ids, conversations, images."""
    problems = []
    if not table.schema.equals(SAMPLE_SCHEMA, check_metadata=False):
        problems.append(f"schema differs: {table.schema} != {SAMPLE_SCHEMA}")
        return problems
    for row in table.to_pylist():
        conv = row["conversations"] or []
        if not conv or conv[0]["from"] != "human" or not conv[0]["value"].startswith("<image>\n"):
            problems.append(f"{row['id']}: first human turn must start with '<image>\\n'")
        if not row["image"] or not row["image"]["bytes"]:
            problems.append(f"{row['id']}: no image bytes")
        if row["question_type"] not in QUESTION_TYPES:
            problems.append(f"{row['id']}: question_type {row['question_type']!r}")
    return problems
