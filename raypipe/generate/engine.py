"""LLM writing stages on vLLM engines (``llm.backend: vllm``), in the generation stream.

    ds = add_vllm_writer(ds, PromptWriter, cfg, **writer_kwargs)

appends three stages where the other backends have one (raypipe.generate.text):

1. :class:`EngineRequests`: the writer's ``prepare`` half (the same templates, keys and
   seeds), then per request the LLM cache (OUT/cache, keyed as the ``openai`` backend
   keys it) and the prompt's token ids through the model's chat template. A request
   already answered, a row that needs none (rejected upstream, handed back unmade) or a
   prompt too long for ``max_model_len`` still crosses the engine stage (Ray Data has one
   path for every row) as a one-token placeholder whose output is ignored: no persisted
   answer is generated again.
2. The Ray Data LLM processor (:func:`raypipe.llm.vllm_backend.build_engine_processor`):
   an autoscaling pool of vLLM engines, ``llm.vllm.min_engines..max_engines``.
3. :class:`EngineAnswers`: the engine's text and token counts become results, new answers
   are stored in the cache, and the writer's ``finish`` half parses them, with the same
   reject reasons (``max_tokens`` for an answer cut at max_tokens).

The writer's row travels through the engine stage as one JSON column, so the engine
stage sees a fixed schema whatever the writer's rows hold.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pyarrow as pa

from raypipe.generate.stage import Stage, add_stage
from raypipe.llm.base import LLMRequest, LLMResult
from raypipe.llm.vllm_backend import VLLMBackend, decode, finish_reason, sampling_params

#: What the engine stage reads (its ``tokenized_prompt`` and ``sampling_params``) and
#: carries (``rp_payload``: the row, its request, and what the cache said).
REQUEST_SCHEMA = pa.schema(
    [
        ("rp_payload", pa.string()),
        ("tokenized_prompt", pa.list_(pa.int64())),
        (
            "sampling_params",
            pa.struct(
                [
                    ("max_tokens", pa.int64()),
                    ("temperature", pa.float64()),
                    ("seed", pa.int64()),
                    (
                        "structured_outputs",
                        pa.struct([("json", pa.string()), ("disable_any_whitespace", pa.bool_())]),
                    ),
                ]
            ),
        ),
    ]
)
#: Sampling of a placeholder request (one greedy token, output ignored).
PLACEHOLDER = {"max_tokens": 1, "temperature": 0.0, "seed": None, "structured_outputs": None}


class _WriterHalf(Stage):
    """A writer (raypipe.generate.text) built in this actor; its backend is a VLLMBackend."""

    def __init__(self, writer: type, writer_kwargs: dict[str, Any]):
        self.writer = writer(**writer_kwargs)
        self.backend: VLLMBackend = self.writer.backend
        if not isinstance(self.backend, VLLMBackend):  # pragma: no cover - wiring error
            raise TypeError(f"{type(self).__name__} needs llm.backend=vllm")


class EngineRequests(_WriterHalf):
    """Step 1 (see the module docstring): rows -> engine requests."""

    OUTPUT_COLUMNS = ("rp_payload", "tokenized_prompt", "sampling_params")

    def __init__(self, writer: type, writer_kwargs: dict[str, Any]):
        super().__init__(writer, writer_kwargs)
        self.INPUT_COLUMNS = writer.INPUT_COLUMNS
        self.bos = [self.backend.tokenizer.bos_token_id or 0]

    def process(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out = []
        for row, req in zip(rows, self.writer.prepare(rows)):
            payload: dict[str, Any] = {"row": row, "request": None, "cached": None, "error": None}
            ids, sampling = self.bos, PLACEHOLDER
            if req is not None:
                payload["request"] = dataclasses.asdict(req)
                entry = self.backend.cached(req)
                if entry is not None:
                    payload["cached"] = entry
                else:
                    prompt_ids, error = self.backend.prompt_ids(req)
                    if error:
                        payload["error"] = error
                    else:
                        ids, sampling = prompt_ids, sampling_params(req)
            out.append(
                {
                    "rp_payload": json.dumps(payload),
                    "tokenized_prompt": ids,
                    "sampling_params": sampling,
                }
            )
        return pa.Table.from_pylist(out, schema=REQUEST_SCHEMA)


class EngineAnswers(_WriterHalf):
    """Step 3 (see the module docstring): engine outputs -> the writer's rows."""

    INPUT_COLUMNS = ("rp_payload",)

    def process(self, batch: pa.Table) -> pa.Table:
        rows, requests, results = [], [], []
        for rec in batch.to_pylist():
            payload = json.loads(rec["rp_payload"])
            data = payload["request"]
            req = (
                None
                if data is None
                else LLMRequest(**{**data, "messages": tuple(data["messages"])})
            )
            rows.append(payload["row"])
            requests.append(req)
            results.append(None if req is None else self.result(req, payload, rec))
        return self.writer.finish(rows, requests, results)

    def result(self, req: LLMRequest, payload: dict[str, Any], rec: dict[str, Any]) -> LLMResult:
        if payload["cached"] is not None:
            return self.backend.served(req, payload["cached"])
        if payload["error"]:
            return self.backend.failed(req, payload["error"])
        error = rec.get("__inference_error__")
        if error:
            return self.backend.failed(req, f"engine: {error}")
        tokens = [int(t) for t in rec.get("rp_tokens") or []]
        finish = finish_reason(
            len(tokens), tokens[-1] if tokens else None, req.max_tokens, self.backend.eos
        )
        text = decode(self.backend.tokenizer, tokens)
        return self.backend.generated(
            req, text, int(rec.get("rp_prompt_tokens") or 0), len(tokens), finish
        )


def add_vllm_writer(ds, writer: type, cfg, **writer_kwargs: Any):
    """Append ``writer`` (a raypipe.generate.text LLM stage) on vLLM engines: its request
    half, a Ray Data LLM processor, its answer half (see the module docstring)."""
    from raypipe.llm.vllm_backend import build_engine_processor

    kwargs = {"writer": writer, "writer_kwargs": writer_kwargs}
    pool = dict(max_actors=cfg.llm_actors, num_cpus=cfg.llm_actor_cpus)
    ds = add_stage(ds, EngineRequests, kwargs, **pool)
    ds = build_engine_processor(cfg.llm)(ds)
    return add_stage(ds, EngineAnswers, kwargs, **pool)
