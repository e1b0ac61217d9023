"""The end of the stream: rows -> Parquet parts in OUT/data and OUT/rejects.

One :class:`PartWriter` actor per run buffers decided rows and writes a part when it
holds ``part_max_rows`` rows or when its oldest row has waited ``part_max_seconds``
(a background thread checks), so a long run shows data early and parts stay a
sensible size. It tells the planner each row's outcome, which is what plans the
replacement of a rejected row. The driver calls :meth:`PartWriter.close` when the
stream has ended, which writes what is left. Parts are written whole or not at all
(OutputStore); rows still buffered when a job is killed are simply made again by
the re-run, as they are in neither data nor rejects.
"""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.compute as pc

from raypipe.generate.planner import UNMADE
from raypipe.generate.store import OutputStore
from raypipe.schema import split_accepted

#: Columns of the per-row summary the stream returns to the driver (no image bytes).
SUMMARY_COLUMNS = ["id", "ability", "index", "reject_stage", "reject_reason", "meta"]


class PartWriter:
    """Buffers rows and writes parts by size or age; reports outcomes to the planner."""

    def __init__(self, out: str, planner, part_max_rows: int, part_max_seconds: float):
        self.store = OutputStore(out)
        self.planner = planner
        self.max_rows = part_max_rows
        self.max_seconds = part_max_seconds
        self._lock = threading.Lock()
        self._buffers: dict[str, list[pa.Table]] = {"data": [], "rejects": []}
        self._since: dict[str, float | None] = {"data": None, "rejects": None}
        self.parts_written = 0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._age_flusher, daemon=True)
        self._thread.start()

    def add(self, batch: pa.Table) -> pa.Table:
        """Buffer one block of decided rows; returns its summary (for the driver)."""
        import ray

        data, rejects = split_accepted(batch)
        if rejects.num_rows:  # rows handed back unmade are written nowhere
            rejects = rejects.filter(pc.not_equal(rejects["stage"], UNMADE))
        with self._lock:
            for sub, table in (("data", data), ("rejects", rejects)):
                if table.num_rows:
                    self._buffers[sub].append(table)
                    if self._since[sub] is None:
                        self._since[sub] = time.monotonic()
                    if sum(t.num_rows for t in self._buffers[sub]) >= self.max_rows:
                        self._flush(sub, whole_parts_only=True)
        stages = batch.column("reject_stage").to_pylist()
        outcomes = [
            (ab, idx, stage or None)
            for ab, idx, stage in zip(
                batch.column("ability").to_pylist(), batch.column("index").to_pylist(), stages
            )
        ]
        ray.get(self.planner.report.remote(outcomes))
        return batch.select(SUMMARY_COLUMNS)

    def _flush(self, sub: str, whole_parts_only: bool = False) -> None:
        """Write the buffer as parts of at most ``max_rows`` rows; with
        ``whole_parts_only``, keep a remainder shorter than that buffered."""
        if not self._buffers[sub]:
            return
        table = pa.concat_tables(self._buffers[sub])
        start = 0
        while table.num_rows - start >= self.max_rows or (
            not whole_parts_only and start < table.num_rows
        ):
            self.store.write_table(sub, table.slice(start, self.max_rows))
            self.parts_written += 1
            start += self.max_rows
        rest = table.slice(start)
        self._buffers[sub] = [rest] if rest.num_rows else []
        if not rest.num_rows:
            self._since[sub] = None

    def _age_flusher(self) -> None:
        tick = min(1.0, self.max_seconds / 4)
        while not self._closed.wait(tick):
            with self._lock:
                for sub, since in self._since.items():
                    if since is not None and time.monotonic() - since >= self.max_seconds:
                        self._flush(sub)

    def close(self) -> int:
        """Write what is left; returns the number of parts this writer wrote."""
        self._closed.set()
        with self._lock:
            for sub in self._buffers:
                self._flush(sub)
        return self.parts_written


def write_block(batch: pa.Table, writer) -> pa.Table:
    """The stream's last stage (a light task): hand a block to the run's writer actor."""
    import ray

    return ray.get(writer.add.remote(batch))
