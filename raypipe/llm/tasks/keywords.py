"""Task ``keywords``: n more keywords for an ability's bank (paper §4.3).

The request (:func:`keyword_request`), the JSON schema of its answer under structured
output (:func:`schema`), the parsers of a text answer (:func:`parse_keywords`, one keyword
per line, numbered or not) and of a JSON one (:func:`parse_keywords_json`), and the
offline writer's answer (:func:`offline_answer`: catalog keywords not in the bank yet).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from raypipe.llm.base import LLMRequest
from raypipe.llm.tasks.common import (
    JSON_OVERHEAD_TOKENS,
    MAX_KEYWORD_CHARS,
    MAX_KEYWORD_WORDS,
    chat_messages,
    clean_text,
    detect_refusal,
    json_object,
    json_string,
    load_json,
    squash,
    strip_line,
    strip_quotes,
)
from raypipe.matching import phrase_key, stem, strip_emphasis, words

if TYPE_CHECKING:
    from raypipe.abilities import Ability

TASK = "keywords"

KEYWORD_SYSTEM = (
    "You are a helpful assistant that builds keyword lists for generating images with "
    "Stable Diffusion. You answer with the list only."
)

KEYWORD_USER = """\
We are building a dataset that teaches the visual ability "{display_name}": {description}

List {n} more keywords for this ability. Each keyword names one thing that can be seen in \
an image and recognised from the image alone.

Requirements:
1. One keyword per line, numbered (1. 2. 3. ...), nothing else on the line.
2. Each keyword is short (1 to 4 words), lowercase, with no commas or brackets.
3. Do not repeat a keyword from the list below, and do not list near-synonyms of each \
other; prefer specific, less common keywords over generic ones.

Keywords we already have:
{existing}"""


#: The line the template gets under structured output: the same fields, as JSON.
JSON_INSTRUCTION = 'Answer as JSON: {"keywords": ["keyword", ...]}.'
#: The offline writer's answer of the wrong structure (``params["inject"] = "malformed"``).
MALFORMED = "Sure, there are many more keywords one could think of for this."


def keyword_request(
    ability: Ability,
    n: int,
    existing: Sequence[str],
    key: str,
    seed: int | None = None,
    temperature: float = 0.9,
) -> LLMRequest:
    """Ask for ``n`` more keywords of ``ability``, none of them in ``existing``."""
    if n < 1:
        raise ValueError(f"keyword_request: n must be >= 1, got {n}")
    existing = list(existing)
    user = KEYWORD_USER.format(
        display_name=ability.display_name,
        description=ability.description,
        n=n,
        existing=", ".join(existing) if existing else "(none yet)",
    )
    return LLMRequest(
        key=key,
        task="keywords",
        ability=ability.name,
        messages=chat_messages(KEYWORD_SYSTEM, user),
        params={"n": n, "existing": existing},
        temperature=temperature,
        seed=seed,
        max_tokens=64 + 12 * n,
    )


def schema(req: LLMRequest) -> dict[str, Any]:
    """The JSON schema of a keywords answer: up to ``n`` short lowercase keywords."""
    budget = req.max_tokens - JSON_OVERHEAD_TOKENS
    n = int(req.params["n"])
    each = max(8, min(40, budget // max(n, 1) - 4))
    return json_object(
        {
            "keywords": {
                "type": "array",
                "items": json_string(f"[a-z][a-z '-]{{1,{each - 1}}}"),
                "minItems": 1,
                "maxItems": n,
            }
        }
    )


class ItemReject(NamedTuple):
    """One list item that was not accepted: ``(reason, raw)``."""

    reason: str
    raw: str


@dataclass
class ParsedList:
    """Accepted items, and every item that was not accepted."""

    items: list[str]
    rejects: list[ItemReject]


_KEYWORD_TAIL_RE = re.compile(r"\s+[-\u2013\u2014]\s+|:\s+|\s+\(")
_KEYWORD_LABEL_RE = re.compile(r"^(?:[a-z ]{0,30}\s)?keywords?\s*:\s*", re.IGNORECASE)


def parse_keywords(text: str | None, ability: Ability, existing: Iterable[str] = ()) -> ParsedList:
    """Keywords from a keyword-expansion answer, one per line (numbered or not).

    Lowercased and de-duplicated against ``existing`` (pass the current bank) and each
    other; an explanation after the keyword ("crimson - a deep red") is dropped.
    """
    if not text or not text.strip():
        return ParsedList([], [ItemReject("empty", "")])
    if detect_refusal(text):
        return ParsedList([], [ItemReject("refusal", text.strip())])

    lines = [strip_line(line) for line in clean_text(text).split("\n")]
    lines = [(s, item) for s, item, heading in lines if s and not heading]
    if any(item for _, item in lines):
        chosen = [s for s, item in lines if item]
    else:  # plain lines: skip prose such as "Here are 20 more keywords:"
        chosen = [s for s, _ in lines if not s.endswith(":")]

    seen = {_kw_key(k) for k in existing}
    own_names = {phrase_key(ability.name.replace("_", " ")), phrase_key(ability.display_name)}
    items: list[str] = []
    rejects: list[ItemReject] = []
    for line in chosen:
        line = _KEYWORD_LABEL_RE.sub("", line)  # "Keywords: a, b, c"
        line = _KEYWORD_TAIL_RE.split(line, maxsplit=1)[0]
        for piece in re.split(r"[,;]", line):
            raw = piece.strip()
            kw = strip_emphasis(strip_quotes(raw), prose=True).strip(" ()[]").lower()
            kw = " ".join(kw.split())
            kw = kw.rstrip(".!?").strip()
            if not kw:
                continue
            reason = _keyword_problem(kw)
            if reason is None and phrase_key(kw) in own_names:
                reason = "not_a_keyword"
            if reason is None and _kw_key(kw) in seen:
                reason = "duplicate"
            if reason:
                rejects.append(ItemReject(reason, raw))
                continue
            seen.add(_kw_key(kw))
            items.append(kw)
    if not items and not rejects:
        rejects.append(ItemReject("empty", text.strip()))
    return ParsedList(items, rejects)


def _kw_key(keyword: str) -> str:
    return " ".join(stem(w) for w in words(keyword))


def _keyword_problem(kw: str) -> str | None:
    if len(kw.split()) > MAX_KEYWORD_WORDS or len(kw) > MAX_KEYWORD_CHARS:
        return "too_long"
    if not any(c.isalpha() for c in kw) or not all(c.isalnum() or c in " -'&./" for c in kw):
        return "bad_format"
    return None


def parse_keywords_json(text: str | None, ability, existing=()) -> ParsedList:
    """:func:`parse_keywords` for a ``{"keywords": [...]}`` answer."""
    obj = load_json(text)
    items = obj.get("keywords") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        return parse_keywords("", ability, existing)
    lines = "\n".join(f"{i}. {squash(str(kw))}" for i, kw in enumerate(items, 1))
    return parse_keywords(lines, ability, existing)


def offline_answer(ability: Ability, params: dict, rng: random.Random) -> str:
    """The offline writer's answer: catalog keywords not in ``params["existing"]``."""
    known = {phrase_key(k) for k in params.get("existing", ())}
    pool = [k for k in ability.keywords if phrase_key(k) not in known]
    rng.shuffle(pool)
    chosen = pool[: int(params["n"])]
    if not chosen:
        return ""
    lines = "\n".join(f"{i}. {kw}" for i, kw in enumerate(chosen, 1))
    return f"Here are {len(chosen)} more {ability.display_name.lower()} keywords:\n\n{lines}"
