"""The LLM judge: an OpenAI-compatible model grades each prediction 0/1 against the
reference, as VLMEvalKit's judges do, beside the keyword verdict of
:mod:`raypipe.evaluate.score`.

:func:`judge_prompt` renders one row (``question``, ``question_type``,
``answer_keywords``, ``prediction``; optional ``options``, ``match``, ``synonyms``) as a
system and a user message: the question, the reference (the options too for either-or
items, and the accepted synonyms), the model's answer, a short rubric and the
instruction to reply with exactly ``1`` (correct) or ``0`` (wrong). The judge does not
see the image; it grades the answer against the reference only.

:func:`judge_rows` sends one request per row through the project's LLM client
(:func:`raypipe.llm.make_backend`), so the response cache, the retries, the concurrency
and the rate limits of ``llm`` apply, and the API key is handled as everywhere else
(read from ``llm.api_key_env``, never sent anywhere but the endpoint, never logged).
Each row comes back with:

``judge_correct``
    True/False, or None when the request failed after its retries or the answer does not
    parse (:func:`parse_judgement`); None rows are not counted in ``judge_accuracy`` or
    the agreement (see :func:`raypipe.evaluate.score.accuracy_table`).
``judge_raw``
    The judge's text as it came back (None when no request was sent or it failed).
``judge_error``
    Why the request failed (the client's ``<kind>: <detail>``), else None.
``judge_model``
    ``llm.model``.

A row whose prediction is missing or has no words is judged wrong (``judge_correct``
False) without a request, as the keyword scorer calls it ``empty``.

Requests are sent at temperature 0 with a small token limit (a reasoning model keeps
``llm.max_tokens``: its thinking counts against the limit). A request's name in logs is
``judge/MODEL/ID/DIGEST``, the digest taken over the row id, the model, the prediction
and the judge model; its cache key is the request itself (judge model, messages,
sampling parameters), so a re-run is served from the cache, and two models that gave the
same answer to the same item pay for one verdict. Before anything is sent the endpoint
is checked (:meth:`raypipe.llm.client.OpenAIBackend.check`): an unreachable endpoint, a
refused key or a model the server does not serve fails at once, saying what to fix. A
re-run that the cache answers in full skips the check and sends nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raypipe.errors import ConfigError, EndpointError
from raypipe.evaluate.score import (
    agreement,
    canonical_question_type,
    normalize_answer,
    question_options,
)
from raypipe.llm import make_backend
from raypipe.llm.base import LLMRequest, Secret
from raypipe.llm.cache import request_key
from raypipe.llm.config import LLMConfig

if TYPE_CHECKING:
    from raypipe.llm.limits import LimiterHandle

__all__ = [
    "JUDGE_MAX_TOKENS",
    "JUDGE_SYSTEM",
    "JUDGE_USER",
    "judge_prompt",
    "judge_request",
    "judge_rows",
    "judge_summary",
    "parse_judgement",
]

log = logging.getLogger(__name__)

#: Completion token limit of a judge request (enough for "Score: 1" and a little more).
JUDGE_MAX_TOKENS = 16
#: The LLMRequest task name of judge requests.
JUDGE_TASK = "judge"

JUDGE_SYSTEM = (
    "You grade the answers of AI models to questions about images. You do not see the "
    "image: compare the model's answer with the reference answer only. Reply with exactly "
    "one character: 1 if the answer is correct, 0 if it is wrong."
)

JUDGE_USER = """\
Grade the model's answer to a question about an image against the reference answer.

Question: {question}
Question type: {question_type}
{reference_lines}
Model's answer: {prediction}

Rules:
- 1 (correct): the answer gives the reference answer. Synonyms, plurals, paraphrases and \
extra detail that does not contradict the reference are fine.
- 0 (wrong): the answer gives something else, denies the reference ("not red", "there is \
no dog") or gives no answer.
- A yes/no question must be answered with the reference yes or no; a hedge ("maybe", \
"probably", "I cannot tell") or both yes and no is wrong.
- An either-or question must be answered by picking exactly one option, the reference one; \
both options, neither or another option is wrong.

Reply with exactly 1 if the model's answer is correct and 0 if it is wrong. Write nothing \
else."""

_TYPE_TEXT = {
    "yes_no": "yes/no",
    "wh": "open (what, which, who, where, how, ...)",
    "either_or": "either-or (pick one of the options)",
}


# ---------------------------------------------------------------------------------------
# The prompt
# ---------------------------------------------------------------------------------------


