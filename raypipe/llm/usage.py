"""A backend's counters: requests, HTTP calls, retries, failures by reason and kind,
paid and served tokens and USD (what ``stats()`` returns and the manifest sums)."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

#: Counters of ``stats()``. ``prompt_tokens``/``completion_tokens`` are paid usage (HTTP
#: answers); ``cached_*`` is usage served from the cache (and in-flight duplicates).
STAT_KEYS = (
    "requests",
    "cache_hits",
    "http_calls",
    "retries",
    "failures",
    "prompt_tokens",
    "completion_tokens",
    "cached_prompt_tokens",
    "cached_completion_tokens",
    "estimated_usage",
)


class Usage:
    """Thread-safe counters (the backend's loop writes, any thread reads)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter({k: 0 for k in STAT_KEYS})
        self._errors: Counter[str] = Counter()
        self._kinds: Counter[str] = Counter()
        self._cost = 0.0
        self._cached_cost = 0.0
        self._lock = threading.Lock()

    def count(self, **deltas: float) -> None:
        """Add to counters; ``cost_usd`` and ``cached_cost_usd`` are USD sums."""
        with self._lock:
            for k, v in deltas.items():
                if k == "cost_usd":
                    self._cost += v
                elif k == "cached_cost_usd":
                    self._cached_cost += v
                else:
                    self._counts[k] += int(v)

    def failed(self, reason: str, kind: str) -> None:
        """One request failed for ``reason`` (``http_401``, ``timeout``...), of ``kind``."""
        with self._lock:
            self._counts["failures"] += 1
            self._errors[reason] += 1
            self._kinds[kind] += 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
            out["failure_kinds"] = dict(self._kinds)
            out["cost_usd"] = round(self._cost, 8)
            out["cached_cost_usd"] = round(self._cached_cost, 8)
            out["errors"] = dict(self._errors)
        return out
