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

Negation, for scoring answers (:func:`keyword_polarity`, :func:`affirms_keyword`):

5. :func:`clauses` writes contractions out (``isn't`` -> ``is not``, ``it's`` -> ``it is``,
   ``cannot`` -> ``can not``) and splits the text into clauses at sentence and clause
   punctuation (not a decimal point or a thousands comma) and at ``but``, ``however``,
   ``although``, ``though`` and ``whereas``; ``instead of``, ``rather than`` and
   ``except (for)`` are read as ``not`` ("blue instead of red" denies red).
6. Within one clause, an occurrence of a keyword word is negated when one of
   :data:`NEGATIONS` (``not``, ``no``, ``never``, ``neither``, ``nor``, ``none``,
   ``without``, ``lacks``, ``hardly``, ``scarcely``) stands at most
   :data:`NEGATION_WINDOW` words before it, with no pronoun or form of "be" in between
   (``no, it is red`` and ``no it is red`` do not deny red).
   A keyword is affirmed in a clause when each of its words that the clause names has
   an occurrence that is not negated: ``the car is not red`` denies red, ``the fish is
   not riding a bicycle`` denies "fish riding a bicycle".

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
    "NEGATIONS",
    "NEGATION_WINDOW",
    "STOPWORDS",
    "affirms_keyword",
    "clauses",
    "emphasized_keywords",
    "expand_contractions",
    "find_phrase",
    "keyword_polarity",
    "keyword_positions",
    "mentions_any",
    "mentions_keyword",
    "negated_at",
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


# --- clauses and negation ----------------------------------------------------------------

#: Words that deny the keyword words shortly after them ("not red", "no dog").
NEGATIONS = frozenset(
    "not no never neither nor none without lacks lack lacking lacked hardly scarcely".split()
)
#: How many words before a keyword word a negation may stand.
NEGATION_WINDOW = 3
# Words that start a new statement between a negation and a keyword ("no, it is red").
_RESTART = frozenset(
    "it this that these those there he she they i we you is are was were am".split()
)

# n't forms, with and without the apostrophe ("isn't", "isnt"); the irregular ones first.
_NOT_FORMS = {
    "ca": "can not",
    "can": "can not",
    "won": "will not",
    "wo": "will not",
    "ain": "is not",
    "ai": "is not",
    "shan": "shall not",
    "sha": "shall not",
}
_NT_RE = re.compile(
    r"\b(is|are|was|were|do|does|did|has|have|had|could|should|would|must|need|might"
    r"|ca|can|wo|won|ai|ain|sha|shan)(?:n['\u2019]t|nt)\b"
)
_SUFFIXES = {"re": "are", "ve": "have", "ll": "will", "m": "am", "d": "would"}
_SUFFIX_RE = re.compile(r"\b(i|you|we|they|he|she|it|that|there|who|what)['\u2019](re|ve|ll|m|d)\b")
_IS_RE = re.compile(
    r"\b(it|that|there|here|what|who|where|when|why|how|he|she|this|let)['\u2019]s\b"
)
_CANNOT_RE = re.compile(r"\bcannot\b")
# Sentence and clause punctuation; a "." or "," between digits is part of a number.
_CLAUSE_SPLIT_RE = re.compile(
    r"[.,](?!\d)|(?<!\d)[.,]|[!?;:()\"\u201c\u201d]|\s[-\u2013\u2014]+\s"
    r"|\b(?:but|however|although|though|whereas)\b"
)
# Phrases that deny what follows, read as "not" ("blue instead of red").
_DENY_RE = re.compile(r"\b(?:instead of|rather than|except(?: for)?)\b")


def expand_contractions(text: str) -> str:
    """Lower-cased ``text`` with contractions written out.

    ``isn't``/``isnt`` -> ``is not``, ``can't``/``cannot`` -> ``can not``, ``won't`` ->
    ``will not``, ``it's``/``there's``/``what's`` -> ``it is``/..., ``they're`` -> ``they
    are``, ``I've`` -> ``i have``, ``we'll`` -> ``we will``, ``I'm`` -> ``i am``, ``he'd`` ->
    ``he would``. Any other ``'s`` (a possessive, "the dog's") is left alone.
    """
    t = text.lower()
    t = _CANNOT_RE.sub("can not", t)
    t = _NT_RE.sub(lambda m: _NOT_FORMS.get(m.group(1), m.group(1) + " not"), t)
    t = _IS_RE.sub(lambda m: "let us" if m.group(1) == "let" else m.group(1) + " is", t)
    return _SUFFIX_RE.sub(lambda m: f"{m.group(1)} {_SUFFIXES[m.group(2)]}", t)


def clauses(text: str) -> list[str]:
    """``text`` as clauses (rule 5 of the module docstring), lower case, none empty."""
    parts = _CLAUSE_SPLIT_RE.split(_DENY_RE.sub("not", expand_contractions(text)))
    return [" ".join(p.split()) for p in parts if p and p.strip()]


def keyword_positions(text: str, keyword: str) -> list[list[int]]:
    """Where ``text`` names ``keyword``: for each keyword word it names, the indices in
    ``words(text)`` where that word occurs. Empty exactly when :func:`mentions_keyword` is
    False.

    A keyword met in its closed form (``T-shirt`` in "tshirt", or "t shirt" for the
    keyword ``tshirt``) counts as one word; a pair of text words is placed at its first.
    """
    kw = words(strip_emphasis(keyword))
    if not kw:
        return []
    ws = words(text)
    stems = [stem(w) for w in ws]
    pairs = [stem(a + b) for a, b in zip(ws, ws[1:])]

    def where(s: str) -> list[int]:
        return sorted(
            {i for i, t in enumerate(stems) if t == s} | {i for i, t in enumerate(pairs) if t == s}
        )

    if len(kw) > 1:
        joined = where(stem("".join(kw)))
        if joined:
            return [joined]
    content = [w for w in kw if w not in STOPWORDS] or kw
    found = [where(stem(w)) for w in content]
    named = [f for f in found if f]
    need = len(content) if len(content) <= EXACT_MAX_WORDS else math.ceil(len(content) / 2)
    return named if len(named) >= need else []


def negated_at(ws: list[str], index: int, window: int = NEGATION_WINDOW) -> bool:
    """Whether the word ``ws[index]`` is negated (rule 6): a negation at most ``window``
    words before it, with no pronoun or form of "be" between them."""
    for j in range(index - 1, max(-1, index - window - 1), -1):
        if ws[j] in NEGATIONS:
            return True
        if ws[j] in _RESTART:
            return False
    return False


def keyword_polarity(text: str, keyword: str) -> bool | None:
    """How one clause names ``keyword``: True affirmed, False only negated, None not named.

    ``text`` is a single clause (see :func:`clauses`); punctuation in it does not split it.
    """
    found = keyword_positions(text, keyword)
    if not found:
        return None
    ws = words(text)
    return all(any(not negated_at(ws, i) for i in where) for where in found)


def affirms_keyword(text: str, keyword: str) -> bool:
    """Whether some clause of ``text`` names ``keyword`` without negating it.

    ``The car is not red, it is blue.`` affirms blue and not red; ``It isn't a dog.``
    does not affirm dog.
    """
    return any(keyword_polarity(c, keyword) for c in clauses(text))


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
