"""The stream's source: read tasks that each pull the next rows from the planner
(:class:`raypipe.generate.planner.Planner`), and how many of them an execution gets."""

from __future__ import annotations

import math
from typing import Any

from raypipe.generate.planner import CHUNK_SCHEMA


def plan_source(planner, tickets: int):
    """A Ray Datasource of ``tickets`` read tasks, each one pull from ``planner``.

    One pull per read task, so each answer becomes its own block at once (Ray Data
    coalesces what a single read task yields until 128 MiB or the task ends). A pull
    after the run is finished yields no block at all: an empty block would still cross
    every stage as a task (and leave its stats in every operator's bookkeeping on the
    driver), and :func:`tickets_for` leaves room for twice the pulls a run needs.
    """
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    def read_fn():
        import ray

        rows = ray.get(planner.pull.remote())
        if rows.num_rows:
            yield rows

    class PlanSource(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, **kwargs):
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return [ReadTask(read_fn, meta, schema=CHUNK_SCHEMA) for _ in range(tickets)]

        @property
        def supports_distributed_reads(self) -> bool:
            return True

    return PlanSource()


#: Rows beyond the open ones that a first execution's read tasks leave room for, as a
#: fraction of them: the replacements of a run that rejects up to this share (dedup,
#: format, render and quality rejects together) stay in the same execution.
EXPECTED_REPLACEMENTS = 0.5
#: Read tasks beyond full pulls: the first pulls' ramp-up and a tail of small pulls.
SPARE_TICKETS = 16


def tickets_for(status: dict[str, Any], pull_chunks: int, k: int, first: bool = True) -> int:
    """Read tasks for one execution (each one pull: see :func:`plan_source`).

    Every read task runs, and one that finds the run finished still costs a task and an
    (empty) block in every operator's bookkeeping on the driver, so the count follows
    the rows the run expects rather than the most it may plan: the first execution gets
    full pulls for each ability's open rows plus ``EXPECTED_REPLACEMENTS`` of them in
    replacements (never more than its replacement budget allows), plus
    ``SPARE_TICKETS``. A run that rejects more continues in a new execution (the
    planner keeps its state), which gets read tasks for everything that may still be
    planned, twice over."""
    abilities = status["abilities"].values()
    room = [a["max_planned"] - a["planned"] + a["open"] for a in abilities]
    if first:
        rows = [
            min(r, math.ceil(a["open"] * (1 + EXPECTED_REPLACEMENTS)))
            for a, r in zip(abilities, room)
        ]
        chunks = sum(math.ceil(n / k) for n in rows)
        return math.ceil(chunks / pull_chunks) + SPARE_TICKETS
    return max(8, math.ceil(sum(room) / (pull_chunks * k)) * 2 + 64)
