"""Deterministic, sharded reading: each worker reads only the rows of its share.

With ``data.deterministic_order`` the driver builds a light :class:`TrainIndex` (per row:
source, Parquet file and row group, id; no image bytes) and puts it in Ray's object
store. Every worker derives the same epoch order from it and reads, itself, only the
row groups (or image files) that hold its rows.

**The order of an epoch** is a pure function of (seed, epoch, data), whatever the worker
count (:func:`epoch_order`): row groups are shuffled and cut into windows of at least
``shuffle_window_rows`` rows; a window's rows are laid out group after group (shuffled
within each group) and cut into ``G`` strata (``G`` = global batch); step ``k`` of the
window takes row ``k`` of every stratum. Global step ``s`` trains on rows
``[s*G, (s+1)*G)`` of that order. A rank's slice of every step is the same run of
``G/W`` strata, so it comes from about 1/W of the window's row groups: each worker reads
about 1/W of the image bytes (plus the groups that straddle slice boundaries). The
step's loss and gradients (a sum over the global batch) do not depend on ``W``.

*What it costs in randomness*: a step draws one row from each of ``G`` strata of one
window (a random set of whole row groups, ``shuffle_window_rows`` rows) rather than
``G`` rows from the whole dataset, and consecutive steps draw from the same few groups
of each stratum. Rows of one Parquet row group (64 as raypipe writes them) stay in one
window. *What it costs in memory*: a worker holds the row groups its strata are
reading, about ``G/W`` groups. JSON sources (LLaVA, StableLLaVA) have one image file per
row: each row is its own group.

**Resume at step s** reads only the row groups that hold rows of steps ``s`` and later
(a group is the unit of reading, so the group a stratum is in the middle of at ``s`` is
read whole).
**Byte counts**: a worker counts the compressed bytes of the image column chunks it
reads (from the Parquet footer of each row group it reads) and the sizes of image files
it reads; the run summary reports them per rank.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from raypipe import storage
from raypipe.train.sources import (
    _PARQUET_COLUMNS,
    DROP_NO_IMAGE,
    DataSource,
    check_sources,
    copies,
    hash01,
    image_location,
    json_records,
    parquet_files,
    read_image_file,
)

#: Rows of the light index (one per source row; weights are applied per epoch).
INDEX_SCHEMA = pa.schema(
    [
        ("source", pa.int32()),
        ("file", pa.int32()),  # index into the source's files; -1 for JSON sources
        ("group", pa.int32()),  # Parquet row group; -1 for JSON sources
        ("row", pa.int32()),  # row within the group, or the JSON record's position
        ("key", pa.string()),  # what weights and order hash: row id, or JSON position
        ("id", pa.string()),
        ("turns", pa.string()),  # JSON sources: the conversation as JSON; else null
        ("image_path", pa.string()),  # JSON sources: the image file's location
        ("image_error", pa.string()),
    ]
)


@dataclass
class TrainIndex:
    """What every worker needs to order an epoch and read its rows (no image bytes)."""

    sources: list[dict[str, Any]]  #: per source: path, kind, weight, files (fs paths)
    rows: pa.Table  #: INDEX_SCHEMA
    group_image_bytes: dict[tuple[int, int, int], int]  #: (source, file, group) -> bytes

    @property
    def num_source_rows(self) -> int:
        return self.rows.num_rows


def build_index(sources: list[DataSource | str]) -> TrainIndex:
    """Read ids and row-group layout of every source (Parquet: the id column and the
    footers only; JSON: the records, which are small)."""
    import pyarrow.parquet as pq

    resolved = check_sources(sources)
    tables, meta, group_bytes = [], [], {}
    for s, src in enumerate(resolved):
        if src.kind == "raypipe":
            fs, files = parquet_files(src.path)
            meta.append(
                {
                    "path": src.path,
                    "kind": src.kind,
                    "weight": src.weight,
                    "files": files,
                    "image_folder": src.image_folder,
                    "allow_external_paths": src.allow_external_paths,
                }
            )
            for f, path in enumerate(files):
                md = pq.read_metadata(path, filesystem=fs)
                ids = pq.read_table(path, columns=["id"], filesystem=fs).column("id")
                sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
                group = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
                row = np.concatenate([np.arange(n, dtype=np.int32) for n in sizes] or [[]])
                for g in range(md.num_row_groups):
                    rg = md.row_group(g)
                    group_bytes[(s, f, g)] = sum(
                        rg.column(c).total_compressed_size
                        for c in range(rg.num_columns)
                        if rg.column(c).path_in_schema.split(".")[0] == "image"
                    )
                n = len(ids)
                tables.append(
                    pa.table(
                        {
                            "source": pa.array(np.full(n, s, dtype=np.int32)),
                            "file": pa.array(np.full(n, f, dtype=np.int32)),
                            "group": pa.array(group.astype(np.int32)),
                            "row": pa.array(row.astype(np.int32)),
                            "key": ids.cast(pa.string()),
                            "id": ids.cast(pa.string()),
                            "turns": pa.nulls(n, pa.string()),
                            "image_path": pa.nulls(n, pa.string()),
                            "image_error": pa.nulls(n, pa.string()),
                        },
                        schema=INDEX_SCHEMA,
                    )
                )
        else:
            meta.append({"path": src.path, "kind": src.kind, "weight": src.weight, "files": []})
            tables.append(_json_index(s, src))
    rows = pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()
    return TrainIndex(sources=meta, rows=rows, group_image_bytes=group_bytes)


def _json_index(s: int, src: DataSource) -> pa.Table:
    records = json_records(src)
    n = len(records)
    return pa.table(
        {
            "source": [s] * n,
            "file": [-1] * n,
            "group": [-1] * n,
            "row": [r.position for r in records],
            "key": [f"{r.position}" for r in records],
            "id": [r.id for r in records],
            "turns": [json.dumps(r.turns) for r in records],
            "image_path": [r.image_path for r in records],
            "image_error": [r.image_error for r in records],
        },
        schema=INDEX_SCHEMA,
    )


# ---------------------------------------------------------------------------------------
# Epoch order and the (step, rank) plan
# ---------------------------------------------------------------------------------------


@dataclass
class EpochOrder:
    """One epoch's rows in training order: index rows (with repeats for weights > 1)."""

    rows: np.ndarray  #: positions in TrainIndex.rows, in order
    layout: np.ndarray  #: per ordered row: its place in the epoch's group-sorted layout