def _value(row: Mapping[str, Any], name: str, default: Any = None) -> Any:
    value = row.get(name, default)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    return value


def _one_line(text: Any) -> str:
    """``text`` on one line: a multi-line answer cannot pass for a line of the prompt."""
    return " ".join(str(text).split())


def _listed(value: Any) -> list[str]:
    """A list field as strings (a list, a JSON list or a comma list; as the scorer reads it)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                value = [text]
        else:
            value = re.split(r"[,;]", text)
    try:
        items = [_one_line(v) for v in value]
    except TypeError:
        items = [_one_line(value)]
    return [v for v in items if v]


def _synonym_text(row: Mapping[str, Any]) -> str:
    value = _value(row, "synonyms", {})
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            return ""
    if not isinstance(value, Mapping):
        return ""
    parts = []
    for key, alts in value.items():
        alts = _listed([alts] if isinstance(alts, str) else (alts or []))
        if alts:
            parts.append(f"{', '.join(alts)} (for {_one_line(key)})")
    return "; ".join(parts)


def _question_type(row: Mapping[str, Any]) -> str:
    try:
        return canonical_question_type(_value(row, "question_type"))
    except ValueError:
        return "wh"


def judge_prompt(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """The system and user messages that ask the judge to grade ``row``'s prediction.

    The reference is ``answer_keywords`` ("any one of" or "all of" them, after ``match``;
    for yes/no items the first keyword); an either-or item lists its ``options``, or the
    options :func:`raypipe.evaluate.score.question_options` parses from the question
    (none when it parses none: the question itself names them). ``synonyms`` are listed
    as also accepted. The question and the prediction are put on one line each.
    """
    qtype = _question_type(row)
    keywords = _listed(_value(row, "answer_keywords", []))
    question = _one_line(_value(row, "question", ""))
    if qtype == "yes_no":
        reference = keywords[0] if keywords else ""
    elif len(keywords) > 1:
        rule = str(_value(row, "match", "any")).strip().lower()
        reference = ("all of: " if rule == "all" else "any one of: ") + ", ".join(keywords)
    else:
        reference = ", ".join(keywords)
    lines = [f"Reference answer: {reference}"]
    if qtype == "either_or":
        options = _listed(_value(row, "options", [])) or question_options(question, keywords)
        if options:
            lines.append(f"Options: {' | '.join(options)}")
    synonyms = _synonym_text(row)
    if synonyms:
        lines.append(f"Also accepted: {synonyms}")
    user = JUDGE_USER.format(
        question=question,
        question_type=_TYPE_TEXT[qtype],
        reference_lines="\n".join(lines),
        prediction=_one_line(_value(row, "prediction", "")),
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def request_name(row: Mapping[str, Any], judge_model: str) -> str:
    """``judge/MODEL/ID/DIGEST``: the request's name in logs, the same on every run."""
    model, ident = str(row.get("model") or ""), str(row.get("id") or "")
    blob = "\x1f".join([ident, model, str(_value(row, "prediction", "")), judge_model])
    return f"judge/{model}/{ident}/{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def judge_request(
    row: Mapping[str, Any], judge_model: str, max_tokens: int = JUDGE_MAX_TOKENS
) -> LLMRequest:
    """The request that grades ``row``: :func:`judge_prompt` at temperature 0."""
    return LLMRequest(
        key=request_name(row, judge_model),
        task=JUDGE_TASK,
        ability=str(row.get("ability") or ""),
        messages=tuple(judge_prompt(row)),
        temperature=0.0,
        max_tokens=max_tokens,
    )


# ---------------------------------------------------------------------------------------
# Reading the judge's answer
# ---------------------------------------------------------------------------------------

_THINK_RE = re.compile(r"<think>.*?(?:</think>|$)", re.S | re.I)
_MARKUP_RE = re.compile(r"[*_`#\"'\u2018\u2019\u201c\u201d]")
# The whole answer is a verdict: "1", "0.", "[1]", "(0)", "1/1", "1.0".
_BARE_RE = re.compile(r"[\[(]?\s*([01])(?:\.0+)?(?:\s*/\s*1)?\s*[\])]?\s*[.!]?")
# The answer opens with a verdict and goes on: "1 - it names red", "0 (wrong)", "1\n...".
_LEADING_RE = re.compile(r"([01])(?=\s|[-\u2013\u2014:;()]|$)")
# A labelled verdict anywhere: "Score: 1", "grade = 0", "The verdict is 1", "Rating: 1/1".
_LABELLED_RE = re.compile(
    r"\b(?:score|grade|verdict|judge?ment|rating|result|output|answer)\b\s*(?:is\s*)?"
    r"[:=\-]?\s*[\[(]?([01])(?:\.0+)?\b(?!\.\d)",
    re.I,
)
_NEGATED_CORRECT_RE = re.compile(r"\b(?:not|isnt|never)\s+(?:correct|right)\b")
# "the correct answer is red" names the reference, not the verdict.
_CORRECT_ANSWER_RE = re.compile(r"\bcorrect\s+(?:answer|option|one|reference)\b")
_FIRST_WORD = {
    "correct": True,
    "right": True,
    "incorrect": False,
    "wrong": False,
}
_ALONE_WORD = {"yes": True, "true": True, "no": False, "false": False}


