"""One failure contract for LLM requests: every result says which kind of failure it is.

Every :class:`~raypipe.llm.base.LLMResult` carries ``failure``, one of ``KINDS``, taken
from this table (``kind_of`` for an attempt's exception, :func:`content_failure` for
an answer that arrived):

=======================================================  ============  ===============
what happened                                            kind          what follows
=======================================================  ============  ===============
an answer with text                                      ``none``      parsed by the stage
HTTP 408, 409, 429, any 5xx                              ``transient`` retried; then handed back
connection refused/reset, DNS, TLS                       ``transient`` retried; then handed back
no first token within ``llm.first_token_timeout_s``      ``transient`` retried; then handed back
no chunk within ``llm.idle_timeout_s`` once streaming    ``transient`` retried; then handed back
``llm.deadline_s`` passed; a non-streamed attempt over   ``transient`` retried; then handed back
``llm.timeout_s``; a 200 body that is not a completion;
an error event inside the stream
empty completion, ``finish_reason`` ``length`` or        ``content``   a reject with its reason
``content_filter``, a refusal; (in the stage) an answer
that does not parse
HTTP 400 (except a parameter the client can drop:        ``fatal``     the run stops at once,
``stream_options``/``stream`` under ``llm.stream=auto``),               quoting the server
401, 403, 404, 413 and any other 4xx
=======================================================  ============  ===============

This layer never turns a transient failure into a reject: it retries up to
``llm.max_attempts`` and then returns ``failure="transient"``; what the stream does with
such a row is the generation stage's business. A ``fatal`` failure is raised by the
caller as :class:`LLMFatalError` (an :class:`~raypipe.errors.EndpointError`) with the
server's own message.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the offline backend's actors never load the SDK
    import openai

from raypipe.errors import EndpointError

NONE, TRANSIENT, CONTENT, FATAL = "none", "transient", "content", "fatal"
#: The kinds of ``LLMResult.failure``.
KINDS = (NONE, TRANSIENT, CONTENT, FATAL)
#: Statuses retried besides 429 and 5xx (request timeout, conflict), as the openai SDK does.
RETRYABLE_4XX = (408, 409)
#: Pause of the whole job after a 429 that names no Retry-After.
DEFAULT_429_PAUSE_S = 1.0
#: Longest Retry-After raypipe honours; a server asking for more is waited on this long.
MAX_RETRY_AFTER_S = 120.0
#: ``finish_reason`` values that make an answer a content failure.
CONTENT_FINISH = ("length", "content_filter")


class LLMFatalError(EndpointError):
    """The endpoint refused a request in a way no retry mends (401, 403, 404, 400, ...):
    the run stops at once with the server's message."""


class MalformedResponse(Exception):
    """A 200 answer whose body is not a chat completion (transient)."""


class StreamTimeout(TimeoutError):
    """A streamed attempt made no progress in time (first token, idle, or deadline)."""


class StreamError(Exception):
    """The server sent an error event inside a stream that had started (transient)."""


def kind_of(exc: BaseException) -> str:
    """The failure kind of an attempt's exception (see the module's table)."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        code = exc.status_code
        if code == 429 or code >= 500 or code in RETRYABLE_4XX:
            return TRANSIENT
        return FATAL
    if isinstance(
        exc,
        (
            openai.APIConnectionError,
            asyncio.TimeoutError,
            TimeoutError,
            MalformedResponse,
            StreamError,
            openai.APIError,  # an error event in a stream (no status)
        ),
    ):
        return TRANSIENT
    return FATAL  # a bug or an unknown error: stop rather than retry it forever


def is_retryable(exc: BaseException) -> bool:
    return kind_of(exc) == TRANSIENT


def content_failure(text: str | None, finish: str | None, refusal: str | None) -> str | None:
    """Why an answer that arrived is unusable (``<reason>: <detail>``), else None."""
    if refusal:
        return f"refusal: {refusal[:200]}"
    if finish in CONTENT_FINISH:
        return f"{'max_tokens' if finish == 'length' else finish}: finish_reason={finish}"
    if not text:
        return f"empty_completion: the model returned no text (finish_reason={finish})"
    return None


def retry_after_s(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def server_message(exc: openai.APIStatusError) -> str:
    """The server's own message of an error answer (OpenAI's ``{"error": {"message"}}``)."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return exc.message


