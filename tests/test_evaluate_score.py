"""Golden cases for keyword scoring (raypipe.evaluate.score) and the negation-aware
matching it adds to raypipe.matching: each case's verdict and reason asserted."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from raypipe.evaluate.score import (
    Verdict,
    accuracy_table,
    agreement,
    canonical_question_type,
    normalize_answer,
    question_options,
    score_answer,
    wilson_interval,
)
from raypipe.matching import (
    affirms_keyword,
    clauses,
    expand_contractions,
    keyword_polarity,
    keyword_positions,
    mentions_keyword,
)


def wh(*keywords, **extra):
    return {
        "question": "What is shown?",
        "question_type": "wh",
        "answer_keywords": list(keywords),
        **extra,
    }


def yes_no(reference, question="Is the car red?"):
    return {"question": question, "question_type": "yes_no", "answer_keywords": [reference]}


def either(question, *keywords, **extra):
    return {
        "question": question,
        "question_type": "either_or",
        "answer_keywords": list(keywords),
        **extra,
    }


CAR = "Is the car red or blue?"

# fmt: off
GOLDEN = [
    # (case, item, prediction, correct, matched, reason)
    # Right and wrong.
    ("right", wh("red"), "The car is red.", True, "red", "keyword"),
    ("wrong", wh("red"), "The car is green.", False, None, "no_keyword"),
    ("second keyword", wh("crimson", "red"), "A red car.", True, "red", "keyword"),
    # Negation.
    ("negated", wh("red"), "The car is not red, it is blue.", False, None, "negated"),
    ("other clause", wh("blue"), "The car is not red, it is blue.", True, "blue", "keyword"),
    ("no dog", wh("dog"), "There is no dog here.", False, None, "negated"),
    ("never", wh("smiling"), "She is never smiling.", False, None, "negated"),
    ("without", wh("hat"), "A man without a hat.", False, None, "negated"),
    ("contraction", wh("cat"), "It isn't a cat", False, None, "negated"),
    ("contraction no apostrophe", wh("cat"), "it isnt a cat", False, None, "negated"),
    ("denied then named", wh("cat"), "It's not a dog, it's a cat.", True, "cat", "keyword"),
    ("no then answer", wh("red"), "No, it is red.", True, "red", "keyword"),
    ("instead of", wh("red"), "It is blue instead of red.", False, None, "negated"),
    ("not only denied", wh("navy blue"), "The coat is not navy blue.", False, None, "negated"),
    # Plurals and word forms.
    ("plural", wh("dog"), "two dogs", True, "dog", "keyword"),
    ("plural keyword", wh("berries"), "A single berry.", True, "berries", "keyword"),
    ("verb form", wh("running"), "The dog runs.", True, "running", "keyword"),
    # Synonyms count as the keyword, which is what is reported.
    ("synonym", wh("sofa", synonyms={"sofa": ["couch", "settee"]}), "A cat on a couch.", True, "sofa", "keyword"),
    ("synonym negated", wh("sofa", synonyms={"sofa": ["couch"]}), "It is not a couch.", False, None, "negated"),
    ("no synonym given", wh("sofa"), "A cat on a couch.", False, None, "no_keyword"),
    # Number words.
    ("number word", wh("3"), "There are three cats", True, "3", "keyword"),
    ("number keyword", wh("three"), "3 cats", True, "three", "keyword"),
    ("compound number", wh("21"), "twenty-one balloons", True, "21", "keyword"),
    ("other number", wh("3"), "There are four cats", False, None, "no_keyword"),
    # Punctuation and case.
    ("punctuation", wh("red"), "Red!", True, "red", "keyword"),
    ("quoted", wh("red"), '"RED."', True, "red", "keyword"),
    ("hyphen", wh("t-shirt"), "He wears a T shirt.", True, "t-shirt", "keyword"),
    # any / all.
    ("any one", wh("red", "car"), "A red bus.", True, "red", "keyword"),
    ("all missing one", wh("red", "car", match="all"), "A red bus.", False, None, "partial"),
    ("all present", wh("red", "car", match="all"), "A red car.", True, "red, car", "keyword"),
    ("all one negated", wh("red", "car", match="all"), "A car that is not red.", False, None, "negated"),
    ("all none", wh("red", "car", match="all"), "A bus.", False, None, "no_keyword"),
    # Training question types score as wh.
    ("caption", {"question": "Describe.", "question_type": "caption", "answer_keywords": ["teal"]}, "A teal umbrella.", True, "teal", "keyword"),
    # yes / no.
    ("yes", yes_no("yes"), "Yes, it is.", True, "yes", "yes"),
    ("no", yes_no("no"), "No.", True, "no", "no"),
    ("yes wrong", yes_no("no"), "Yes, it is.", False, "yes", "yes"),
    ("no wrong", yes_no("yes"), "No.", False, "no", "no"),
    ("yes lower", yes_no("yes"), "yes", True, "yes", "yes"),
    ("yeah", yes_no("yes"), "Yeah, the car is red.", True, "yes", "yes"),
    ("no then words", yes_no("no"), "No, the car is blue.", True, "no", "no"),
    ("yes then no word", yes_no("yes", "Is there a dog?"), "Yes, there is no doubt.", True, "yes", "yes"),
    ("not sure", yes_no("yes"), "I am not sure.", False, None, "hedge"),
    ("maybe yes", yes_no("yes"), "Maybe yes.", False, None, "hedge"),
    ("yes and no", yes_no("yes"), "yes and no", False, None, "hedge"),
    ("yes or no", yes_no("no"), "Yes or no.", False, None, "hedge"),
    ("cannot tell", yes_no("no"), "I can't tell from the image.", False, None, "hedge"),
    ("unclear", yes_no("no"), "It is unclear.", False, None, "hedge"),
    ("possibly", yes_no("yes"), "Yes, possibly.", False, None, "hedge"),
    ("it is not", yes_no("no"), "It is not.", True, "no", "no"),
    ("it isn't", yes_no("no"), "It isn't.", True, "no", "no"),
    ("there is no", yes_no("no", "Is there a dog in the image?"), "There is no dog in the picture.", True, "no", "no"),
    ("statement denied", yes_no("no"), "The car is not red.", True, "no", "no"),
    ("statement affirmed", yes_no("yes"), "The car is red.", True, "yes", "yes"),
    ("it is", yes_no("yes"), "It is.", True, "yes", "yes"),
    ("no yes or no", yes_no("no"), "The car is blue.", False, None, "no_yes_no"),
    # either / or, options parsed from the question.
    ("one option", either(CAR, "blue"), "It is blue.", True, "blue", "option"),
    ("wrong option", either(CAR, "blue"), "It is red.", False, "red", "wrong_option"),
    ("both options", either(CAR, "blue"), "It is red and blue.", False, None, "both_options"),
    ("neither option", either(CAR, "blue"), "It is green.", False, None, "no_option"),
    ("only denied", either(CAR, "blue"), "It is not red.", False, None, "negated"),
    ("denied and picked", either(CAR, "blue"), "Not red, but blue.", True, "blue", "option"),
    ("three options", either("Is the car red, green, or blue?", "green"), "Green.", True, "green", "option"),
    ("article options", either("Is the animal a cheetah or a zebra?", "cheetah"), "It is a cheetah.", True, "cheetah", "option"),
    ("shared words", either("Is the man playing the violin or playing the guitar?", "violin"), "He is playing the guitar.", False, "playing guitar", "wrong_option"),
    ("keyword synonym", either("Is the giraffe in a narrow corridor or on an open savanna?", "corridor", "hallway"), "It stands in a hallway.", True, "corridor", "option"),
    ("keyword anchor", either("Is the fishing boat amber or salmon pink?", "amber"), "Amber.", True, "amber", "option"),
    ("guessed first option", either("Is the fishing boat amber or salmon pink?", "salmon pink"), "Salmon pink or amber.", False, None, "both_options"),
    ("subject word", either("Is the plant a snake plant or a sunflower?", "sunflower"), "The plant is a sunflower.", True, "sunflower", "option"),
    ("subject word wrong", either("Is the plant a snake plant or a sunflower?", "sunflower"), "A snake plant.", False, "snake plant", "wrong_option"),
    # either / or, options given.
    ("given options", either("Which one?", "cat", options=["cat", "dog"]), "A cat.", True, "cat", "option"),
    ("given both", either("Which one?", "cat", options=["cat", "dog"]), "A cat and a dog.", False, None, "both_options"),
    ("given neither", either("Which one?", "cat", options=["cat", "dog"]), "A horse.", False, None, "no_option"),
    ("option synonym", either("Which one?", "sofa", options=["sofa", "bed"], synonyms={"sofa": ["couch"]}), "A couch.", True, "sofa", "option"),
    ("either-or spelling", {**either(CAR, "red"), "question_type": "either-or"}, "Red.", True, "red", "option"),
    # Empty.
    ("empty", wh("red"), "", False, None, "empty"),
    ("blank", yes_no("yes"), "   ", False, None, "empty"),
    ("only punctuation", either(CAR, "red"), "...", False, None, "empty"),
    ("none", wh("red"), None, False, None, "empty"),
]
# fmt: on


@pytest.mark.parametrize(
    "item,prediction,correct,matched,reason",
    [case[1:] for case in GOLDEN],
    ids=[case[0] for case in GOLDEN],
)
def test_golden(item, prediction, correct, matched, reason):
    assert score_answer(item, prediction) == Verdict(correct, matched, reason)


def test_enough_golden_cases():
    assert len(GOLDEN) >= 30
    reasons = {case[-1] for case in GOLDEN}
    assert reasons >= {
        "keyword", "no_keyword", "negated", "partial", "yes", "no", "hedge",
        "no_yes_no", "option", "wrong_option", "both_options", "no_option", "empty",
    }  # fmt: skip


@pytest.mark.parametrize(
    "text,normal",
    [
        ("Red!", "red"),
        ("The Car, a dog and an apple.", "car dog and apple"),
        ("It's two.", "it is 2"),
        ("There aren't THREE cats; don't", "there are not 3 cats do not"),
        ("I can't / cannot", "i can not can not"),
        ("twenty one and thirty-two", "21 and 32"),
        ("ten twelve zero", "10 12 0"),
        ("none of them", "none of them"),
        ("3.5 kg, 1,000 people.", "3.5 kg 1000 people"),
        ("The dog's ball", "dogs ball"),
        ("T-shirt (blue)", "t shirt blue"),
        ("", ""),
    ],
)
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


@pytest.mark.parametrize(
    "question,options",
    [
        ("Is the car red or blue?", ["red", "blue"]),
        ("Is the car red, green or blue?", ["red", "green", "blue"]),
        ("Is the car red, green, or blue?", ["red", "green", "blue"]),
        ("Is it either a cat or a dog?", ["cat", "dog"]),
        ("Which is it, red or blue?", ["red", "blue"]),
        ("Looking closely, is the car red, green or blue?", ["red", "green", "blue"]),
        (
            "Is the giraffe in a narrow corridor or on an open savanna?",
            ["narrow corridor", "open savanna"],
        ),
        ("Does the man have a buzz cut or long wavy hair?", ["buzz cut", "long wavy hair"]),
        ("Are there two or three dogs?", ["2", "3 dogs"]),
        ("Is the car red?", []),
    ],
)
def test_question_options(question, options):
    assert question_options(question) == options


def test_question_options_anchor_on_a_keyword():
    # Without the keyword the first option takes as many words as the second.
    boat = "Is the fishing boat amber or salmon pink?"
    assert question_options(boat) == ["boat amber", "salmon pink"]
    assert question_options(boat, ["amber"]) == ["amber", "salmon pink"]
    pond = "Is the koi pond depicted in art deco style or psychedelic style?"
    assert question_options(pond) == ["deco style", "psychedelic style"]
    assert question_options(pond, ["art deco"]) == ["art deco style", "psychedelic style"]


@pytest.mark.parametrize(
    "value,canonical",
    [
        ("yes_no", "yes_no"), ("yes/no", "yes_no"), ("yesno", "yes_no"), ("Yes-No", "yes_no"),
        ("wh", "wh"), ("wh-", "wh"), ("caption", "wh"), ("unusual", "wh"),
        ("either_or", "either_or"), ("either-or", "either_or"), ("Either/Or", "either_or"),
    ],
)  # fmt: skip
def test_question_type_spellings(value, canonical):
    assert canonical_question_type(value) == canonical


def test_items_that_cannot_be_scored_say_what_to_fix():
    with pytest.raises(ValueError, match="question_type 'essay'"):
        score_answer({**wh("red"), "question_type": "essay"}, "red")
    with pytest.raises(ValueError, match="answer_keywords is empty"):
        score_answer({**wh(), "id": "x-1"}, "red")
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        score_answer(yes_no("red"), "yes")
    with pytest.raises(ValueError, match="list them in the item's 'options'"):
        score_answer(either("What colour is the car?", "red"), "red")
    with pytest.raises(ValueError, match="match 'most'"):
        score_answer(wh("red", match="most"), "red")


def test_item_forms():
    # Keywords as a comma string, synonyms and options as JSON text (Parquet/CSV cells),
    # an object with attributes instead of a dict.
    assert score_answer({**wh(), "answer_keywords": "crimson, red"}, "a red car").correct
    item = either("Which?", "sofa", options='["sofa", "bed"]', synonyms='{"sofa": ["couch"]}')
    assert score_answer(item, "a couch") == Verdict(True, "sofa", "option")

    class Row:
        question = "Is the car red?"
        question_type = "yes/no"
        answer_keywords = ("Yes",)

    assert score_answer(Row(), "Yes.") == Verdict(True, "yes", "yes")


# --- the matching the scorer adds --------------------------------------------------------


def test_contractions_and_clauses():
    assert expand_contractions("It's red, isn't it? I can't; they're") == (
        "it is red, is not it? i can not; they are"
    )
    assert expand_contractions("The dog's won't") == "the dog's will not"
    assert clauses("The car is not red, it is blue.") == ["the car is not red", "it is blue"]
    assert clauses("It costs 3.5, or 1,000.") == ["it costs 3.5", "or 1,000"]
    assert clauses("Red but blue") == ["red", "blue"]


@pytest.mark.parametrize(
    "text,keyword,polarity",
    [
        ("the car is red", "red", True),
        ("the car is not red", "red", False),
        ("the car is not very bright red", "red", False),
        ("no it is red", "red", True),  # "it is" starts a new statement
        ("not that i know of a dog", "dog", True),  # more than three words away
        ("no red car and a red truck", "red", True),  # one occurrence affirmed
        ("the fish is not riding a bicycle", "fish riding a bicycle", False),
        ("neither red nor blue", "blue", False),
        ("it lacks red", "red", False),
        ("he is hardly a doctor", "doctor", False),
        ("a tree lacking leaves", "leaves", False),
        ("a blue car", "red", None),
    ],
)
def test_keyword_polarity(text, keyword, polarity):
    assert keyword_polarity(text, keyword) is polarity


@pytest.mark.parametrize(
    "text,keyword",
    [
        ("Two tabby cats sleep.", "tabby cat"),
        ("a t shirt", "tshirt"),
        ("A T-Shirt", "t shirt"),
        ("a giraffe squeezes down a narrow hallway", "giraffe in a narrow corridor"),
        ("a giraffe on the savanna", "giraffe in a narrow corridor"),
        ("a cat on a sofa", "tabby cat"),
        ("anything", ""),
    ],
)
def test_keyword_positions_agree_with_mentions_keyword(text, keyword):
    assert bool(keyword_positions(text, keyword)) is mentions_keyword(text, keyword)


def test_affirms_keyword():
    assert affirms_keyword("The car is not red, it is blue.", "blue")
    assert not affirms_keyword("The car is not red, it is blue.", "red")
    assert not affirms_keyword("It isn't a dog.", "dog")


# --- accuracy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "correct,n,low,high",
    [
        (8, 10, 0.4902, 0.9433),
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (50, 100, 0.4038, 0.5962),
        (1, 2, 0.0945, 0.9055),
        (0, 0, 0.0, 1.0),
    ],
)
def test_wilson_interval(correct, n, low, high):
    lo, hi = wilson_interval(correct, n)
    assert lo == pytest.approx(low, abs=5e-5)
    assert hi == pytest.approx(high, abs=5e-5)


def test_wilson_interval_z_and_bad_counts():
    lo90, hi90 = wilson_interval(8, 10, z=1.645)
    lo95, hi95 = wilson_interval(8, 10)
    assert lo95 < lo90 < 0.8 < hi90 < hi95
    with pytest.raises(ValueError, match="0 <= correct <= n"):
        wilson_interval(11, 10)


def test_accuracy_table_without_judge_or_human():
    rows = [{"ability": "color", "correct": c} for c in [True] * 8 + [False] * 2]
    rows += [{"ability": "animal", "correct": 1}, {"ability": "animal", "correct": 0}]
    table = accuracy_table(rows)
    assert list(table) == ["overall", "abilities"]
    assert list(table["abilities"]) == ["animal", "color"]
    color = table["abilities"]["color"]
    assert set(color) == {"n", "errors", "correct", "accuracy", "ci_low", "ci_high"}
    assert color["errors"] == 0  # no row failed
    assert (color["n"], color["correct"], color["accuracy"]) == (10, 8, 0.8)
    assert (color["ci_low"], color["ci_high"]) == pytest.approx((0.4902, 0.9433), abs=5e-5)
    overall = table["overall"]
    assert (overall["n"], overall["correct"]) == (12, 9)
    assert overall["accuracy"] == pytest.approx(0.75)
    # A pyarrow table (predictions.parquet read back) gives the same table.
    as_table = [{"ability": r["ability"], "correct": bool(r["correct"])} for r in rows]
    assert accuracy_table(pa.Table.from_pylist(as_table)) == table


def test_accuracy_table_with_judge_and_human():
    rows = [
        {"ability": "color", "correct": True, "judge_correct": True, "human_correct": None},
        {"ability": "color", "correct": False, "judge_correct": True, "human_correct": None},
        {"ability": "animal", "correct": True, "judge_correct": None, "human_correct": 1},
        {"ability": "animal", "correct": False, "judge_correct": 0, "human_correct": 0},
        {"ability": "animal", "correct": True, "judge_correct": float("nan"), "human_correct": 1},
    ]
    table = accuracy_table(rows)
    color, animal = table["abilities"]["color"], table["abilities"]["animal"]
    # Keys appear only where that column holds a value.
    assert (color["judge_n"], color["judge_accuracy"]) == (2, 1.0)
    assert "human_accuracy" not in color and "human_n" not in color
    assert (animal["judge_n"], animal["judge_accuracy"]) == (1, 0.0)
    assert animal["human_n"] == 3
    assert animal["human_accuracy"] == pytest.approx(2 / 3)
    overall = table["overall"]
    assert (overall["n"], overall["correct"]) == (5, 3)
    assert (overall["judge_n"], overall["judge_accuracy"]) == (3, pytest.approx(2 / 3))
    assert (overall["human_n"], overall["human_accuracy"]) == (3, pytest.approx(2 / 3))


def test_accuracy_table_empty_and_bad_rows():
    empty = accuracy_table([])
    assert empty["abilities"] == {}
    assert empty["overall"]["n"] == 0 and empty["overall"]["accuracy"] is None
    assert (empty["overall"]["ci_low"], empty["overall"]["ci_high"]) == (0.0, 1.0)
    with pytest.raises(ValueError, match="row 0: no 'ability'"):
        accuracy_table([{"correct": True}])
    with pytest.raises(ValueError, match="row 1: judge_correct is 'maybe'"):
        accuracy_table(
            [
                {"ability": "a", "correct": 1},
                {"ability": "a", "correct": 1, "judge_correct": "maybe"},
            ]
        )


def test_agreement():
    assert agreement([True, False, True, True], [True, True, True, False]) == 0.5
    assert agreement([True, None, False], [True, False, None]) == 1.0  # None skipped
    assert agreement([1, 0], [True, False]) == 1.0
    assert agreement([None], [True]) is None
    assert agreement([], []) is None
    assert math.isclose(agreement([True, True, False], [True, True, True]), 2 / 3)
    with pytest.raises(ValueError, match="differ in length"):
        agreement([True], [True, False])
