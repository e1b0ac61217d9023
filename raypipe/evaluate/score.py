"""Keyword scoring of model answers: one verdict per benchmark item, accuracy tables.

Anyone can call it on predictions: an item is a dict (or any object with the same
attributes) holding ``question``, ``question_type``, ``answer_keywords`` and, optionally,
``options``, ``match`` and ``synonyms``; :func:`score_answer` gives a :class:`Verdict`.
Words are compared through :mod:`raypipe.matching` (stems, plurals, compounds, negation),
after both sides pass through :func:`normalize_answer`.

Normalisation (:func:`normalize_answer`), as the VQA evaluation does it:

- lower case; contractions written out (``isn't`` -> ``is not``, ``it's`` -> ``it is``,
  ``don't`` -> ``do not``, ``can't``/``cannot`` -> ``can not``);
- punctuation removed, except a ``.`` between digits (``3.5``); a comma between digits is
  dropped (``1,000`` -> ``1000``); apostrophes vanish (``dog's`` -> ``dogs``), any other
  mark becomes a space (``t-shirt`` -> ``t shirt``, which still names ``T-shirt``);
- number words become digits (``zero`` .. ``twenty``, the tens, ``twenty-one`` -> ``21``);
  ``none`` stays a word, since it negates;
- the articles ``a``, ``an``, ``the`` are dropped.

Question types (``question_type``; spellings such as ``yes/no``, ``yesno``, ``either-or``
are accepted, and the training types ``caption`` and ``unusual`` are scored as ``wh``):

``wh``
    Each answer keyword, or one of its ``synonyms``, must be affirmed by the prediction:
    named (:func:`raypipe.matching.mentions_keyword`) in a clause that does not negate it
    ("not red", "isn't a dog", "no dog", "never ...", "without ..."). ``match: any``
    (default) needs one keyword, ``match: all`` every one. Reasons: ``keyword`` (right),
    ``negated`` (a keyword named, but only denied), ``partial`` (``all``: some keywords
    missing), ``no_keyword``.
``yes_no``
    The reference is ``answer_keywords[0]``, ``yes`` or ``no``. A hedge ("maybe",
    "possibly", "probably", "I am not sure", "I cannot tell", "it is unclear", "could
    be", or both a yes and a no) is wrong (``hedge``). Otherwise the answer is, in order:
    the word opening a clause (``yes``, ``yeah``, ``correct``, ... or ``no``, ``nope``,
    ...; "Yes, it is." -> yes, "No." -> no); else the first clause that names the
    question's content words ("Is the car red?" -> car, red): denied -> no, all of them
    affirmed -> yes; else a first clause with a negation ("It is not.", "There is no
    dog.") -> no, or one of only pronouns and verbs ("It is.") -> yes. Reasons: the
    answer found (``yes``/``no``), ``hedge``, or ``no_yes_no`` when none is found.
``either_or``
    Options come from the item's ``options``, else from the question ("Is the car red or
    blue?" -> red, blue; "red, green or blue" gives three; see :func:`question_options`).
    The reference option is the one the answer keywords name. The prediction must affirm
    exactly one option: the reference option -> right (``option``), another ->
    ``wrong_option``, two or more -> ``both_options``, one only denied -> ``negated``,
    none -> ``no_option``. Words shared by all options ("style" in "in watercolor style
    or pixel art style") do not count. A first option parsed from the question, whose
    start is a guess, is named by its last word that the question does not use elsewhere
    ("boat amber" in "Is the fishing boat amber or salmon pink?" by "amber", "snake
    plant" in "Is the plant a snake plant or a sunflower?" by "snake"). The reference
    keywords and their synonyms name the reference option too (unless another option
    names them), so "a hallway" picks "narrow corridor" when ``corridor``/``hallway``
    are the keywords. ``match`` is not used. Hedges are not judged here: "probably red"
    picks red.

Every type: a prediction that is missing or has no words is wrong, reason ``empty``.
``Verdict.matched`` is what the prediction gave that decided: the keyword(s) affirmed
(as written in ``answer_keywords``, even when a synonym was used; ``match: all`` joins
them with ", "), the option picked (right or wrong), or the yes/no found; else None.

Accuracy (:func:`accuracy_table`) counts rows per ability and overall, with Wilson score
intervals (:func:`wilson_interval`), beside the judge's and the human reviewers' accuracy
where those columns hold values; :func:`agreement` is how often two verdict lists agree.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from raypipe.matching import (
    EXACT_MAX_WORDS,
    NEGATIONS,
    STOPWORDS,
    clauses,
    expand_contractions,
    keyword_polarity,
    mentions_keyword,
    stem,
    strip_emphasis,
    words,
)

__all__ = [
    "QUESTION_TYPES",
    "Verdict",
    "accuracy_table",
    "agreement",
    "canonical_question_type",
    "normalize_answer",
    "question_options",
    "score_answer",
    "wilson_interval",
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

# --- normalisation -----------------------------------------------------------------------

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
    """``text`` normalised as the VQA evaluation does (rules in the module docstring).

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


