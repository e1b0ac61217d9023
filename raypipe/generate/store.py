"""The output directory of a generation run, local or a URI (docs/data-contract.md).

``OUT`` may be a local path or any URI pyarrow understands (``s3://``, ``gs://``, ...).
Parts, plan logs, banks and the manifest are written whole or not at all
(:func:`raypipe.storage.publish`: serialized first, then one rename or one upload), so a
killed or failing writer never leaves half a file under its final name and a re-run can
trust every file it finds. Before each publish the store calls its ``fence`` (the run's
lease check, :mod:`raypipe.generate.lease`): a run that lost OUT publishes nothing more.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raypipe import storage
from raypipe.schema import REJECT_SCHEMA, SAMPLE_SCHEMA

#: Rows per Parquet row group: with 512 px PNGs (~0.5 MB) a group stays near 32 MB,
#: far from the 2 GiB limit of a binary column chunk.
ROW_GROUP_ROWS = 64


class OutputStore:
    """Reads and writes OUT/{data,rejects,keywords,manifest.json} on any pyarrow filesystem."""

    def __init__(self, uri: str, fence: Callable[[], None] | None = None):
        self.uri = uri.rstrip("/")
        self.fs, self.root = storage.open_location(self.uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        #: Called before every publish; raises (LeaseLost) when this run no longer holds OUT.
        self.fence = fence

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
        """Create OUT's folders and remove the temporary files killed runs left (call it
        only while holding OUT's lease: a live run's temporary files look the same)."""
        for sub in ("data", "rejects", "keywords", "plan"):
            self.fs.create_dir(self.path(sub), recursive=True)
            storage.remove_temporaries(self.fs, self.path(sub))
        storage.remove_temporaries(self.fs, self.root)  # manifest, card, identity
        storage.remove_temporaries(self.fs, self.path("cache"))  # (see ResponseCache.put)

    def _publish(self, final: str, data) -> None:
        if self.fence is not None:
            self.fence()
        storage.publish(self.fs, final, data)

    # -- parquet ---------------------------------------------------------------------
    def write_table(self, sub: str, table: pa.Table, name: str | None = None) -> str | None:
        """Write ``table`` as one part under OUT/<sub>/; returns its path (None if empty)."""
        if table.num_rows == 0:
            return None
        if name is None:
            ids = "\n".join(sorted(table.column("id").to_pylist()))
            name = f"part-{hashlib.sha256(ids.encode()).hexdigest()[:20]}.parquet"
        final = self.path(sub, name)
        buf = pa.BufferOutputStream()  # serialized whole before anything is published
        pq.write_table(table, buf, row_group_size=ROW_GROUP_ROWS)
        self._publish(final, buf.getvalue())
        return final

    def _parts(self, sub: str) -> list[str]:
        return storage.list_files(self.fs, self.path(sub), ".parquet", recursive=False)

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
        """(ids in data or rejects, accepted rows per ability). An id written twice (by
        an older raypipe, or copied in by hand) counts once."""
        data = self.read_columns("data", ["id", "ability"])
        rej = self.read_columns("rejects", ["id", "ability", "stage"])
        rej = rej.filter(pc.not_equal(rej["stage"], "keywords"))
        accepted = set(data.column("id").to_pylist())
        done = accepted | set(rej.column("id").to_pylist())
        per_ability: dict[str, int] = {}
        for sid, ab in zip(data.column("id").to_pylist(), data.column("ability").to_pylist()):
            if sid in accepted:
                accepted.discard(sid)
                per_ability[ab] = per_ability.get(ab, 0) + 1
        return done, per_ability

    # -- json ------------------------------------------------------------------------
    def write_json(self, rel: str, obj: Any) -> None:
        text = json.dumps(obj, indent=2, sort_keys=True, default=str)
        self._publish(self.path(rel), text.encode())

    def write_bytes(self, rel: str, data: bytes) -> None:
        """OUT/<rel>, whole or not at all (the dataset card, its preview)."""
        self._publish(self.path(rel), data)

    def read_json(self, rel: str) -> Any | None:
        info = self.fs.get_file_info(self.path(rel))
        if info.type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(self.path(rel)) as f:
            return json.loads(f.read().decode())
