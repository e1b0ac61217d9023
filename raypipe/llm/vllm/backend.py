"""The ``vllm`` backend object (see raypipe.llm.vllm)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raypipe.llm.base import LLMRequest, LLMResult
from raypipe.llm.cache import ResponseCache, request_key
from raypipe.llm.config import LLMConfig
from raypipe.llm.request_body import request_body
from raypipe.llm.vllm.checks import check_model
from raypipe.llm.vllm.failures import engine_failure
from raypipe.llm.vllm.request import chat_ids, eos_ids, sampling_params
from raypipe.llm.vllm.service import start_service
from raypipe.llm.vllm.settings import model_path


class VLLMBackend:
    """The ``vllm`` backend object (see the module docstring).

    In the stream's actors it holds what their stages share (the model path, tokenizer,
    cache, limits) and starts nothing. :meth:`complete_batch` (keyword banks, writers
    served from OUT/cache, tests) sends what the cache does not answer to the engines of
    the :class:`EngineService` given to :meth:`attach` (the run's), or else of one of its
    own, started on first use and stopped by :meth:`close`.
    """

    def __init__(self, cfg: LLMConfig, cache_dir: str | Path | None = None):
        self.cfg = cfg
        self.model = cfg.model
        self.cache = ResponseCache(cache_dir) if cache_dir else None
        self._path: str | None = None
        self._tokenizer = None
        self._eos: set[int] | None = None
        self._max_len: int | None = None
        self._service = None  # an EngineService actor (attach, or this backend's own)
        self._own_service = False
        self._handle = None  # the Serve handle of the service's engines
        self.engine_s = 0.0  # engine-seconds of this backend's own service
        self._counts = dict(
            requests=0, cache_hits=0, failures=0, prompt_tokens=0, completion_tokens=0,
            cached_prompt_tokens=0, cached_completion_tokens=0, engines_started=0,
        )  # fmt: skip

    # --- what the stream's stages use -------------------------------------------------

    @property
    def path(self) -> str:
        if self._path is None:
            self._path = model_path(self.cfg)
        return self._path

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._tokenizer

    @property
    def eos(self) -> set[int]:
        if self._eos is None:
            self._eos = eos_ids(self.tokenizer, self.path)
        return self._eos

    @property
    def max_model_len(self) -> int:
        if self._max_len is None:
            from transformers import AutoConfig

            own = getattr(AutoConfig.from_pretrained(self.path), "max_position_embeddings", None)
            self._max_len = self.cfg.vllm.max_model_len or own or 2**31
        return self._max_len

    def key(self, req: LLMRequest) -> str:
        return request_key(request_body(self.model, req))

    def cached(self, req: LLMRequest) -> dict[str, Any] | None:
        return self.cache.get(self.key(req)) if self.cache is not None else None

    def prompt_ids(self, req: LLMRequest) -> tuple[list[int] | None, str | None]:
        """``(token ids, None)``, or ``(None, error)`` when prompt + max_tokens cannot fit."""
        ids = chat_ids(self.tokenizer, req.messages)
        if len(ids) + req.max_tokens > self.max_model_len:
            return None, (
                f"prompt_too_long: {len(ids)} prompt tokens + max_tokens {req.max_tokens} > "
                f"max_model_len {self.max_model_len}; raise llm.vllm.max_model_len"
            )
        return ids, None

    def served(self, req: LLMRequest, entry: dict[str, Any]) -> LLMResult:
        """A stored answer, served: nothing generated, its usage counted as cached."""
        prompt, completion = (
            int(entry.get("prompt_tokens") or 0),
            int(entry.get("completion_tokens") or 0),
        )
        self._count(cache_hits=1, cached_prompt_tokens=prompt, cached_completion_tokens=completion)
        return LLMResult(
            key=req.key,
            text=entry["text"],
            cached=True,
            cached_prompt_tokens=prompt,
            cached_completion_tokens=completion,
            finish_reason=entry.get("finish_reason"),
        )

    def generated(
        self, req: LLMRequest, text: str, prompt_tokens: int, completion_tokens: int, finish: str
    ) -> LLMResult:
        """An answer the engine wrote: stored in the cache (when there is text), counted."""
        self._count(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        common = dict(
            key=req.key,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=finish,
        )
        if not text:
            self._count(failures=1)
            return LLMResult(
                text=None,
                error=f"empty_completion: the model returned no text ({finish})",
                **common,
            )
        if self.cache is not None:
            self.cache.put(
                self.key(req),
                {
                    "model": self.model,
                    "text": text,
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "cost_usd": 0.0,
                    "finish_reason": finish,
                },
            )
        return LLMResult(text=text, **common)

    def failed(self, req: LLMRequest, error: str) -> LLMResult:
        self._count(failures=1)
        return LLMResult(key=req.key, text=None, error=error)

    # --- the LLMBackend protocol (the run's engines, or engines of its own) -------------

    def check(self) -> dict[str, Any]:
        return check_model(self.cfg)

    def attach(self, service) -> None:
        """Use the engines of ``service`` (an :class:`EngineService` actor, the run's)
        instead of starting a service of this backend's own; they are counted there."""
        self._service = service

    def _engine(self):
        """The Serve handle of the engines (the service starts them if they are not up)."""
        if self._handle is None:
            import ray
            from ray import serve

            if self._service is None:
                self._service = start_service(self.cfg)
                self._own_service = True
            app = ray.get(self._service.ensure.remote())
            self._handle = serve.get_app_handle(app)
        return self._handle

    def complete_batch(self, requests: list[LLMRequest]) -> list[LLMResult]:
        results: list[LLMResult | None] = [None] * len(requests)
        todo: list[tuple[int, list[int]]] = []
        for i, req in enumerate(requests):
            self._count(requests=1)
            entry = self.cached(req)
            if entry is not None:
                results[i] = self.served(req, entry)
                continue
            ids, error = self.prompt_ids(req)
            if error:
                results[i] = self.failed(req, error)
            else:
                todo.append((i, ids))
        if todo:
            try:
                engine = self._engine()
                calls = [
                    engine.complete.remote(ids, sampling_params(requests[i])) for i, ids in todo
                ]
                outs = [call.result() for call in calls]
            except Exception as e:  # noqa: BLE001 - sorted by engine_failure
                error = engine_failure(e, self.cfg, engine=True)
                if error is None:
                    raise
                raise error from None
            for (i, _), out in zip(todo, outs):
                results[i] = self.generated(
                    requests[i],
                    out["text"],
                    out["prompt_tokens"],
                    out["completion_tokens"],
                    "length" if out["finish_reason"] == "length" else "stop",
                )
        return results  # type: ignore[return-value]

    def _count(self, **deltas: int) -> None:
        for k, v in deltas.items():
            self._counts[k] += v

    def stats(self) -> dict[str, Any]:
        return {**self._counts, "cost_usd": 0.0, "engine_s": self.engine_s}

    def close(self) -> None:
        """Stop this backend's own engines (unless ``llm.vllm.keep_engines``); an
        attached service is the caller's to stop."""
        self._handle = None
        if self._own_service:
            import ray

            stopped = ray.get(self._service.stop.remote(self.cfg.vllm.keep_engines))
            self._counts["engines_started"] += stopped["engines_started"]
            self.engine_s += stopped["engine_s"]
            ray.kill(self._service)
            self._service, self._own_service = None, False

    def __repr__(self) -> str:
        return f"VLLMBackend(model={self.model!r})"