def describe(exc: BaseException) -> str:
    """``<reason>: <short detail>`` for an attempt's exception (not yet scrubbed)."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        return f"http_{exc.status_code}: {server_message(exc)}"
    if isinstance(exc, StreamTimeout):
        return f"timeout: {exc}"
    if isinstance(exc, (openai.APITimeoutError, asyncio.TimeoutError, TimeoutError)):
        return "timeout: no answer within the per-attempt timeout (llm.timeout_s)"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        return f"connection: {type(cause).__name__ if cause else 'connection error'}"
    if isinstance(exc, MalformedResponse):
        return f"bad_response: {exc}"
    if isinstance(exc, (StreamError, openai.APIError)):
        return f"stream_error: {exc}"
    return f"error: {type(exc).__name__}: {exc}"


def fatal_message(error: str) -> str:
    """What the run says when it stops on a fatal failure (``error``: the server's)."""
    return (
        f"the LLM endpoint refused a request, so the run stops: {error}. Fix the setting "
        "it names (llm.api_key_env, llm.model, llm.base_url, ...) and run the same command "
        "again to resume."
    )


def fatal_cause(exc: BaseException | None) -> LLMFatalError | None:
    """The :class:`LLMFatalError` inside ``exc`` (a Ray task error wraps it), if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, LLMFatalError):
            return exc
        cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError
        if isinstance(cause, BaseException) and id(cause) not in seen:
            exc = cause
            continue
        exc = exc.__cause__ or exc.__context__
    return None


# ---------------------------------------------------------------------------------------
# Parameters a server refuses (fatal unless the client can drop them)
# ---------------------------------------------------------------------------------------

#: Request parameters that differ between reasoning and classic chat models.
SHAPE_PARAMS = ("max_tokens", "max_completion_tokens", "temperature")
#: Parameters the client sends only when the server takes them (llm.stream, structured).
OPTIONAL_PARAMS = ("stream_options", "stream", "response_format")
#: Words with which servers refuse a parameter (OpenAI, vLLM's and pydantic's validators).
REFUSAL_WORDS = ("unsupported", "not supported", "unrecognized", "unknown", "extra", "permitted")


def refused_parameter(exc: BaseException, params: tuple[str, ...] = SHAPE_PARAMS) -> str | None:
    """The request parameter among ``params`` that a 400/422 answer refuses, if any."""
    import openai

    if not isinstance(exc, openai.APIStatusError) or exc.status_code not in (400, 422):
        return None
    body = exc.body if isinstance(exc.body, dict) else {}
    inner = body.get("error") if isinstance(body.get("error"), dict) else body
    if inner.get("param") in params:
        return inner["param"]
    text = f"{inner.get('message') or exc.message} {inner.get('code') or ''}".lower()
    if not any(word in text for word in REFUSAL_WORDS):
        return None
    # Longest names first: "stream_options" also contains "stream".
    ordered = sorted(params, key=len, reverse=True)
    quoted = [p for p in ordered if f"'{p}'" in text or f"`{p}`" in text or f'"{p}"' in text]
    named = quoted or [p for p in ordered if p in text]
    return named[0] if named else None


def parameter_hint(param: str, reasoning_on: bool) -> str:
    """What to set when the server refused ``param`` (see ``llm.reasoning``)."""
    if reasoning_on:
        return (
            f"the server refuses {param!r}, which llm.reasoning=on sends "
            "(max_completion_tokens, no temperature): set llm.reasoning=off for servers and "
            "models that take max_tokens and temperature."
        )
    return (
        f"the server refuses {param!r}, as OpenAI's reasoning models (o1, o3, o4-mini, gpt-5, "
        "...) do: set llm.reasoning=on (max_completion_tokens, no temperature)."
    )


def is_timeout(exc: BaseException) -> bool:
    import openai

    return isinstance(exc, (openai.APITimeoutError, asyncio.TimeoutError, TimeoutError))


def retry_wait(
    exc: BaseException, attempt: int, initial_s: float, cap_s: float
) -> tuple[float, float | None]:
    """``(wait before the next attempt, pause for the whole job or None)``.

    The server's ``Retry-After`` (or a bare 429's ``DEFAULT_429_PAUSE_S``) is a pause
    for the job, waited with up to 10% jitter; anything else backs off exponentially
    from ``initial_s`` (``llm.backoff_initial_s``) to ``cap_s``, jittered.
    """
    import openai

    after = None
    if isinstance(exc, openai.APIStatusError):
        after = retry_after_s(exc.response.headers)
        if after is None and exc.status_code == 429:
            after = DEFAULT_429_PAUSE_S
    if after is not None:
        after = min(after, MAX_RETRY_AFTER_S)
        return after + random.uniform(0, min(1.0, 0.1 * after)), after
    base = min(cap_s, initial_s * 2 ** (attempt - 1))
    return min(cap_s, base + random.uniform(0, base)), None


def error_text(exc: BaseException, reasoning: bool) -> str:
    """:func:`describe`, with what to set when a reasoning parameter was refused."""
    error = describe(exc)
    param = refused_parameter(exc)
    if param is not None:
        error += f" ({parameter_hint(param, reasoning)})"
    return error
