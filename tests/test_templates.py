"""The four templates render for every ability, carry what the paper's templates carry,
and are fully determined by their arguments."""

from __future__ import annotations

import dataclasses

import pytest

from raypipe.abilities import ABILITIES, QUESTION_TYPES, load_catalog
from raypipe.llm.tasks import (
    benchmark_request,
    dialogue_request,
    keyword_request,
    prompt_request,
)
from raypipe.llm.tasks.benchmark_items import QUESTION_TYPE_HINTS


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def _user(request) -> str:
    roles = [m["role"] for m in request.messages]
    assert roles == ["system", "user"]
    assert all(m["content"].strip() for m in request.messages)
    return request.messages[1]["content"]


@pytest.mark.parametrize("name", ABILITIES)
def test_prompt_request(catalog, name):
    ability = catalog[name]
    keywords = list(ability.keywords[3:7])
    req = prompt_request(ability, keywords, key=f"prompts/{name}/0", seed=7, temperature=0.5)
    text = _user(req)
    assert (req.task, req.ability, req.key, req.seed, req.temperature) == (
        "prompts",
        name,
        f"prompts/{name}/0",
        7,
        0.5,
    )
    assert req.params["keywords"] == keywords and req.params["k"] == 4
    assert "exactly 4 prompts" in text
    for caution in ability.cautions:
        assert caution in text
    for example in ability.icl_examples:
        assert f"- {example}" in text
    assert ability.keywords[0] in text.split("Keyword examples:")[1]
    assert "double brackets" in text
    # The assigned keywords, numbered in order, after everything else.
    tail = text.split("Keywords to use, one per prompt:")[1]
    assert [line for line in tail.splitlines() if line[:1].isdigit()] == [
        f"{i}. {kw}" for i, kw in enumerate(keywords, 1)
    ]


def test_prompt_request_examples(catalog):
    color = catalog["color"]
    own = ["((periwinkle)) teapot, sunlit kitchen, realistic photo, soft light, 8k"]
    text = _user(prompt_request(color, ["teal"], key="k", examples=own))
    assert own[0] in text and color.sd_examples[0] not in text

    curated = dataclasses.replace(color, curated_examples=tuple(own))
    text = _user(prompt_request(curated, ["teal"], key="k"))
    assert own[0] in text and color.sd_examples[0] not in text


@pytest.mark.parametrize("name", ABILITIES)
def test_dialogue_request(catalog, name):
    ability = catalog[name]
    prompt = ability.sd_examples[0]
    question = ability.questions[1]
    req = dialogue_request(ability, prompt, question, key="d", seed=3, temperature=0.9)
    text = _user(req)
    keyword = req.params["keyword"]
    assert keyword and prompt.startswith(f"(({keyword}))")
    assert f"Question: {question}" in text and f"Prompt: {prompt}" in text
    assert text.rstrip().endswith("Description: <your answer>")
    for ex in ability.dialogue_examples:
        assert f"Prompt: {ex.prompt}\nDescription: " in text
    # The ability's own extra requirement, and no other ability's.
    assert (f"5. {ability.dialogue_focus}" in text) == bool(ability.dialogue_focus)
    for other in catalog.values():
        if other.dialogue_focus and other.name != name:
            assert other.dialogue_focus not in text


def test_abnormal_dialogue_asks_what_is_unusual(catalog):
    text = _user(
        dialogue_request(catalog["abnormal"], catalog["abnormal"].sd_examples[0], "?", "k")
    )
    assert "unusual" in text and "why" in text


def test_dialogue_focus_comes_from_the_ability_file(catalog):
    # A user's ability gets a focus requirement from its file alone, keyword filled in.
    color = dataclasses.replace(
        catalog["color"], dialogue_focus="Name the exact shade of (({keyword})) twice."
    )
    text = _user(dialogue_request(color, "((teal)) umbrella, rainy park, 8k", "?", "k"))
    assert "5. Name the exact shade of ((teal)) twice.\n" in text
    plain = _user(dialogue_request(catalog["color"], "((teal)) umbrella, rainy park", "?", "k"))
    assert "5. " not in plain.split("Examples:")[0]


@pytest.mark.parametrize("name", ABILITIES)
@pytest.mark.parametrize("question_type", QUESTION_TYPES)
def test_benchmark_request(catalog, name, question_type):
    ability = catalog[name]
    prompt = ability.sd_examples[1]
    req = benchmark_request(ability, prompt, question_type, key="b", seed=1, temperature=0.2)
    text = _user(req)
    assert req.params == {
        "prompt": prompt,
        "question_type": question_type,
        "keyword": req.params["keyword"],
    }
    assert QUESTION_TYPE_HINTS[question_type] in text
    for field in ("Prompt:", "Question:", "Response:", "Keywords:"):
        assert field in text
    for ex in ability.benchmark_examples:
        assert f"Question: {ex.question}\nResponse: {ex.answer}" in text
    # Demonstrations of the requested type come first.
    first = text.index("Question: ", text.index("Examples:"))
    wanted = [ex for ex in ability.benchmark_examples if ex.question_type == question_type]
    assert text[first:].startswith(f"Question: {wanted[0].question}")


@pytest.mark.parametrize("name", ABILITIES)
def test_keyword_request(catalog, name):
    ability = catalog[name]
    existing = list(ability.keywords[:10])
    req = keyword_request(ability, 25, existing, key="kw", seed=0)
    text = _user(req)
    assert req.params == {"n": 25, "existing": existing}
    assert "List 25 more keywords" in text
    assert ", ".join(existing) in text
    assert ability.display_name in text


def test_requests_are_deterministic(catalog):
    ab = catalog["animal"]
    args = [
        (prompt_request, (ab, list(ab.keywords[:5]), "k", 1, 0.9)),
        (dialogue_request, (ab, ab.sd_examples[0], ab.questions[0], "k", 1, 0.9)),
        (benchmark_request, (ab, ab.sd_examples[0], "wh", "k", 1, 0.9)),
        (keyword_request, (ab, 10, list(ab.keywords), "k", 1, 0.9)),
    ]
    for fn, a in args:
        assert fn(*a) == fn(*a)
    one = prompt_request(ab, ["lion", "tiger"], "k")
    other = prompt_request(ab, ["tiger", "lion"], "k")
    assert one.messages != other.messages


def test_bad_arguments_raise(catalog):
    ab = catalog["color"]
    with pytest.raises(ValueError, match="question_type"):
        benchmark_request(ab, ab.sd_examples[0], "multiple_choice", "k")
    with pytest.raises(ValueError, match="keywords"):
        prompt_request(ab, [], "k")
    with pytest.raises(ValueError, match="n must be"):
        keyword_request(ab, 0, [], "k")
