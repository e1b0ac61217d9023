"""The offline writer answers every template, for every ability, in a format the parser
accepts; deterministically; with exact benchmark answers; and injects faults on request."""

from __future__ import annotations

import re

import pytest

from raypipe.abilities import ABILITIES, QUESTION_TYPES, load_catalog
from raypipe.llm.base import LLMRequest
from raypipe.llm.offline import OfflineBackend
from raypipe.llm.tasks import (
    benchmark_request,
    dialogue_request,
    keyword_request,
    parse_benchmark,
    parse_dialogue,
    parse_keywords,
    parse_prompts,
    prompt_request,
)
from raypipe.matching import emphasized_keywords


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


@pytest.fixture()
def backend(catalog):
    return OfflineBackend(catalog=catalog)


def _ask(backend, request: LLMRequest) -> str:
    (result,) = backend.complete_batch([request])
    assert result.ok, result.error
    assert result.cost_usd == 0 and result.attempts == 0
    return result.text


@pytest.mark.parametrize("name", ABILITIES)
def test_every_task_parses_cleanly(catalog, backend, name):
    ability = catalog[name]
    keywords = list(ability.keywords[:8])

    # Prompts: one per keyword, in order, the keyword first and bracketed.
    text = _ask(backend, prompt_request(ability, keywords, key="p", seed=5))
    parsed = parse_prompts(text, keywords)
    assert [p.reason for p in parsed] == [None] * len(keywords), text
    for kw, p in zip(keywords, parsed):
        assert p.prompt.startswith(f"(({kw}))")
        assert p.prompt == p.raw  # already in normal form

    for i, p in enumerate(parsed):
        # Dialogue: 2-4 sentences that name the keyword.
        req = dialogue_request(ability, p.prompt, ability.questions[i], key=f"d{i}", seed=i)
        text = _ask(backend, req)
        dialogue = parse_dialogue(text, p.prompt, p.keyword)
        assert dialogue.ok, (dialogue, text)
        assert p.keyword.lower() in dialogue.description.lower()
        assert 2 <= len(re.findall(r"[.!?](?:\s|$)", dialogue.description)) <= 4
        if name == "abnormal":
            assert "unusual" in dialogue.description

        # Benchmark: each question type, exact answer containing its keywords.
        for qtype in QUESTION_TYPES:
            req = benchmark_request(ability, p.prompt, qtype, key=f"b{i}{qtype}", seed=i)
            item = parse_benchmark(_ask(backend, req), qtype)
            assert item.ok, item
            assert item.question_type == qtype
            assert any(k in item.answer.lower() for k in item.answer_keywords)
            if qtype != "yes_no":
                assert p.keyword.lower() in item.answer_keywords

    # Keywords: new ones only, all from the catalog.
    existing = list(ability.keywords[:20])
    text = _ask(backend, keyword_request(ability, 10, existing, key="k", seed=0))
    listed = parse_keywords(text, ability, existing)
    assert listed.rejects == [] and len(listed.items) == 10
    assert set(listed.items) <= set(ability.keywords) - set(existing)


def test_ability_file_text_reaches_the_offline_dialogue(catalog):
    # A user ability's own focus and explanation sentences, with no code change.
    import dataclasses

    color = catalog["color"]
    custom = dataclasses.replace(
        color,
        name="shade",
        focus_sentences=("Look closely at the {keyword} paint.",),
        explanation_sentence="Few objects are ever painted {a_keyword} shade.",
    )
    backend = OfflineBackend(catalog={"shade": custom})
    prompt = "((ochre)) ceramic vase, white marble table, realistic photo, natural light, 8k"
    text = _ask(backend, dialogue_request(custom, prompt, color.questions[0], key="d", seed=0))
    assert "Look closely at the ochre paint. Few objects are ever painted an ochre shade." in text
    assert parse_dialogue(text, prompt).ok


def test_benchmark_uses_the_catalog_templates(catalog, backend):
    color = catalog["color"]
    prompt = "((teal)) umbrella, rainy park, realistic photo, soft light, 8k"
    seen = set()
    for seed in range(12):
        item = parse_benchmark(
            _ask(backend, benchmark_request(color, prompt, "yes_no", key="b", seed=seed)), "yes_no"
        )
        seen.add((item.question.split(" in the image ")[0], item.answer.split(",")[0]))
    # Both yes/no templates (a "yes" and a "no" item) about the umbrella.
    assert ("Is the umbrella", "Yes") in seen and ("Is the umbrella", "No") in seen


