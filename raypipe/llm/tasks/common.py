"""What raypipe's four LLM tasks share: chat messages, the tolerant text cleaning and
field extraction their parsers use, the JSON-schema pieces and JSON reading of structured
output, and the prompt facts the offline writer reads back.

Parsers never raise on bad model output. Each returns its results with a short, stable
snake_case *reject reason* for what it could not accept; the caller keeps the raw text
and writes a reject row.

Reject reasons:

==========================  ==========================================================
``empty``                   the output (or the prompt) is empty
``refusal``                 the model declined ("I'm sorry, I can't ...", "As an AI ...")
``missing_prompt``          no prompt in the output for this keyword
``missing_field:<name>``    a labelled field (``Description:``, ``Question:``, ...) is absent
``empty_field:<name>``      the field is present but empty
``keyword_missing``         the expected keyword is nowhere in the prompt / description
``keyword_not_emphasized``  the keyword is in the prompt, but not in ``((...))``
``keyword_not_first``       ``((keyword))`` is in the prompt, but does not open it
``wrong_keyword``           the prompt opens with a different ``((keyword))``
``bad_format``              unbalanced brackets or characters a keyword cannot hold
``too_short`` / ``too_long``  outside the length bounds below
``duplicate``               same as an earlier item (or an existing keyword)
``not_a_keyword``           the ability's own name instead of a keyword
``mentions_prompt``         a description talks about the prompt / Stable Diffusion
``wrong_question_type``     the question is not of the requested type
``answer_not_yes_no``       a yes/no question whose response starts with neither
``keywords_not_in_answer``  no answer keyword occurs in the response
``invalid_json``            a structured answer (``llm.structured_output``) that is not
                            JSON of its schema's shape (raypipe.llm.tasks)
``max_tokens``              the answer was cut at ``max_tokens`` (set by the stages, not
                            here: an unfinished answer is never used)
==========================  ==========================================================
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from raypipe.matching import emphasized_keywords, find_phrase, strip_emphasis

if TYPE_CHECKING:
    from raypipe.abilities import Ability

# Hard bounds (the templates ask for less; these catch only clear failures).
MIN_PROMPT_WORDS = 5
MAX_PROMPT_WORDS = 60  # CLIP reads 77 tokens; longer prompts lose their tail
MAX_PROMPT_CHARS = 400
MAX_KEYWORD_WORDS = 6  # abnormal keywords are short scenes
MAX_KEYWORD_CHARS = 60
MIN_DESCRIPTION_WORDS = 8
MAX_DESCRIPTION_WORDS = 160
MAX_QUESTION_WORDS = 40
MAX_ANSWER_WORDS = 80


# --- low-level helpers ------------------------------------------------------------------

_REFUSAL_RES = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"\bI(?:'m| am)\s+(?:so\s+|very\s+|really\s+)?sorry\b[^.\n]{0,60}?\b(?:can(?:no|')?t|can not|unable|won't|will not|not able|must decline)\b",
        r"\bI\s+(?:can(?:no|')?t|can not|won't|will not|must decline to|am unable to|'m unable to|am not able to|'m not able to)\s+(?:help|assist|comply|fulfil|fulfill|provide|create|generate|write|produce|complete|do that|do this|continue)",
        r"\bas an ai\b",
        r"\bas a (?:large )?language model\b",
        r"\bI(?:'m| am) (?:an ai|a language model)\b",
        r"\bI (?:apologi[sz]e|must decline),? but\b",
        r"\bI(?:'m| am) not (?:able|allowed|permitted) to\b",
        r"\bthis request (?:violates|goes against)\b",
    )
]
#: Only the opening of an answer is searched: a refusal comes first.
_REFUSAL_WINDOW = 400

_QUOTES = {"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u00a0": " "}
_FENCE_RE = re.compile(r"^\s*(```|~~~)")
HEADING_RE = re.compile(r"^#{1,6}\s*")
_BULLET_RE = re.compile(
    r"^(?:[-*\u2022+\u2013\u2014]\s+|\(?\d{1,3}[.)\]:](?!\d)\s*|#\d{1,3}[.):]?\s+)"
)
_LABEL_RE = re.compile(
    r"^(?:sd\s+|stable diffusion\s+|image\s+)?prompt\s*(?:#\s*)?\d{0,3}\s*[:.)\-\u2013\u2014]\s*",
    re.IGNORECASE,
)
EMPHASIS_RE = re.compile(r"\(\((?!\()\s*([^()]*?)\s*\)\)")


def normalize_chars(text: str) -> str:
    for src, dst in _QUOTES.items():
        text = text.replace(src, dst)
    return text


def clean_text(text: str) -> str:
    """Normalise line ends and quotes, drop code-fence lines and trailing whitespace."""
    text = normalize_chars(text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = [line.rstrip() for line in text.split("\n") if not _FENCE_RE.match(line)]
    return "\n".join(lines).strip()


def strip_quotes(s: str) -> str:
    s = s.strip()
    while len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'`":
        s = s[1:-1].strip()
    # An opening quote whose closing one was cut off by trailing punctuation.
    if s and s[0] in "\"'" and s.count(s[0]) == 1:
        s = s[1:].strip()
    if s and s[-1] in "\"'" and s.count(s[-1]) == 1:
        s = s[:-1].strip()
    return s


def unmark(s: str) -> str:
    """Remove markdown emphasis markers (bold, italics, inline code) from a line."""
    s = s.replace("**", "").replace("__", "").replace("`", "")
    s = re.sub(r"(?<!\w)_([^_]+)_(?!\w)", r"\1", s)
    return s.replace("*", "")


def strip_line(line: str) -> tuple[str, bool, bool]:
    """One output line -> (content, is_list_item, is_heading)."""
    s = line.strip()
    is_heading = bool(HEADING_RE.match(s)) and not re.match(r"^#\d", s)
    if is_heading:
        s = HEADING_RE.sub("", s)
    s = s.lstrip("> ").strip() if s.startswith(">") else s
    s = s.replace("**", "").replace("__", "")
    is_item = False
    m = _BULLET_RE.match(s)
    if m:
        is_item, s = True, s[m.end() :]
    s = unmark(s).strip()
    m = _LABEL_RE.match(s)
    if m:
        is_item, s = True, s[m.end() :]
    return s.strip(), is_item, is_heading


def detect_refusal(text: str | None) -> bool:
    """True when the opening of ``text`` declines the task ("I'm sorry, I can't ...")."""
    if not text:
        return False
    head = normalize_chars(text)[:_REFUSAL_WINDOW]
    return any(r.search(head) for r in _REFUSAL_RES)


# --- labelled fields (dialogue, benchmark) ------------------------------------------------

#: Field labels a model may use, mapped to the field they fill.
FIELD_LABELS: dict[str, str] = {
    "prompt": "prompt",
    "description": "description",
    "question": "question",
    "response": "response",
    "answer": "response",
    "keywords": "keywords",
    "key words": "keywords",
    "answer keywords": "keywords",
    "answer_keywords": "keywords",
    "reference keywords": "keywords",
}
_LABEL_ALT = "|".join(sorted((re.escape(k) for k in FIELD_LABELS), key=len, reverse=True))
_FIELD_SEP_RE = re.compile(
    rf"^(?P<label>{_LABEL_ALT})\s*(?:\([^)]*\))?\s*[:\-\u2013\u2014]\s*(?P<rest>.*)$", re.I
)
_FIELD_ALONE_RE = re.compile(rf"^(?P<label>{_LABEL_ALT})\s*:?\s*$", re.I)


def extract_fields(text: str) -> dict[str, str]:
    """``Label: value`` fields of an answer -> ``{field: value}`` (first occurrence wins).

    Accepts ``**Label:** value``, ``Label - value``, ``### Label`` headings with the value
    below, list markers before labels, and values that run over several lines (up to the
    next label or a blank line after the value).
    """
    fields: dict[str, list[str]] = {}
    current: str | None = None
    for line in clean_text(text).split("\n"):
        s = line.strip()
        s = HEADING_RE.sub("", s) if HEADING_RE.match(s) else s
        s = unmark(s).strip()
        s = re.sub(r"^(?:[-\u2022]\s+|\d{1,2}[.)]\s+)", "", s)
        m = _FIELD_SEP_RE.match(s) or _FIELD_ALONE_RE.match(s)
        if m:
            name = FIELD_LABELS[m.group("label").lower()]
            if name in fields:  # a second "Prompt:" block etc.: keep the first
                current = None
                continue
            current = name
            rest = m.groupdict().get("rest") or ""
            fields[name] = [rest.strip()] if rest.strip() else []
            continue
        if current is None:
            continue
        if not s:
            if fields[current]:  # a blank line ends a value that has started
                current = None
            continue
        fields[current].append(s)
    return {name: strip_quotes(" ".join(" ".join(parts).split())) for name, parts in fields.items()}


# --- chat messages -----------------------------------------------------------------------


def chat_messages(system: str, user: str) -> tuple[dict[str, str], ...]:
    return ({"role": "system", "content": system}, {"role": "user", "content": user})


def bullets(items: Sequence[str]) -> str:
    return "\n".join(f"- {item}" for item in items)


def first_emphasis(prompt: str) -> str:
    found = emphasized_keywords(prompt)
    return found[0] if found else ""


# --- structured output (llm.structured_output) -------------------------------------------

#: Characters of a string field: printable ASCII but ``"``, ``\\``, ``(``, ``)``, ``<``
#: and ``>`` (one token each at worst, never an escape, an unbalanced bracket or the
#: text of a special token such as ``</s>`` or ``<image>``, which a later request that
#: copies the string would turn into that token).
SAFE = r"[ !#-'*-;=?-\[\]-~]"
#: Tokens allowed for the JSON around the strings (braces, keys, commas), per field.
JSON_OVERHEAD_TOKENS = 16


def regex_literal(text: str) -> str:
    """``text`` as a literal inside a JSON-schema (ECMA) regex."""
    return re.sub(r"([\\^$.|?*+()\[\]{}/-])", r"\\\1", text)


def json_string(pattern: str) -> dict[str, Any]:
    return {"type": "string", "pattern": f"^{pattern}$"}


def json_object(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def load_json(text: str | None) -> Any:
    """The JSON value of an answer (raw control characters inside strings allowed), or None."""
    if not text:
        return None
    try:
        return json.loads(text, strict=False)
    except ValueError:
        return None


def squash(value: str) -> str:
    return " ".join(value.split())


def json_strings(obj: Any, names: tuple[str, ...]) -> dict[str, str] | None:
    if not isinstance(obj, dict) or not all(isinstance(obj.get(n), str) for n in names):
        return None
    return {n: squash(obj[n]) for n in names}


#: Reject reasons that say an answer had the wrong shape (not what it said): what
#: structured output is for. ``max_tokens`` (cut) is counted apart.
FORMAT_REASONS = ("empty", "invalid_json", "missing_prompt", "missing_field:", "empty_field:")


def is_format_reason(reason: str) -> bool:
    """Whether ``reason`` is a format reject (see :data:`FORMAT_REASONS`)."""
    return any(reason == r or (r.endswith(":") and reason.startswith(r)) for r in FORMAT_REASONS)


# --- what the offline writer reads back from a prompt -------------------------------------

_DETERMINERS = frozenset("a an the one two three some several".split())


def article(phrase: str) -> str:
    """``phrase`` with "a"/"an" in front, unless it already has a determiner."""
    first = phrase.split(" ", 1)[0].lower()
    if first in _DETERMINERS:
        return phrase
    return ("an " if first[:1] in "aeiou" else "a ") + phrase


def find_first(options: tuple[str, ...], text: str) -> str | None:
    """The option that occurs earliest in ``text`` (longest first on ties)."""
    best: tuple[int, int, str] | None = None
    for opt in options:
        at = find_phrase(text, opt)
        if at is not None and (best is None or (at, -len(opt)) < best[:2]):
            best = (at, -len(opt), opt)
    return best[2] if best else None


class PromptFacts:
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
            find_first(ability.subjects, head) or rest or find_first(ability.subjects, plain)
        ) or ""
        # How the prompt itself names keyword + subject, else the ability's phrase.
        if rest:
            self.phrase = head
        elif self.subject and "{subject}" in ability.phrase:
            self.phrase = ability.describe(keyword, self.subject)
        else:
            self.phrase = keyword
        self.scene = find_first(ability.scenes, plain)
        self.style = find_first(ability.styles, plain)
        self.light = next(
            (s for s in segments[1:] if s.lower().endswith(("light", "lighting"))), None
        )
