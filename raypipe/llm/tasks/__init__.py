"""raypipe's four LLM tasks of the StableLLaVA method, one module each.

=============  ==========================  ===============================================
task           module                      asks for
=============  ==========================  ===============================================
``keywords``   :mod:`.keywords`            n more ability keywords (paper §4.3)
``prompts``    :mod:`.prompts`             k SD prompts, ``1. ((keyword)) ...`` (Fig. 4)
``dialogue``   :mod:`.dialogues`           ``Prompt:`` / ``Description:`` (Fig. 4)
``benchmark``  :mod:`.benchmark_items`     ``Question:`` / ``Response:`` / ``Keywords:``
                                           (Fig. 5)
=============  ==========================  ===============================================

Each module holds the whole task: its template text and request builder (an
:class:`~raypipe.llm.base.LLMRequest` whose ``messages`` follow the paper's templates and
whose ``params`` carry the same inputs in structured form), the JSON schema of its answer
under ``llm.structured_output`` (``schema``, with ``JSON_INSTRUCTION``, the line the
template then gains), the parsers of a text and of a JSON answer (tolerant of formatting,
strict on content, never raising: a reject reason instead, see :mod:`.common`), and the
offline writer's answer (``offline_answer``, ``MALFORMED``). A request is fully determined
by its arguments, so its cache key is stable across runs.

Under structured output the schema holds the template's hard rules, built from the
request's own inputs (prompt i opens with ``((keyword i)),``; a dialogue copies its
prompt and names the keyword; a benchmark question opens the way its type asks), and
every string is printable ASCII without quotes, backslashes, parentheses or angle
brackets, bounded so the whole answer fits in ``max_tokens`` even at one character per
token: an answer always ends as valid JSON. JSON is read with ``json.loads(strict=False)``
(a model may put raw tabs or line breaks inside strings); what a schema cannot say is
still checked by the same content checks, with the same reject reasons, and an answer of
the wrong shape is rejected as ``invalid_json``.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

from raypipe.llm.base import LLMRequest
from raypipe.llm.tasks import benchmark_items, dialogues, keywords, prompts
from raypipe.llm.tasks.benchmark_items import (
    BenchmarkParse,
    benchmark_request,
    parse_benchmark,
    parse_benchmark_json,
)
from raypipe.llm.tasks.common import FORMAT_REASONS, detect_refusal, is_format_reason
from raypipe.llm.tasks.dialogues import (
    DialogueParse,
    dialogue_request,
    parse_dialogue,
    parse_dialogue_json,
)
from raypipe.llm.tasks.keywords import (
    ParsedList,
    keyword_request,
    parse_keywords,
    parse_keywords_json,
)
from raypipe.llm.tasks.prompts import (
    PromptParse,
    check_prompt,
    parse_prompts,
    parse_prompts_json,
    prompt_request,
)

__all__ = [
    "FORMAT_REASONS",
    "TASKS",
    "BenchmarkParse",
    "DialogueParse",
    "ParsedList",
    "PromptParse",
    "benchmark_request",
    "check_prompt",
    "detect_refusal",
    "dialogue_request",
    "is_format_reason",
    "keyword_request",
    "parse_benchmark",
    "parse_benchmark_json",
    "parse_dialogue",
    "parse_dialogue_json",
    "parse_keywords",
    "parse_keywords_json",
    "parse_prompts",
    "parse_prompts_json",
    "prompt_request",
    "schema_for",
    "template_texts",
    "with_schema",
]

#: Each task's module, by the name a request's ``task`` carries.
TASKS: dict[str, ModuleType] = {m.TASK: m for m in (keywords, prompts, dialogues, benchmark_items)}


def task_module(task: str) -> ModuleType:
    """The module of ``task``; a ValueError naming the tasks there are."""
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown LLM task {task!r}; the tasks are {', '.join(TASKS)}") from None


def schema_for(req: LLMRequest) -> dict[str, Any]:
    """The JSON schema of ``req``'s answer (its task's ``schema``)."""
    return task_module(req.task).schema(req)


def for_run(req: LLMRequest, llm: Any, structured: bool | None = None) -> LLMRequest:
    """``req`` as a run with LLM settings ``llm`` (an ``LLMConfig``) sends it.

    A task sets the completion limit its answer needs (``max_tokens``: k prompts, one
    dialogue, ...). A free-text request's limit is capped by ``llm.max_tokens``. A
    structured request keeps its task's limit: its schema bounds every string so the
    whole answer ends within that limit, and bounds sized to a smaller one could not
    hold the answer's required parts. A reasoning model's thinking counts against the
    limit too, so for one the limit sent is ``llm.max_tokens`` where that is larger.
    ``structured`` defaults to ``llm.structured_on()``.
    """
    structured = llm.structured_on() if structured is None else structured
    if structured:
        req = with_schema(req)
    if llm.reasoning_on():
        limit = max(req.max_tokens, llm.max_tokens)
    elif structured:
        limit = req.max_tokens
    else:
        limit = min(req.max_tokens, llm.max_tokens)
    return req if limit == req.max_tokens else dataclasses.replace(req, max_tokens=limit)


def with_schema(req: LLMRequest) -> LLMRequest:
    """``req`` under structured output: its schema, and its template's JSON line."""
    messages = list(req.messages)
    last = dict(messages[-1])
    last["content"] = f"{last['content']}\n\n{task_module(req.task).JSON_INSTRUCTION}"
    messages[-1] = last
    return dataclasses.replace(req, messages=tuple(messages), response_schema=schema_for(req))


#: The template constants whose text decides what is asked (the dataset identity's
#: ``templates`` digest), by name and module.
_TEMPLATE_NAMES = {
    keywords: ("KEYWORD_SYSTEM", "KEYWORD_USER"),
    prompts: (
        "PROMPT_SYSTEM", "PROMPT_USER", "PROMPT_MIN_WORDS", "PROMPT_MAX_WORDS",
        "KEYWORD_EXAMPLES_SHOWN",
    ),
    dialogues: ("DIALOGUE_SYSTEM", "DIALOGUE_USER"),
    benchmark_items: ("BENCHMARK_SYSTEM", "BENCHMARK_USER"),
}  # fmt: skip


def template_texts() -> dict[str, Any]:
    """``{name: value}`` of every template constant: what the identity digest hashes.

    The digest of datasets written when the templates were one module also hashed that
    module's ``TYPE_CHECKING`` (False); it stays in, so their identity does not change.
    """
    texts: dict[str, Any] = {"TYPE_CHECKING": False}
    for module, names in _TEMPLATE_NAMES.items():
        texts.update((name, getattr(module, name)) for name in names)
    return texts
