"""Task ``prompts``: k Stable Diffusion prompts, prompt i built around keyword i (paper
Fig. 4, top).

The request (:func:`prompt_request`), the JSON schema of its answer (:func:`schema`), the
check of one prompt (:func:`check_prompt`, also used by curation), the parsers of a text
answer (:func:`parse_prompts`: ``1. ((keyword)) ...`` lines through markdown and prose) and
of a JSON one (:func:`parse_prompts_json`), and the offline writer's answer
(:func:`offline_answer`: ``((keyword)) subject, scene, style, lighting, quality tags``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raypipe.llm.base import LLMRequest
from raypipe.llm.tasks.common import (
    EMPHASIS_RE,
    JSON_OVERHEAD_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_PROMPT_WORDS,
    MIN_PROMPT_WORDS,
    SAFE,
    bullets,
    chat_messages,
    clean_text,
    detect_refusal,
    json_object,
    json_string,
    load_json,
    normalize_chars,
    regex_literal,
    squash,
    strip_line,
    strip_quotes,
)
from raypipe.matching import emphasized_keywords, find_phrase, phrase_key, strip_emphasis

if TYPE_CHECKING:
    from raypipe.abilities import Ability

TASK = "prompts"

#: Length the prompt template asks for (the parser's hard bounds are wider).
PROMPT_MIN_WORDS = 15
PROMPT_MAX_WORDS = 40
#: How many seed keywords the prompt template shows as "keyword examples".
KEYWORD_EXAMPLES_SHOWN = 20


PROMPT_SYSTEM = (
    "You are a prompt generator for the text-to-image model Stable Diffusion. You write "
    "prompts as comma-separated keywords and answer with the numbered list only."
)

PROMPT_USER = """\
Write {k} prompts for Stable Diffusion to generate images for the visual ability \
"{display_name}": {description}

Requirements:
1. A prompt is a list of keywords and short phrases separated by commas: the main \
subject, the scene, the style, the lighting and quality tags.
2. The {ability_lower} keyword comes first and is wrapped in double brackets for \
emphasis, e.g. (({example_keyword})).
3. Describe only what can be seen in a single image: no sounds, smells, feelings, \
stories or text to be rendered.
4. Each prompt is about {min_words} to {max_words} words long.
5. Prompt number i must be built around keyword number i of the list at the end.

Cautions:
{cautions}

Keyword examples: {keyword_examples}

Examples of good prompts:
{examples}

Keywords to use, one per prompt:
{assigned}

