"""The verdicts a careful grader gives: answers that list candidates, hedge or deny are
wrong; a second colour or animal in the scene, a one-word answer and a long answer with
details are right. One golden table over the three question types."""

from __future__ import annotations

import pytest

from raypipe.evaluate.score import Verdict, score_answer

COLORS = ["red", "blue", "green", "yellow", "orange", "purple", "black", "white", "dark red"]
ANIMALS = ["cat", "dog", "horse", "cow", "sheep", "tiger", "zebra"]
PROFESSIONS = ["doctor", "nurse", "chef", "police officer", "firefighter"]


def wh(question, keyword, bank, **extra):
    return {
        "question": question,
        "question_type": "wh",
        "answer_keywords": [keyword] if isinstance(keyword, str) else keyword,
        "candidates": bank,
        **extra,
    }


def yes_no(reference, question="Is the car red?"):
    return {"question": question, "question_type": "yes_no", "answer_keywords": [reference]}


def either(question, keyword, **extra):
    return {
        "question": question,
        "question_type": "either_or",
        "answer_keywords": [keyword],
        **extra,
    }


CAR = wh("What color is the car?", "red", COLORS)
UMBRELLA = wh("What color is the umbrella?", "red", COLORS)
ANIMAL = wh("What animal is on the grass?", "dog", ANIMALS)
JOB = wh("What is the man's profession?", "doctor", PROFESSIONS)
# An imported item: no bank, its own keywords and options are the candidates.
IMPORTED = wh("What color is the bus?", "yellow", [], options=["yellow", "white"])
NESTED = either("Is the car red or dark red?", "dark red")
NESTED_RED = either("Is the car red or dark red?", "red")

# fmt: off
GOLDEN = [
    # (case, item, prediction, correct, reason)
    # wh: candidate lists are not answers.
    ("list of six", CAR, "It could be red, blue, green, yellow, orange or purple.", False, "several_answers"),
    ("x or y", CAR, "Red or blue.", False, "several_answers"),
    ("x, y or z", CAR, "Red, blue or green.", False, "several_answers"),
    ("could be x, y", CAR, "It could be red, blue.", False, "several_answers"),
    ("slash", CAR, "red/blue", False, "several_answers"),
    ("or maybe", CAR, "The car is red, or maybe orange.", False, "several_answers"),
    ("either or in answer", ANIMAL, "Either a dog or a cat.", False, "several_answers"),
    ("profession list", JOB, "He is a doctor or a nurse.", False, "several_answers"),
    ("imported options list", IMPORTED, "Yellow or white.", False, "several_answers"),
    ("imported keyword alone", IMPORTED, "It is yellow.", True, "keyword"),
    # wh: negators and hedges.
    ("lacks", CAR, "It lacks red; it is blue.", False, "negated"),
    ("hardly", JOB, "He is hardly a doctor.", False, "negated"),
    ("rather than", CAR, "It is blue rather than red.", False, "negated"),
    ("instead of", CAR, "The car is painted blue instead of red.", False, "negated"),
    ("not x, it's y (wrong)", CAR, "It's not red, it's blue.", False, "negated"),
    ("not x, it's y (right)", CAR, "The car is not blue, it's red.", True, "keyword"),
    ("right, not a competitor", CAR, "Red, not blue.", True, "keyword"),
    ("single hedged answer", CAR, "Probably red.", True, "keyword"),
    # wh: guards against over-correction.
    ("context colour", CAR, "A red car by a blue wall.", True, "keyword"),
    ("context coat", UMBRELLA, "A woman in a green coat holds a red umbrella.", True, "keyword"),
    ("context animal", ANIMAL, "A dog chases a cat across the grass.", True, "keyword"),
    ("context, then more", ANIMAL, "A brown dog lies on the grass next to a sleeping cat and a horse.", True, "keyword"),
    ("one word", CAR, "Red.", True, "keyword"),
    ("one word lower", ANIMAL, "dog", True, "keyword"),
    ("long with details", CAR, "The car in the picture is a shiny red sedan with chrome wheels, parked on a quiet street.", True, "keyword"),
    ("two colours with and", CAR, "The car is red and white.", True, "keyword"),
    ("comma, then context", CAR, "The car is red, blue sky behind it.", True, "keyword"),
    ("next sentence", CAR, "The car is red. The sky is blue and the grass is green.", True, "keyword"),
    ("nested candidate", CAR, "It is dark red.", True, "keyword"),
    ("synonym listed with reference", wh("What color is the car?", ["red", "crimson"], COLORS), "Red or crimson.", True, "keyword"),
    ("wrong colour", CAR, "Blue.", False, "no_keyword"),
    ("competitors only", CAR, "Blue or green.", False, "no_keyword"),
    # yes/no.
    ("yn not x, it's y", yes_no("yes"), "The car is not blue, it's red.", True, "yes"),
    ("yn not x, it's y: no", yes_no("no"), "The car is not blue, it's red.", False, "yes"),
    ("yn hardly", yes_no("no", "Is the man a doctor?"), "He is hardly a doctor.", True, "no"),
    ("yn lacks", yes_no("no", "Does the tree have leaves?"), "The tree lacks leaves.", True, "no"),
    ("yn rather than", yes_no("no"), "The car is blue rather than red.", True, "no"),
    ("yn instead of", yes_no("no"), "It is painted blue instead of red.", True, "no"),
    ("yn hedge can't be certain", yes_no("yes"), "Yes, although I can't be certain.", False, "hedge"),
    ("yn hedge guess", yes_no("yes"), "I guess so.", False, "hedge"),
    ("yn hedge could be", yes_no("yes"), "It could be red.", False, "hedge"),
    ("yn one word", yes_no("yes"), "Yes", True, "yes"),
    ("yn long with details", yes_no("yes"), "Yes, the car parked by the blue wall is a bright red convertible.", True, "yes"),
    ("yn context colour", yes_no("yes"), "The red car stands by a blue wall.", True, "yes"),
    # either-or.
    ("nested: longest option", NESTED, "Dark red.", True, "option"),
    ("nested: short option", NESTED_RED, "Red.", True, "option"),
    ("nested: wrong longest", NESTED_RED, "It is dark red.", False, "wrong_option"),
    ("nested: both", NESTED, "Red or dark red.", False, "both_options"),
    ("eo rather than", either("Is the car red or blue?", "blue"), "Blue rather than red.", True, "option"),
    ("eo lacks", either("Is the car red or blue?", "blue"), "It lacks red; it is blue.", True, "option"),
    ("eo not x, it's y", either("Is the car red or blue?", "red"), "It's not blue, it's red.", True, "option"),
    ("eo list", either("Is the animal a cat or a dog?", "dog"), "A cat or a dog.", False, "both_options"),
    ("eo one word", either("Is the animal a cat or a dog?", "dog"), "Dog.", True, "option"),
    ("eo long with details", either("Is the animal a cat or a dog?", "dog"), "It is a fluffy brown dog with a red collar, lying on the grass.", True, "option"),
]
# fmt: on


