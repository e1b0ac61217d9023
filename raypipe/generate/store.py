"""The output directory of a generation run, local or a URI (docs/architecture.md, "Data contract").

``OUT`` may be a local path or any URI pyarrow understands (``s3://``, ``gs://``, ...).
Parquet parts are written whole or not at all (local: temp file + rename; object stores:
an upload is atomic), so a killed job never leaves a half-written part and a re-run can
trust every part it finds.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raypipe.schema import REJECT_SCHEMA, SAMPLE_SCHEMA

#: Rows per Parquet row group: with 512 px PNGs (~0.5 MB) a group stays near 32 MB,
#: far from the 2 GiB limit of a binary column chunk.
ROW_GROUP_ROWS = 64


class OutputStore:
    """Reads and writes OUT/{data,rejects,keywords,manifest.json} on any pyarrow filesystem."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.root = pafs.FileSystem.from_uri(
            self.uri if "://" in self.uri else str(Path(self.uri).resolve())
        )
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    # -- paths -----------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def cache_location(self) -> str:
        """Where the LLM response cache lives: OUT/cache, on OUT's own filesystem.

        For a URI the query (endpoint, region, ...) is kept, so every node of a cluster,
        and any later re-run, reads and writes the same cache.
        """
        if self.local:
            return self.path("cache")
        base, sep, query = self.uri.partition("?")
        return f"{base.rstrip('/')}/cache{sep}{query}"

    def makedirs(self) -> None:
        """Create OUT's folders; on local disks, remove temporary files a killed run left."""
        for sub in ("data", "rejects", "keywords", "plan"):
            self.fs.create_dir(self.path(sub), recursive=True)
            if self.local:
                for leftover in Path(self.path(sub)).glob(".tmp-*"):
                    leftover.unlink(missing_ok=True)

    # -- parquet ---------------------------------------------------------------------
    def write_table(self, sub: str, table: pa.Table, name: str | None = None) -> str | None:
        """Write ``table`` as one part under OUT/<sub>/; returns its path (None if empty)."""
        if table.num_rows == 0:
            return None
        if name is None:
            ids = "\n".join(sorted(table.column("id").to_pylist()))
            name = f"part-{hashlib.sha256(ids.encode()).hexdigest()[:20]}.parquet"
        final = self.path(sub, name)
        if self.local:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = self.path(sub, f".tmp-{uuid.uuid4().hex}-{name}")
            pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS)
            os.replace(tmp, final)
        else:
            with self.fs.open_output_stream(final) as f:
                pq.write_table(table, f, row_group_size=ROW_GROUP_ROWS)
        return final

    def _parts(self, sub: str) -> list[str]:
        sel = pafs.FileSelector(self.path(sub), allow_not_found=True)
        return sorted(
            info.path
            for info in self.fs.get_file_info(sel)
            if info.type == pafs.FileType.File
            and info.base_name.endswith(".parquet")
            and not info.base_name.startswith(".")
        )

    def read_columns(self, sub: str, columns: list[str]) -> pa.Table:
        """Only the named columns of every part (images are never read for bookkeeping)."""
        schema = SAMPLE_SCHEMA if sub == "data" else REJECT_SCHEMA if sub == "rejects" else None
        tables = [pq.read_table(p, columns=columns, filesystem=self.fs) for p in self._parts(sub)]
        if not tables:
            return pa.table(
                {c: pa.array([], type=schema.field(c).type if schema else pa.string()) for c in columns}
            )
        return pa.concat_tables(tables)

    def done_ids(self) -> tuple[set[str], dict[str, int]]:
        """(ids in data or rejects, accepted rows per ability)."""
        data = self.read_columns("data", ["id", "ability"])
        rej = self.read_columns("rejects", ["id", "ability", "stage"])
        sample_rejects = [
            i
            for i, s in zip(rej.column("id").to_pylist(), rej.column("stage").to_pylist())
            if s != "keywords"
        ]
        done = set(data.column("id").to_pylist()) | set(sample_rejects)
        per_ability: dict[str, int] = {}
        for ab in data.column("ability").to_pylist():
            per_ability[ab] = per_ability.get(ab, 0) + 1
        return done, per_ability

    # -- json ------------------------------------------------------------------------
    def write_json(self, rel: str, obj: Any) -> None:
        text = json.dumps(obj, indent=2, sort_keys=True, default=str)
        final = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = final + f".tmp-{uuid.uuid4().hex}"
            Path(tmp).write_text(text)
            os.replace(tmp, final)
        else:
            with self.fs.open_output_stream(final) as f:
                f.write(text.encode())

    def read_json(self, rel: str) -> Any | None:
        info = self.fs.get_file_info(self.path(rel))
        if info.type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(self.path(rel)) as f:
            return json.loads(f.read().decode())