Answer with exactly {k} prompts, one per line, numbered in the same order, each in the \
form `1. ((keyword)) subject, scene, style, lighting, quality tags`."""


#: The line the template gets under structured output: the same fields, as JSON.
JSON_INSTRUCTION = (
    'Answer as JSON: {"prompts": ["((keyword 1)), ...", "((keyword 2)), ...", ...]}, '
    "one string per keyword, in the order of the keywords."
)
#: The offline writer's answer of the wrong structure (``params["inject"] = "malformed"``).
MALFORMED = "Here are some ideas: a red car on a street and a blue umbrella."

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


def prompt_request(
    ability: Ability,
    keywords: Sequence[str],
    key: str,
    seed: int | None = None,
    temperature: float = 0.9,
    examples: Sequence[str] | None = None,
) -> LLMRequest:
    """Ask for ``len(keywords)`` SD prompts; prompt i is built around ``keywords[i]``.

    ``examples`` are the in-context examples (default: ``ability.icl_examples``, i.e. the
    curated set when the ability has one, else its seed examples).
    """
    keywords = list(keywords)
    if not keywords:
        raise ValueError("prompt_request: keywords must not be empty")
    examples = list(ability.icl_examples if examples is None else examples)
    k = len(keywords)
    user = PROMPT_USER.format(
        k=k,
        display_name=ability.display_name,
        description=ability.description,
        ability_lower=ability.display_name.lower(),
        example_keyword=ability.keywords[0],
        min_words=PROMPT_MIN_WORDS,
        max_words=PROMPT_MAX_WORDS,
        cautions=bullets(ability.cautions),
        keyword_examples=", ".join(ability.keywords[:KEYWORD_EXAMPLES_SHOWN]),
        examples=bullets(examples),
        assigned="\n".join(f"{i}. {kw}" for i, kw in enumerate(keywords, 1)),
    )
    return LLMRequest(
        key=key,
        task="prompts",
        ability=ability.name,
        messages=chat_messages(PROMPT_SYSTEM, user),
        params={"keywords": keywords, "k": k, "examples": examples},
        temperature=temperature,
        seed=seed,
        max_tokens=128 + 96 * k,
    )


def schema(req: LLMRequest) -> dict[str, Any]:
    """The JSON schema of a prompts answer: prompt i opens with ``((keyword i)),``."""
    budget = req.max_tokens - JSON_OVERHEAD_TOKENS
    keywords = list(req.params["keywords"])
    each = budget // len(keywords) - 4
    items = []
    for kw in keywords:
        head = f"(({kw})), "
        room = max(each - len(head), 24)
        items.append(json_string(f"{regex_literal(head)}{SAFE}{{20,{room}}}"))
    return json_object(
        {
            "prompts": {
                "type": "array",
                "prefixItems": items,
                "items": False,
                "minItems": len(items),
                "maxItems": len(items),
            }
        }
    )


def normalize_prompt(prompt: str) -> str:
    """Single spaces, tidy commas and brackets, no surrounding quotes or end punctuation."""
    s = strip_quotes(" ".join(normalize_chars(prompt).split()))
    s = re.sub(r"\s+,", ",", s)
    s = re.sub(r",(?:\s*,)+", ",", s)
    s = re.sub(r",(?=\S)", ", ", s)
    s = re.sub(r"\({3,}([^()]*)\){3,}", r"((\1))", s)  # (((kw))) -> ((kw))
    s = EMPHASIS_RE.sub(lambda m: f"(({' '.join(m.group(1).split())}))", s)
    s = s.strip().rstrip(".,;:!").strip()
    return strip_quotes(s)


def check_prompt(prompt: str, keyword: str | None = None) -> tuple[str | None, str | None]:
    """Validate one SD prompt -> ``(normalised prompt, None)`` or ``(None, reason)``.

    With ``keyword``, the prompt must open with exactly ``((keyword))`` (case and spacing
    aside; the keyword is then written as given). Without, it must open with some
    ``((term))``.
    """
    p = normalize_prompt(prompt)
    if not p:
        return None, "empty"
    if p.count("(") != p.count(")"):
        return None, "bad_format"
    terms = emphasized_keywords(p)
    plain = strip_emphasis(p, prose=True)
    if keyword is not None:
        want = phrase_key(keyword)
        if not terms or phrase_key(terms[0]) != want or not p.startswith("(("):
            if any(phrase_key(t) == want for t in terms):
                return None, "keyword_not_first"
            if find_phrase(plain, want) is not None:
                return None, "keyword_not_emphasized"
            if p.startswith("((") and terms:
                return None, "wrong_keyword"
            return None, "keyword_missing"
        p = f"(({keyword}))" + p[p.index("))") + 2 :]
    elif not terms:
        return None, "keyword_missing"
    elif not p.startswith("(("):
        return None, "keyword_not_first"
    n_words = len(plain.split())
    if n_words < MIN_PROMPT_WORDS:
        return None, "too_short"
    if n_words > MAX_PROMPT_WORDS or len(p) > MAX_PROMPT_CHARS:
        return None, "too_long"
    return p, None


@dataclass
class PromptParse:
    """The prompt found for one expected keyword (``reason`` is None when accepted)."""

    index: int  # position of the keyword in the request
    keyword: str  # the keyword this prompt must be built around
    prompt: str | None  # normalised prompt, when accepted
    reason: str | None  # reject reason, when not
    raw: str = ""  # the candidate line it came from ("" when none)

    @property
    def ok(self) -> bool:
        return self.reason is None


_LEAD_LABEL_RE = re.compile(r"^[^,()]{0,60}?[:\u2013\u2014]\s*$|^[^,()]{0,60}?\s-\s*$")


def _prompt_candidates(text: str) -> list[str]:
    """Lines that hold a prompt: any line with ``((``, or a list item that reads like one."""
    out = []
    for line in clean_text(text).split("\n"):
        s, is_item, is_heading = strip_line(line)
        if not s:
            continue
        idx = s.find("((")
        if idx > 0 and _LEAD_LABEL_RE.match(s[:idx]):  # "Crimson car: ((crimson)) ..."
            s = s[idx:]
        if idx >= 0 and (s.startswith("((") or is_item or s.count(",") >= 2):
            out.append(s)
        elif is_item and s.count(",") >= 2:
            out.append(s)
    return out


def parse_prompts(text: str | None, keywords: Sequence[str]) -> list[PromptParse]:
    """One :class:`PromptParse` per expected keyword, index-aligned with ``keywords``.

    The i-th prompt must open with ``((keywords[i]))``. When the model reordered its list,
    prompts are matched by keyword; a keyword with no prompt gets ``missing_prompt``.
    Extra prompts beyond the ones asked for are ignored.
    """
    keywords = list(keywords)
    if not text or not text.strip():
        return [PromptParse(i, kw, None, "empty") for i, kw in enumerate(keywords)]
    if detect_refusal(text):
        return [PromptParse(i, kw, None, "refusal") for i, kw in enumerate(keywords)]

    cands = _prompt_candidates(text)
    firsts = [phrase_key(t[0]) if (t := emphasized_keywords(c)) else "" for c in cands]
    used: set[int] = set()
    chosen: dict[int, int] = {}

    def take(i: int, j: int) -> None:
        chosen[i] = j
        used.add(j)

    wants = [phrase_key(kw) for kw in keywords]
    # 1. In place and right. 2. Right but moved. 3. Related (rejected below with a reason).
    for i, want in enumerate(wants):
        if i < len(cands) and firsts[i] == want:
            take(i, i)
    for i, want in enumerate(wants):
        if i not in chosen:
            j = next((j for j in range(len(cands)) if j not in used and firsts[j] == want), None)
            if j is not None:
                take(i, j)
    for i, want in enumerate(wants):
        if i not in chosen:
            j = next(
                (
                    j
                    for j in range(len(cands))
                    if j not in used and find_phrase(cands[j], want) is not None
                ),
                None,
            )
            if j is not None:
                take(i, j)
    # 4. Whatever is left in the keyword's own position (e.g. a prompt with another keyword).
    for i in range(len(wants)):
        if i not in chosen and i < len(cands) and i not in used:
            take(i, i)

    out: list[PromptParse] = []
    seen: set[str] = set()
    for i, kw in enumerate(keywords):
        if i not in chosen:
            out.append(PromptParse(i, kw, None, "missing_prompt"))
            continue
        raw = cands[chosen[i]]
        prompt, reason = check_prompt(raw, kw)
        if prompt is not None and phrase_key(prompt) in seen:
            prompt, reason = None, "duplicate"
        if prompt is not None:
            seen.add(phrase_key(prompt))
        out.append(PromptParse(i, kw, prompt, reason, raw))
    return out


def parse_prompts_json(text: str | None, keywords: list[str]) -> list[PromptParse]:
    """:func:`parse_prompts` for a ``{"prompts": [...]}`` answer: the
    string at position i is prompt i, checked with :func:`check_prompt`."""
    obj = load_json(text)
    prompts = obj.get("prompts") if isinstance(obj, dict) else None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        return [
            PromptParse(i, kw, None, "invalid_json", text or "") for i, kw in enumerate(keywords)
        ]
    out, seen = [], set()
    for i, kw in enumerate(keywords):
        if i >= len(prompts):
            out.append(PromptParse(i, kw, None, "missing_prompt"))
            continue
        raw = squash(prompts[i])
        prompt, reason = (None, "refusal") if detect_refusal(raw) else check_prompt(raw, kw)
        if prompt is not None and phrase_key(prompt) in seen:
            prompt, reason = None, "duplicate"
        if prompt is not None:
            seen.add(phrase_key(prompt))
        out.append(PromptParse(i, kw, prompt, reason, raw))
    return out


def offline_answer(ability: Ability, params: dict, rng: random.Random) -> str:
    """The offline writer's answer: one catalog-filled prompt per keyword, numbered."""
    lines = [
        f"{i}. {_offline_prompt(ability, kw, rng)}" for i, kw in enumerate(params["keywords"], 1)
    ]
    return "\n".join(lines)


def _offline_prompt(ability: Ability, keyword: str, rng: random.Random) -> str:
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
