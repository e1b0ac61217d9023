"""What the planner tracks per ability, and OUT/plan: what a run handed to the stream.

Rows (``id``, ``ability``, ``state``): ``planned`` each time an id is handed to the
stream, ``returned`` each time it is handed back unmade (after a transient LLM failure,
or when the run was halted), ``burned`` for a chunk position whose answer failed (never
planned again, in this run or a later one). An id planned more often than returned and
in neither OUT/data nor OUT/rejects was lost in flight (a kill): the next run makes it
again, and until then the manifest says ``balanced: false``.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, deque

import pyarrow as pa

#: OUT/plan's schema.
PLAN_SCHEMA = pa.schema([("id", pa.string()), ("ability", pa.string()), ("state", pa.string())])
#: How often the plan log is written to OUT/plan.
PLAN_LOG_S = 5.0


class AbilityPlan:
    """What the planner tracks for one ability."""

    def __init__(self, name: str, need: int, max_planned: int, done: set[int]):
        self.name = name
        self.need = need  # accepted rows still wanted
        self.max_planned = max_planned  # most rows this run may plan
        self.planned = 0
        self.done = done  # indices already in OUT (data or rejects)
        self.burned: set[int] = set()
        self.next_index = 0
        self.pending: deque[int] = deque()  # planned, not yet pulled
        self.in_flight: set[int] = set()  # pulled, not yet decided
        self.unanswered: set[int] = set()  # pulled, not yet back from the prompt writer
        self.replanned: set[int] = set()  # planned before, in neither folder: made again
        self.dedup_queue: deque[int] = deque()  # planned, not yet through dedup
        self.arrived: dict[int, tuple[str, str | None]] = {}  # index -> (id, prompt)
        self.passed: set[int] = set()  # through dedup (its prompt is in the index)
        self.decided: dict[int, tuple] = {}  # index -> dedup's (reason, repeats)
        self.waved: set[int] = set()  # through dedup without its turn, to be handed back
        self.due: dict[int, float] = {}  # handed back: not pulled again before this time
        self.handed_back: dict[int, int] = {}  # index -> times handed back (transient)

    def open(self) -> int:
        return len(self.pending) + len(self.in_flight)

    @property
    def exhausted(self) -> bool:
        return self.need > self.open() and self.planned >= self.max_planned

    def next_free(self) -> int:
        i = self.next_index
        while i in self.done or i in self.burned or i in self.replanned:
            i += 1
        self.next_index = i + 1
        return i


class PlanLog:
    """The planner's log of OUT/plan entries, written every few seconds as one part."""

    def __init__(self, store):
        self.store = store
        self.entries: list[dict[str, str]] = []
        self.logged_at = time.monotonic()

    def add(self, sid: str, ability: str, state: str) -> None:
        self.entries.append({"id": sid, "ability": ability, "state": state})

    def flush(self, force: bool = False) -> None:
        """Write what is logged as one part, if ``PLAN_LOG_S`` passed (or ``force``). The
        part's name is a hash of its entries: the same entries rewrite the same part."""
        due = time.monotonic() - self.logged_at >= PLAN_LOG_S
        if self.entries and (force or due):
            text = "\n".join(sorted(f"{e['state']} {e['id']}" for e in self.entries))
            name = f"part-{hashlib.sha256(text.encode()).hexdigest()[:20]}.parquet"
            table = pa.Table.from_pylist(self.entries, schema=PLAN_SCHEMA)
            self.store.write_table("plan", table, name=name)
            self.entries = []
            self.logged_at = time.monotonic()


def outstanding_ids(logged: list[tuple[str, str]]) -> set[str]:
    """Ids of OUT/plan's ``(id, state)`` rows that are planned more often than handed
    back unmade (``returned``): each planning logs ``planned`` once and each hand-back
    ``returned`` once, so an id returned by one run and planned again by a later one is
    outstanding again."""
    balance: Counter = Counter()
    for sid, state in logged:
        if state == "planned":
            balance[sid] += 1
        elif state == "returned":
            balance[sid] -= 1
    return {sid for sid, n in balance.items() if n > 0}
