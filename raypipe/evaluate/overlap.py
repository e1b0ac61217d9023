"""The training-overlap filter: benchmark items absent from the training data.

Overlap (:func:`overlap_filter`, the paper's check that benchmark items are absent from
the training data), per ability:

1. ``keyword_overlap``: the item's emphasised keyword (the ``((...))`` terms of its
   prompt, else its answer keywords) and a training row's keyword (its ``keywords``
   column and the ``((...))`` terms of its prompt) name each other
   (:func:`raypipe.matching.mentions_keyword`, either way round), and the rest of the
   two prompts overlap strongly: the Jaccard similarity of their content words (stems,
   stopwords and both keywords left out) is at least ``threshold``.
2. ``near_duplicate_prompt``: the item's prompt repeats a training prompt, exactly or
   nearly (:class:`raypipe.similarity.NearDuplicateIndex`, word-bigram Jaccard at
   least ``near_duplicate_threshold``).

Training rows are indexed by ability and by the stems of their keywords, so an item is
compared only with the rows that share a keyword word. Items without a prompt (real
images) have nothing to compare and are kept.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raypipe.errors import ConfigError
from raypipe.evaluate.items import KEYWORD_OVERLAP, NEAR_DUPLICATE, OVERLAP_STAGE, RAW_MAX
from raypipe.matching import (
    STOPWORDS,
    emphasized_keywords,
    mentions_keyword,
    stem,
    strip_emphasis,
    words,
)
from raypipe.schema import SAMPLE_SCHEMA
from raypipe.similarity import NearDuplicateIndex, jaccard, shingles
from raypipe.train.sources import parquet_files

__all__ = ["overlap_filter", "read_training_prompts"]


def _stems_of(text: str) -> list[str]:
    """Content-word stems of a keyword (all its words if it has only stopwords)."""
    ws = words(strip_emphasis(text))
    content = [w for w in ws if w not in STOPWORDS] or ws
    return [stem(w) for w in content]


def _index_keys(keyword: str) -> set[str]:
    """Keys a keyword is filed under: its content stems, and adjacent words written
    together (``t shirt`` / ``t-shirt`` -> ``tshirt``), as mentions_keyword meets them."""
    ws = words(strip_emphasis(keyword))
    keys = set(_stems_of(keyword))
    keys |= {stem(a + b) for a, b in zip(ws, ws[1:])}
    if len(ws) > 1:
        keys.add(stem("".join(ws)))
    return keys


@lru_cache(maxsize=65536)
def _same_keyword(a: str, b: str) -> bool:
    return mentions_keyword(a, b) or mentions_keyword(b, a)


@lru_cache(maxsize=65536)
def _word_stems(keyword: str) -> frozenset[str]:
    """Stems of every word of a keyword: what is left out of prompts compared on it."""
    return frozenset(stem(w) for w in words(strip_emphasis(keyword)))


def _prompt_stems(prompt: str) -> frozenset[str]:
    """Content-word stems of a prompt's plain text."""
    return frozenset(stem(w) for w in words(strip_emphasis(prompt)) if w not in STOPWORDS)


def _row_keywords(row: Mapping[str, Any]) -> list[str]:
    kws = [k for k in (row.get("keywords") or []) if k and k.strip()]
    for k in emphasized_keywords(row.get("prompt") or ""):
        if k not in kws:
            kws.append(k)
    return kws


class _AbilityIndex:
    """Training rows of one ability: by keyword key, and a near-duplicate index."""

    def __init__(self, rows: list[Mapping[str, Any]], near_threshold: float):
        self.rows = rows
        self.keywords = [_row_keywords(r) for r in rows]
        self.by_key: dict[str, list[int]] = defaultdict(list)
        for i, kws in enumerate(self.keywords):
            for key in {k for kw in kws for k in _index_keys(kw)}:
                self.by_key[key].append(i)
        self.stems: dict[int, frozenset[str]] = {}  # filled as rows become candidates
        self.near = NearDuplicateIndex(threshold=near_threshold)
        self.by_id: dict[str, int] = {}
        for i, r in enumerate(rows):
            plain = strip_emphasis(r.get("prompt") or "")
            if plain:
                self.near.add(r["id"], plain)
                self.by_id.setdefault(r["id"], i)

    def keyword_overlap(
        self, prompt: str, item_keywords: list[str], threshold: float
    ) -> dict[str, Any] | None:
        """The training row whose keyword the item shares and whose other words overlap
        it most (at least ``threshold``), as reject details; None if none does."""
        best: tuple[float, dict[str, Any]] | None = None
        item_stems = _prompt_stems(prompt)
        for kw in item_keywords:
            candidates = sorted({i for key in _index_keys(kw) for i in self.by_key.get(key, ())})
            for i in candidates:
                shared = next((rk for rk in self.keywords[i] if _same_keyword(kw, rk)), None)
                if shared is None:
                    continue
                if i not in self.stems:
                    self.stems[i] = _prompt_stems(self.rows[i].get("prompt") or "")
                drop = _word_stems(kw) | _word_stems(shared)
                score = jaccard(item_stems - drop, self.stems[i] - drop)
                if score >= threshold and (best is None or score > best[0]):
                    best = (
                        score,
                        {
                            "overlaps": self.rows[i]["id"],
                            "keyword": kw,
                            "training_keyword": shared,
                            "training_prompt": self.rows[i].get("prompt") or "",
                            "jaccard": round(score, 4),
                        },
                    )
        return best[1] if best else None

    def near_duplicate(self, prompt: str) -> dict[str, Any] | None:
        plain = strip_emphasis(prompt)
        hit = self.near.check("", plain)
        if hit is None:
            return None
        other = self.rows[self.by_id[hit[1]]]
        other_prompt = other.get("prompt") or ""
        return {
            "overlaps": other["id"],
            "training_prompt": other_prompt,
            "jaccard": round(jaccard(shingles(plain), shingles(strip_emphasis(other_prompt))), 4),
        }