def _normalize_keyword(keyword: str) -> str:
    return normalize_answer(strip_emphasis(str(keyword)))


# --- items -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """The keyword verdict on one prediction (reasons listed in the module docstring)."""

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


def _field(item: Any, name: str, default: Any = None) -> Any:
    if isinstance(item, Mapping):
        value = item.get(name, default)
    else:
        value = getattr(item, name, default)
    if isinstance(value, float) and math.isnan(value):  # a missing cell read by pandas
        return default
    return default if value is None else value


def _where(item: Any) -> str:
    ident = _field(item, "id")
    return f"item {ident!r}" if ident else "item"


def _text_list(item: Any, name: str) -> list[str]:
    value = _field(item, name, [])
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{_where(item)}: {name} {value!r} is not a JSON list ({e}); "
                    f"write it as a list of strings"
                ) from None
        else:
            value = re.split(r"[,;]", text)
    try:
        items = [str(v).strip() for v in value]
    except TypeError:
        raise ValueError(
            f"{_where(item)}: {name} must be a list of strings, got {type(value).__name__}"
        ) from None
    return [v for v in items if v]


def _synonyms(item: Any) -> dict[str, list[str]]:
    value = _field(item, "synonyms", {})
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{_where(item)}: synonyms is not a JSON object ({e}); "
                f'write it as {{"keyword": ["alternative", ...]}}'
            ) from None
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{_where(item)}: synonyms must map a keyword to a list of alternatives, "
            f"got {type(value).__name__}"
        )
    out: dict[str, list[str]] = {}
    for key, alts in value.items():
        if isinstance(alts, str):
            alts = [alts]
        norm = [_normalize_keyword(a) for a in (alts or [])]
        out.setdefault(_normalize_keyword(key), []).extend(a for a in norm if a)
    return out


def _match_rule(item: Any) -> str:
    rule = str(_field(item, "match", "any")).strip().lower() or "any"
    if rule not in MATCH_RULES:
        raise ValueError(f"{_where(item)}: match {rule!r} is not 'any' or 'all'")
    return rule


# --- scoring -----------------------------------------------------------------------------


def score_answer(item: Any, prediction: str | None) -> Verdict:
    """The keyword verdict on ``prediction`` for ``item`` (rules in the module docstring).

    Raises ValueError, naming the item, when the item cannot be scored: an unknown
    ``question_type``, no answer keywords, a yes/no reference that is neither "yes" nor
    "no", or an either-or question whose options are neither given nor parseable.
    """
    qtype = canonical_question_type(_field(item, "question_type"))
    raw_keywords = _text_list(item, "answer_keywords")
    keywords = [(kw, _normalize_keyword(kw)) for kw in raw_keywords]
    keywords = [(kw, norm) for kw, norm in keywords if norm]
    if not keywords:
        raise ValueError(
            f"{_where(item)}: answer_keywords is empty; give the reference keyword(s) "
            f"(for yes/no questions, 'yes' or 'no')"
        )
    synonyms = _synonyms(item)
    question = str(_field(item, "question", ""))
    # The item is checked in full before the prediction is looked at.
    if qtype == "yes_no":
        reference = keywords[0][1]
        if reference not in ("yes", "no"):
            raise ValueError(
                f"{_where(item)}: a yes_no item's answer_keywords[0] must be 'yes' or 'no', "
                f"got {raw_keywords[0]!r}; fix the keyword or set question_type to wh"
            )
    elif qtype == "either_or":
        groups = _option_groups(item, question, keywords, synonyms)
    else:
        rule = _match_rule(item)

    text = "" if prediction is None or _is_nan(prediction) else str(prediction)
    parts = [p for p in (normalize_answer(c) for c in clauses(text)) if p]
    if not parts:
        return Verdict(False, None, "empty")
    if qtype == "yes_no":
        return _score_yes_no(reference, question, text, parts)
    if qtype == "either_or":
        return _score_either_or(groups, parts)
    return _score_wh(keywords, synonyms, rule, parts)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _polarity(parts: list[str], aliases: Iterable[str]) -> bool | None:
    """True if some clause affirms an alias, False if they are only denied, None if never named."""
    seen = None
    for alias in aliases:
        for part in parts:
            p = keyword_polarity(part, alias)
            if p:
                return True
            if p is False:
                seen = False
    return seen


