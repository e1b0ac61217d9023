"""Keyword scoring of model answers: one verdict per benchmark item, accuracy tables.

Anyone can call it on predictions: an item is a dict (or any object with the same
attributes) holding ``question``, ``question_type``, ``answer_keywords`` and, optionally,
``options``, ``match``, ``synonyms``, ``candidates`` and ``error``; :func:`score_answer`
gives a :class:`Verdict`. Words are compared through :mod:`raypipe.matching` (stems,
plurals, compounds, negation), after both sides pass through :func:`normalize_answer`.
Each question type is scored in its own module (``score_wh``, ``score_yes_no``,
``score_either_or``); the rules are all here.

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
    ("not red", "isn't a dog", "no dog", "never ...", "without ...", "lacks red",
    "hardly a doctor", "blue rather than red", "blue instead of red"; in "not X, it is
    Y" each clause speaks for itself). ``match: any`` (default) needs one keyword,
    ``match: all`` every one. An answer is one answer, not a list: a right keyword
    offered beside a competing candidate as alternatives ("red or blue", "red, blue or
    green", "red/blue", or a bare comma list that ends its clause: "It could be red,
    blue.") is wrong (``several_answers``). Candidates are the item's ``candidates`` (the keyword bank of
    its ability), its ``options`` and answer keywords, and whatever else the caller
    passes (:func:`raypipe.evaluate.report.score_rows` adds the answer keywords of the
    benchmark's other items of that ability); a candidate that names a reference keyword
    or is named by one ("dark red" for red) competes with nothing. Candidates joined by
    "and" ("red and white") describe one thing, and a candidate with other words between
    it and the answer is context ("A red car by a blue wall.", "A woman in a green coat
    holds a red umbrella." both answer red). A hedge around a single answer ("probably
    red") is not judged. Reasons: ``keyword`` (right), ``several_answers``, ``negated``
    (a keyword named, but only denied), ``partial`` (``all``: some keywords missing),
    ``no_keyword``.
``yes_no``
    The reference is ``answer_keywords[0]``, ``yes`` or ``no``. A hedge ("maybe",
    "possibly", "probably", "I am not sure", "I cannot tell", "I can't be certain", "it is
    unclear", "could be", "I guess", or both a yes and a no) is wrong (``hedge``;
    :data:`raypipe.evaluate.score_yes_no.HEDGES`). Otherwise the answer is, in order: the
    word opening a clause (``yes``, ``yeah``, ``correct``, ... or ``no``, ``nope``, ...;
    "Yes, it is." -> yes, "No." -> no); else the first clause that names the question's
    content words ("Is the car red?" -> car, red): denied -> no, all of them affirmed ->
    yes; else the content words as the clauses name them, a later clause deciding a word
    an earlier one named ("The car is not blue, it's red." -> car and red affirmed ->
    yes; "He is hardly a doctor." -> no); else a first clause with a negation ("It is
    not.", "There is no dog.") -> no, or one of only pronouns and verbs ("It is.") ->
    yes. Reasons: the answer found (``yes``/``no``), ``hedge``, or ``no_yes_no`` when none
    is found.
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
    are the keywords. Where one option holds another ("red or dark red"), the longest
    option named wins: "Dark red." picks dark red, "Red." picks red. ``match`` is not
    used. Hedges are not judged here: "probably red" picks red.

Every type: a prediction that is missing or has no words is wrong, reason ``empty``; a
prediction that failed (the model call raised, timed out, was filtered: the row's
``error``) is wrong, reason ``error``, and counted in the accuracy table's ``errors``.
``Verdict.matched`` is what the prediction gave that decided: the keyword(s) affirmed
(as written in ``answer_keywords``, even when a synonym was used; ``match: all`` joins
them with ", "), the option picked (right or wrong), or the yes/no found; else None.

Accuracy (:func:`accuracy_table`, :mod:`raypipe.evaluate.accuracy`) counts rows per
ability and overall, failed predictions included as wrong, with Wilson score intervals
(:func:`wilson_interval`), beside the judge's and the human reviewers' accuracy
where those columns hold values; :func:`agreement` is how often two verdict lists agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from raypipe.evaluate.accuracy import ERROR, accuracy_table, agreement, wilson_interval
from raypipe.evaluate.normalize import (
    QUESTION_TYPES,
    Verdict,
    canonical_question_type,
    is_nan,
    item_field,
    match_rule,
    normalize_answer,
    normalize_keyword,
    synonyms_of,
    text_list,
    where,
)
from raypipe.evaluate.score_either_or import option_groups, question_options, score_either_or
from raypipe.evaluate.score_wh import score_wh
from raypipe.evaluate.score_yes_no import score_yes_no
from raypipe.matching import clauses

__all__ = [
    "ERROR",
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


def score_answer(
    item: Any, prediction: str | None, candidates: Iterable[str] = (), error: Any = None
) -> Verdict:
    """The keyword verdict on ``prediction`` for ``item`` (rules in the module docstring).

    ``candidates``: more competing answers of the item's ability, beside the item's own
    ``candidates``, ``options`` and keywords (wh items). ``error``: why the prediction
    failed, if it did (else the item's ``error`` field is read): the verdict is then
    wrong, reason ``error``.

    Raises ValueError, naming the item, when the item cannot be scored: an unknown
    ``question_type``, no answer keywords, a yes/no reference that is neither "yes" nor
    "no", or an either-or question whose options are neither given nor parseable.
    """
    qtype = canonical_question_type(item_field(item, "question_type"))
    raw_keywords = text_list(item, "answer_keywords")
    keywords = [(kw, normalize_keyword(kw)) for kw in raw_keywords]
    keywords = [(kw, norm) for kw, norm in keywords if norm]
    if not keywords:
        raise ValueError(
            f"{where(item)}: answer_keywords is empty; give the reference keyword(s) "
            f"(for yes/no questions, 'yes' or 'no')"
        )
    synonyms = synonyms_of(item)
    question = str(item_field(item, "question", ""))
    # The item is checked in full before the prediction is looked at.
    if qtype == "yes_no":
        reference = keywords[0][1]
        if reference not in ("yes", "no"):
            raise ValueError(
                f"{where(item)}: a yes_no item's answer_keywords[0] must be 'yes' or 'no', "
                f"got {raw_keywords[0]!r}; fix the keyword or set question_type to wh"
            )
    elif qtype == "either_or":
        groups = option_groups(item, question, keywords, synonyms)
    else:
        rule = match_rule(item)

    failed = error if error is not None else item_field(item, "error")
    if failed:
        return Verdict(False, None, ERROR)
    text = "" if prediction is None or is_nan(prediction) else str(prediction)
    parts = [p for p in (normalize_answer(c) for c in clauses(text)) if p]
    if not parts:
        return Verdict(False, None, "empty")
    if qtype == "yes_no":
        return score_yes_no(reference, question, text, parts)
    if qtype == "either_or":
        return score_either_or(groups, parts)
    pool = [*text_list(item, "candidates"), *text_list(item, "options"), *raw_keywords]
    return score_wh(keywords, synonyms, rule, parts, text, [*pool, *candidates])