def rows_per_epoch(index: TrainIndex, seed: int, num_samples: int | None) -> int:
    n = len(_weighted(index, seed))
    return min(n, num_samples) if num_samples else n


def _weighted(index: TrainIndex, seed: int) -> list[tuple[int, int]]:
    """(index row, copy) for every copy that weights keep (the same every epoch)."""
    source = index.rows.column("source").to_numpy()
    keys = index.rows.column("key").to_pylist()
    weights = [src["weight"] for src in index.sources]
    out = []
    for i, (s, key) in enumerate(zip(source, keys)):
        for copy in copies(weights[s], seed, int(s), key):
            out.append((i, copy))
    return out


def epoch_order(
    index: TrainIndex,
    seed: int,
    epoch: int,
    window_rows: int,
    global_batch: int,
    num_samples: int | None = None,
) -> EpochOrder:
    """The epoch's order (see the module doc).

    Row groups are shuffled and cut into windows of at least ``window_rows`` rows. In a
    window, the rows are laid out group after group (rows shuffled within each group)
    and the layout is cut into ``global_batch`` equal *strata*; step ``k`` of the
    window's ``T`` steps takes row ``k`` of every stratum. So a step samples the whole
    window evenly; its j-th row (by layout) always comes from stratum j, so the ranks'
    slices of a step are contiguous runs of strata, i.e. of row groups, at every step of
    the window, whatever the worker count; and each stratum is consumed front to back,
    so a row group is needed by a short run of consecutive steps only. Rows a window
    leaves over (fewer than ``global_batch``) open the next window's layout.
    """
    items = _weighted(index, seed)
    source = index.rows.column("source").to_numpy()
    file = index.rows.column("file").to_numpy()
    group = index.rows.column("group").to_numpy()
    row = index.rows.column("row").to_numpy()
    keys = index.rows.column("key").to_pylist()

    def group_of(i: int) -> tuple[int, int, int]:
        # JSON rows are groups of one (their images are separate files).
        return (int(source[i]), int(file[i]), int(group[i]) if group[i] >= 0 else -int(row[i]) - 1)

    def row_hash(*parts) -> int:
        return hash01("row", seed, epoch, *parts)

    members: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
    for i, copy in items:
        members.setdefault(group_of(i), []).append((i, copy))
    groups = sorted(members, key=lambda g: hash01("group", seed, epoch, *g))
    order: list[tuple[int, int]] = []  # (index row, layout position)
    carry: list[tuple[tuple[int, int], int]] = []  # rows left over by the last window
    laid = 0  # layout positions handed out so far

    def flush(window: list[tuple[int, int, int]], final: bool) -> None:
        nonlocal carry, laid
        layout = list(carry)
        for g in window:  # group after group, rows shuffled within a group
            for t in sorted(
                members[g], key=lambda t: row_hash(int(source[t[0]]), keys[t[0]], t[1])
            ):
                layout.append((t, laid))
                laid += 1
        T = len(layout) // global_batch  # full steps; stratum j = layout[j*T:(j+1)*T]
        # Step k of the window takes row k of every stratum.
        slots = sorted((k, j * T + k) for j in range(global_batch if T else 0) for k in range(T))
        order.extend((layout[p][0][0], layout[p][1]) for _, p in slots)
        carry = layout[T * global_batch :]  # the last rows wait for the next window
        if final and carry:  # the epoch's last, short step
            order.extend((t[0], pos) for t, pos in carry)
            carry = []

    window: list[tuple[int, int, int]] = []
    size = len(carry)
    for g in groups:
        window.append(g)
        size += len(members[g])
        if size >= max(window_rows, global_batch):
            flush(window, final=False)
            window, size = [], len(carry)
    flush(window, final=True)
    layout_arr = np.asarray([pos for _, pos in order], dtype=np.int64)
    order = [i for i, _ in order]
    rows = np.asarray(order, dtype=np.int64)
    if num_samples is not None:
        rows, layout_arr = rows[:num_samples], layout_arr[:num_samples]
    return EpochOrder(rows=rows, layout=layout_arr)


