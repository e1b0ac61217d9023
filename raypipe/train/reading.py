"""Reading and mixing on Ray Data, for ``data.deterministic_order: false``.

:func:`build_train_dataset` reads, weights and mixes the sources into one Ray Dataset of
:data:`TRAIN_ROW_SCHEMA` rows; Ray Train then splits the stream between workers as they
ask (each reads only its share; the order within an epoch is not reproducible). The
deterministic reader, where each worker reads its own rows, is
:mod:`raypipe.train.shards`.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pyarrow as pa

from raypipe.schema import TURN_TYPE
from raypipe.train.sources import (
    _PARQUET_COLUMNS,
    DROP_NO_IMAGE,
    DataSource,
    check_sources,
    copies,
    image_location,
    json_records,
    order_key,
    parquet_files,
    read_image_file,
)

#: Rows that build_train_dataset yields. ``image`` holds encoded bytes, or is null with
#: ``image_error`` saying why: "<reason>[: <detail>]" with reason DROP_MISSING_FILE or
#: DROP_NO_IMAGE.
TRAIN_ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("image", pa.binary()),
        ("image_error", pa.string()),
        ("conversations", pa.list_(TURN_TYPE)),
    ]
)

# While staged, rows also carry an image path to read after mixing, and their sort key.
_STAGED_SCHEMA = pa.schema(
    list(TRAIN_ROW_SCHEMA) + [("image_path", pa.string()), ("order_key", pa.int64())]
)

_JSON_BLOCK_ROWS = 4096

_SORT_ROWS = 512  # rows per partition of the global shuffle (they carry image bytes)

_SORT_MAX_PARTITIONS = 1000

logger = logging.getLogger(__name__)


def build_train_dataset(
    sources: list[DataSource | str],
    *,
    seed: int,
    num_samples: int | None = None,
    shuffle: bool = True,
    epoch: int = 0,
):
    """Read, weight and mix ``sources`` into one Ray Dataset of :data:`TRAIN_ROW_SCHEMA` rows.

    Each row is kept ``weight`` times in expectation (decided by a hash of seed, source and
    row, so the selection is the same on every run and worker count). With ``shuffle`` the
    rows are globally ordered by a second hash that also takes ``epoch``: the order is a
    pure function of (seed, epoch, data), whatever the block layout. Without it, sources
    follow each other in the given order. ``num_samples`` keeps the first that many rows.
    Image files of JSON sources are read after mixing, so only the kept rows are read.
    """
    # 1. Validate and resolve.
    resolved = check_sources(sources)
    # 2. Stage each source: rows repeated / sampled by weight, each with its sort key.
    #    JSON sources are staged in this process (their records are small); Parquet
    #    sources, which carry the image bytes, are staged on Ray Data.
    staged: list[Any] = []  # per source: a Ray Dataset or a list of rows
    for i, src in enumerate(resolved):
        if src.kind == "raypipe":
            staged.append(_stage_parquet_source(src, i, seed, epoch))
        else:
            staged.append(_stage_json_source(src, i, seed, epoch))
    # 3. Global, deterministic order. Rows all in this process are sorted here; otherwise
    #    Ray Data sorts (a distributed shuffle).
    in_process = all(isinstance(part, list) for part in staged)
    if in_process:
        rows = [row for part in staged for row in part]
        if shuffle:
            rows.sort(key=lambda r: r["order_key"])
        ds = _rows_dataset(rows)
    else:
        parts = [_rows_dataset(p) if isinstance(p, list) else p for p in staged]
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        if shuffle:
            rows = sum(
                len(p) if isinstance(p, list) else _parquet_rows(src) * src.weight
                for p, src in zip(staged, resolved)
            )
            ds = ds.sort("order_key", boundaries=_sort_boundaries(rows))
    if num_samples is not None:
        ds = ds.limit(num_samples)
    # 4. Read image files of the kept rows; drop staging columns.
    return ds.map_batches(_read_image_files, batch_format="pyarrow", batch_size=64)


def _sort_boundaries(rows: float) -> list[int]:
    """Even split points of the (uniform) order keys: about _SORT_ROWS rows per partition.

    Given, they spare Ray Data the sampling pass and its default of 200 partitions,
    which dominates small runs.
    """
    parts = int(min(_SORT_MAX_PARTITIONS, max(2, math.ceil(rows / _SORT_ROWS))))
    return [(2**63 // parts) * i for i in range(1, parts)]


def _parquet_rows(src: DataSource) -> int:
    import pyarrow.parquet as pq

    fs, files = parquet_files(src.path)
    return sum(pq.read_metadata(f, filesystem=fs).num_rows for f in files)


def _rows_dataset(rows: list[dict[str, Any]]):
    import ray

    table = pa.Table.from_pylist(rows, schema=_STAGED_SCHEMA)
    # Several blocks, so image reading and encoding run in parallel.
    step = max(1, min(_JSON_BLOCK_ROWS, -(-table.num_rows // 8)))
    return ray.data.from_arrow(
        [table.slice(i, step) for i in range(0, max(table.num_rows, 1), step)]
    )


def _stage_parquet_source(src: DataSource, index: int, seed: int, epoch: int):
    import ray

    fs, files = parquet_files(src.path)
    ds = ray.data.read_parquet(files, filesystem=fs).select_columns(_PARQUET_COLUMNS)
    return ds.map_batches(
        _stage_parquet_batch,
        fn_kwargs={
            "source": src.path,
            "folder": src.image_folder,
            "allow_external": src.allow_external_paths,
            "index": index,
            "weight": src.weight,
            "seed": seed,
            "epoch": epoch,
        },
        batch_format="pyarrow",
        batch_size=64,
    )


def _stage_json_source(src: DataSource, index: int, seed: int, epoch: int) -> list[dict]:
    rows = []
    for rec in json_records(src):
        base = {
            "id": rec.id,
            "source": src.path,
            "image": None,
            "image_error": rec.image_error,
            "image_path": rec.image_path,
            "conversations": rec.turns,
        }
        key = f"{rec.position}"
        for copy in copies(src.weight, seed, index, key):
            rows.append({**base, "order_key": order_key(seed, epoch, index, key, copy)})
    if not rows:
        logger.warning("data source %s: weight %s kept no rows", src.path, src.weight)
    return rows


def _stage_parquet_batch(
    batch: pa.Table,
    source: str,
    folder: str,
    allow_external: bool,
    index: int,
    weight: float,
    seed: int,
    epoch: int,
) -> pa.Table:
    rows = []
    for row in batch.to_pylist():
        image = row.get("image") or {}
        data, path = image.get("bytes"), image.get("path")
        error = None if data or path else DROP_NO_IMAGE
        if not data and path:  # read after mixing, if it stays in the image folder
            path, error = image_location(folder, path, allow_external)
        staged = {
            "id": row["id"],
            "source": source,
            "image": data,
            "image_error": error,
            "image_path": None if data else path,
            "conversations": [
                {"from": t["from"], "value": t["value"]} for t in row["conversations"] or []
            ],
        }
        for copy in copies(weight, seed, index, row["id"]):
            rows.append({**staged, "order_key": order_key(seed, epoch, index, row["id"], copy)})
    return pa.Table.from_pylist(rows, schema=_STAGED_SCHEMA)


def _read_image_files(batch: pa.Table) -> pa.Table:
    rows = batch.to_pylist()
    for row in rows:
        if row["image"] is None and row["image_path"] and not row["image_error"]:
            row["image"], row["image_error"] = read_image_file(row["image_path"])
    return pa.Table.from_pylist(rows, schema=_STAGED_SCHEMA).select(TRAIN_ROW_SCHEMA.names)


__all__ = ["TRAIN_ROW_SCHEMA", "build_train_dataset"]