def _rows(rows: pa.Table | Iterable[Mapping[str, Any]], columns: Sequence[str]) -> list[dict]:
    if isinstance(rows, pa.Table):
        present = [c for c in columns if c in rows.column_names]
        return rows.select(present).to_pylist()
    return [dict(r) for r in rows]


def overlap_filter(
    items: pa.Table | Iterable[Mapping[str, Any]],
    training_rows: pa.Table | Iterable[Mapping[str, Any]],
    threshold: float = 0.5,
    near_duplicate_threshold: float = 0.8,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split benchmark items into ``(kept, dropped)`` by overlap with the training rows.

    ``items``: rows with ``id``, ``ability``, ``prompt`` and ``answer_keywords`` (other
    fields, images included, are carried through untouched). ``training_rows``: rows
    with ``id``, ``ability``, ``prompt`` and optionally ``keywords`` (a raypipe run's
    samples; :func:`read_training_prompts` reads just these). ``kept`` holds the items
    in their order; ``dropped`` holds a rejects row (REJECT_SCHEMA columns, stage
    ``overlap``) per dropped item, its reason ``keyword_overlap`` or
    ``near_duplicate_prompt`` and its ``raw`` a JSON object naming the training row it
    overlaps (``overlaps``), that row's prompt and the similarity found. The keyword
    check comes first; rules in the module docstring.
    """
    for name, value in (
        ("threshold", threshold),
        ("near_duplicate_threshold", near_duplicate_threshold),
    ):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= 1):
            raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    items = items.to_pylist() if isinstance(items, pa.Table) else [dict(r) for r in items]
    wanted = {r.get("ability") for r in items}
    by_ability: dict[str, list[dict]] = defaultdict(list)
    for r in _rows(training_rows, ("id", "ability", "prompt", "keywords")):
        if r.get("ability") in wanted:
            by_ability[r["ability"]].append(r)
    indexes = {ab: _AbilityIndex(rows, near_duplicate_threshold) for ab, rows in by_ability.items()}

    kept: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    for item in items:
        prompt = item.get("prompt") or ""
        index = indexes.get(item.get("ability"))
        if index is None or not words(strip_emphasis(prompt)):
            kept.append(item)
            continue
        keywords = emphasized_keywords(prompt) or [
            k for k in (item.get("answer_keywords") or []) if k and k.strip()
        ]
        reason, detail = KEYWORD_OVERLAP, index.keyword_overlap(prompt, keywords, threshold)
        if detail is None:
            reason, detail = NEAR_DUPLICATE, index.near_duplicate(prompt)
        if detail is None:
            kept.append(item)
            continue
        dropped.append(
            {
                "id": item.get("id"),
                "ability": item.get("ability"),
                "stage": OVERLAP_STAGE,
                "reason": reason,
                "raw": json.dumps({"prompt": prompt, **detail}, sort_keys=True)[:RAW_MAX],
            }
        )
    return kept, dropped


def read_training_prompts(locations: str | Sequence[str]) -> pa.Table:
    """``id``, ``ability``, ``prompt`` and ``keywords`` of raypipe training samples.

    ``locations``: one or more generation runs (OUT, OUT/data or one Parquet file, local
    or URIs), as training's ``--data`` names them. Only those columns are read: no image
    bytes leave the files. A part without ``keywords`` gives empty lists.
    """
    columns = ["id", "ability", "prompt", "keywords"]
    schema = pa.schema([SAMPLE_SCHEMA.field(c) for c in columns])
    tables = []
    for location in [locations] if isinstance(locations, str) else list(locations):
        fs, files = parquet_files(str(location))
        for path in files:
            names = pq.read_schema(path, filesystem=fs).names
            missing = [c for c in columns[:3] if c not in names]
            if missing:
                raise ConfigError(
                    f"{path} lacks columns {missing}: not raypipe samples; give a generation "
                    "run's OUT (or OUT/data)"
                )
            t = pq.read_table(path, columns=[c for c in columns if c in names], filesystem=fs)
            if "keywords" not in t.column_names:
                t = t.append_column(
                    "keywords", pa.array([[]] * t.num_rows, type=pa.list_(pa.string()))
                )
            tables.append(t.select(columns).cast(schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()
