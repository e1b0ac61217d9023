"""Keyword matching and prompt emphasis: the one place raypipe decides "does this text
name that keyword" and "what is this prompt without its brackets".

Parsing (is the keyword in the description?), the quality stage (does the answer mention
the row's keyword?) and evaluation scoring (does the prediction contain the reference
keyword?) all ask through :func:`mentions_keyword`, so one answer holds everywhere. This
module imports nothing from the rest of raypipe.

Matching, in order:

1. Text and keyword are split into words (letters and digits, case folded); emphasis
   brackets and weights in the keyword are removed first (``((teal))``, ``(teal:1.4)``).
2. Every word is reduced by :func:`stem`, one small English stemmer: plurals
   (``berries``/``berry``, ``buses``/``bus``, ``horses``/``horse``), ``-ing``/``-ed``
   forms (``painted``/``painting``/``paint``) and a final ``e`` or ``y``.
3. Hyphenated and closed compounds meet: the keyword's words written together
   (``T-shirt`` -> ``tshirt``) may match one word of the text, and two adjacent words of
   the text may match one keyword word (``t shirt`` names ``tshirt``).
4. A keyword of one or two content words (stopwords such as "a", "in" aside) must have
   every one of them in the text. A longer one, a short scene like ``giraffe in a narrow
   corridor``, may be paraphrased: at least half of its content words must occur.

Emphasis follows the A1111 rules the render stage honours: ``(x)`` weights x by 1.1,
``((x))`` by 1.1**2, ``[x]`` by 1/1.1, ``(x:1.4)`` by 1.4, ``\\(`` is a literal bracket
(:func:`parse_emphasis`). :func:`strip_emphasis` gives the plain text of a prompt; with
``prose=True`` it removes only the doubled brackets StableLLaVA uses, for text such as an
LLM's description where a single bracket is an ordinary parenthesis ("(left)", "(3:30)").
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

__all__ = [
    "BRACKET_WEIGHT",
    "STOPWORDS",
    "emphasized_keywords",
    "find_phrase",
    "mentions_any",
    "mentions_keyword",
    "parse_emphasis",
    "phrase_key",
    "stem",
    "strip_emphasis",
    "words",
]

#: Words that do not count towards naming a keyword ("giraffe in a narrow corridor" has
#: three content words).
STOPWORDS = frozenset(
    "a an the of in on at to with and or by for from into onto its his her their is are".split()
)
#: Keywords with more content words than this may be paraphrased (half of them suffice).
EXACT_MAX_WORDS = 2

_WORD_RE = re.compile(r"[^\W_]+")
_VOWELS = frozenset("aeiou")
# Doubled final consonants that -ing/-ed added ("running" -> "runn" -> "run").
_UNDOUBLE = frozenset("bdgmnprt")


# --- words and stems ---------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Lower-cased words: runs of letters and digits (hyphens, quotes, brackets split)."""
    return _WORD_RE.findall(text.lower())


def stem(word: str) -> str:
    """A small English stemmer: enough that a word's plural, -ing and -ed forms meet.

    Not a dictionary form (``horse`` -> ``hors``): only equality of stems means anything.
    """
    w = word.lower()
    # 1. Plurals.
    if len(w) > 4 and w.endswith("ies"):
        base = w[:-3]
        w = base + ("i" if _VOWELS & set(base) else "y")  # berries -> berri, skies -> sky
    elif len(w) > 3 and w.endswith("es") and w[:-2].endswith(("s", "x", "z", "ch", "sh")):
        w = w[:-2]  # buses, boxes, peaches, horses -> hors (as horse -> hors below)
    elif len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us")):
        w = w[:-1]
    # 2. Verb forms, and the consonant they double ("running" -> "runn" -> "run").
    verb = False
    if len(w) > 5 and w.endswith("ing"):
        w, verb = w[:-3], True
    elif len(w) > 4 and w.endswith("ed") and not w.endswith("eed"):
        w, verb = w[:-2], True
    if verb and len(w) > 3 and w[-1] == w[-2] and w[-1] in _UNDOUBLE:
        w = w[:-1]
    # 3. A final e or y (smile/smiling, movie/movies, berry/berries).
    if len(w) > 2 and w.endswith("e"):
        w = w[:-1]
    elif len(w) > 2 and w.endswith("y") and _VOWELS & set(w[:-1]):
        w = w[:-1] + "i"
    return w


def _text_stems(text: str) -> set[str]:
    ws = words(text)
    # Adjacent pairs too, so "t shirt" / "t-shirt" in the text names "tshirt".
    return {stem(w) for w in ws} | {stem(a + b) for a, b in zip(ws, ws[1:])}


# --- matching ----------------------------------------------------------------------------


def mentions_keyword(text: str, keyword: str) -> bool:
    """Whether ``text`` names ``keyword`` (rules in the module docstring).

    A keyword without any word (``""``, ``"(( ))"``) is named by nothing.
    """
    kw = words(strip_emphasis(keyword))
    if not kw:
        return False
    have = _text_stems(text)
    if len(kw) > 1 and stem("".join(kw)) in have:  # T-shirt -> tshirt
        return True
    content = [w for w in kw if w not in STOPWORDS] or kw
    hits = sum(1 for w in content if stem(w) in have)
    if len(content) <= EXACT_MAX_WORDS:
        return hits == len(content)
    return hits >= math.ceil(len(content) / 2)


