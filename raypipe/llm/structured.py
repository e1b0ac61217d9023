"""Structured output (``llm.structured_output``): a JSON schema per request, answers read
back through the same content checks as the text templates.

With structured output on, each request keeps its template and adds one line that names
the same fields as JSON (``{"prompts": [...]}``, ``{"prompt": ..., "description": ...}``,
...), and carries a JSON schema (:attr:`LLMRequest.response_schema`) that the ``vllm``
backend hands to vLLM's structured outputs, so the engine can only write text of that
shape. The schema holds the template's hard rules, built from the request's own inputs:

- prompt i is a string that opens with ``((keyword i)),`` (a ``pattern``);
- a dialogue copies its prompt (``const``) and its description names the keyword;
- a benchmark question opens the way its type asks (``Is ...?``, ``What ...?``,
  ``... or ...?``) and a yes/no response opens with Yes or No;
- every string is printable ASCII without quotes, backslashes, parentheses or angle
  brackets inside, and
  bounded so the whole answer fits in the request's ``max_tokens`` even at one character
  per token: an answer always ends (no cut at ``max_tokens``) as valid JSON.

JSON is compact (no whitespace between fields: ``disable_any_whitespace``), and read
with ``json.loads(strict=False)``, since a model may put raw tabs or line breaks inside
strings. What the schema cannot say is still checked by :mod:`raypipe.llm.parsing`
(lengths in words, refusals, duplicates, a description that talks about the prompt,
answer keywords that the response names), with the same reject reasons; an answer that
is not JSON of the expected shape is rejected as ``invalid_json``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from raypipe.llm.base import LLMRequest
from raypipe.llm.parsing import (
    BenchmarkParse,
    DialogueParse,
    ParsedList,
    PromptParse,
    benchmark_from_fields,
    check_prompt,
    detect_refusal,
    dialogue_from_fields,
    parse_keywords,
)
from raypipe.matching import phrase_key

#: Characters of a string field: printable ASCII but ``"``, ``\\``, ``(``, ``)``, ``<``
#: and ``>`` (one token each at worst, never an escape, an unbalanced bracket or the
#: text of a special token such as ``</s>`` or ``<image>``, which a later request that
#: copies the string would turn into that token).
SAFE = r"[ !#-'*-;=?-\[\]-~]"
#: Tokens allowed for the JSON around the strings (braces, keys, commas), per field.
JSON_OVERHEAD_TOKENS = 16

#: The line each template gets under structured output: the same fields, as JSON.
JSON_INSTRUCTIONS = {
    "keywords": 'Answer as JSON: {"keywords": ["keyword", ...]}.',
    "prompts": (
        'Answer as JSON: {"prompts": ["((keyword 1)), ...", "((keyword 2)), ...", ...]}, '
        "one string per keyword, in the order of the keywords."
    ),
    "dialogue": 'Answer as JSON: {"prompt": "<the prompt, copied>", "description": "<your answer>"}.',
    "benchmark": (
        'Answer as JSON: {"prompt": "<the prompt, copied>", "question": "<the question>", '
        '"response": "<the correct answer>", "keywords": "<answer keywords, comma-separated>"}.'
    ),
}

#: How a question of each benchmark type must open (a regex over its first words).
QUESTION_OPENINGS = {
    "yes_no": "(Is|Are|Does|Do|Can|Could|Has|Have) ",
    "wh": "(What|Which|Where|How|Who) ",
}


def _regex_literal(text: str) -> str:
    """``text`` as a literal inside a JSON-schema (ECMA) regex."""
    return re.sub(r"([\\^$.|?*+()\[\]{}/-])", r"\\\1", text)


def _string(pattern: str) -> dict[str, Any]:
    return {"type": "string", "pattern": f"^{pattern}$"}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def schema_for(req: LLMRequest) -> dict[str, Any]:
    """The JSON schema of ``req``'s answer (see the module docstring)."""
    budget = req.max_tokens - JSON_OVERHEAD_TOKENS
    if req.task == "keywords":
        n = int(req.params["n"])
        each = max(8, min(40, budget // max(n, 1) - 4))
        return _object(
            {
                "keywords": {
                    "type": "array",
                    "items": _string(f"[a-z][a-z '-]{{1,{each - 1}}}"),
                    "minItems": 1,
                    "maxItems": n,
                }
            }
        )
    if req.task == "prompts":
        keywords = list(req.params["keywords"])
        each = budget // len(keywords) - 4
        items = []
        for kw in keywords:
            head = f"(({kw})), "
            room = max(each - len(head), 24)
            items.append(_string(f"{_regex_literal(head)}{SAFE}{{20,{room}}}"))
        return _object(
            {
                "prompts": {
                    "type": "array",
                    "prefixItems": items,
                    "items": False,
                    "minItems": len(items),
                    "maxItems": len(items),
                }
            }
        )
    prompt = req.params["prompt"]
    budget -= len(prompt) + JSON_OVERHEAD_TOKENS
    if req.task == "dialogue":
        kw = _regex_literal(req.params["keyword"] or "")
        lead = min(60, budget // 4)
        rest = max(budget - lead - len(req.params["keyword"] or "") - 2, 60)
        return _object(
            {
                "prompt": {"const": prompt},
                "description": _string(f"({SAFE}{{0,{lead}}} )?{kw}[ ,.]{SAFE}{{40,{rest}}}"),
            }
        )
    if req.task == "benchmark":
        qtype = req.params["question_type"]
        question, response, keywords = (max(int(budget * f), 24) for f in (0.35, 0.45, 0.2))
        if qtype == "either_or":
            half = question // 2 - 3
            q = f"{SAFE}{{3,{half}}} or {SAFE}{{3,{half}}}\\?"
        else:
            q = f"{QUESTION_OPENINGS[qtype]}{SAFE}{{3,{question}}}\\?"
        r = f"(Yes|No), {SAFE}{{3,{response}}}" if qtype == "yes_no" else f"{SAFE}{{3,{response}}}"
        k = "(yes|no)" if qtype == "yes_no" else f"[a-z][a-z ,'-]{{1,{keywords}}}"
        return _object(
            {"prompt": {"const": prompt}, "question": _string(q), "response": _string(r),
             "keywords": _string(k)}
        )  # fmt: skip
    raise ValueError(f"no structured output schema for task {req.task!r}")


def with_schema(req: LLMRequest) -> LLMRequest:
    """``req`` under structured output: its schema, and the template's JSON line."""
    messages = list(req.messages)
    last = dict(messages[-1])
    last["content"] = f"{last['content']}\n\n{JSON_INSTRUCTIONS[req.task]}"
    messages[-1] = last
    return dataclasses.replace(req, messages=tuple(messages), response_schema=schema_for(req))


def load(text: str | None) -> Any:
    """The JSON value of an answer (raw control characters inside strings allowed), or None."""
    if not text:
        return None
    try:
        return json.loads(text, strict=False)
    except ValueError:
        return None


def _clean(value: str) -> str:
    return " ".join(value.split())


def _strings(obj: Any, names: tuple[str, ...]) -> dict[str, str] | None:
    if not isinstance(obj, dict) or not all(isinstance(obj.get(n), str) for n in names):
        return None
    return {n: _clean(obj[n]) for n in names}


def parse_prompts(text: str | None, keywords: list[str]) -> list[PromptParse]:
    """:func:`raypipe.llm.parsing.parse_prompts` for a ``{"prompts": [...]}`` answer: the
    string at position i is prompt i, checked with :func:`check_prompt`."""
    obj = load(text)
    prompts = obj.get("prompts") if isinstance(obj, dict) else None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        return [
            PromptParse(i, kw, None, "invalid_json", text or "") for i, kw in enumerate(keywords)
        ]
    out, seen = [], set()
    for i, kw in enumerate(keywords):
        if i >= len(prompts):
            out.append(PromptParse(i, kw, None, "missing_prompt"))
            continue
        raw = _clean(prompts[i])
        prompt, reason = (None, "refusal") if detect_refusal(raw) else check_prompt(raw, kw)
        if prompt is not None and phrase_key(prompt) in seen:
            prompt, reason = None, "duplicate"
        if prompt is not None:
            seen.add(phrase_key(prompt))
        out.append(PromptParse(i, kw, prompt, reason, raw))
    return out


def parse_dialogue(text: str | None, prompt: str, keyword: str | None = None) -> DialogueParse:
    """:func:`raypipe.llm.parsing.parse_dialogue` for a ``{"prompt", "description"}`` answer."""
    fields = _strings(load(text), ("description",))
    if fields is None:
        return DialogueParse(None, "invalid_json")
    return dialogue_from_fields(fields, prompt, keyword)


def parse_benchmark(text: str | None, question_type: str) -> BenchmarkParse:
    """:func:`raypipe.llm.parsing.parse_benchmark` for a ``{"question", "response",
    "keywords"}`` answer."""
    fields = _strings(load(text), ("question", "response", "keywords"))
    if fields is None:
        return BenchmarkParse(None, None, (), question_type, "invalid_json")
    if detect_refusal(" ".join(fields.values())):
        return BenchmarkParse(None, None, (), question_type, "refusal")
    return benchmark_from_fields(fields, question_type)


def parse_keywords_json(text: str | None, ability, existing=()) -> ParsedList:
    """:func:`raypipe.llm.parsing.parse_keywords` for a ``{"keywords": [...]}`` answer."""
    obj = load(text)
    items = obj.get("keywords") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        return parse_keywords("", ability, existing)
    lines = "\n".join(f"{i}. {_clean(str(kw))}" for i, kw in enumerate(items, 1))
    return parse_keywords(lines, ability, existing)


#: Reject reasons that say an answer had the wrong shape (not what it said): what
#: structured output is for. ``max_tokens`` (cut) is counted apart.
FORMAT_REASONS = ("empty", "invalid_json", "missing_prompt", "missing_field:", "empty_field:")


def is_format_reason(reason: str) -> bool:
    """Whether ``reason`` is a format reject (see :data:`FORMAT_REASONS`)."""
    return any(reason == r or (r.endswith(":") and reason.startswith(r)) for r in FORMAT_REASONS)