def parse_judgement(text: str | None) -> bool | None:
    """The judge's verdict in ``text``: True (1, correct), False (0, wrong), or None.

    Read, in order, after dropping a ``<think>`` block and markdown marks: the answer as
    a bare ``1``/``0`` ("**1**", "[0]", "1/1"); an answer opening with one ("1 - it
    names red"); an opening verdict word ("Correct", "Incorrect.", "Wrong: ..."), or
    "yes"/"no"/"true"/"false" alone; a labelled digit ("Score: 1", "verdict = 0"; the
    last one counts); a last line that is a bare digit; else "correct" or "incorrect"/
    "wrong"/"not correct" in the text, when only one of the two kinds occurs ("the
    correct answer is ..." is neither). None for anything else: the judge's answer is
    then not counted.
    """
    if text is None:
        return None
    clean = _MARKUP_RE.sub("", _THINK_RE.sub(" ", str(text))).strip()
    if not clean:
        return None
    bare = _BARE_RE.fullmatch(clean)
    if bare:
        return bare.group(1) == "1"
    leading = _LEADING_RE.match(clean)
    if leading:
        return leading.group(1) == "1"
    tokens = re.findall(r"[a-z]+", clean.lower())
    if tokens and tokens[0] in _FIRST_WORD:
        return _FIRST_WORD[tokens[0]]
    if len(tokens) == 1 and tokens[0] in _ALONE_WORD:
        return _ALONE_WORD[tokens[0]]
    labelled = _LABELLED_RE.findall(clean)
    if labelled:
        return labelled[-1] == "1"
    last = _BARE_RE.fullmatch(clean.splitlines()[-1].strip())
    if last:
        return last.group(1) == "1"
    words = _CORRECT_ANSWER_RE.sub(" ", " ".join(tokens))
    negative = bool(re.search(r"\b(?:incorrect|wrong)\b", words)) or bool(
        _NEGATED_CORRECT_RE.search(words)
    )
    positive = bool(re.search(r"\bcorrect\b", _NEGATED_CORRECT_RE.sub(" ", words)))
    if negative != positive:
        return positive
    return None


# ---------------------------------------------------------------------------------------
# Judging rows
# ---------------------------------------------------------------------------------------


def is_empty_prediction(prediction: Any) -> bool:
    """Missing, NaN, or no words once normalised: what the keyword scorer calls ``empty``."""
    if prediction is None or (isinstance(prediction, float) and math.isnan(prediction)):
        return True
    return not normalize_answer(str(prediction))


