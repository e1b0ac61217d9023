"""OUT/plan: what a run handed to the stream, so the next run and the manifest know.

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
from collections import Counter

import pyarrow as pa

#: OUT/plan's schema.
PLAN_SCHEMA = pa.schema([("id", pa.string()), ("ability", pa.string()), ("state", pa.string())])
#: How often the plan log is written to OUT/plan.
PLAN_LOG_S = 5.0


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