def mentions_any(text: str, keywords: Iterable[str]) -> bool:
    """Whether ``text`` names at least one of ``keywords``."""
    return any(mentions_keyword(text, kw) for kw in keywords)


def phrase_key(text: str) -> str:
    """Comparison key for exact phrases: lower case, hyphens as spaces, single spaces."""
    return " ".join(text.lower().replace("-", " ").split())


def find_phrase(text: str, phrase: str) -> int | None:
    """Where ``phrase`` occurs in ``phrase_key(text)`` as whole words, exactly; else None.

    The exact counterpart of :func:`mentions_keyword` (no stems, no paraphrase): for
    telling *which* of several known phrases a prompt uses, and where.
    """
    key = phrase_key(phrase)
    if not key:
        return None
    m = re.search(rf"(?<![^\W_]){re.escape(key)}(?![^\W_])", phrase_key(text))
    return m.start() if m else None


# --- emphasis ----------------------------------------------------------------------------

#: Multiplier for one level of ``( )`` (and divisor for ``[ ]``).
BRACKET_WEIGHT = 1.1

_ATTENTION = re.compile(
    r"""
    \\[()\[\]\\]          # escaped bracket or backslash: literal
    | \(                  # open round: x 1.1
    | \[                  # open square: / 1.1
    | :\s*([+-]?[.\d]+)\s*\)   # explicit weight closing a round bracket
    | \)
    | \]
    | [^\\()\[\]:]+       # plain text
    | :                   # a colon that is not a weight
    | \\                  # lone backslash
    """,
    re.X,
)
# ((term)), (((term))), ((term:1.3)): the doubled brackets StableLLaVA prompts use.
_DOUBLE_RE = re.compile(r"\({2,}\s*([^()]*?)(?:\s*:\s*[\d.]+)?\s*\){2,}")
_EMPHASIZED_RE = re.compile(r"\(\((?!\()\s*([^()]*?)\s*\)\)")
_WEIGHT_RE = re.compile(r"\s*:\s*[\d.]+$")


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """Split a prompt into ``(fragment, weight)`` pairs (A1111 emphasis rules).

    >>> parse_emphasis("((red)) car, [blurry]")
    [('red', 1.2100000000000002), (' car, ', 1.0), ('blurry', 0.9090909090909091)]

    Unclosed brackets apply to the rest of the prompt; consecutive fragments with the
    same weight are merged.
    """
    parts: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for part in parts[start:]:
            part[1] *= factor

    for m in _ATTENTION.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\") and len(tok) == 2:
            parts.append([tok[1], 1.0])
        elif tok == "(":
            round_open.append(len(parts))
        elif tok == "[":
            square_open.append(len(parts))
        elif weight is not None and round_open:
            try:
                scale(round_open.pop(), float(weight))
            except ValueError:  # e.g. "(x:1.2.3)": keep the text
                parts.append([tok, 1.0])
        elif tok == ")" and round_open:
            scale(round_open.pop(), BRACKET_WEIGHT)
        elif tok == "]" and square_open:
            scale(square_open.pop(), 1 / BRACKET_WEIGHT)
        else:
            parts.append([tok, 1.0])
    for start in round_open:
        scale(start, BRACKET_WEIGHT)
    for start in square_open:
        scale(start, 1 / BRACKET_WEIGHT)

    merged: list[list[Any]] = []
    for frag, w in parts:
        if merged and merged[-1][1] == w:
            merged[-1][0] += frag
        else:
            merged.append([frag, w])
    return [(f, w) for f, w in merged if f] or [("", 1.0)]


def strip_emphasis(text: str, prose: bool = False) -> str:
    """The text without emphasis markup, whitespace collapsed.

    Default: a prompt's plain text, every bracket and weight removed as the render
    stage reads them (``((red)) car, [blurry], (sharp:1.5)`` -> ``red car, blurry,
    sharp``). ``prose=True``: only doubled brackets (``((red))``, ``((gold:1.3))``) are
    markup, single ones are kept as written (``(left)``, ``(sunny:1.2)``).
    """
    if prose:
        plain = _DOUBLE_RE.sub(r"\1", text)
    else:
        plain = "".join(frag for frag, _ in parse_emphasis(text))
        plain = re.sub(r"\s+(?=[,.;:!?])", "", plain)  # "(( red )) , car" -> "red, car"
    return " ".join(plain.split())


def emphasized_keywords(prompt: str) -> list[str]:
    """The ``((...))`` terms of a prompt, in order (weights such as ``:1.2`` dropped)."""
    out = []
    for m in _EMPHASIZED_RE.finditer(prompt):
        term = " ".join(_WEIGHT_RE.sub("", m.group(1)).split())
        if term:
            out.append(term)
    return out
