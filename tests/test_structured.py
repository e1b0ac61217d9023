"""Structured output schemas and their parsers, and the vllm backend's request helpers
(no vLLM needed: these run in the main suite)."""

from __future__ import annotations

import json
import re

import pytest

from raypipe.abilities import load_catalog
from raypipe.config import load_config
from raypipe.errors import ConfigError
from raypipe.generate.config import GenerateConfig
from raypipe.llm import tasks as structured
from raypipe.llm.cache import request_key
from raypipe.llm.config import LLMConfig
from raypipe.llm.request_body import request_body
from raypipe.llm.tasks import benchmark_request, dialogue_request, prompt_request
from raypipe.llm.vllm import (
    engine_kwargs,
    finish_reason,
    sampling_params,
)

CATALOG = load_catalog()
KWS = ["crimson", "navy blue", "olive green", "teal", "mustard yellow"]


def color_prompts():
    return structured.with_schema(prompt_request(CATALOG["color"], KWS, key="p/0", seed=7))


def test_prompt_schema_carries_each_keyword_and_fits_max_tokens():
    req = color_prompts()
    assert req.messages[-1]["content"].endswith(structured.prompts.JSON_INSTRUCTION)
    items = req.response_schema["properties"]["prompts"]["prefixItems"]
    assert len(items) == 5
    good = "((navy blue)), old sailing boat, calm harbour, golden hour, photo, 8k"
    assert re.fullmatch(items[1]["pattern"], good)
    assert not re.fullmatch(items[0]["pattern"], good)  # prompt 1 must open with crimson
    assert not re.fullmatch(items[1]["pattern"], good + " (extra)")  # no stray brackets
    # Worst case one token per character: the longest answer (strings, their quotes and
    # commas, the braces and key, the end token) still fits max_tokens.
    longest = sum(
        len(f"(({kw})), ") + int(re.search(r"\{20,(\d+)\}", i["pattern"]).group(1))
        for kw, i in zip(KWS, items)
    )
    assert longest + 3 * len(items) + len('{"prompts":[]}') + 1 <= req.max_tokens


def test_structured_prompts_are_checked_like_text_prompts():
    req = color_prompts()
    answer = {
        "prompts": [
            "((crimson)),\tvintage car, city street,\r\n dramatic light, 8k",
            "((navy blue)), boat",  # too short
            "((olive green)), vintage car, city street, dramatic light, 8k",
            "((teal)), I'm sorry, I can't help with that request today",
        ]
    }
    parsed = structured.parse_prompts_json(json.dumps(answer), req.params["keywords"])
    assert parsed[0].prompt == "((crimson)), vintage car, city street, dramatic light, 8k"
    assert [p.reason for p in parsed] == [None, "too_short", None, "refusal", "missing_prompt"]
    bad = structured.parse_prompts_json('{"prompts": ["((crimson)), a', KWS)
    assert {p.reason for p in bad} == {"invalid_json"}
    # Raw tabs and line breaks inside strings, as a random-weight model writes them.
    raw = '{"prompts":["((crimson)),\tred car on a\nwet street, night, neon, photo"]}'
    assert structured.parse_prompts_json(raw, KWS[:1])[0].ok


def test_structured_dialogue_and_benchmark_go_through_the_same_checks():
    prompt = "((crimson)) vintage car, city street, dramatic lighting, 8k"
    req = structured.with_schema(
        dialogue_request(CATALOG["color"], prompt, "What colour is the car?", key="d/0")
    )
    pattern = req.response_schema["properties"]["description"]["pattern"]
    desc = "The car is painted a deep crimson that shines under the street lights at night."
    assert re.fullmatch(pattern, desc)
    assert not re.fullmatch(pattern, "A red car parked on a street at night, shining brightly.")
    ok = structured.parse_dialogue_json(json.dumps({"prompt": prompt, "description": desc}), prompt)
    assert ok.ok and ok.description == desc
    short = structured.parse_dialogue_json('{"prompt": "x", "description": "crimson car."}', prompt)
    assert short.reason == "too_short"
    assert structured.parse_dialogue_json('{"prompt": "x"}', prompt).reason == "invalid_json"

    bench = structured.with_schema(benchmark_request(CATALOG["color"], prompt, "yes_no", key="b"))
    props = bench.response_schema["properties"]
    assert re.fullmatch(props["question"]["pattern"], "Is the car crimson?")
    assert re.fullmatch(props["response"]["pattern"], "Yes, the car is crimson.")
    answer = {"prompt": prompt, "question": "Is the car crimson?",
              "response": "Yes, the car is crimson.", "keywords": "yes"}  # fmt: skip
    item = structured.parse_benchmark_json(json.dumps(answer), "yes_no")
    assert item.ok and item.answer_keywords == ("yes",)


def test_format_reasons():
    for reason in ("invalid_json", "missing_prompt", "empty", "missing_field:description"):
        assert structured.is_format_reason(reason)
    for reason in ("too_short", "keyword_missing", "refusal", "max_tokens", "duplicate"):
        assert not structured.is_format_reason(reason)


def test_cache_key_is_the_openai_backends_key_for_the_same_request(monkeypatch):
    from raypipe.llm.client import OpenAIBackend

    monkeypatch.setenv("RAYPIPE_STRUCTURED_TEST_KEY", "sk-test")
    req = prompt_request(CATALOG["color"], KWS, key="p/0", seed=7, temperature=0.9)
    cfg = LLMConfig(
        backend="openai", model="m", reasoning="off", api_key_env="RAYPIPE_STRUCTURED_TEST_KEY"
    )
    backend = OpenAIBackend(cfg, None)
    try:
        assert request_key(request_body("m", req)) == request_key(backend._body(req))
    finally:
        backend.close()
    # A schema is part of the request, so of its key.
    assert request_key(request_body("m", color_prompts())) != request_key(request_body("m", req))


