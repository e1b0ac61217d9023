"""Scoring either-or answers (rules: :mod:`raypipe.evaluate.score`, ``either_or``), and
reading the options an either-or question offers."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from raypipe.evaluate.normalize import (
    ARTICLES,
    Verdict,
    normalize_answer,
    polarity,
    text_list,
    where,
)
from raypipe.evaluate.score_yes_no import _AUX, _PRONOUNS, _WH
from raypipe.matching import (
    STOPWORDS,
    mentions_keyword,
    stem,
    words,
)

__all__ = ["option_groups", "question_options", "score_either_or"]

_OR_RE = re.compile(r",?\s+or\s+", re.I)
_OPTION_FRAME = _AUX | _PRONOUNS | _WH | frozenset({"either", "whether"})
_DETERMINERS = ARTICLES | frozenset("this that these those my your his her its their".split())
_PREPOSITIONS = frozenset(
    "in on at to with by for from into onto of as like near under over inside outside "
    "behind beside above below".split()
)
# Words an option may open with that are not part of it ("on an open savanna").
_LEADING = STOPWORDS | frozenset({"as", "like"})


def question_options(question: str, keywords: Sequence[str] = ()) -> list[str]:
    """The options an either-or question offers, normalised; [] when it offers none.

    "Is the car red or blue?" -> ``["red", "blue"]``; "Is it red, green, or blue?" ->
    three (a comma list after the last comma item that opens like a question: "Looking
    closely, is it red, green or blue?"). The options after the first one run from a
    comma or "or" to the next; where the first one starts is a guess, in this order:

    1. as many content words as the longest other option, back from the first "or",
       but not the word after an opening "Is the" (the subject) and not an opening
       question word ("is", "it", "either", ...): "Is the car red or light blue?" -> red;
    2. if the second option opens with an article or a preposition, from the last one
       of that kind: "Is the animal a tiger or a snow leopard?" -> tiger, "Is the owl in
       stained glass or as a pencil sketch?" -> stained glass;
    3. a reference keyword (``keywords``) that reaches back past that start extends the
       option ("in art deco style or psychedelic style" with "art deco" -> "art deco
       style"); one that ends it and starts later is the option ("Is the fishing boat
       amber or salmon pink?" with "amber" -> amber, not "boat amber").

    An opening article or preposition is dropped from every option ("on an open
    savanna" -> "open savanna"). Give the item ``options`` where the guess is wrong.
    """
    text = question.strip().rstrip("?!. ").strip()
    pieces = [p.strip(" ,") for p in _OR_RE.split(text)]
    if len(pieces) < 2:
        return []
    head = [h.strip() for h in pieces[0].split(",")]
    # The question proper starts at the last comma item that opens like a question.
    start = 0
    for i, h in enumerate(head):
        first = words(h)[:1]
        if first and (first[0] in _AUX or first[0] in _WH):
            start = i
    lead, listed = words(head[start]), head[start + 1 :]
    others = [o for o in [*listed, *pieces[1:]] if words(o)]
    # As many content words as the longest other option ("flying a kite": two).
    width = max((len(_content(words(o))) or 1 for o in others), default=1)
    begin = len(lead)
    while begin > 0 and len(_content(lead[begin:])) < width:
        begin -= 1
    # "Is the mailbox khaki or ...": after "is the", the subject takes at least one word.
    if len(lead) > 3 and lead[0] in _AUX and lead[1] in _DETERMINERS:
        begin = max(begin, 3)
    while begin < len(lead) and lead[begin] in _OPTION_FRAME:
        begin += 1
    # "a tiger or a snow leopard", "in stained glass or as a sketch": the first option
    # opens as the second one does, with an article or a preposition.
    second = words(others[0])[0] if others else ""
    for opening in (ARTICLES, _PREPOSITIONS):
        if second in opening:
            at = [i for i in range(2, len(lead) - 1) if lead[i] in opening]
            begin = at[-1] if at else begin
    extend, trim = [], []
    for kw in keywords:
        kt = words(kw)
        for s in range(len(lead) - len(kt) + 1) if kt else ():
            if lead[s : s + len(kt)] != kt:
                continue
            if s < begin < s + len(kt):
                extend.append(s)
            elif s > begin and s + len(kt) == len(lead):
                trim.append(s)
    if extend:
        begin = min(extend)
    elif trim:
        begin = min(trim)
    out: list[str] = []
    for option in [" ".join(lead[begin:]), *others]:
        norm_words = normalize_answer(option).split()
        while len(norm_words) > 1 and norm_words[0] in _LEADING:
            norm_words = norm_words[1:]  # "in narrow corridor" -> "narrow corridor"
        norm = " ".join(norm_words)
        if norm and norm not in out:
            out.append(norm)
    return out if len(out) >= 2 else []


def _content(ws: Sequence[str]) -> list[str]:
    return [w for w in ws if w not in STOPWORDS]


@dataclass
class _Group:
    label: str  # what Verdict.matched reports
    aliases: list[str]
    reference: bool
    option: str  # the option, normalised


def _names(a: str, b: str) -> bool:
    return mentions_keyword(a, b) or mentions_keyword(b, a)


def option_groups(
    item: Any,
    question: str,
    keywords: list[tuple[str, str]],
    synonyms: dict[str, list[str]],
) -> list[_Group]:
    given = text_list(item, "options")
    if given:
        labels = given
    else:
        labels = question_options(question, [kw for kw, _ in keywords])
    options = [normalize_answer(o) for o in labels]
    if len([o for o in options if o]) < 2:
        source = f"options {given!r}" if given else f"question {question!r}"
        raise ValueError(
            f"{where(item)}: an either_or item needs two or more options and its {source} "
            f"gives fewer; list them in the item's 'options'"
        )
    refs = [norm for _, norm in keywords]
    ref_terms = [[r, *synonyms.get(r, [])] for r in refs]
    scores = [sum(any(_names(o, t) for t in terms) for terms in ref_terms) for o in options]
    best = max(scores)
    chosen = {i for i, s in enumerate(scores) if best and s == best}
    if len(chosen) > 1:
        first = {i for i in chosen if any(_names(options[i], t) for t in ref_terms[0])}
        chosen = first or chosen
    if len(chosen) > 1:  # "red" names "red" and "dark red": the option it is
        exact = {i for i in chosen if any(options[i] in terms for terms in ref_terms)}
        chosen = exact or chosen

    # The question's words outside the options ("is", "plant" in "Is the plant a
    # snake plant or a sunflower?").
    frame = Counter(normalize_answer(question).split())
    for o in options:
        frame.subtract(o.split())
    # Words every option shares ("style", "playing") do not tell the options apart.
    stems = [{stem(w) for w in o.split() if w not in STOPWORDS} for o in options]
    shared = set.intersection(*stems)
    groups = []
    for i, (label, option) in enumerate(zip(labels, options)):
        distinct = " ".join(w for w in option.split() if stem(w) not in shared) or option
        content = [w for w in _content(distinct.split()) if frame[w] <= 0]
        if i == 0 and not given and len(content) > 1:
            # Where a parsed first option starts is a guess ("boat amber" for "Is the
            # fishing boat amber or salmon pink?"): its last word names it, unless the
            # question uses that word elsewhere too.
            aliases = [content[-1]]
        else:
            aliases = [distinct]
        for key, alts in synonyms.items():
            if key and mentions_keyword(option, key):
                aliases.extend(alts)
        if i in chosen:
            others = [o for j, o in enumerate(options) if j != i]
            extra = [t for terms in ref_terms for t in terms]
            aliases.extend(t for t in extra if not any(mentions_keyword(o, t) for o in others))
        groups.append(_Group(label, aliases, i in chosen, option))
    if not chosen:  # no option is the reference: the keywords themselves are the answer
        groups.append(
            _Group(keywords[0][0], [t for terms in ref_terms for t in terms], True, refs[0])
        )
    return groups


def score_either_or(groups: list[_Group], parts: list[str]) -> Verdict:
    """The verdict on a prediction (its normalised clauses: ``parts``) among ``groups``
    (:func:`option_groups`)."""
    found = [(g, polarity(parts, g.aliases)) for g in groups]
    picked = _longest([g for g, p in found if p], parts)
    if len(picked) > 1:
        return Verdict(False, None, "both_options")
    if picked:
        g = picked[0]
        return Verdict(g.reference, g.label, "option" if g.reference else "wrong_option")
    if any(p is False for _, p in found):
        return Verdict(False, None, "negated")
    return Verdict(False, None, "no_option")


def _longest(picked: list[_Group], parts: list[str]) -> list[_Group]:
    """``picked`` less the options named only inside a longer picked option: "Dark red."
    picks "dark red", not also "red"."""
    out = []
    for g in picked:
        longer = [
            h.option
            for h in picked
            if h is not g
            and len(h.option.split()) > len(g.option.split())
            and mentions_keyword(h.option, g.option)
        ]
        if not longer:
            out.append(g)
            continue
        rest = [_without(part, longer) for part in parts]
        if polarity([r for r in rest if r], g.aliases):
            out.append(g)
    return out


def _without(part: str, phrases: list[str]) -> str:
    """``part`` with every whole occurrence of ``phrases`` (by stems) cut out."""
    ws = part.split()
    stems = [stem(w) for w in ws]
    keep = [True] * len(ws)
    for phrase in phrases:
        target = [stem(w) for w in phrase.split()]
        n = len(target)
        for i in range(len(ws) - n + 1):
            if stems[i : i + n] == target:
                keep[i : i + n] = [False] * n
    return " ".join(w for w, k in zip(ws, keep) if k)
