"""The offline writer: answers raypipe's four templates from the ability catalog, no model.

What it is: a deterministic *template filler* for demos, CI and tests. It is not a
language model and writes nothing a model would: every answer is assembled from the
catalog (keyword bank x subjects x scenes x styles, plus fixed lighting and quality tags
below), so it costs nothing, needs no key or network, and its benchmark answers are
exact (filled from the ability's ``benchmark_templates``).

What it returns is the *text* a real model returns for the same template, in the same
format, so it goes through the same parser (:mod:`raypipe.llm.parsing`) and the same
reject path as a real answer. Per task:

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
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from raypipe.llm.base import LLMRequest, LLMResult
from raypipe.matching import emphasized_keywords, find_phrase, phrase_key, strip_emphasis

if TYPE_CHECKING:
    from raypipe.abilities import Ability
    from raypipe.config import LLMConfig

__all__ = ["INJECT_FAULTS", "MODEL_NAME", "OfflineBackend"]

MODEL_NAME = "raypipe-offline"
#: Values of ``params["inject"]`` the writer understands.
INJECT_FAULTS = ("refusal", "malformed", "empty", "error")

#: Lighting and quality tags appended to prompts (kept neutral so colours read true).
LIGHTING = (
    "soft natural light",
    "bright daylight",
    "overcast daylight",
    "soft diffuse light",
    "even daylight",
    "clear morning light",
    "natural light",
)
QUALITY_TAGS = ("highly detailed", "sharp focus", "8k", "4k", "high detail", "crisp detail")
#: Sentences that put the keyword in focus, for abilities whose file has no
#: ``focus_sentences`` of its own.
DEFAULT_FOCUS_SENTENCES = (
    "The {keyword} is the clear focus of the picture, large in the frame and in sharp detail.",
    "The {keyword} stands out clearly from the background and is easy to recognise.",
    "Nothing else in the picture draws the eye as much as the {keyword}.",
)

_REFUSAL_TEXT = "I'm sorry, but I can't help with that request."
_DETERMINERS = frozenset("a an the one two three some several".split())


def _rng(request: LLMRequest) -> random.Random:
    blob = json.dumps(
        [request.task, request.ability, request.params, request.seed],
        sort_keys=True,
        default=str,
    )
    return random.Random(int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big"))


def _article(phrase: str) -> str:
    """``phrase`` with "a"/"an" in front, unless it already has a determiner."""
    first = phrase.split(" ", 1)[0].lower()
    if first in _DETERMINERS:
        return phrase
    return ("an " if first[:1] in "aeiou" else "a ") + phrase


def _find_first(options: tuple[str, ...], text: str) -> str | None:
    """The option that occurs earliest in ``text`` (longest first on ties)."""
    best: tuple[int, int, str] | None = None
    for opt in options:
        at = find_phrase(text, opt)
        if at is not None and (best is None or (at, -len(opt)) < best[:2]):
            best = (at, -len(opt), opt)
    return best[2] if best else None


class _PromptFacts:
    """Subject, natural phrase, scene, style and lighting read back from an SD prompt."""

    def __init__(self, ability: Ability, prompt: str, keyword: str):
        plain = strip_emphasis(prompt, prose=True)
        segments = [s.strip() for s in plain.split(",") if s.strip()]
        head = segments[0] if segments else ""
        rest = re.sub(rf"(?i)(?<![a-z0-9]){re.escape(keyword)}(?![a-z0-9])", "", head, count=1)
        rest = rest.strip(" ,")
        # The subject: a catalog subject in the head segment ("((crimson)) vintage car"),
        # else what the head says besides the keyword, else a catalog subject anywhere.
        self.subject = (
            _find_first(ability.subjects, head) or rest or _find_first(ability.subjects, plain)
        ) or ""
        # How the prompt itself names keyword + subject, else the ability's phrase.
        if rest:
            self.phrase = head
        elif self.subject and "{subject}" in ability.phrase:
            self.phrase = ability.describe(keyword, self.subject)
        else:
            self.phrase = keyword
        self.scene = _find_first(ability.scenes, plain)
        self.style = _find_first(ability.styles, plain)
        self.light = next(
            (s for s in segments[1:] if s.lower().endswith(("light", "lighting"))), None
        )


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
        writer = {
            "keywords": self._keywords,
            "prompts": self._prompts,
            "dialogue": self._dialogue,
            "benchmark": self._benchmark,
        }.get(request.task)
        if writer is None:
            raise _OfflineFailure(f"offline: unknown task {request.task!r}")
        try:
            return writer(ability, request.params, _rng(request))
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
            return {
                "keywords": "Sure, there are many more keywords one could think of for this.",
                "prompts": "Here are some ideas: a red car on a street and a blue umbrella.",
                "dialogue": "The picture is nice and shows what the prompt asked for, I think.",
                "benchmark": "Question: What is shown in the image?",
            }.get(request.task, "???")
        raise _OfflineFailure(
            f"offline: unknown inject value {inject!r}; use one of {', '.join(INJECT_FAULTS)}"
        )

    def _keywords(self, ability: Ability, params: dict, rng: random.Random) -> str:
        known = {phrase_key(k) for k in params.get("existing", ())}
        pool = [k for k in ability.keywords if phrase_key(k) not in known]
        rng.shuffle(pool)
        chosen = pool[: int(params["n"])]
        if not chosen:
            return ""
        lines = "\n".join(f"{i}. {kw}" for i, kw in enumerate(chosen, 1))
        return f"Here are {len(chosen)} more {ability.display_name.lower()} keywords:\n\n{lines}"

    def _prompts(self, ability: Ability, params: dict, rng: random.Random) -> str:
        lines = [
            f"{i}. {self._prompt(ability, kw, rng)}" for i, kw in enumerate(params["keywords"], 1)
        ]
        return "\n".join(lines)

    def _prompt(self, ability: Ability, keyword: str, rng: random.Random) -> str:
        subject = rng.choice(ability.subjects)
        phrase = ability.phrase.strip()
        if phrase.startswith("{keyword}"):
            head = phrase.format(keyword=f"(({keyword}))", subject=subject)
        elif "{subject}" in phrase:
            head = f"(({keyword})), {subject}"
        else:
            head = f"(({keyword}))"
        parts = [
            head,
            rng.choice(ability.scenes),
            rng.choice(ability.styles),
            rng.choice(LIGHTING),
            *rng.sample(QUALITY_TAGS, 2),
        ]
        return ", ".join(parts)

    def _dialogue(self, ability: Ability, params: dict, rng: random.Random) -> str:
        prompt = params["prompt"]
        keyword = params.get("keyword") or (emphasized_keywords(prompt) or [""])[0]
        facts = _PromptFacts(ability, prompt, keyword)
        first = f"The image shows {_article(facts.phrase)}"
        if facts.scene and ability.keyword_is_setting:
            first += f", with {facts.scene}."
        elif facts.scene:
            first += f", with {_article(facts.scene)} as the setting."
        else:
            first += "."
        focus = rng.choice(ability.focus_sentences or DEFAULT_FOCUS_SENTENCES)
        sentences = [first, focus.format(keyword=keyword)]
        if ability.explanation_sentence:
            sentences.append(
                ability.explanation_sentence.format(keyword=keyword, a_keyword=_article(keyword))
            )
        if facts.style and len(sentences) < 4:
            look = f"It has the look of {_article(facts.style.split(',')[0])}"
            look += f", with {facts.light}." if facts.light else "."
            sentences.append(look)
        return f"Prompt: {prompt}\nDescription: {' '.join(sentences)}"

    def _benchmark(self, ability: Ability, params: dict, rng: random.Random) -> str:
        prompt = params["prompt"]
        question_type = params["question_type"]
        keyword = params.get("keyword") or (emphasized_keywords(prompt) or [""])[0]
        templates = [t for t in ability.benchmark_templates if t.question_type == question_type]
        if not templates:
            raise ValueError(f"ability {ability.name!r} has no {question_type} template")
        facts = _PromptFacts(ability, prompt, keyword)
        others = [k for k in ability.keywords if phrase_key(k) != phrase_key(keyword)]
        item = rng.choice(templates).render(
            keyword=keyword, subject=facts.subject or "main subject", other=rng.choice(others)
        )
        return (
            f"Prompt: {prompt}\nQuestion: {item.question}\nResponse: {item.answer}\n"
            f"Keywords: {', '.join(item.answer_keywords)}"
        )


class _OfflineFailure(Exception):
    """A request the offline writer cannot answer; becomes ``LLMResult.error``."""
