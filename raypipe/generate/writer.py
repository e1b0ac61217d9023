"""The end of the stream: rows -> Parquet parts in OUT/data and OUT/rejects.

One :class:`PartWriter` actor per run buffers decided rows and writes a part when it
holds ``part_max_rows`` rows or when its oldest row has waited ``part_max_seconds``
(a background thread checks), so a long run shows data early and parts stay a
sensible size. It tells the planner each row's outcome, which is what plans the
replacement of a rejected row. The driver calls :meth:`PartWriter.close` when the
stream has ended, which writes what is left. Parts are written whole or not at all
(OutputStore); rows still buffered when a job is killed are simply made again by
the re-run, as they are in neither data nor rejects.

Idempotent by id: Ray retries a ``write_block`` task whose worker died, and runs it
again to rebuild a lost output, so the same block can be handed over twice (or a row
rebuilt upstream can come back with another outcome). The writer keeps every id it took
in this run and drops repeats, so an id reaches OUT/data or OUT/rejects at most once,
never both. Before each part is published the writer checks the run still holds OUT's
lease (the store's fence).
"""

from __future__ import annotations

import logging
import threading
import time

import pyarrow as pa
import pyarrow.compute as pc

from raypipe.generate.llm_stage import UNMADE
from raypipe.generate.store import OutputStore
from raypipe.schema import split_accepted

log = logging.getLogger(__name__)
#: Columns of the per-row summary the stream returns to the driver (no image bytes).
SUMMARY_COLUMNS = ["id", "ability", "index", "reject_stage", "reject_reason", "meta"]


class PartWriter:
    """Buffers rows and writes parts by size or age; reports outcomes to the planner."""

    def __init__(self, out: str, planner, part_max_rows: int, part_max_seconds: float, lease=None):
        self.store = OutputStore(out, fence=lease.check if lease is not None else None)
        self.planner = planner
        self.max_rows = part_max_rows
        self.max_seconds = part_max_seconds
        self._lock = threading.Lock()
        self._buffers: dict[str, list[pa.Table]] = {"data": [], "rejects": []}
        self._since: dict[str, float | None] = {"data": None, "rejects": None}
        self.parts_written = 0
        self._taken: set[str] = set()  # ids buffered or written by this run
        self.repeats_dropped = 0
        self.flush_errors = 0
        self._routed = None  # the Tally of rows routed here before render (route_rejects)
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
            data, rejects = self._new_only(data), self._new_only(rejects)
            for sub, table in (("data", data), ("rejects", rejects)):
                if table.num_rows:
                    self._buffers[sub].append(table)
                    if self._since[sub] is None:
                        self._since[sub] = time.monotonic()
                    if sum(t.num_rows for t in self._buffers[sub]) >= self.max_rows:
                        self._flush(sub, whole_parts_only=True)
        outcomes = list(
            zip(
                *(
                    batch.column(c).to_pylist()
                    for c in ("ability", "index", "reject_stage", "reject_reason")
                )
            )
        )
        outcomes = [(ab, i, stage or None, reason or None) for ab, i, stage, reason in outcomes]
        ray.get(self.planner.report.remote(outcomes))
        return batch.select(SUMMARY_COLUMNS)

    def add_routed(self, batch: pa.Table) -> None:
        """Buffer rows decided before render (rejected or handed back): they never cross
        the render pool, so the driver gets their counts from :meth:`routed_tally`."""
        from raypipe.generate.manifest import Tally

        summary = self.add(batch)
        with self._lock:
            self._routed = self._routed or Tally()
            self._routed.add(summary)

    def routed_tally(self):
        """The counts of rows routed here since the last call (a Tally, or None)."""
        with self._lock:
            tally, self._routed = self._routed, None
        return tally

    def _new_only(self, table: pa.Table) -> pa.Table:
        """The rows of ``table`` whose ids this run has not taken yet (now taken)."""
        if not table.num_rows:
            return table
        keep = []
        for sid in table.column("id").to_pylist():
            keep.append(sid not in self._taken)
            self._taken.add(sid)
        if all(keep):
            return table
        self.repeats_dropped += keep.count(False)
        return table.filter(pa.array(keep))

    def _flush(self, sub: str, whole_parts_only: bool = False) -> None:
        """Write the buffer as parts of at most ``max_rows`` rows; with
        ``whole_parts_only``, keep a remainder shorter than that buffered. When a write
        raises, what was not written stays buffered (and the error propagates)."""
        if not self._buffers[sub]:
            return
        table = pa.concat_tables(self._buffers[sub])
        start = 0
        try:
            while table.num_rows - start >= self.max_rows or (
                not whole_parts_only and start < table.num_rows
            ):
                self.store.write_table(sub, table.slice(start, self.max_rows))
                self.parts_written += 1
                start += self.max_rows
        finally:
            rest = table.slice(start)
            self._buffers[sub] = [rest] if rest.num_rows else []
            if not rest.num_rows:
                self._since[sub] = None

    def _age_flusher(self) -> None:
        """Writes parts by age. A failed write is logged and tried again at the next
        tick (the rows stay buffered); it never ends the thread, which would leave parts
        written only by size or at close."""
        tick = min(1.0, self.max_seconds / 4)
        while not self._closed.wait(tick):
            with self._lock:
                for sub, since in self._since.items():
                    if since is None or time.monotonic() - since < self.max_seconds:
                        continue
                    try:
                        self._flush(sub)
                    except Exception:  # noqa: BLE001 - logged; close() raises it for good
                        self.flush_errors += 1
                        log.exception("writing a part of OUT/%s failed; trying again", sub)

    def close(self) -> int:
        """Write what is left; returns the number of parts this writer wrote."""
        self._closed.set()
        self._thread.join()
        with self._lock:
            for sub in self._buffers:
                self._flush(sub)
        return self.parts_written


def route_rejects(batch: pa.Table, writer, planner) -> pa.Table:
    """Before render (a light task): rows already rejected or handed back go to the
    writer at once; the rest go on, so every render call is filled with rows to render,
    and the planner hears that they are past the LLM stages (its late read tasks wait
    for that to take the replacements of rows rejected before render)."""
    import ray

    decided = pc.fill_null(pc.not_equal(batch["reject_stage"], ""), False)
    if pc.any(decided).as_py():
        ray.get(writer.add_routed.remote(batch.filter(decided)))
        batch = batch.filter(pc.invert(decided))
    if batch.num_rows:
        rows = zip(batch.column("ability").to_pylist(), batch.column("index").to_pylist())
        ray.get(planner.past_dialogues.remote(list(rows)))
    return batch


def write_block(batch: pa.Table, writer) -> pa.Table:
    """The stream's last stage (a light task): hand a block to the run's writer actor."""
    import ray

    return ray.get(writer.add.remote(batch))