def test_sampling_params_and_finish_reason():
    params = sampling_params(color_prompts())
    assert params["seed"] == 7 and params["max_tokens"] == color_prompts().max_tokens
    assert json.loads(params["structured_outputs"]["json"])["type"] == "object"
    assert params["structured_outputs"]["disable_any_whitespace"] is True
    assert finish_reason(608, 5, 608, {2}) == "length"
    assert finish_reason(608, 2, 608, {2}) == "stop"  # ended exactly at max_tokens
    assert finish_reason(100, 5, 608, {2}) == "stop"


def test_vllm_config_and_engine_kwargs():
    cfg = load_config(GenerateConfig, "raypipe/configs/generate/demo-vllm.yaml").llm
    kwargs = engine_kwargs(cfg)
    assert kwargs["max_num_seqs"] == cfg.vllm.batch_size
    assert kwargs["enable_chunked_prefill"] is False  # CPU engines: see engine_kwargs
    gpu = load_config(GenerateConfig, "raypipe/configs/generate/sd15-vllm.yaml").llm
    assert "enable_chunked_prefill" not in engine_kwargs(gpu)
    with pytest.raises(ConfigError, match="structured_output needs llm.backend=openai or vllm"):
        load_config(GenerateConfig, None, ["llm.backend=offline", "llm.structured_output=true"])


def test_engine_gpu_seconds_price_the_llm_per_1000_samples():
    from raypipe.generate.manifest import llm_engine_usage

    cfg = load_config(GenerateConfig, "raypipe/configs/generate/sd15-vllm.yaml")
    service = {"engines_started": 2, "engine_s": 400.0, "found_running": False}
    usage = llm_engine_usage(cfg.llm, {}, service)
    assert usage == {
        "engines": 2, "found_running": False, "engine_s": 400.0, "gpus_per_engine": 1.0,
        "gpu_s": 400.0,
    }  # fmt: skip
    # Engines another run left up: this run started none, and pays for the time it held them.
    reused = llm_engine_usage(
        cfg.llm, {}, {"engines_started": 0, "engine_s": 50.0, "found_running": True}
    )
    assert reused["engines"] == 0 and reused["found_running"] and reused["gpu_s"] == 50.0
    assert llm_engine_usage(cfg.llm, {})["engines"] == 0  # served from OUT/cache
    assert llm_engine_usage(load_config(GenerateConfig, None).llm, {}) is None


def _bounds(req) -> list[int]:
    """Every string bound in a request's schema (maxLength, a pattern's {m,n}): what the
    completion limit sizes."""
    found: list[int] = []

    def walk(node):
        if isinstance(node, dict):
            if "maxLength" in node:
                found.append(node["maxLength"])
            if isinstance(node.get("pattern"), str):
                found.extend(int(n) for n in re.findall(r"\{\d+,(\d+)\}", node["pattern"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(req.response_schema)
    return found


def test_llm_max_tokens_caps_free_text_limits_and_structured_answers_keep_their_bounds():
    prompts = prompt_request(CATALOG["color"], KWS, key="p/0", seed=7)
    dialogue = dialogue_request(CATALOG["color"], "((teal)) car", "What colour?", key="d/x")
    own = prompts.max_tokens  # what k=5 prompts may need
    assert own > 256 and dialogue.max_tokens > 256

    # The default limit (1024) is above every task's own: requests go out unchanged.
    default = LLMConfig(backend="openai", model="m", structured_output=False)
    assert structured.for_run(prompts, default) == prompts

    capped = LLMConfig(backend="openai", model="m", max_tokens=256, structured_output=False)
    sent = structured.for_run(prompts, capped)
    assert sent.max_tokens == 256 and structured.for_run(dialogue, capped).max_tokens == 256
    assert request_key(request_body("m", sent)) != request_key(request_body("m", prompts))

    # Structured: the schema bounds the answer within the task's own limit, which stays.
    on = capped.model_copy(update={"structured_output": True})
    for req in (prompts, dialogue):
        sent = structured.for_run(req, on)
        assert sent.max_tokens == req.max_tokens
        assert sent.response_schema == structured.with_schema(req).response_schema
        assert all(n >= 0 for n in _bounds(sent))


def test_a_reasoning_model_gets_llm_max_tokens_for_its_thinking():
    prompts = prompt_request(CATALOG["color"], KWS, key="p/0", seed=7)
    cfg = LLMConfig(backend="openai", model="o3-mini", max_tokens=8000, structured_output=True)
    sent = structured.for_run(prompts, cfg)
    assert sent.max_tokens == 8000  # sent as max_completion_tokens: thinking + answer
    assert request_body("o3-mini", sent, reasoning=True)["max_completion_tokens"] == 8000
    # the answer's own bounds still follow the task's limit
    assert _bounds(sent) == _bounds(structured.with_schema(prompts))


def test_the_dry_run_counts_the_limit_the_run_sends():
    from raypipe.generate.budget import estimate

    cfg = load_config(GenerateConfig, None, ["num_samples=10", "abilities=[color]"])
    small = cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"max_tokens": 100})})
    full = estimate(cfg, {"color": CATALOG["color"]})["tokens_per_request"]
    capped = estimate(small, {"color": CATALOG["color"]})["tokens_per_request"]
    assert full["prompts"]["completion"] > 100 and capped["prompts"]["completion"] == 100
    assert capped["dialogue"]["completion"] == 100