# wh


def _score_wh(
    keywords: list[tuple[str, str]],
    synonyms: dict[str, list[str]],
    rule: str,
    parts: list[str],
) -> Verdict:
    found = [(kw, _polarity(parts, [norm, *synonyms.get(norm, [])])) for kw, norm in keywords]
    affirmed = [kw for kw, p in found if p]
    negated = any(p is False for _, p in found)
    if rule == "any" and affirmed:
        return Verdict(True, affirmed[0], "keyword")
    if rule == "all" and len(affirmed) == len(found):
        return Verdict(True, ", ".join(affirmed), "keyword")
    if negated:
        return Verdict(False, None, "negated")
    if affirmed:
        return Verdict(False, None, "partial")
    return Verdict(False, None, "no_keyword")


# yes / no

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
    "not possible to",
    "can not tell",
    "can not say",
    "can not be sure",
    "can not determine",
    "can not be determined",
    "do not know",
    "no way to tell",
    "hard to tell",
    "hard to say",
    "difficult to tell",
    "difficult to say",
    "difficult to determine",
    "impossible to tell",
    "impossible to say",
    "impossible to determine",
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


def _is_hedge(text: str) -> bool:
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
    for part in parts if content else []:
        named = [p for p in (keyword_polarity(part, w) for w in content) if p is not None]
        if len(named) < need:
            continue
        if not all(named):
            return "no"
        if len(named) == len(content):
            return "yes"
    first = parts[0].split()
    if any(w in NEGATIONS for w in first):
        return "no"
    if all(w in _PRONOUNS or w in _AUX for w in first):
        return "yes"
    return None


def _score_yes_no(reference: str, question: str, text: str, parts: list[str]) -> Verdict:
    if _is_hedge(" ".join(parts)):
        return Verdict(False, None, "hedge")
    given = _interjections(text)
    if len(given) > 1:
        return Verdict(False, None, "hedge")
    answer = given.pop() if given else _statement_answer(question, parts)
    if answer is None:
        return Verdict(False, None, "no_yes_no")
    return Verdict(answer == reference, answer, answer)


# either / or

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


def _names(a: str, b: str) -> bool:
    return mentions_keyword(a, b) or mentions_keyword(b, a)


def _option_groups(
    item: Any,
    question: str,
    keywords: list[tuple[str, str]],
    synonyms: dict[str, list[str]],
) -> list[_Group]:
    given = _text_list(item, "options")
    if given:
        labels = given
    else:
        labels = question_options(question, [kw for kw, _ in keywords])
    options = [normalize_answer(o) for o in labels]
    if len([o for o in options if o]) < 2:
        source = f"options {given!r}" if given else f"question {question!r}"
        raise ValueError(
            f"{_where(item)}: an either_or item needs two or more options and its {source} "
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
        groups.append(_Group(label, aliases, i in chosen))
    if not chosen:  # no option is the reference: the keywords themselves are the answer
        groups.append(_Group(keywords[0][0], [t for terms in ref_terms for t in terms], True))
    return groups


def _score_either_or(groups: list[_Group], parts: list[str]) -> Verdict:
    found = [(g, _polarity(parts, g.aliases)) for g in groups]
    picked = [g for g, p in found if p]
    if len(picked) > 1:
        return Verdict(False, None, "both_options")
    if picked:
        g = picked[0]
        return Verdict(g.reference, g.label, "option" if g.reference else "wrong_option")
    if any(p is False for _, p in found):
        return Verdict(False, None, "negated")
    return Verdict(False, None, "no_option")


# --- accuracy ----------------------------------------------------------------------------


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
    if value is None or _is_nan(value):
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
    ``judge_correct`` and ``human_correct``; a verdict is a bool or 0/1, and an empty one
    (None, NaN) is not counted. Each S holds ``n``, ``correct``, ``accuracy`` (None when
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