def test_deterministic_in_params_and_seed(catalog):
    ability = catalog["food"]
    reqs = [
        prompt_request(ability, list(ability.keywords[:5]), key="a", seed=1),
        dialogue_request(ability, ability.sd_examples[0], ability.questions[0], key="b", seed=1),
        benchmark_request(ability, ability.sd_examples[0], "wh", key="c", seed=1),
        keyword_request(ability, 5, [], key="d", seed=1),
    ]
    first = [r.text for r in OfflineBackend(catalog=catalog).complete_batch(reqs)]
    again = [r.text for r in OfflineBackend(catalog=catalog).complete_batch(reqs[::-1])][::-1]
    assert first == again
    # The key does not enter; the seed does.
    renamed = prompt_request(ability, list(ability.keywords[:5]), key="other", seed=1)
    reseeded = prompt_request(ability, list(ability.keywords[:5]), key="a", seed=2)
    backend = OfflineBackend(catalog=catalog)
    assert _ask(backend, renamed) == first[0]
    assert _ask(backend, reseeded) != first[0]


def test_prompts_vary_over_seeds(catalog, backend):
    ability = catalog["vehicle"]
    texts = {
        _ask(backend, prompt_request(ability, ["ambulance"], key="p", seed=s)) for s in range(20)
    }
    assert len(texts) >= 15


def test_keyword_bank_exhausted_gives_empty_text(catalog, backend):
    color = catalog["color"]
    text = _ask(backend, keyword_request(color, 5, list(color.keywords), key="k"))
    assert text == ""
    assert [r.reason for r in parse_keywords(text, color, color.keywords).rejects] == ["empty"]


def _with(request: LLMRequest, **params) -> LLMRequest:
    return LLMRequest(**{**request.__dict__, "params": {**request.params, **params}})


def test_injected_faults_go_through_the_parser(catalog, backend):
    color = catalog["color"]
    prompt = color.sd_examples[0]
    reqs = {
        "prompts": prompt_request(color, ["teal", "ochre"], key="p"),
        "dialogue": dialogue_request(color, prompt, color.questions[0], key="d"),
        "benchmark": benchmark_request(color, prompt, "wh", key="b"),
        "keywords": keyword_request(color, 5, [], key="k"),
    }

    def reasons(task: str, text: str) -> list[str]:
        if task == "prompts":
            return sorted({p.reason for p in parse_prompts(text, ["teal", "ochre"])})
        if task == "dialogue":
            return [parse_dialogue(text, prompt).reason]
        if task == "benchmark":
            return [parse_benchmark(text, "wh").reason]
        return sorted({r.reason for r in parse_keywords(text, color).rejects})

    expected_malformed = {
        "prompts": ["missing_prompt"],
        "dialogue": ["missing_field:description"],
        "benchmark": ["missing_field:response"],
        "keywords": ["too_long"],
    }
    for task, req in reqs.items():
        assert reasons(task, _ask(backend, _with(req, inject="refusal"))) == ["refusal"]
        assert reasons(task, _ask(backend, _with(req, inject="empty"))) == ["empty"]
        assert (
            reasons(task, _ask(backend, _with(req, inject="malformed")))
            == (expected_malformed[task])
        )
        (failed,) = backend.complete_batch([_with(req, inject="error")])
        assert failed.text is None and "injected" in failed.error

    stats = backend.stats()
    assert stats["requests"] == 16 and stats["injected"] == 16 and stats["failures"] == 4
    assert stats["cost_usd"] == 0 and stats["http_calls"] == 0


def test_bad_requests_fail_without_raising(catalog, backend):
    color = catalog["color"]
    good = prompt_request(color, ["teal"], key="ok")
    bad_ability = LLMRequest(**{**good.__dict__, "key": "x", "ability": "nope"})
    bad_task = LLMRequest(**{**good.__dict__, "key": "y", "task": "poetry"})
    bad_params = LLMRequest(**{**good.__dict__, "key": "z", "params": {}})
    bad_inject = _with(good, inject="gremlins")
    results = backend.complete_batch([bad_ability, good, bad_task, bad_params, bad_inject])
    assert [r.key for r in results] == ["x", "ok", "y", "z", "ok"]
    assert [r.ok for r in results] == [False, True, False, False, False]
    assert "unknown ability 'nope'" in results[0].error
    assert "unknown task" in results[2].error
    assert "bad params" in results[3].error
    assert "unknown inject value" in results[4].error


def test_is_an_llm_backend(catalog):
    backend = OfflineBackend(catalog={"color": catalog["color"]})
    assert backend.model == "raypipe-offline"
    assert backend.complete_batch([]) == []
    backend.close()
    # Loads the shipped catalog lazily when none is given.
    lazy = OfflineBackend()
    text = _ask(lazy, prompt_request(catalog["plant"], ["tulip"], key="t"))
    assert emphasized_keywords(text.split(". ", 1)[1])[0] == "tulip"
