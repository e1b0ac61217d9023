"""What every question type's scorer shares: answer normalisation, reading an item's
fields, and the :class:`Verdict` (the rules are in :mod:`raypipe.evaluate.score`)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from raypipe.matching import expand_contractions, keyword_polarity, strip_emphasis

__all__ = [
    "ARTICLES",
    "MATCH_RULES",
    "NUMBER_WORDS",
    "QUESTION_TYPES",
    "Verdict",
    "canonical_question_type",
    "is_nan",
    "item_field",
    "match_rule",
    "normalize_answer",
    "normalize_keyword",
    "polarity",
    "synonyms_of",
    "text_list",
    "where",
]

#: The scored question types; every accepted spelling maps to one of them.
QUESTION_TYPES = ("yes_no", "wh", "either_or")
_TYPE_ALIASES = {
    "yes_no": "yes_no",
    "yesno": "yes_no",
    "yes_or_no": "yes_no",
    "wh": "wh",
    "wh_question": "wh",
    "caption": "wh",
    "unusual": "wh",
    "either_or": "either_or",
    "eitheror": "either_or",
}
MATCH_RULES = ("any", "all")

ARTICLES = frozenset({"a", "an", "the"})
_UNITS = "zero one two three four five six seven eight nine".split()
_TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
#: Number words and their digits ("none" is left alone: it negates).
NUMBER_WORDS: dict[str, int] = {
    **{w: i for i, w in enumerate(_UNITS)},
    **{w: 10 + i for i, w in enumerate(_TEENS)},
    **{w: 20 + 10 * i for i, w in enumerate(_TENS)},
}

_TENS_DIGITS = frozenset(str(v) for v in range(20, 100, 10))
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d)")
_PERIOD_RE = re.compile(r"(?<!\d)\.|\.(?!\d)")
_APOSTROPHE_RE = re.compile(r"['\u2019\u2018`]")
_PUNCT_RE = re.compile(r"[^\w\s.]|_")


def normalize_answer(text: str | None) -> str:
    """``text`` normalised as the VQA evaluation does (rules in :mod:`raypipe.evaluate.score`).

    >>> normalize_answer("There aren't two Dogs, it's the 3 cats!")
    'there are not 2 dogs it is 3 cats'
    """
    if not text:
        return ""
    t = expand_contractions(str(text))
    t = _THOUSANDS_RE.sub("", t)
    t = _PERIOD_RE.sub(" ", t)
    t = _APOSTROPHE_RE.sub("", t)
    t = _PUNCT_RE.sub(" ", t)
    out: list[str] = []
    for tok in t.split():
        if tok in ARTICLES:
            continue
        value = NUMBER_WORDS.get(tok)
        if value is None:
            out.append(tok)
        elif 1 <= value <= 9 and out and out[-1] in _TENS_DIGITS:
            out[-1] = str(int(out[-1]) + value)  # twenty one -> 21
        else:
            out.append(str(value))
    return " ".join(out)


def normalize_keyword(keyword: str) -> str:
    return normalize_answer(strip_emphasis(str(keyword)))


@dataclass(frozen=True)
class Verdict:
    """The keyword verdict on one prediction (reasons listed in :mod:`raypipe.evaluate.score`)."""

    correct: bool
    matched: str | None
    reason: str


def canonical_question_type(value: Any) -> str:
    """``yes_no``, ``wh`` or ``either_or`` for an accepted spelling (``Yes/No``, ``wh-``,
    ``either-or``, ``caption``, ...); ValueError for anything else."""
    key = re.sub(r"[\s/\-]+", "_", str(value or "").strip().lower()).strip("_")
    if key not in _TYPE_ALIASES:
        raise ValueError(
            f"question_type {value!r} is not one of yes_no, wh, either_or (or yes/no, "
            f"yesno, either-or, caption, unusual); set it on the item"
        )
    return _TYPE_ALIASES[key]


def item_field(item: Any, name: str, default: Any = None) -> Any:
    if isinstance(item, Mapping):
        value = item.get(name, default)
    else:
        value = getattr(item, name, default)
    if isinstance(value, float) and math.isnan(value):  # a missing cell read by pandas
        return default
    return default if value is None else value


def where(item: Any) -> str:
    ident = item_field(item, "id")
    return f"item {ident!r}" if ident else "item"


def text_list(item: Any, name: str) -> list[str]:
    value = item_field(item, name, [])
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{where(item)}: {name} {value!r} is not a JSON list ({e}); "
                    f"write it as a list of strings"
                ) from None
        else:
            value = re.split(r"[,;]", text)
    try:
        items = [str(v).strip() for v in value]
    except TypeError:
        raise ValueError(
            f"{where(item)}: {name} must be a list of strings, got {type(value).__name__}"
        ) from None
    return [v for v in items if v]


def synonyms_of(item: Any) -> dict[str, list[str]]:
    value = item_field(item, "synonyms", {})
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{where(item)}: synonyms is not a JSON object ({e}); "
                f'write it as {{"keyword": ["alternative", ...]}}'
            ) from None
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{where(item)}: synonyms must map a keyword to a list of alternatives, "
            f"got {type(value).__name__}"
        )
    out: dict[str, list[str]] = {}
    for key, alts in value.items():
        if isinstance(alts, str):
            alts = [alts]
        norm = [normalize_keyword(a) for a in (alts or [])]
        out.setdefault(normalize_keyword(key), []).extend(a for a in norm if a)
    return out


def match_rule(item: Any) -> str:
    rule = str(item_field(item, "match", "any")).strip().lower() or "any"
    if rule not in MATCH_RULES:
        raise ValueError(f"{where(item)}: match {rule!r} is not 'any' or 'all'")
    return rule


def is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def polarity(parts: list[str], aliases: Iterable[str]) -> bool | None:
    """True if some clause affirms an alias, False if they are only denied, None if never
    named (``parts``: the prediction's normalised clauses)."""
    seen = None
    for alias in aliases:
        for part in parts:
            p = keyword_polarity(part, alias)
            if p:
                return True
            if p is False:
                seen = False
    return seen