def judge_rows(
    rows: Iterable[Mapping[str, Any]],
    llm_cfg: LLMConfig | Mapping[str, Any],
    cache_dir: str | Path | None,
    api_key: Secret | None = None,
    concurrency: int | None = None,
    *,
    limiter: LimiterHandle | None = None,
    check: bool = True,
    max_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """Each of ``rows`` with the judge's verdict added (fields in the module doc), in order.

    Args:
        rows: prediction rows (dicts, or a pyarrow Table read row by row).
        llm_cfg: the judge's ``llm`` config (an :class:`~raypipe.llm.config.LLMConfig` or
            its fields); ``backend`` must be ``openai``.
        cache_dir: where answers are cached (a folder or a URI, as ``make_backend``
            takes); None: no cache.
        api_key: the key, when ``llm.api_key_env`` is not set in this process.
        concurrency: requests in flight at once; None: ``llm.concurrency``.
        limiter: the job's rate limiter (:func:`raypipe.llm.limits.start_limiter`).
        check: check the endpoint and the model before the first request (one
            1-token request besides the model list), unless the cache answers every
            request; False skips it.
        max_tokens: completion token limit per request; None: ``JUDGE_MAX_TOKENS``
            (``llm.max_tokens`` for a reasoning model).

    Raises:
        ConfigError: ``llm.backend`` is not ``openai``.
        EndpointError: the key variable is not set, or the endpoint is unreachable,
            refuses the key or does not serve ``llm.model`` (with what to do).
    """
    cfg = llm_cfg if isinstance(llm_cfg, LLMConfig) else LLMConfig.model_validate(dict(llm_cfg))
    if cfg.backend != "openai":
        raise ConfigError(
            f"the LLM judge needs an OpenAI-compatible model, but its llm.backend is "
            f"{cfg.backend!r}: set backend: openai with the judge's model and base_url"
        )
    cfg = cfg.model_copy()
    if concurrency is not None:
        cfg.concurrency = concurrency  # validated (at least 1)
    if max_tokens is None:
        max_tokens = cfg.max_tokens if cfg.reasoning_on() else JUDGE_MAX_TOKENS
    if hasattr(rows, "to_pylist"):
        rows = rows.to_pylist()
    out = [dict(row) for row in rows]

    todo: list[tuple[int, LLMRequest]] = []
    for i, row in enumerate(out):
        row["judge_model"] = cfg.model
        if is_empty_prediction(row.get("prediction")):
            row.update(judge_correct=False, judge_raw=None, judge_error=None)
        else:
            todo.append((i, judge_request(row, cfg.model, max_tokens)))
    if not todo:
        return out

    backend = make_backend(cfg, cache_dir, None, api_key, limiter=limiter)
    try:
        requests = [req for _, req in todo]
        if check and not _all_cached(backend, requests):
            try:
                backend.check()
            except EndpointError as e:
                raise EndpointError(f"LLM judge ({cfg.model}): {e}") from None
        results = backend.complete_batch(requests)
        stats = backend.stats()
    finally:
        backend.close()
    for (i, _), result in zip(todo, results):
        out[i].update(
            judge_correct=parse_judgement(result.text) if result.ok else None,
            judge_raw=result.text,
            judge_error=result.error,
        )
    _log_summary(cfg.model, judge_summary(out), stats)
    return out


def _log_summary(model: str, summary: dict[str, Any], stats: dict[str, Any]) -> None:
    log.info(
        "judge %s: %d rows, %d judged, %d unparseable, %d failed, %d empty (no request); "
        "%d HTTP calls, %d from the cache, %.4f USD",
        model,
        summary["rows"],
        summary["judged"],
        summary["unparseable"],
        summary["failed"],
        summary["empty"],
        stats.get("http_calls", 0),
        stats.get("cache_hits", 0),
        stats.get("cost_usd", 0.0),
    )
    if summary["failed"]:
        log.warning(
            "judge %s: %d request(s) failed after retries (%s); their judge_correct is None",
            model,
            summary["failed"],
            ", ".join(f"{k}: {v}" for k, v in sorted(stats.get("errors", {}).items())),
        )


def _all_cached(backend: Any, requests: list[LLMRequest]) -> bool:
    """Whether the backend's cache answers every request (then no check is needed)."""
    cache = getattr(backend, "cache", None)
    if cache is None or not hasattr(backend, "_body"):
        return False
    return all(cache.get(request_key(backend._body(req))) is not None for req in requests)


def judge_summary(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts over judged rows: ``rows``, ``judged`` (a verdict), ``correct``,
    ``unparseable`` (an answer with no verdict in it), ``failed`` (no answer), ``empty``
    (an empty prediction, judged wrong without a request), ``accuracy`` (over the
    judged rows; None when none is) and, where rows carry the keyword verdict
    ``correct``, ``agreement`` of the keyword verdict with the judge's (None when no row
    has both)."""
    rows = list(rows)
    judged = [r for r in rows if r.get("judge_correct") is not None]
    correct = sum(bool(r["judge_correct"]) for r in judged)
    out: dict[str, Any] = {
        "rows": len(rows),
        "judged": len(judged),
        "correct": correct,
        "unparseable": sum(
            r.get("judge_correct") is None and r.get("judge_raw") is not None for r in rows
        ),
        "failed": sum(
            r.get("judge_correct") is None and r.get("judge_error") is not None for r in rows
        ),
        "empty": sum(is_empty_prediction(r.get("prediction")) for r in rows),
        "accuracy": correct / len(judged) if judged else None,
    }
    if any("correct" in r for r in rows):
        out["agreement"] = agreement(
            [r.get("correct") for r in rows], [r.get("judge_correct") for r in rows]
        )
    return out
