"""Predictions of OpenAI-compatible vision endpoints through raypipe's LLM client.

Endpoint inference (:func:`predict_openai`): one chat request per item, the image as a
data URL (``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``,
its stored PNG or JPEG bytes as they are) before the question, temperature 0, through
:class:`raypipe.llm.client.OpenAIBackend` with its response cache, rate limits,
concurrency and retries. A second run over the same items is answered from the cache.
"""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa

from raypipe.errors import ConfigError
from raypipe.evaluate.inference import (
    PREDICTION_COLUMNS,
    EvalModel,
    image_bytes,
    items_table,
    parse_model,
    prediction_table,
)
from raypipe.llm.base import LLMRequest, Secret
from raypipe.llm.config import LLMConfig

log = logging.getLogger(__name__)

__all__ = ["OPENAI_CHUNK", "endpoint_config", "image_data_url", "openai_messages", "predict_openai"]

#: Endpoint requests handed to the client at once (bounds the data URLs held in memory).
OPENAI_CHUNK = 256


def _image_mime(data: bytes) -> str:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return ""


def image_data_url(data: bytes) -> str:
    """``data:image/...;base64,...`` for an image's bytes: PNG, JPEG, WebP and GIF as
    they are (what vision endpoints accept), anything else PIL reads as PNG."""
    mime = _image_mime(data)
    if not mime:
        from PIL import Image

        buf = io.BytesIO()
        with Image.open(io.BytesIO(data)) as img:
            img.convert("RGB").save(buf, format="PNG")
        data, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def openai_messages(question: str, image: bytes) -> tuple[dict[str, Any], ...]:
    """The OpenAI vision form of :func:`vision_messages`: the image as a data URL."""
    return (
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                {"type": "text", "text": question},
            ],
        },
    )


def endpoint_config(model: EvalModel, llm: LLMConfig | None, max_new_tokens: int) -> LLMConfig:
    """The LLM client's config for an endpoint model: ``llm``'s concurrency, limits,
    retries, timeouts and prices, with the model, URL and key variable of ``model``,
    temperature 0 and ``max_tokens`` = ``max_new_tokens``."""
    base = llm or LLMConfig()
    return base.model_copy(
        update={
            "backend": "openai",
            "model": model.model,
            "base_url": model.base_url,
            "api_key_env": model.api_key_env,
            "temperature": 0.0,
            "max_tokens": max_new_tokens,
        }
    )


def predict_openai(
    items: Any,
    model: EvalModel | str,
    cache_dir: str | Path | None,
    *,
    llm: LLMConfig | None = None,
    max_new_tokens: int = 32,
    api_key: Secret | None = None,
    limiter: Any = None,
    check: bool | None = None,
) -> list[dict[str, Any]]:
    """An OpenAI-compatible vision endpoint's answers to benchmark items.

    Args:
        items: a benchmark folder, an item table or item dicts.
        model: an ``openai`` :class:`EvalModel` (or its string, for :func:`parse_model`).
        cache_dir: the response cache (a folder or URI; None: no cache). A re-run with
            the same items, model and settings is answered from it, no HTTP call made.
        llm: client settings (concurrency, requests/tokens per minute, max_attempts,
            timeout_s, prices, cache on/off); its backend, model, URL, key variable,
            temperature and max_tokens are replaced.
        max_new_tokens: the completion limit per answer.
        api_key: a key for processes where the variable is not set (see make_backend).
        limiter: a job-wide limiter handle (:func:`raypipe.llm.limits.start_limiter`).
        check: ask the endpoint first whether it serves the model and takes the
            request parameters (:meth:`OpenAIBackend.check`: fails fast with
            EndpointError, at the cost of one one-token request). None: check unless the
            cache answers every item of the first chunk, so a re-run served from the
            cache sends nothing.

    Returns:
        One prediction row per item, in the items' order; a request that failed after
        every retry has ``prediction`` None and ``error`` set.
    """
    from raypipe.llm import make_backend

    if isinstance(model, str):
        model = parse_model(model)
    if model.kind != "openai":
        raise ConfigError(f"{model.name}: predict_openai needs an openai:MODEL@BASE_URL model")
    table = items_table(items)
    if table.num_rows == 0:
        return []
    cfg = endpoint_config(model, llm, max_new_tokens)
    backend = make_backend(cfg, cache_dir=cache_dir, api_key=api_key, limiter=limiter)
    rows: list[dict[str, Any]] = []
    try:
        for start in range(0, table.num_rows, OPENAI_CHUNK):
            chunk = table.slice(start, OPENAI_CHUNK)
            values, requests, where = _openai_requests(model.name, chunk, max_new_tokens)
            if start == 0 and (check or (check is None and not _all_cached(backend, requests))):
                backend.check()
            results = backend.complete_batch(requests) if requests else []
            rows += _openai_rows(chunk, values, where, results)
        stats = backend.stats()
    finally:
        backend.close()
    log.info(
        "%s: %d answers, %d from the cache, %d HTTP calls, %d failed, %.4f USD",
        model.name,
        stats["requests"],
        stats["cache_hits"],
        stats["http_calls"],
        stats["failures"],
        stats["cost_usd"],
    )
    return rows


def _all_cached(backend, requests: list[LLMRequest]) -> bool:
    """Whether the backend's cache holds an answer to every one of ``requests``."""
    from raypipe.llm.cache import request_key

    cache = getattr(backend, "cache", None)
    if cache is None or not requests:
        return False
    return all(cache.get(request_key(backend._body(r))) is not None for r in requests)


def _openai_requests(
    name: str, chunk: pa.Table, max_new_tokens: int
) -> tuple[dict[str, list], list[LLMRequest], list[int]]:
    """The chunk's requests, their row positions, and the rows' columns so far (filled
    in for items whose image cannot be sent)."""
    n = chunk.num_rows
    values: dict[str, list] = {k: [None] * n for k in PREDICTION_COLUMNS}
    values["model"] = [name] * n
    requests, where = [], []
    for i, row in enumerate(chunk.select(["id", "ability", "image", "question"]).to_pylist()):
        data = image_bytes(row["image"])
        try:
            if data is None:
                raise ValueError("no image bytes")
            messages = openai_messages(row["question"] or "", data)
        except Exception as e:  # noqa: BLE001 - one bad image is that item's error
            values["error"][i] = f"image: {type(e).__name__}: {e}"
            for k in ("latency_s", "batch_latency_s", "prompt_tokens", "completion_tokens"):
                values[k][i] = 0
            values["cached"][i], values["cost_usd"][i] = False, 0.0
            continue
        requests.append(
            LLMRequest(
                key=f"predict/{name}/{row['id']}",
                task="predict",
                ability=row["ability"] or "",
                messages=messages,
                temperature=0.0,
                max_tokens=max_new_tokens,
            )
        )
        where.append(i)
    return values, requests, where


def _openai_rows(chunk: pa.Table, values: dict[str, list], where: list[int], results) -> list:
    for i, res in zip(where, results):
        values["prediction"][i] = res.text.strip() if res.text is not None else None
        values["error"][i] = res.error
        values["latency_s"][i] = values["batch_latency_s"][i] = float(res.latency_s)
        values["prompt_tokens"][i] = int(res.prompt_tokens or res.cached_prompt_tokens)
        values["completion_tokens"][i] = int(res.completion_tokens or res.cached_completion_tokens)
        values["cached"][i] = bool(res.cached)
        values["cost_usd"][i] = float(res.cost_usd)
    return prediction_table(chunk, values).to_pylist()
