"""Golden tests for raypipe.matching: the one keyword matcher and emphasis stripper that
parsing, the quality stage and scoring share."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from raypipe.matching import (
    emphasized_keywords,
    find_phrase,
    mentions_any,
    mentions_keyword,
    parse_emphasis,
    stem,
    strip_emphasis,
)

MENTIONS = [
    # (keyword, text, named?)
    # Case.
    ("crimson", "The car is Crimson.", True),
    ("Crimson", "a crimson car", True),
    # Whole words only.
    ("crimson", "The car is crimsonish.", False),
    ("fox", "a firefox logo", False),
    ("cat", "a category of things", False),
    # Plurals, either way round.
    ("berry", "A bowl of berries.", True),
    ("berries", "one berry", True),
    ("bus", "Two buses wait.", True),
    ("horse", "horses in a field", True),
    ("box", "stacked boxes", True),
    ("peach", "ripe peaches", True),
    ("dress", "two dresses", True),
    ("sunflower", "Two Sunflowers in a vase.", True),
    ("sky", "stormy skies", True),
    ("movie", "old movies", True),
    # Verb forms.
    ("running", "the man is running fast", True),
    ("running", "a dog runs", True),
    ("ran", "a dog is running", False),  # irregular forms are not known
    ("smiling", "a smile on her face", True),
    ("painted", "a painting of a boat", True),
    ("stopped", "the car stops", True),
    # Hyphens and closed compounds.
    ("T-shirt", "a tshirt", True),
    ("t shirt", "A T-Shirt on a chair.", True),
    ("tshirt", "a t shirt on a chair", True),
    ("rust", "The rust-coloured door.", True),
    ("navy blue", "a navy-blue coat", True),
    # Multi-word keywords: one or two content words must all be there...
    ("tabby cat", "Two tabby cats sleep on a sofa.", True),
    ("navy blue", "a blue coat", False),
    ("tabby cat", "a cat on a sofa", False),
    # ...a longer one (a short scene) may be paraphrased: half its content words.
    ("giraffe in a narrow corridor", "a giraffe squeezes down a narrow hallway", True),
    ("giraffe in a narrow corridor", "a giraffe on the savanna", False),
    ("fish riding a bicycle", "a goldfish on a bike", False),
    ("fish riding a bicycle", "a fish rides a red bicycle", True),
    # Emphasis forms in the keyword are syntax, not words.
    ("((teal))", "a teal umbrella", True),
    ("(((teal)))", "a teal umbrella", True),
    ("[teal]", "a teal umbrella", True),
    ("(teal:1.4)", "a teal umbrella", True),
    ("((navy blue:1.2))", "a navy blue coat", True),
    # Nothing to name.
    ("", "anything at all", False),
    ("   ", "anything at all", False),
    ("(( ))", "anything at all", False),
]


@pytest.mark.parametrize("keyword,text,named", MENTIONS)
def test_mentions_keyword(keyword, text, named):
    assert mentions_keyword(text, keyword) is named


def test_mentions_any():
    assert mentions_any("a crimson car", ["teal", "crimson"])
    assert not mentions_any("a crimson car", ["teal", "ochre"])
    assert not mentions_any("a crimson car", [])


@pytest.mark.parametrize(
    "forms",
    [
        ("horse", "horses"),
        ("berry", "berries"),
        ("bus", "buses"),
        ("cactus", "cactuses"),
        ("eye", "eyes"),
        ("tree", "trees"),
        ("string", "strings"),
        ("paint", "painted", "painting", "paints"),
        ("bake", "baked", "baking"),
        ("swim", "swimming"),
        ("day", "days"),
    ],
)
def test_stem_meets_word_forms(forms):
    assert len({stem(f) for f in forms}) == 1, {f: stem(f) for f in forms}


@pytest.mark.parametrize("apart", [("glass", "grass"), ("cat", "cart"), ("sky", "ski")])
def test_stem_keeps_words_apart(apart):
    assert stem(apart[0]) != stem(apart[1])


@pytest.mark.parametrize(
    "text,plain,prose",
    [
        ("((crimson)) vintage car", "crimson vintage car", "crimson vintage car"),
        ("(((crimson))) car", "crimson car", "crimson car"),
        ("((crimson:1.3)) car", "crimson car", "crimson car"),
        ("(crimson) car", "crimson car", "(crimson) car"),
        ("[blurry] car", "blurry car", "[blurry] car"),
        ("(sharp:1.4) car", "sharp car", "(sharp:1.4) car"),
        ("a car (left) at 3:30", "a car left at 3:30", "a car (left) at 3:30"),
        (r"a \(literal\) bracket", "a (literal) bracket", r"a \(literal\) bracket"),
        ("(( red )) , car", "red, car", "red , car"),
        ("", "", ""),
    ],
)
def test_strip_emphasis(text, plain, prose):
    assert strip_emphasis(text) == plain
    assert strip_emphasis(text, prose=True) == prose


def test_strip_emphasis_agrees_with_the_render_weights():
    # The plain text is exactly the fragments the render stage weights.
    prompt = "((red)) car, [blurry], (sharp:1.5), (unclosed"
    assert strip_emphasis(prompt) == " ".join("".join(f for f, _ in parse_emphasis(prompt)).split())


def test_emphasized_keywords():
    prompt = "((crimson)) car, ((( city street ))), (sunny:1.2), ((gold:1.3)) trim"
    assert emphasized_keywords(prompt) == ["crimson", "city street", "gold"]
    assert emphasized_keywords("no emphasis (here)") == []


def test_find_phrase_is_exact():
    assert find_phrase("A Navy-Blue coat", "navy blue") == 2
    assert find_phrase("a navyblue coat", "navy blue") is None
    assert find_phrase("navy blues", "navy blue") is None  # no stems here
    assert find_phrase("anything", "") is None


def test_matching_imports_nothing_from_raypipe():
    # Parsing, quality and scoring import it; it must sit below all of them.
    source = Path(__file__).resolve().parents[1] / "raypipe" / "matching.py"
    tree = ast.parse(source.read_text())
    modules = [
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in (n.names if isinstance(n, ast.Import) else [n])
    ]
    assert not [m for m in modules if m and m.startswith("raypipe")], modules
