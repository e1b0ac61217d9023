"""Scoring wh-answers (rules: :mod:`raypipe.evaluate.score`, ``wh``): reference keywords
affirmed, and no list of candidate answers offered in their place."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from raypipe.evaluate.normalize import Verdict, normalize_answer, normalize_keyword, polarity
from raypipe.matching import (
    expand_contractions,
    keyword_positions,
    mentions_keyword,
    negated_at,
    words,
)

__all__ = ["alternatives", "score_wh"]

# Words that may stand between two answers offered as alternatives ("red, or maybe
# blue"); any other word makes the second a part of the scene ("a red car by a blue wall").
_LINK_WORDS = frozenset("or and either maybe perhaps possibly probably even also".split())
# Clause punctuation kept as tokens (not a decimal point or a thousands comma).
_SEP_RE = re.compile(r"((?<!\d),|,(?!\d)|[;/!?:()\"]|(?<!\d)\.|\.(?!\d))")


def score_wh(
    keywords: list[tuple[str, str]],
    synonyms: dict[str, list[str]],
    rule: str,
    parts: list[str],
    text: str,
    candidates: Iterable[str] = (),
) -> Verdict:
    """The verdict on ``text`` (its normalised clauses: ``parts``) for a wh item with
    reference ``keywords`` (as written, normalised), their ``synonyms``, ``rule`` (any or
    all) and the other answers of its ability (``candidates``)."""
    found = [(kw, polarity(parts, [norm, *synonyms.get(norm, [])])) for kw, norm in keywords]
    affirmed = [kw for kw, p in found if p]
    negated = any(p is False for _, p in found)
    right = (rule == "any" and affirmed) or (rule == "all" and len(affirmed) == len(found))
    if right:
        references = [t for _, norm in keywords for t in (norm, *synonyms.get(norm, []))]
        if alternatives(text, references, candidates):
            return Verdict(False, None, "several_answers")
        matched = affirmed[0] if rule == "any" else ", ".join(affirmed)
        return Verdict(True, matched, "keyword")
    if negated:
        return Verdict(False, None, "negated")
    if affirmed:
        return Verdict(False, None, "partial")
    return Verdict(False, None, "no_keyword")


@dataclass(frozen=True)
class _Mention:
    start: int  # token positions, inclusive
    end: int
    reference: bool


def _tokens(text: str) -> list[str]:
    """Normalised words, with clause punctuation kept as tokens ("," "." ...)."""
    out: list[str] = []
    for piece in _SEP_RE.split(expand_contractions(text)):
        if not piece:
            continue
        if _SEP_RE.fullmatch(piece):
            out.append("," if piece in ",/" else ".")
            if piece == "/":  # "red/blue": "or"
                out[-1] = "or"
        else:
            out.extend(w for tok in normalize_answer(piece).split() for w in words(tok))
    return out


def _spans(words_only: list[str], term: str) -> list[tuple[int, int]]:
    """Where ``term`` is named in ``words_only``, as (first, last) word positions: each
    occurrence of its first named word with the nearest occurrences of the others."""
    found = keyword_positions(" ".join(words_only), term)
    if not found:
        return []
    width = len(term.split()) + 1
    spans = []
    for p0 in found[0]:
        chosen = [p0] + [min(where, key=lambda q, p0=p0: abs(q - p0)) for where in found[1:]]
        if max(chosen) - min(chosen) <= width:
            spans.append((min(chosen), max(chosen)))
    return spans


def _mentions(tokens: list[str], references: list[str], competitors: list[str]) -> list[_Mention]:
    """Affirmed mentions of the terms, the longest one kept where several overlap."""
    at = [i for i, t in enumerate(tokens) if t not in (",", ".")]
    words_only = [tokens[i] for i in at]
    raw: list[tuple[int, int, bool]] = []
    for terms, reference in ((references, True), (competitors, False)):
        for term in terms:
            for a, b in _spans(words_only, term):
                if not negated_at(words_only, a):
                    raw.append((at[a], at[b], reference))
    raw.sort(key=lambda m: (m[0] - m[1], not m[2]))  # longest first, references first
    kept: list[_Mention] = []
    for start, end, reference in raw:
        if all(end < k.start or start > k.end for k in kept):
            kept.append(_Mention(start, end, reference))
    return sorted(kept, key=lambda m: m.start)


def _link(gap: list[str]) -> str | None:
    """How two mentions with ``gap`` between them are joined: "or", "and", "list" (only
    commas), or None when other words stand between them (or nothing does)."""
    if not gap or any(t not in _LINK_WORDS and t != "," for t in gap):
        return None
    if "or" in gap or "either" in gap:
        return "or"
    if "and" in gap:
        return "and"
    return "list" if "," in gap else None


def alternatives(text: str, references: list[str], candidates: Iterable[str]) -> bool:
    """Whether ``text`` offers a reference and a competing candidate as alternatives:
    mentions joined by "or" ("red or blue", "red, blue or green", "red/blue"), or a bare
    comma list ("It could be red, blue."). Mentions joined by "and" ("red and white")
    describe one thing; a candidate elsewhere in the sentence ("a red car by a blue
    wall") is context. A candidate naming a reference, or named by one ("dark red" for
    red), competes with nothing."""
    refs = [r for r in references if r]
    competitors = []
    for c in dict.fromkeys(normalize_keyword(c) for c in candidates):
        if c and not any(mentions_keyword(c, r) or mentions_keyword(r, c) for r in refs):
            competitors.append(c)
    if not competitors:
        return False
    tokens = _tokens(text)
    mentions = _mentions(tokens, refs, competitors)
    chain: list[_Mention] = mentions[:1]
    links: list[str] = []
    for prev, cur in zip(mentions, mentions[1:]):
        link = _link(tokens[prev.end + 1 : cur.start])
        if link is None:
            if _offers(chain, links, tokens):
                return True
            chain, links = [cur], []
        else:
            chain.append(cur)
            links.append(link)
    return _offers(chain, links, tokens)


def _offers(chain: list[_Mention], links: list[str], tokens: list[str]) -> bool:
    """Whether a chain of linked mentions offers a reference and a competitor as
    alternatives: joined by "or", or a bare comma list that ends its clause ("red, blue."
    but not "red, blue sky behind it", where blue describes the sky)."""
    if {m.reference for m in chain} != {True, False}:
        return False
    if "or" in links:
        return True
    after = chain[-1].end + 1
    return all(k == "list" for k in links) and (after >= len(tokens) or tokens[after] in ",.")
