"""The run's planner: which rows to make, as a fixed plan per execution of the stream.

A generation run is one or a few streaming Ray Data executions. Before each, the
:class:`Planner` actor fixes what it makes (:meth:`Planner.plan_execution`): every row
that can be made now, cut into read tasks; each read task takes its slice at once
(:meth:`Planner.take`), so no read task waits and the stream's input ends when the plan
is read, which lets a stage fill fixed-size batches (the render pool's last call of an
execution is the only partial one). The planner answers from what it knows so far:

1. At the start it plans, per ability, every id an earlier run planned that is in
   neither OUT/data nor OUT/rejects (rows in flight or buffered at a kill), whether or
   not the quota is met already, so a resumed run always ends balanced; then the
   smallest free indices, as many as the ability still needs (``quota - accepted``).
2. A rejected row (at any stage) gets one replacement: the next never-planned index
   of its ability, made by the next execution (a *top-up*: at most ``MAX_TOP_UPS`` per
   run). Rows beyond the quota are never planned. Rejection depends only on
   a row's own content, so a re-run makes the same decisions.
3. A prompt request answers k rows at once (a *chunk*: indices ``c*k .. c*k+k-1``).
   When some of its prompts do not parse, the prompt writer *burns* those positions
   (:meth:`burn`): they are never planned as replacements, so no row is ever served
   an answer that already failed; the chunk's good prompts stay usable.
4. Prompt dedup is decided here (:meth:`dedup`) in index order: a row's prompt is
   compared once every lower-index row of its ability has arrived, so the lowest index
   wins among repeats, against every earlier row of its ability that passed dedup
   (this run and OUT/data), exact or near (``near_duplicate_threshold``).
5. A row whose LLM request failed as transient (an outage, not its content) is handed
   back and planned again under the same id by the next execution, after a pause
   (:meth:`report`): it burns no position, spends no replacement budget and is no
   top-up; rows of its ability with higher indices wait at dedup for it (those still
   waiting when the execution ends are planned again with it), so dedup decides as it
   would have.
6. A run stops planning when every ability has its quota, when an ability used up its
   replacement budget (``replace_budget``), or when it is halted (:meth:`halt`:
   ``max_usd`` reached, or ``llm.outage_stop_s`` of outage), or when its top-ups are
   used up: rows in flight finish or are handed back unmade, and no execution follows.
   What was planned, handed back and burned is in OUT/plan (raypipe.generate.plan_log).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any

import pyarrow as pa

from raypipe.generate.executions import CHUNK_SCHEMA, LATE_TASKS, ExecutionPlans
from raypipe.generate.keywords import keyword_for
from raypipe.generate.llm_stage import TRANSIENT_REASON, UNMADE
from raypipe.generate.plan_log import AbilityPlan, PlanLog, outstanding_ids
from raypipe.generate.store import OutputStore
from raypipe.schema import sample_id
from raypipe.similarity import NearDuplicateIndex

#: Why a run stops when a restarted actor lost the rows it held (exit 75).
ACTOR_LOST = "actor_lost"
#: Pause before a handed-back row is pulled again: doubled with each hand-back of the
#: row, up to ``REQUEUE_MAX_S`` (its requests already retried with backoff).
REQUEUE_S = 1.0
REQUEUE_MAX_S = 30.0


def _positions(ids, prefix: str) -> set[int]:
    """The plan positions of the ids that start with an ability's ``prefix``."""
    return {int(s[len(prefix) :]) for s in ids if s.startswith(prefix)}