def rank_rows(order: EpochOrder, step: int, global_batch: int, world: int, rank: int) -> np.ndarray:
    """Index rows of ``rank``'s slice of epoch step ``step`` (may be short at the end)."""
    lo, hi = step * global_batch, min((step + 1) * global_batch, len(order.rows))
    if lo >= hi:
        return order.rows[:0]
    positions = np.arange(lo, hi)
    # By layout position: the step's j-th stratum row goes to rank j // (G/W).
    positions = positions[np.argsort(order.layout[lo:hi], kind="stable")]
    share = global_batch // world
    return order.rows[positions[rank * share : (rank + 1) * share]]


# ---------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------


class ShardReader:
    """A worker's rows, step by step, read from storage by this worker alone."""

    def __init__(
        self,
        index: TrainIndex,
        *,
        seed: int,
        window_rows: int,
        num_samples: int | None,
        global_batch: int,
        world: int,
        rank: int,
    ):
        self.index = index
        self.seed, self.window_rows, self.num_samples = seed, window_rows, num_samples
        self.G, self.world, self.rank = global_batch, world, rank
        self.image_bytes = 0  #: compressed image bytes this worker read
        self.groups_read: list[tuple[int, int, int]] = []  #: every row group read, in order
        self._files: dict[tuple[int, int], Any] = {}
        self._fs = [
            storage.open_location(src["path"])[0] if src["files"] else None for src in index.sources
        ]
        cols = index.rows
        self._source = cols.column("source").to_numpy()
        self._file = cols.column("file").to_numpy()
        self._group = cols.column("group").to_numpy()
        self._row = cols.column("row").to_numpy()

    def steps(
        self, start_step: int, total_steps: int, steps_per_epoch: int
    ) -> Iterator[list[dict]]:
        """This rank's rows of every optimiser step from ``start_step`` (one list per step)."""
        step = start_step
        while step < total_steps:
            epoch, first = divmod(step, steps_per_epoch)
            last = min(total_steps - epoch * steps_per_epoch, steps_per_epoch)
            order = epoch_order(
                self.index, self.seed, epoch, self.window_rows, self.G, self.num_samples
            )
            plan = [rank_rows(order, s, self.G, self.world, self.rank) for s in range(first, last)]
            yield from self._read(plan)
            step = (epoch + 1) * steps_per_epoch

    def _read(self, plan: list[np.ndarray]) -> Iterator[list[dict]]:
        # Last step each Parquet row group is needed in, so it is dropped right after.
        last_use: dict[tuple[int, int, int], int] = {}
        for k, rows in enumerate(plan):
            for i in rows:
                if self._file[i] >= 0:
                    last_use[self._group_key(i)] = k
        loaded: dict[tuple[int, int, int], list[dict]] = {}
        for k, rows in enumerate(plan):
            out = []
            for i in rows:
                if self._file[i] < 0:
                    out.append(self._json_row(int(i)))
                    continue
                key = self._group_key(i)
                if key not in loaded:
                    loaded[key] = self._read_group(key)
                out.append(dict(loaded[key][int(self._row[i])]))
            for key in [g for g, last in last_use.items() if last == k and g in loaded]:
                del loaded[key]
            yield out

    def _group_key(self, i) -> tuple[int, int, int]:
        return (int(self._source[i]), int(self._file[i]), int(self._group[i]))

    def _read_group(self, key: tuple[int, int, int]) -> list[dict]:
        import pyarrow.parquet as pq

        s, f, g = key
        handle = self._files.get((s, f))
        if handle is None:
            fs = self._fs[s]
            handle = pq.ParquetFile(fs.open_input_file(self.index.sources[s]["files"][f]))
            self._files[(s, f)] = handle
        table = handle.read_row_group(g, columns=_PARQUET_COLUMNS)
        self.image_bytes += self.index.group_image_bytes.get(key, 0)
        self.groups_read.append(key)
        rows = []
        meta = self.index.sources[s]
        source = meta["path"]
        for row in table.to_pylist():
            image = row.get("image") or {}
            data, path, error = image.get("bytes"), image.get("path"), None
            if not data and path:
                path, error = image_location(
                    meta["image_folder"], path, meta["allow_external_paths"]
                )
                if path is not None:
                    data, error = self._read_file(path)
            elif not data:
                error = DROP_NO_IMAGE
            rows.append(
                {
                    "id": row["id"],
                    "source": source,
                    "image": data,
                    "image_error": error,
                    "conversations": [
                        {"from": t["from"], "value": t["value"]} for t in row["conversations"] or []
                    ],
                }
            )
        return rows

    def _read_file(self, location: str) -> tuple[bytes | None, str | None]:
        data, error = read_image_file(location)
        self.image_bytes += len(data or b"")
        return data, error

    def _json_row(self, i: int) -> dict:
        rows = self.index.rows
        s = int(self._source[i])
        error = rows.column("image_error")[i].as_py()
        path = rows.column("image_path")[i].as_py()
        data = None
        if not error and path:
            data, error = self._read_file(path)
        return {
            "id": rows.column("id")[i].as_py(),
            "source": self.index.sources[s]["path"],
            "image": data,
            "image_error": error,
            "conversations": json.loads(rows.column("turns")[i].as_py()),
        }


def epoch_image_bytes(index: TrainIndex) -> int:
    """Compressed image bytes of every Parquet row group (one epoch reads each once)."""
    return sum(index.group_image_bytes.values())


__all__ = [
    "EpochOrder",
    "ShardReader",
    "TrainIndex",
    "build_index",
    "epoch_image_bytes",
    "epoch_order",
    "rank_rows",
    "rows_per_epoch",
]
