"""Scoring yes/no answers (rules: :mod:`raypipe.evaluate.score`, ``yes_no``)."""

from __future__ import annotations

import math
import re

from raypipe.evaluate.normalize import Verdict, normalize_answer
from raypipe.matching import EXACT_MAX_WORDS, NEGATIONS, STOPWORDS, clauses, keyword_polarity

__all__ = ["HEDGES", "score_yes_no"]

_YES = frozenset("yes yeah yep yup correct true indeed absolutely certainly definitely".split())
_NO = frozenset("no nope nah incorrect false".split())
#: Words and phrases (normalised) that make a yes/no answer a hedge.
HEDGES = (
    "maybe",
    "perhaps",
    "possibly",
    "probably",
    "might",
    "unsure",
    "uncertain",
    "unclear",
    "unknown",
    "could be",
    "may be",
    "may or may not",
    "not sure",
    "not certain",
    "not clear",
    "not entirely sure",
    "not possible to",
    "not be sure",
    "not be certain",
    "can not tell",
    "can not say",
    "can not be sure",
    "can not be certain",
    "can not confirm",
    "can not determine",
    "can not be determined",
    "unable to tell",
    "unable to determine",
    "do not know",
    "no way to tell",
    "hard to tell",
    "hard to say",
    "hard to be sure",
    "difficult to tell",
    "difficult to say",
    "difficult to determine",
    "impossible to tell",
    "impossible to say",
    "impossible to determine",
    "i guess",
)
_AUX = frozenset(
    "is are was were am be do does did can could will would should has have had shall may might".split()
)
_PRONOUNS = frozenset("it this that these those there he she they i we you one".split())
_WH = frozenset("what which who whom whose where when why how".split())
# Question words that say nothing about the content ("Is there a dog in the image?" -> dog).
_FRAME = (
    _AUX
    | _PRONOUNS
    | _WH
    | STOPWORDS
    | frozenset("image picture photo photograph scene shown show shows visible depicted".split())
)
_AND_OR_RE = re.compile(r"\b(?:and|or)\b|/")


def is_hedge(text: str) -> bool:
    """Whether normalised ``text`` holds one of :data:`HEDGES` as whole words."""
    padded = f" {text} "
    return any(f" {h} " in padded for h in HEDGES)


def _interjections(text: str) -> set[str]:
    """yes/no given as a word opening a clause, or standing alone between "and"/"or"."""
    found: set[str] = set()
    for clause in clauses(text):
        for k, piece in enumerate(_AND_OR_RE.split(clause)):
            ws = normalize_answer(piece).split()
            if not ws or (k > 0 and len(ws) > 1):
                continue
            if ws[0] in _YES:
                found.add("yes")
            elif ws[0] in _NO:
                found.add("no")
    return found


def _statement_answer(question: str, parts: list[str]) -> str | None:
    content = list(dict.fromkeys(w for w in normalize_answer(question).split() if w not in _FRAME))
    # As mentions_keyword counts a keyword's words, but word by word: the question's
    # words run together ("car red" -> "carred") are no compound to look for.
    need = len(content) if len(content) <= EXACT_MAX_WORDS else math.ceil(len(content) / 2)
    # 1. The first clause that names enough of the content words decides.
    for part in parts if content else []:
        named = [p for p in (keyword_polarity(part, w) for w in content) if p is not None]
        if len(named) < need:
            continue
        if not all(named):
            return "no"
        if len(named) == len(content):
            return "yes"
    # 2. Content words named across clauses, a later clause deciding a word an earlier
    # one named too: "The car is not blue, it's red." (car: yes, red: yes) -> yes.
    latest: dict[str, bool] = {}
    for part in parts if content else []:
        for w in content:
            p = keyword_polarity(part, w)
            if p is not None:
                latest[w] = p
    if len(latest) >= need:
        if not all(latest.values()):
            return "no"
        if len(latest) == len(content):
            return "yes"
    # 3. A clause of only a negation, or only pronouns and verbs.
    first = parts[0].split()
    if any(w in NEGATIONS for w in first):
        return "no"
    if all(w in _PRONOUNS or w in _AUX for w in first):
        return "yes"
    return None


def score_yes_no(reference: str, question: str, text: str, parts: list[str]) -> Verdict:
    """The verdict on ``text`` (its normalised clauses: ``parts``) for a yes/no item
    whose answer is ``reference``."""
    if is_hedge(" ".join(parts)):
        return Verdict(False, None, "hedge")
    given = _interjections(text)
    if len(given) > 1:
        return Verdict(False, None, "hedge")
    answer = given.pop() if given else _statement_answer(question, parts)
    if answer is None:
        return Verdict(False, None, "no_yes_no")
    return Verdict(answer == reference, answer, answer)


def yes_no_of(question: str, text: str) -> str | None:
    """The yes or no that ``text`` gives to ``question`` (None for a hedge or neither):
    what a benchmark item's own response answers."""
    parts = [p for p in (normalize_answer(c) for c in clauses(text or "")) if p]
    if not parts:
        return None
    verdict = score_yes_no("yes", question, text, parts)
    return verdict.matched if verdict.reason in ("yes", "no") else None
