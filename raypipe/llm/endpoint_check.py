"""The start-up check of an ``openai`` endpoint: everything a long run would otherwise
find out one failed request at a time, in a few seconds and before any work.

1. ``GET /models`` (where served): the key is accepted and ``llm.model`` is listed.
2. One request of one token, shaped like the real ones (``max_tokens`` or
   ``max_completion_tokens``, ``temperature``) and sent the way they will be
   (streamed unless ``llm.stream=off``): a server that refuses a parameter fails here.
   Under ``llm.stream=auto`` a server that refuses streaming is noted, and the backend
   sends whole answers (one log line).
3. With ``llm.structured_output`` ``true`` or ``auto``: one request of at most 16
   tokens with a JSON schema as ``response_format``. A refusal fails the run, quoting
   the server's answer (``true``), or turns structured output off with a log line
   (``auto``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import openai

from raypipe.errors import EndpointError
from raypipe.llm.base import LLMRequest
from raypipe.llm.failures import (
    describe,
    is_retryable,
    is_timeout,
    parameter_hint,
    refused_parameter,
    retry_after_s,
    server_message,
)
from raypipe.llm.transport import plain_attempt, streamed_attempt

if TYPE_CHECKING:
    from raypipe.llm.client import OpenAIBackend

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Most tokens the structured-output probe may cost.
PROBE_TOKENS = 16
#: The probe's schema: the smallest object a server must follow.
PROBE_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


async def check(backend: OpenAIBackend, timeout_s: float) -> dict[str, Any]:
    """Steps 1-3 (see the module docstring); raises EndpointError with what to do."""
    client = backend._client.with_options(timeout=timeout_s, max_retries=0)
    start = time.monotonic()
    deadline = start + timeout_s
    models: list[str] = []
    problem = None
    structured: bool | None = None
    try:
        # 1. The served models, where the server lists them.
        try:
            page = await _retrying(client.models.list, deadline)
            models = [m.id for m in page.data]
        except openai.APIStatusError as e:
            if e.status_code not in (404, 405, 501):  # no /models route: probe below
                raise
        if models and backend.model not in models:
            shown = ", ".join(models[:20]) + (" ..." if len(models) > 20 else "")
            problem = (
                f"{backend.base_url} does not list model {backend.model!r}; it serves: "
                f"{shown}. Set llm.model to one of them."
            )
        else:
            # 2. One token, asked with the parameters and the transport real requests use.
            # A probe generates, so a busy server may take as long to start answering it
            # as a real request: it gets a real request's limits, not the listing's.
            probe = backend._client.with_options(max_retries=0)
            allowance = max(timeout_s, backend.first_answer_s())
            await _probe(backend, probe, _ping(backend, 1), time.monotonic() + allowance)
            # 3. Structured output, where asked for.
            if backend.cfg.structured_output is not False:
                structured = await _structured(backend, probe, time.monotonic() + allowance)
    except Exception as e:
        problem = endpoint_problem(backend, e)
    if problem:  # raised out here so the SDK's exception (and its text) is not chained
        raise EndpointError(problem)
    return {
        "base_url": backend.base_url,
        "model": backend.model,
        "models": len(models),
        "latency_s": round(time.monotonic() - start, 3),
        "stream": backend.stream,
        "structured_output": structured if structured is not None else False,
    }


def _ping(backend: OpenAIBackend, max_tokens: int, schema: dict | None = None) -> dict[str, Any]:
    req = LLMRequest(
        key="check",
        task="check",
        ability="",
        # A fresh question each time: never a repeat of an answered request.
        messages=(
            {"role": "user", "content": f'Answer {{"ok": true}}. ping {uuid.uuid4().hex[:8]}'},
        ),
        temperature=backend.cfg.temperature,
        max_tokens=max_tokens,
        response_schema=schema,
    )
    return backend.body(req)


async def _probe(backend: OpenAIBackend, client: Any, body: dict, deadline: float) -> Any:
    """One request sent as real ones are; under ``llm.stream=auto`` a refusal of
    streaming switches the backend to whole answers and the probe is sent again."""

    def send() -> Awaitable[Any]:
        if backend.stream:
            return streamed_attempt(client, body, backend.timeouts)
        return plain_attempt(client, body, max(0.01, deadline - time.monotonic()))

    while True:
        try:
            return await _retrying(send, deadline)
        except openai.APIStatusError as e:
            if not backend._drop_stream(e):
                raise


async def _structured(backend: OpenAIBackend, client: Any, deadline: float) -> bool:
    """Step 3: whether the server takes ``response_format`` with a JSON schema."""
    body = _ping(backend, PROBE_TOKENS, PROBE_SCHEMA)
    try:
        answer = await _probe(backend, client, body, deadline)
    except openai.APIStatusError as e:
        if e.status_code not in (400, 422):
            raise
        said = backend._scrub(server_message(e))[:300]
        if backend.cfg.structured_output == "auto":
            log.warning(
                "%s refuses response_format with a JSON schema (HTTP %d: %s): structured "
                "output is off for this run (llm.structured_output=auto).",
                backend.base_url, e.status_code, said,
            )  # fmt: skip
            return False
        raise EndpointError(
            f"{backend.base_url} refuses structured output for model {backend.model!r}: it "
            f"answered a request with response_format (json_schema) with HTTP "
            f"{e.status_code}: {said}. Set llm.structured_output=false (or auto, to use it "
            "where the server takes it)."
        ) from None
    usage = answer.usage or {}
    backend._count(
        requests=1,
        http_calls=1,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )
    return True


async def _retrying(call: Callable[[], Awaitable[T]], deadline: float) -> T:
    """``call()`` until it succeeds, fails for good, or ``deadline`` passes: a 429 or
    5xx at start-up is retried (after Retry-After when it fits), not fatal."""
    attempt = 0
    while True:
        attempt += 1
        left = deadline - time.monotonic()
        try:
            return await asyncio.wait_for(call(), max(0.01, left))
        except openai.APIStatusError as e:  # unreachable or refused: fail at once
            if not is_retryable(e):
                raise
            wait = retry_after_s(e.response.headers) or min(2.0, 0.1 * 2**attempt)
            if time.monotonic() + wait >= deadline:
                raise
            await asyncio.sleep(wait)


def endpoint_problem(backend: OpenAIBackend, exc: Exception) -> str:
    """What went wrong reaching the endpoint, and what to do, for an EndpointError."""
    var, url = backend.cfg.api_key_env, backend.base_url
    if isinstance(exc, EndpointError):
        return str(exc)
    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return (
            f"{url} refused the API key in ${var} (HTTP {exc.status_code}): set {var} to "
            "a valid key for this endpoint (llm.api_key_env names the variable)."
        )
    if isinstance(exc, openai.NotFoundError):
        return (
            f"{url} does not serve model {backend.model!r} (HTTP 404): check llm.model and "
            "llm.base_url (it usually ends in /v1)."
        )
    param = refused_parameter(exc)
    if param is not None:
        return backend._scrub(
            f"{url} refused a request for model {backend.model!r} ({describe(exc)}): "
            + parameter_hint(param, backend.reasoning)
        )
    if isinstance(exc, openai.APIStatusError):
        return backend._scrub(f"{url} answered {describe(exc)}: check the server's log.")
    if isinstance(exc, (openai.APIConnectionError, asyncio.TimeoutError, TimeoutError)):
        what = "did not answer in time" if is_timeout(exc) else "is unreachable"
        return (
            f"the LLM endpoint {url} {what}: check llm.base_url, that the server is "
            "running (e.g. `vllm serve <model> --port 8000`) and reachable from this "
            "machine."
        )
    return backend._scrub(f"checking {url} failed: {describe(exc)}")
