"""One HTTP attempt of a chat completion, streamed or not, timed by its progress.

A streamed attempt (``llm.stream``) fails only when it makes no progress: no first
token within ``first_token_s`` (a reasoning model streams nothing while it thinks, so
its default is longer), or no chunk within ``idle_s`` once tokens flow; an optional
``deadline_s`` bounds the whole attempt. A long answer at a slow token rate therefore
completes however long it takes, and a stalled one fails (transient) in about
``idle_s``. Usage comes from the final chunk (``stream_options.include_usage``); a
server that sends none gets its usage counted from the text and marked estimated.

A non-streamed attempt (``llm.stream=off``, or ``auto`` after a server refused
streaming) waits at most ``llm.timeout_s`` for the whole answer.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import openai

from raypipe.llm.failures import MalformedResponse, StreamError, StreamTimeout

#: Fields a streamed request adds to the body (not part of it: see request_body).
STREAM_FIELDS = {"stream": True, "stream_options": {"include_usage": True}}


@dataclass
class Answer:
    """What one successful attempt returned."""

    text: str | None
    finish_reason: str | None
    usage: dict[str, Any] = field(default_factory=dict)
    refusal: str | None = None
    #: usage counted from the text (the server sent none)
    estimated: bool = False


@dataclass(frozen=True)
class Timeouts:
    """Progress limits of one streamed attempt, in seconds (``None``: no limit)."""

    first_token_s: float
    idle_s: float
    deadline_s: float | None = None


def estimate_tokens(text: str) -> int:
    """About 4 characters per token, as OpenAI's guidance has it."""
    return max(1, len(text) // 4) if text else 0


def estimate_prompt_tokens(messages: tuple[dict[str, str], ...] | list[dict[str, str]]) -> int:
    """About 4 characters per token plus a few per message."""
    return 3 + sum(4 + len(str(m.get("content") or "")) // 4 for m in messages)


async def plain_attempt(client: Any, body: dict[str, Any], timeout_s: float, httpx: Any) -> Answer:
    """A non-streamed attempt: the whole answer within ``timeout_s``."""
    # post() with a plain body: the same request chat.completions.create sends,
    # without its per-call type transform (a large share of the CPU per call).
    response = await asyncio.wait_for(
        client.post("/chat/completions", body=body, cast_to=httpx.Response), timeout=timeout_s
    )
    return parse_completion(response.content, response.status_code)


def parse_completion(content: bytes, status: int) -> Answer:
    """A whole (non-streamed) chat completion body; MalformedResponse if it is none."""
    try:
        data = json.loads(content)
        choice = data["choices"][0]
        message = choice["message"]
        text = message.get("content")
        usage = data.get("usage") or {}
        if not isinstance(usage, dict) or not (text is None or isinstance(text, str)):
            raise TypeError("unexpected field types")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise MalformedResponse(
            f"HTTP {status} body is not a chat completion ({type(e).__name__})"
        ) from None
    return Answer(text, choice.get("finish_reason"), usage, message.get("refusal"))


async def streamed_attempt(client: Any, body: dict[str, Any], limits: Timeouts) -> Answer:
    """A streamed attempt: chunks until the end, each within the progress limits."""
    start = time.monotonic()
    deadline = start + limits.deadline_s if limits.deadline_s else None

    def wait_for(first: bool) -> tuple[float, str]:
        """How long the next step may take, and what it is called when it does not come."""
        if first:
            left, what = limits.first_token_s - (time.monotonic() - start), "first_token"
        else:
            left, what = limits.idle_s, "idle"
        if deadline is not None and deadline - time.monotonic() < left:
            left, what = deadline - time.monotonic(), "deadline"
        return max(0.0, left), what

    def timed_out(what: str) -> StreamTimeout:
        if what == "first_token":
            text = f"no first token within {limits.first_token_s:g} s (llm.first_token_timeout_s)"
        elif what == "idle":
            text = f"the stream stalled for {limits.idle_s:g} s (llm.idle_timeout_s)"
        else:
            text = f"the answer took longer than {limits.deadline_s:g} s (llm.deadline_s)"
        return StreamTimeout(text)

    left, what = wait_for(True)
    try:
        stream = await asyncio.wait_for(
            client.post(
                "/chat/completions",
                body={**body, **STREAM_FIELDS},
                cast_to=object,
                stream=True,
                stream_cls=openai.AsyncStream[object],
            ),
            left,
        )
    except asyncio.TimeoutError:
        raise timed_out(what) from None
    response = stream.response
    if "event-stream" not in response.headers.get("content-type", ""):
        # A server that ignores "stream" answers whole: read it as such.
        try:
            content = await asyncio.wait_for(response.aread(), wait_for(True)[0])
        except asyncio.TimeoutError:
            raise timed_out(what) from None
        finally:
            await stream.close()
        return parse_completion(content, response.status_code)
    pieces: list[str] = []
    refusal: list[str] = []
    finish: str | None = None
    usage: dict[str, Any] = {}
    started = False
    chunks = stream.__aiter__()
    try:
        while True:
            left, what = wait_for(not started)
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), left)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise timed_out(what) from None
            if not isinstance(chunk, dict):
                raise MalformedResponse(f"a stream chunk is not a JSON object: {chunk!r:.80}")
            if chunk.get("error"):
                raise StreamError(str(chunk["error"])[:300])
            if isinstance(chunk.get("usage"), dict):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                if delta.get("content"):
                    pieces.append(delta["content"])
                if delta.get("refusal"):
                    refusal.append(delta["refusal"])
                # Reasoning text counts as progress (it is not part of the answer).
                if delta.get("content") or delta.get("refusal") or _reasoning(delta):
                    started = True
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
                    started = True
    finally:
        await stream.close()
    text = "".join(pieces) if pieces else None
    answer = Answer(text, finish, usage, "".join(refusal) or None)
    if not usage:
        answer.estimated = True
        answer.usage = {
            "prompt_tokens": estimate_prompt_tokens(body.get("messages") or ()),
            "completion_tokens": estimate_tokens(text or ""),
        }
    return answer


def _reasoning(delta: dict[str, Any]) -> bool:
    return bool(delta.get("reasoning_content") or delta.get("reasoning"))
