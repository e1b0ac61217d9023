"""The planner's side of executions: each execution of the stream reads a fixed plan.

:class:`ExecutionPlans` is a part of :class:`raypipe.generate.planner.Planner` (its
state: ``abilities``, ``_cond``, the plan log). Before each execution the driver calls
:meth:`~ExecutionPlans.plan_execution`, which fixes every row that can be made now, cut
into read tasks; a read task takes its slice at once (:meth:`~ExecutionPlans.take`), so
the stream's input ends once the plan is read (which lets the render pool get full
batches). ``LATE_TASKS`` late read tasks at the end make, in the same execution, the
replacements of rows rejected before render; the rest are made by at most
``MAX_TOP_UPS`` top-up executions.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

import pyarrow as pa

#: What a pull hands the prompt writer: one item per request chunk.
CHUNK_SCHEMA = pa.schema(
    [
        ("ability", pa.string()),
        ("chunk", pa.int64()),
        ("indices", pa.list_(pa.int64())),
        ("ids", pa.list_(pa.string())),
        ("chunk_keywords", pa.list_(pa.string())),
    ]
)

#: Executions after the first that plan replacements of rejected rows, at most, per run
#: (DESIGN: bounded top-ups); a run still short after them stops with ``TOP_UPS``.
MAX_TOP_UPS = 3
#: Why a run stops when its top-ups are used up (exit 1; the same command continues).
TOP_UPS = "top_ups"
#: Read tasks at the end of each execution that make, in the same execution, the
#: replacements of rows rejected before render (prompts, dedup, dialogues): each waits
#: until every row taken before it is past those stages, then takes what is planned.
LATE_TASKS = 3


def late_tasks(backend: str) -> int:
    """Late read tasks per execution for ``llm.backend``: none for ``vllm``, whose writers
    batch rows (``llm.vllm.batch_size``): a batch waits for rows until the execution's
    input ends, and a late read task would wait for the rows that batch holds. A vLLM
    run's replacements are made by top-ups."""
    return 0 if backend == "vllm" else LATE_TASKS


class ExecutionPlans:
    """Executions of the stream, each a fixed plan (a mixin of the Planner)."""

    def plan_execution(self) -> dict[str, Any]:
        """Fix the plan of the next execution of the stream: every row that can be made
        now, cut into read tasks (:meth:`take`), then ``late_tasks`` late read tasks for
        the replacements of rows rejected before render. Rows pulled by the last
        execution and not decided (held at dedup when it ended, or lost with an actor)
        are planned again. Returns ``{"execution", "tasks", "rows", "top_up", "wait_s"}``:
        ``tasks`` is 0 when nothing is to be made now; ``wait_s`` > 0 when rows handed
        back after an outage are still pausing (plan again after that long).

        An execution after the first that plans replacements not made yet (of rows
        rejected at render or quality, or past the late read tasks) is a *top-up*; a run
        makes at most ``MAX_TOP_UPS``, then stops (``stopped: top_ups``) with what it
        has, and the same command continues.
        """
        with self._cond:
            self._requeue_undecided()
            self._slices, self._late = [], {}
            self._before_render.clear()
            self._handed_back = False
            self._pulls = 0
            wait = max((t for ab in self.abilities.values() for t in ab.due.values()), default=0.0)
            wait_s = max(0.0, wait - time.monotonic())
            if self.stopped or self.lost_actor:
                return self._plan(top_up=False, wait_s=0.0)
            if wait_s > 0:
                return self._plan(top_up=False, wait_s=wait_s)
            pending = {(ab.name, i) for ab in self.abilities.values() for i in ab.pending}
            top_up = bool(self._fresh & pending)
            self._fresh.clear()
            if top_up and self.top_ups >= MAX_TOP_UPS:
                self._halt(TOP_UPS)
                return self._plan(top_up=False, wait_s=0.0)
        while True:
            table = self.pull()
            if not table.num_rows:
                break
            self._slices.append(table)
        with self._cond:
            if not self._slices:
                return self._plan(top_up=False, wait_s=0.0)
            self.execution += 1
            self.top_ups += int(top_up)
            return self._plan(top_up=top_up, wait_s=0.0)

    def _plan(self, top_up: bool, wait_s: float) -> dict[str, Any]:
        rows = sum(len(i) for t in self._slices for i in t.column("indices").to_pylist())
        late = self.late_tasks if self._slices else 0
        return {
            "execution": self.execution,
            "tasks": len(self._slices) + late,
            "rows": rows,
            "top_up": top_up,
            "wait_s": wait_s,
        }

    def take(self, execution: int, task: int) -> pa.Table:
        """Read task ``task`` of ``execution``: its fixed slice of the plan, at once. A
        read task that Ray runs again (its worker died) gets the same rows.

        A late read task (after the plan's slices) first waits until every row taken
        before it is past the LLM stages (decided, or reported by
        :meth:`past_dialogues`), then takes the replacements planned meanwhile. It takes
        nothing once a row of the execution was handed back (rows behind it wait at
        dedup until the next execution) or the run is halted.
        """
        if execution != self.execution:
            return CHUNK_SCHEMA.empty_table()
        if task < len(self._slices):
            return self._slices[task]
        with self._cond:
            if task not in self._late:
                while (
                    self._before_render
                    and execution == self.execution
                    and not (self._handed_back or self.stopped or self.lost_actor)
                ):
                    self._cond.wait(timeout=1.0)
                if execution != self.execution:  # that execution failed and ended
                    return CHUNK_SCHEMA.empty_table()
                stop = self._handed_back or self.stopped or self.lost_actor
                items = [] if stop else self._take(math.inf)
                self._plan_log.flush(force=True)
                self._late[task] = pa.Table.from_pylist(items, schema=CHUNK_SCHEMA)
            return self._late[task]

    def past_dialogues(self, rows: list[tuple[str, int]]) -> None:
        """Rows (ability, index) that left the LLM stages unrejected (toward render)."""
        with self._cond:
            for ability, index in rows:
                self._before_render.discard((ability, index))
                self.abilities[ability].unanswered.discard(index)  # its answer is back
            self._cond.notify_all()

    def _requeue_undecided(self) -> None:
        """Before an execution: rows the last one pulled and did not decide are planned
        again (a new execution also starts a new dedup actor: no restart)."""
        self._dedup_starts = 0
        for ab in self.abilities.values():
            again = sorted(ab.in_flight | set(ab.pending))
            ab.in_flight.clear()
            ab.unanswered.clear()
            ab.pending = deque(again)
            ab.dedup_queue = deque(sorted((set(ab.dedup_queue) | set(again)) - ab.passed))
            ab.arrived.clear()
