"""The offline writer: answers raypipe's four templates from the ability catalog, no model.

What it is: a deterministic *template filler* for demos, CI and tests. It is not a
language model and writes nothing a model would: every answer is assembled from the
catalog (keyword bank x subjects x scenes x styles, plus the fixed lighting and
quality tags of :mod:`raypipe.llm.tasks.prompts`), so it costs nothing, needs no key or network, and its benchmark answers are
exact (filled from the ability's ``benchmark_templates``).

What it returns is the *text* a real model returns for the same template, in the same
format, so it goes through the same parser and the same reject path as a real answer.
Each task's module (:mod:`raypipe.llm.tasks`) writes its answer (``offline_answer``):

- ``keywords``: catalog keywords that are not in ``params["existing"]``, as a numbered
  list. It knows no keywords beyond the catalog; once the bank holds them all, it answers
  with an empty text (parsed as ``empty``).
- ``prompts``: for each ``params["keywords"][i]``, ``((keyword)) subject, scene, style,
  lighting, quality tags`` (keyword and subject joined by the ability's ``phrase``).
- ``dialogue``: a ``Description:`` of 2-4 sentences naming the keyword, built from the
  subject, scene, style and lighting found in the prompt, with the ability file's
  ``focus_sentences`` and ``explanation_sentence`` (for ``abnormal``: what is unusual).
- ``benchmark``: a ``benchmark_templates`` entry of the requested question type, filled
  with the prompt's keyword and subject (and another keyword as the distractor).

Answers are a pure function of (task, ability, params, seed): the request ``key`` does not
enter, so equal requests get equal answers in any order, process or machine.

Faults for tests are explicit: ``params["inject"]`` set to ``"refusal"`` (a refusal text),
``"malformed"`` (text in the wrong structure), ``"empty"`` (empty text) or ``"error"``
(a failed request: ``text=None``, ``error`` set) makes that request misbehave that way.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from raypipe.llm.base import LLMRequest, LLMResult
from raypipe.llm.tasks import TASKS

if TYPE_CHECKING:
    from raypipe.abilities import Ability
    from raypipe.llm.config import LLMConfig

__all__ = ["INJECT_FAULTS", "MODEL_NAME", "OfflineBackend"]

MODEL_NAME = "raypipe-offline"
#: Values of ``params["inject"]`` the writer understands.
INJECT_FAULTS = ("refusal", "malformed", "empty", "error")

_REFUSAL_TEXT = "I'm sorry, but I can't help with that request."


def _rng(request: LLMRequest) -> random.Random:
    blob = json.dumps(
        [request.task, request.ability, request.params, request.seed],
        sort_keys=True,
        default=str,
    )
    return random.Random(int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big"))


class OfflineBackend:
    """An :class:`~raypipe.llm.base.LLMBackend` that fills templates from the catalog.

    Args:
        cfg: the run's LLM config; only kept for the record (no endpoint is contacted).
        catalog: ``{name: Ability}``; default: the catalog shipped with raypipe, loaded on
            first use. Pass the run's catalog when it includes user abilities.
    """

    model = MODEL_NAME

    def __init__(self, cfg: LLMConfig | None = None, catalog: Mapping[str, Ability] | None = None):
        self.cfg = cfg
        self._catalog = dict(catalog) if catalog is not None else None
        self._stats = {"requests": 0, "failures": 0, "injected": 0}

    @property
    def catalog(self) -> dict[str, Ability]:
        if self._catalog is None:
            from raypipe.abilities import load_catalog

            self._catalog = load_catalog()
        return self._catalog

    # --- LLMBackend -----------------------------------------------------------------------

    def complete_batch(self, requests: list[LLMRequest]) -> list[LLMResult]:
        """Answer each request from the catalog, in order; never raises for one request."""
        return [self._complete(r) for r in requests]

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "offline",
            "model": self.model,
            **self._stats,
            "cache_hits": 0,
            "http_calls": 0,
            "retries": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cost_usd": 0.0,
        }

    def close(self) -> None:
        pass

    # --- answering --------------------------------------------------------------------------

    def _complete(self, request: LLMRequest) -> LLMResult:
        start = time.perf_counter()
        self._stats["requests"] += 1
        try:
            text = self._answer(request)
            error = None
        except _OfflineFailure as e:
            text, error = None, str(e)
        if text is None:
            self._stats["failures"] += 1
        return LLMResult(
            key=request.key, text=text, error=error, latency_s=time.perf_counter() - start
        )

    def _answer(self, request: LLMRequest) -> str:
        inject = request.params.get("inject")
        if inject is not None:
            self._stats["injected"] += 1
            return self._fault(request, inject)
        ability = self.catalog.get(request.ability)
        if ability is None:
            raise _OfflineFailure(
                f"offline: unknown ability {request.ability!r}; the catalog has "
                f"{', '.join(self.catalog)}"
            )
        task = TASKS.get(request.task)
        if task is None:
            raise _OfflineFailure(f"offline: unknown task {request.task!r}")
        try:
            return task.offline_answer(ability, request.params, _rng(request))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise _OfflineFailure(f"offline: bad params for task {request.task!r}: {e}") from None

    def _fault(self, request: LLMRequest, inject: str) -> str:
        if inject == "refusal":
            return _REFUSAL_TEXT
        if inject == "empty":
            return ""
        if inject == "error":
            raise _OfflineFailure("offline: injected error")
        if inject == "malformed":
            task = TASKS.get(request.task)
            return task.MALFORMED if task is not None else "???"
        raise _OfflineFailure(
            f"offline: unknown inject value {inject!r}; use one of {', '.join(INJECT_FAULTS)}"
        )


class _OfflineFailure(Exception):
    """A request the offline writer cannot answer; becomes ``LLMResult.error``."""
