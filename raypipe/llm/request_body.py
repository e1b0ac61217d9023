"""The one chat-completion request body: what the ``openai`` backend sends and what the
response cache hashes (the ``vllm`` backend hashes the same body for its cache key).

Transport fields (``stream``, ``stream_options``) are added when sending and are not
part of the body: how an answer travels does not change it, so a streamed and a
non-streamed answer share one cache entry.
"""

from __future__ import annotations

from typing import Any

from raypipe.llm.base import LLMRequest


def request_body(model: str, req: LLMRequest, reasoning: bool = False) -> dict[str, Any]:
    """The body for ``req`` to ``model``.

    ``reasoning`` (``llm.reasoning``): ``max_completion_tokens`` and no ``temperature``,
    as OpenAI's reasoning models require; else ``max_tokens`` and ``temperature``. A
    request with a JSON schema (``llm.structured_output``) carries it as
    ``response_format`` (``json_schema``, strict), as OpenAI, vLLM's server and SGLang
    take it.
    """
    body: dict[str, Any] = {"model": model, "messages": [dict(m) for m in req.messages]}
    if reasoning:  # reasoning models refuse max_tokens and any non-default temperature
        body["max_completion_tokens"] = req.max_tokens
    else:
        body["temperature"] = req.temperature
        body["max_tokens"] = req.max_tokens
    if req.seed is not None:
        body["seed"] = req.seed
    if req.response_schema is not None:
        body["response_format"] = response_format(req.task, req.response_schema)
    return body


def response_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``response_format`` for a JSON schema (strict: the server must follow it)."""
    return {
        "type": "json_schema",
        "json_schema": {"name": name or "answer", "schema": schema, "strict": True},
    }