class Planner(ExecutionPlans):
    """Plans rows, decides prompt dedup by index, plans replacements (see module doc).

    Runs as one threaded Ray actor per run (``max_concurrency`` > 1: a late read task waits while
    reports arrive). Reads OUT itself, so the driver never holds the ids of a big run.
    """

    def __init__(
        self,
        out: str,
        run_seed: int,
        banks: dict[str, list[str]],
        quota: dict[str, int],
        prompts_per_request: int,
        pull_chunks: int,
        replace_budget: float,
        near_duplicate_threshold: float,
        max_usd: float | None = None,
        spent_usd: float = 0.0,
        lease=None,
        late_tasks: int = LATE_TASKS,
    ):
        # Plan logs are published only while the run holds OUT (``lease``: a LeaseToken).
        self.store = OutputStore(out, fence=lease.check if lease is not None else None)
        self.seed = run_seed
        self.banks = banks
        self.k = prompts_per_request
        self.pull_chunks = pull_chunks
        self.max_usd = max_usd
        self.spent_usd = spent_usd
        self.stopped: str | None = None
        self._cond = threading.Condition()
        self._plan_log = PlanLog(self.store)
        self._pulls = 0
        self.execution, self.top_ups = -1, 0
        self.late_tasks = late_tasks  # per execution (executions.late_tasks)
        self._slices: list[pa.Table] = []  # the read tasks of the current execution
        self._late: dict[int, pa.Table] = {}  # its late read tasks, as first taken
        self._before_render: set[tuple[str, int]] = set()  # taken, not yet past dialogues
        self._fresh: set[tuple[str, int]] = set()  # replacements planned, not yet taken
        self._handed_back = False  # a row of this execution was handed back
        self.requeued = 0  # rows handed back after a transient LLM failure, made again
        self.lost_actor, self._dedup_starts = None, 0  # see dedup_started

        # 1. What OUT already holds.
        done_ids, accepted = self.store.done_ids()
        plan = self.store.read_columns("plan", ["id", "state"])
        logged = list(zip(plan.column("id").to_pylist(), plan.column("state").to_pylist()))
        # Planned by an earlier run, in neither folder and not handed back unmade: made
        # again whatever the quota (also a row whose position burned: its failed answer
        # rejects it, with the reason).
        unfinished = outstanding_ids(logged) - done_ids
        burned_ids = {i for i, st in logged if st == "burned"} - unfinished
        self.index = {
            name: NearDuplicateIndex(near_duplicate_threshold, seed=run_seed) for name in quota
        }
        data = self.store.read_columns("data", ["id", "ability", "prompt"])
        for sid, ab, prompt in zip(
            *(data.column(c).to_pylist() for c in ("id", "ability", "prompt"))
        ):
            if ab in self.index and prompt:
                self.index[ab].add(sid, prompt)
        self.abilities: dict[str, AbilityPlan] = {}
        for name, want in quota.items():
            prefix = sample_id(run_seed, name, 0)[:-7]
            need = max(0, want - accepted.get(name, 0))
            extra = max(self.k, math.ceil(need * replace_budget)) if need else 0
            ab = AbilityPlan(name, need, need + extra, _positions(done_ids, prefix))
            ab.burned = _positions(burned_ids, prefix)
            ab.replanned = _positions(unfinished, prefix)
            self.abilities[name] = ab

        # 2. The first plan: the rows to make again, then as many as each ability needs.
        with self._cond:
            for ab in self.abilities.values():
                for i in sorted(ab.replanned):
                    ab.pending.append(i)
                    ab.dedup_queue.append(i)
                    ab.planned += 1
                ab.max_planned += len(ab.replanned)
                self._top_up(ab)
                ab.pending = deque(sorted(ab.pending))
                ab.dedup_queue = deque(sorted(ab.dedup_queue))
        self.planned_at_start = sum(ab.planned for ab in self.abilities.values())

    # -- planning ------------------------------------------------------------------------

    def _top_up(self, ab: AbilityPlan) -> None:
        while not self.stopped and ab.need > ab.open() and ab.planned < ab.max_planned:
            i = ab.next_free()
            ab.pending.append(i)
            ab.dedup_queue.append(i)
            ab.planned += 1
            if self.execution >= 0:
                self._fresh.add((ab.name, i))
        self._cond.notify_all()

    def _finish(self, ab: AbilityPlan, index: int, accepted: bool) -> None:
        if index not in ab.in_flight:
            return  # decided already (a dedup reject reported again by the writer)
        self._before_render.discard((ab.name, index))
        ab.in_flight.discard(index)
        ab.unanswered.discard(index)
        if accepted:
            ab.need -= 1
        self._top_up(ab)

    def finished(self) -> bool:
        return all(ab.open() == 0 for ab in self.abilities.values())

    def pull(self) -> pa.Table:
        """The next rows to make now, as request chunks (empty when none can be taken).

        Never waits: rows planned while an execution runs (replacements of its rejects,
        rows handed back) wait for the next execution (:meth:`plan_execution`). The
        first pulls of an execution are small (1, 2, 4, ... chunks, up to
        ``pull_chunks``), so its first rows reach the GPUs and OUT/data early.
        """
        limit = min(self.pull_chunks, 2**self._pulls) * self.k
        self._pulls += 1
        with self._cond:
            if self.lost_actor:  # nothing more: the run stops (see dedup_started)
                self._plan_log.flush(force=True)
                return CHUNK_SCHEMA.empty_table()
            items = self._take(limit)
            self._plan_log.flush(force=not items)
        return pa.Table.from_pylist(items, schema=CHUNK_SCHEMA)

    def _held_chunks(self, ab: AbilityPlan) -> set[int]:
        """Chunks whose request is out (their other rows wait: sent once per run), and
        chunks with a handed-back row still pausing."""
        held = {i // self.k for i in ab.unanswered}
        if ab.due:
            now = time.monotonic()
            for i, t in list(ab.due.items()):
                if t <= now:
                    del ab.due[i]
                else:
                    held.add(i // self.k)
        return held

    def _takeable(self, ab: AbilityPlan) -> int:
        if not ab.unanswered and not ab.due:
            return len(ab.pending)
        held = self._held_chunks(ab)
        return sum(1 for i in ab.pending if i // self.k not in held)

    def _next_chunk(self, ab: AbilityPlan) -> list[int]:
        """Pops the rows of the first pending chunk whose request is not out ([] if none)."""
        held = self._held_chunks(ab) if ab.unanswered or ab.due else set()
        c = next((i // self.k for i in ab.pending if i // self.k not in held), None)
        if c is None:
            return []
        if ab.pending[0] // self.k == c:  # the usual case: the chunk at the front
            rows = []
            while ab.pending and ab.pending[0] // self.k == c:
                rows.append(ab.pending.popleft())
            return rows
        rows = [i for i in ab.pending if i // self.k == c]
        ab.pending = deque(i for i in ab.pending if i // self.k != c)
        return rows

    def _take(self, limit: int) -> list[dict[str, Any]]:
        """Up to ``limit`` pending rows as request chunks, one chunk per ability in turn
        (so every ability streams from the start, and a chunk is never split across
        pulls, which would send its request twice)."""
        items: list[dict[str, Any]] = []
        taken = 0
        while taken < limit and any(self._takeable(ab) for ab in self.abilities.values()):
            for ab in self.abilities.values():
                if taken >= limit or not self._takeable(ab):
                    continue
                rows = self._next_chunk(ab)
                if taken and taken + len(rows) > limit:
                    ab.pending = deque(sorted([*rows, *ab.pending]))
                    return items
                c = rows[0] // self.k
                item = {
                    "ability": ab.name,
                    "chunk": c,
                    "indices": [],
                    "ids": [],
                    "chunk_keywords": [
                        keyword_for(self.banks[ab.name], self.seed, ab.name, j)
                        for j in range(c * self.k, c * self.k + self.k)
                    ],
                }
                for i in rows:
                    ab.in_flight.add(i)
                    ab.unanswered.add(i)
                    self._before_render.add((ab.name, i))
                    self._fresh.discard((ab.name, i))
                    sid = sample_id(self.seed, ab.name, i)
                    self._plan_log.add(sid, ab.name, "planned")
                    item["indices"].append(i)
                    item["ids"].append(sid)
                taken += len(item["indices"])
                items.append(item)
        return items

    # -- what the stages tell the planner ------------------------------------------------

    def burn(self, ability: str, indices: list[int]) -> None:
        """Chunk positions whose prompt failed: never plan them as replacements."""
        with self._cond:
            ab = self.abilities.get(ability)
            if ab is None:
                return
            new = [i for i in indices if i not in ab.burned]
            ab.burned.update(new)
            for i in new:
                self._plan_log.add(sample_id(self.seed, ability, i), ability, "burned")
            self._plan_log.flush(force=bool(new))
            unplanned = [i for i in ab.pending if i in ab.burned]
            for i in unplanned:  # planned but not handed out yet: plan another row instead
                ab.pending.remove(i)
                ab.dedup_queue.remove(i)
                ab.planned -= 1
            if unplanned:
                self._top_up(ab)

    def dedup(self, rows: list[tuple]) -> list[tuple[str, str | None, str | None]]:
        """Rows that reached dedup: ``(id, ability, index, prompt or None if rejected,
        unmade reason or None)`` (the last item may be left out).

        Returns ``(id, reason, repeats)`` for every row that can be decided now (reason
        None = passed), in index order per ability; the rest wait for lower indices. A
        row handed back unmade keeps its place (its ability's higher rows wait for it to
        be made again) unless the run is halted; a row that passed dedup before a
        hand-back passes again.
        """
        out: list[tuple[str, str | None, str | None]] = []
        with self._cond:
            if self.lost_actor:  # rows behind the lost ones cannot be decided: hand back
                return [(r[0], UNMADE, self.stopped) for r in rows]
            touched = set()
            for sid, ability, index, prompt, *unmade in rows:
                ab = self.abilities[ability]
                if index in ab.decided:  # made again after a hand-back, or a retried
                    out.append((sid, *ab.decided[index]))  # block: decided before
                    continue
                if unmade and unmade[0] and not self.stopped:  # to be handed back
                    ab.waved.add(index)
                    out.append((sid, None, None))
                    continue
                ab.arrived[index] = (sid, prompt)
                ab.unanswered.discard(index)  # its chunk's answer is back (and cached)
                touched.add(ability)
            self._cond.notify_all()  # rows of those chunks may be pulled now
            for name in touched:
                ab = self.abilities[name]
                while ab.dedup_queue and ab.dedup_queue[0] in ab.arrived:
                    i = ab.dedup_queue.popleft()
                    sid, prompt = ab.arrived.pop(i)
                    hit = None if prompt is None else self.index[name].check_and_add(sid, prompt)
                    ab.decided[i] = hit or (None, None)
                    out.append((sid, *ab.decided[i]))
                    if prompt is None or hit:  # rejected before dedup, or a repeat
                        self._finish(ab, i, accepted=False)
                    else:
                        ab.passed.add(i)
        return out

    def report(self, outcomes: list[tuple]) -> None:
        """Final decisions from the writer: ``(ability, index, reject stage or None,
        reject reason or None)`` (the reason may be left out).

        A row handed back unmade after a transient LLM failure is planned again (see the
        module doc); once the run is halted, a handed-back row that went past dedup
        without its turn is sent through once more, unmade, so the rows behind it are
        decided; any other is handed back for the next run."""
        with self._cond:
            for ability, index, stage, *reason in outcomes:
                ab = self.abilities[ability]
                if stage == UNMADE and index in ab.in_flight:
                    if reason and reason[0] == TRANSIENT_REASON and not self.stopped:
                        self._requeue(ab, index, pause=True)
                        continue
                    if self.stopped and index in ab.waved:
                        self._requeue(ab, index, pause=False)
                        continue
                self._finish(ab, index, accepted=not stage)
                if stage == UNMADE:
                    self._log_returned(ab, index)

    def _requeue(self, ab: AbilityPlan, index: int, pause: bool) -> None:
        """Plan ``index`` again; the plan log says it was handed back (it says planned
        again when it is pulled again)."""
        self._log_returned(ab, index)
        self._handed_back = True
        self._before_render.discard((ab.name, index))
        ab.waved.discard(index)
        ab.in_flight.discard(index)
        ab.unanswered.discard(index)
        ab.pending = deque(sorted([*ab.pending, index]))
        if pause:
            n = ab.handed_back[index] = ab.handed_back.get(index, 0) + 1
            ab.due[index] = time.monotonic() + min(REQUEUE_MAX_S, REQUEUE_S * 2 ** (n - 1))
            self.requeued += 1
        self._cond.notify_all()

    def _log_returned(self, ab: AbilityPlan, index: int) -> None:
        sid = sample_id(self.seed, ab.name, index)
        self._plan_log.add(sid, ab.name, "returned")

    def stop_reason(self) -> str | None:
        """Why the run was halted (``max_usd``, ``llm_outage``), else None: LLM stages
        then send no more requests and hand their rows back unmade."""
        return self.stopped

    def spend(self, usd: float) -> None:
        """Paid LLM spend of a batch; at ``max_usd`` the run is halted."""
        with self._cond:
            self.spent_usd += usd
            if self.max_usd is not None and self.spent_usd >= self.max_usd:
                self._halt("max_usd")

    def halt(self, reason: str) -> None:
        """Stop planning (``reason``: e.g. ``llm_outage``): rows in flight finish or are
        handed back unmade, and the stream ends."""
        with self._cond:
            self._halt(reason)

    def _halt(self, reason: str) -> None:
        if self.stopped:
            return
        self.stopped = reason
        for ab in self.abilities.values():
            ab.due.clear()  # what still goes through is handed back, without a request
            # A pending row that no pulled row waits for at dedup is never made: only a
            # lower index than one already out must still pass (unmade) to decide it.
            hi = max(ab.in_flight | set(ab.arrived), default=-1)
            drop = [i for i in ab.pending if i > hi or i in ab.passed]
            for i in drop:
                ab.pending.remove(i)
                ab.planned -= 1
                if i not in ab.passed:
                    ab.dedup_queue.remove(i)
        self._cond.notify_all()

    def dedup_started(self) -> None:
        """Each dedup actor calls this as it starts. A second start in one execution is
        Ray restarting a dead one: if rows were waiting at dedup, those it held are lost
        (rows of the block Ray retries on the new actor pass as decided before), and the
        run stops (``stopped: actor_lost``; nothing more is pulled and rows still arriving
        at dedup are handed back), and the same command makes the lost rows again."""
        with self._cond:
            self._dedup_starts += 1
            held = any(ab.arrived for ab in self.abilities.values())
            if self._dedup_starts > 1 and held and not self.lost_actor:
                self.stopped = None  # what stops this run is the lost actor
                self._halt(ACTOR_LOST)
                self.lost_actor = "prompt dedup"
                for ab in self.abilities.values():
                    ab.planned -= len(ab.pending)
                    ab.pending.clear()

    def status(self) -> dict[str, Any]:
        with self._cond:
            self._plan_log.flush(force=True)
            stopped = self.stopped
            if not stopped and any(
                ab.exhausted or (ab.need and not ab.open()) for ab in self.abilities.values()
            ):
                stopped = "replace_budget"
            return {
                "finished": self.finished(),
                "stopped": stopped,
                "spent_usd": self.spent_usd,
                "planned": sum(ab.planned for ab in self.abilities.values()),
                "planned_at_start": self.planned_at_start,
                "requeued": self.requeued,
                "executions": self.execution + 1,
                "top_ups": self.top_ups,
                "lost_actor": self.lost_actor,
                "abilities": {
                    ab.name: {
                        "need": ab.need,
                        "open": ab.open(),
                        "planned": ab.planned,
                        "max_planned": ab.max_planned,
                        "burned": len(ab.burned),
                    }
                    for ab in self.abilities.values()
                },
            }
