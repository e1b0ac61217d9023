"""Accuracy tables: per ability and overall, with Wilson intervals, failed predictions
counted (``errors``), beside the judge's and the human reviewers' accuracy."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from raypipe.evaluate.normalize import is_nan

__all__ = ["ERROR", "accuracy_table", "agreement", "wilson_interval"]

#: The verdict reason of a prediction that failed (a timeout, a content filter, an
#: unreadable image): scored wrong, and counted in ``errors``.
ERROR = "error"


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for ``correct`` successes in ``n`` trials (95% at z=1.96).

    ``n == 0`` gives ``(0.0, 1.0)``: with no answers every accuracy is possible.
    """
    if n < 0 or correct < 0 or correct > n:
        raise ValueError(f"wilson_interval: need 0 <= correct <= n, got correct={correct}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _verdict_value(value: Any, column: str, index: int) -> bool | None:
    """A verdict cell as bool (None when empty): bool, 0/1, 0.0/1.0."""
    if value is None or is_nan(value):
        return None
    if isinstance(value, bool):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = None
    if number in (0.0, 1.0) and not isinstance(value, str):
        return bool(number)
    raise ValueError(
        f"row {index}: {column} is {value!r}; a verdict is true/false or 1/0 (empty if unknown)"
    )


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keyword = [r["correct"] for r in rows if r["correct"] is not None]
    n, k = len(keyword), sum(keyword)
    low, high = wilson_interval(k, n)
    out: dict[str, Any] = {
        "n": n,
        "errors": sum(1 for r in rows if r["correct"] is not None and r["error"]),
        "correct": k,
        "accuracy": k / n if n else None,
        "ci_low": low,
        "ci_high": high,
    }
    for name in ("judge", "human"):
        values = [r[name] for r in rows if r[name] is not None]
        if values:
            out[f"{name}_n"] = len(values)
            out[f"{name}_accuracy"] = sum(values) / len(values)
    return out


def accuracy_table(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy per ability and overall: ``{"overall": S, "abilities": {ability: S}}``.

    Each row has ``ability`` and ``correct`` (the keyword verdict), optionally
    ``verdict_reason`` (``error`` for a failed prediction, scored wrong), ``judge_correct``
    and ``human_correct``; a verdict is a bool or 0/1, and an empty one (None, NaN) is not
    counted. Each S holds ``n``, ``errors`` (failed predictions among the ``n``: they
    count as wrong answers), ``correct``, ``accuracy`` (None when
    ``n`` is 0), ``ci_low`` and ``ci_high`` (Wilson 95%), plus ``judge_n`` and
    ``judge_accuracy`` / ``human_n`` and ``human_accuracy`` only where that column holds
    a value. Abilities are in sorted order. A pyarrow Table is read row by row.
    """
    if hasattr(rows, "to_pylist"):
        rows = rows.to_pylist()
    clean: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        if "ability" not in row or row["ability"] in (None, ""):
            raise ValueError(f"row {i}: no 'ability'; every scored row names its ability")
        if "correct" not in row:
            raise ValueError(f"row {i}: no 'correct'; score the predictions first")
        clean.append(
            {
                "ability": str(row["ability"]),
                "correct": _verdict_value(row["correct"], "correct", i),
                "judge": _verdict_value(row.get("judge_correct"), "judge_correct", i),
                "human": _verdict_value(row.get("human_correct"), "human_correct", i),
                "error": row.get("verdict_reason") == ERROR,
            }
        )
    by_ability: dict[str, list[dict[str, Any]]] = {}
    for row in clean:
        by_ability.setdefault(row["ability"], []).append(row)
    return {
        "overall": _summary(clean),
        "abilities": {a: _summary(by_ability[a]) for a in sorted(by_ability)},
    }


def agreement(a: Sequence[Any], b: Sequence[Any]) -> float | None:
    """How often two verdict lists agree, over the positions where both have a verdict.

    None when no position has both. The lists are aligned item by item, so they must be
    of the same length.
    """
    if len(a) != len(b):
        raise ValueError(
            f"agreement: the verdict lists differ in length ({len(a)} vs {len(b)}); "
            f"align them item by item"
        )
    both = 0
    same = 0
    for i, (x, y) in enumerate(zip(a, b)):
        vx, vy = _verdict_value(x, "a", i), _verdict_value(y, "b", i)
        if vx is not None and vy is not None:
            both += 1
            same += vx == vy
    return same / both if both else None
