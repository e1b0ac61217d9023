"""The contract between LLM backends (``openai``, ``offline``) and the stages that use them.

A stage builds :class:`LLMRequest` objects with the template functions, hands a list
of them to a backend's ``complete_batch`` and gets one :class:`LLMResult` per request,
in order. A backend never raises for one bad request: a request that failed after
all retries comes back with ``text=None`` and ``error`` set, and the stage turns it
into a reject row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

#: The LLM tasks raypipe renders templates for.
TASKS = ("keywords", "prompts", "dialogue", "benchmark")


class Secret:
    """Holds an API key; prints as *** so it never lands in a log, repr or traceback,
    and refuses to be pickled, so it never travels in a Ray task's or actor's arguments
    (Ray stores those, and its tools show them): each process reads the key itself
    (raypipe.llm.credentials)."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value

    def __repr__(self) -> str:
        return "***"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError(
            "an API key (raypipe Secret) must not be pickled: it would travel in Ray's task "
            "and actor arguments. Let each process read it from llm.api_key_env or "
            "llm.api_key_file."
        )


@dataclass(frozen=True)
class LLMRequest:
    """One chat-completion request.

    ``messages`` is what an OpenAI-compatible model receives. ``task``, ``ability``
    and ``params`` describe the request in structured form; the offline writer
    answers from them, the openai backend ignores them.
    """

    key: str  # stable name within a run, e.g. "prompts/color/000003"; used in rejects and logs
    task: str  # one of TASKS
    ability: str
    messages: tuple[dict[str, str], ...]  # ({"role": ..., "content": ...}, ...)
    params: dict[str, Any] = field(default_factory=dict)  # task inputs (k, keywords, prompt, ...)
    temperature: float = 0.9
    seed: int | None = None
    max_tokens: int = 1024
    #: JSON schema the answer must follow (``llm.structured_output``; see
    #: raypipe.llm.tasks), or None for the text templates.
    response_schema: dict[str, Any] | None = None


@dataclass
class LLMResult:
    """The outcome of one request, success or failure.

    Usage comes in two kinds that never overlap: ``prompt_tokens``, ``completion_tokens``
    and ``cost_usd`` are what this request paid for (HTTP answers); ``cached_*`` is the
    usage of a stored answer served instead (``cached=True``: no HTTP call, nothing
    paid, so ``cost_usd`` is 0).
    """

    key: str
    text: str | None  # the completion text; None when the request failed
    error: str | None = None  # why it failed (after retries), e.g. "http_429: ...", "timeout"
    #: which kind of failure (raypipe.llm.failures): none, transient, content or fatal
    failure: str = "none"
    prompt_tokens: int = 0  # paid: prompt tokens the endpoint reported for this request
    completion_tokens: int = 0  # paid: completion tokens reported for this request
    cost_usd: float = 0.0  # paid: USD for this request (llm.prices); 0 when cached
    cached: bool = False  # answered from the cache, or by an identical request in flight
    cached_prompt_tokens: int = 0  # served: prompt tokens of the stored answer
    cached_completion_tokens: int = 0  # served: completion tokens of the stored answer
    cached_cost_usd: float = 0.0  # served: what the stored answer cost when it was paid for
    attempts: int = 0  # HTTP attempts made (0 for cache hits and offline)
    latency_s: float = 0.0
    #: Why generation stopped, when known: "stop", or "length" (cut at max_tokens: the
    #: stages reject such an answer as ``max_tokens``, whatever it holds).
    finish_reason: str | None = None
    #: the token usage was counted from the text (the server reported none)
    usage_estimated: bool = False

    @property
    def ok(self) -> bool:
        return self.text is not None


class LLMBackend(Protocol):
    """What stages need from a backend."""

    model: str

    def complete_batch(self, requests: list[LLMRequest]) -> list[LLMResult]:
        """Answer every request (concurrently where the backend can); results in request order."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters: requests, cache_hits, http_calls, retries, failures; paid
        prompt_tokens, completion_tokens, cost_usd; and (openai) the usage served from
        the cache: cached_prompt_tokens, cached_completion_tokens, cached_cost_usd."""
        ...

    def close(self) -> None: ...