@pytest.mark.parametrize(
    "item,prediction,correct,reason",
    [case[1:] for case in GOLDEN],
    ids=[case[0] for case in GOLDEN],
)
def test_careful_grader(item, prediction, correct, reason):
    verdict = score_answer(item, prediction)
    assert (verdict.correct, verdict.reason) == (correct, reason)


def test_table_covers_the_three_question_types():
    types = {case[1]["question_type"] for case in GOLDEN}
    assert len(GOLDEN) >= 40 and types == {"wh", "yes_no", "either_or"}


def test_candidates_given_by_the_caller():
    # Re-scored rows without a bank: the benchmark's other keywords of the ability compete.
    item = {"question": "What animal is it?", "question_type": "wh", "answer_keywords": ["dog"]}
    assert score_answer(item, "A dog or a cat.") == Verdict(True, "dog", "keyword")
    assert score_answer(item, "A dog or a cat.", candidates=["cat"]) == Verdict(
        False, None, "several_answers"
    )


def test_failed_prediction_is_wrong_with_reason_error():
    item = {**CAR, "error": "timeout after 3 attempts"}
    assert score_answer(item, None) == Verdict(False, None, "error")
    assert score_answer(CAR, "red", error="content filter") == Verdict(False, None, "error")


def test_rescored_rows_without_a_bank_use_the_benchmarks_keywords():
    from raypipe.evaluate.report import score_rows

    def row(i, keyword, prediction, ability="animal"):
        return {
            "id": f"{ability}-{i}", "model": "m", "benchmark": "real", "ability": ability,
            "question": "What animal is this?", "question_type": "wh",
            "answer_keywords": [keyword], "prediction": prediction,
        }  # fmt: skip

    rows = [
        row(0, "dog", "A dog or a cat."),
        row(1, "cat", "A cat."),
        row(2, "dog", "A dog next to a cat."),
        # Another ability's keywords do not compete.
        row(3, "red", "Red.", ability="color"),
        row(4, "dog", "A dog or red.", ability="animal"),
    ]
    reasons = [r["verdict_reason"] for r in score_rows(rows)]
    assert reasons == ["several_answers", "keyword", "keyword", "keyword", "keyword"]
