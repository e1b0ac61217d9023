"""Parse and validate LLM output: tolerant of formatting, strict on content.

Real models decorate their answers: markdown bold and italics, numbered or bulleted
lists, headings, a sentence of prose before or after, code fences, CRLF line ends,
``Prompt 1:`` labels, quotes around prompts. The parsers here look through all of that.
What they do not forgive is content: a prompt must start with its ability keyword in
double brackets and stay within length bounds, a description must exist and mention the
keyword, a benchmark item needs a question of the requested type, a response and answer
keywords the response contains.

No function here raises on bad model output. Each returns its results together with a
short, stable snake_case *reject reason* for what it could not accept (``refusal``,
``empty``, ``missing_field:description``, ``keyword_not_first``, ...); the caller keeps
the raw text and writes a reject row.

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
                            JSON of its schema's shape (raypipe.llm.structured)
``max_tokens``              the answer was cut at ``max_tokens`` (set by the stages, not
                            here: an unfinished answer is never used)
==========================  ==========================================================
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from raypipe.matching import (
    emphasized_keywords,
    find_phrase,
    mentions_any,
    mentions_keyword,
    phrase_key,
    stem,
    strip_emphasis,
    words,
)

if TYPE_CHECKING:
    from raypipe.abilities import Ability

__all__ = [
    "BenchmarkParse",
    "DialogueParse",
    "ItemReject",
    "ParsedList",
    "PromptParse",
    "benchmark_from_fields",
    "dialogue_from_fields",
    "check_prompt",
    "clean_text",
    "detect_refusal",
    "extract_fields",
    "normalize_prompt",
    "parse_benchmark",
    "parse_dialogue",
    "parse_keywords",
    "parse_prompts",
]

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
_HEADING_RE = re.compile(r"^#{1,6}\s*")
_BULLET_RE = re.compile(
    r"^(?:[-*\u2022+\u2013\u2014]\s+|\(?\d{1,3}[.)\]:](?!\d)\s*|#\d{1,3}[.):]?\s+)"
)
_LABEL_RE = re.compile(
    r"^(?:sd\s+|stable diffusion\s+|image\s+)?prompt\s*(?:#\s*)?\d{0,3}\s*[:.)\-\u2013\u2014]\s*",
    re.IGNORECASE,
)
_EMPHASIS_RE = re.compile(r"\(\((?!\()\s*([^()]*?)\s*\)\)")


def _normalize_chars(text: str) -> str:
    for src, dst in _QUOTES.items():
        text = text.replace(src, dst)
    return text


def clean_text(text: str) -> str:
    """Normalise line ends and quotes, drop code-fence lines and trailing whitespace."""
    text = _normalize_chars(text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = [line.rstrip() for line in text.split("\n") if not _FENCE_RE.match(line)]
    return "\n".join(lines).strip()


def _strip_quotes(s: str) -> str:
    s = s.strip()
    while len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'`":
        s = s[1:-1].strip()
    # An opening quote whose closing one was cut off by trailing punctuation.
    if s and s[0] in "\"'" and s.count(s[0]) == 1:
        s = s[1:].strip()
    if s and s[-1] in "\"'" and s.count(s[-1]) == 1:
        s = s[:-1].strip()
    return s


def _unmark(s: str) -> str:
    """Remove markdown emphasis markers (bold, italics, inline code) from a line."""
    s = s.replace("**", "").replace("__", "").replace("`", "")
    s = re.sub(r"(?<!\w)_([^_]+)_(?!\w)", r"\1", s)
    return s.replace("*", "")


def _strip_line(line: str) -> tuple[str, bool, bool]:
    """One output line -> (content, is_list_item, is_heading)."""
    s = line.strip()
    is_heading = bool(_HEADING_RE.match(s)) and not re.match(r"^#\d", s)
    if is_heading:
        s = _HEADING_RE.sub("", s)
    s = s.lstrip("> ").strip() if s.startswith(">") else s
    s = s.replace("**", "").replace("__", "")
    is_item = False
    m = _BULLET_RE.match(s)
    if m:
        is_item, s = True, s[m.end() :]
    s = _unmark(s).strip()
    m = _LABEL_RE.match(s)
    if m:
        is_item, s = True, s[m.end() :]
    return s.strip(), is_item, is_heading


def detect_refusal(text: str | None) -> bool:
    """True when the opening of ``text`` declines the task ("I'm sorry, I can't ...")."""
    if not text:
        return False
    head = _normalize_chars(text)[:_REFUSAL_WINDOW]
    return any(r.search(head) for r in _REFUSAL_RES)


def normalize_prompt(prompt: str) -> str:
    """Single spaces, tidy commas and brackets, no surrounding quotes or end punctuation."""
    s = _strip_quotes(" ".join(_normalize_chars(prompt).split()))
    s = re.sub(r"\s+,", ",", s)
    s = re.sub(r",(?:\s*,)+", ",", s)
    s = re.sub(r",(?=\S)", ", ", s)
    s = re.sub(r"\({3,}([^()]*)\){3,}", r"((\1))", s)  # (((kw))) -> ((kw))
    s = _EMPHASIS_RE.sub(lambda m: f"(({' '.join(m.group(1).split())}))", s)
    s = s.strip().rstrip(".,;:!").strip()
    return _strip_quotes(s)


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


# --- keywords ---------------------------------------------------------------------------


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

    lines = [_strip_line(line) for line in clean_text(text).split("\n")]
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
            kw = strip_emphasis(_strip_quotes(raw), prose=True).strip(" ()[]").lower()
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


# --- SD prompts -------------------------------------------------------------------------


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
        s, is_item, is_heading = _strip_line(line)
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
        s = _HEADING_RE.sub("", s) if _HEADING_RE.match(s) else s
        s = _unmark(s).strip()
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
    return {
        name: _strip_quotes(" ".join(" ".join(parts).split())) for name, parts in fields.items()
    }


# --- dialogue ----------------------------------------------------------------------------


@dataclass
class DialogueParse:
    """A description answering a question about an image, or why there is none."""

    description: str | None
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.reason is None


_MENTIONS_PROMPT_RE = re.compile(
    r"\bstable diffusion\b|\b(?:the|this|given) prompt\b|\bdouble bracket", re.IGNORECASE
)


def parse_dialogue(text: str | None, prompt: str, keyword: str | None = None) -> DialogueParse:
    """The ``Description:`` of a dialogue answer, validated against the prompt's keyword.

    ``keyword`` defaults to the prompt's first ``((term))``. ``Answer:`` / ``Response:``
    are accepted in place of ``Description:``.
    """
    if not text or not text.strip():
        return DialogueParse(None, "empty")
    if detect_refusal(text):
        return DialogueParse(None, "refusal")
    return dialogue_from_fields(extract_fields(text), prompt, keyword)


def dialogue_from_fields(
    fields: dict[str, str], prompt: str, keyword: str | None = None
) -> DialogueParse:
    """:func:`parse_dialogue`'s checks on fields already found (by label, or as the keys
    of a structured answer: raypipe.llm.structured)."""
    name = next((f for f in ("description", "response") if f in fields), None)
    if name is None:
        return DialogueParse(None, "missing_field:description")
    desc = strip_emphasis(fields[name], prose=True)
    if not desc:
        return DialogueParse(None, "empty_field:description")
    if detect_refusal(desc):
        return DialogueParse(None, "refusal")
    n_words = len(desc.split())
    if n_words < MIN_DESCRIPTION_WORDS:
        return DialogueParse(None, "too_short")
    if n_words > MAX_DESCRIPTION_WORDS:
        return DialogueParse(None, "too_long")
    if _MENTIONS_PROMPT_RE.search(desc):
        return DialogueParse(None, "mentions_prompt")
    if keyword is None:
        found = emphasized_keywords(prompt)
        keyword = found[0] if found else ""
    if keyword and not mentions_keyword(desc, keyword):
        return DialogueParse(None, "keyword_missing")
    return DialogueParse(desc, None)


# --- benchmark ---------------------------------------------------------------------------


@dataclass
class BenchmarkParse:
    """A benchmark question, its reference response and answer keywords, or why not."""

    question: str | None
    answer: str | None
    answer_keywords: tuple[str, ...]
    question_type: str
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.reason is None


_AUX = frozenset(
    "is are was were do does did can could will would should has have had shall may might".split()
)
_WH = frozenset("what which who whom whose where when why how".split())


def _question_type_problem(question: str, answer: str, question_type: str) -> str | None:
    q_words = words(question)
    if question_type == "yes_no":
        if not q_words or q_words[0] not in _AUX or " or " in f" {question.lower()} ":
            return "wrong_question_type"
        if (words(answer) or [""])[0] not in ("yes", "no"):
            return "answer_not_yes_no"
    elif question_type == "wh":
        if not any(w in _WH for w in q_words[:3]):
            return "wrong_question_type"
    elif question_type == "either_or":
        if " or " not in f" {question.lower()} ":
            return "wrong_question_type"
    else:
        return "wrong_question_type"
    return None


def _split_keywords(value: str) -> tuple[str, ...]:
    out: list[str] = []
    for piece in re.split(r"[,;]", value):
        kw = " ".join(_strip_quotes(piece.strip()).strip(" []()").lower().split()).rstrip(".")
        if kw and kw not in out:
            out.append(kw)
    return tuple(out)


def parse_benchmark(text: str | None, question_type: str) -> BenchmarkParse:
    """``Question:`` / ``Response:`` / ``Keywords:`` of a benchmark answer, validated.

    The question must be of ``question_type`` (``yes_no``: opens with a verb such as "Is"
    and the response opens with yes or no; ``wh``: a wh-word among its first words;
    ``either_or``: offers options joined by "or"), and the response must name at least
    one answer keyword (:func:`raypipe.matching.mentions_keyword`, as scoring does).
    """

    def reject(reason: str, q: str | None = None, a: str | None = None) -> BenchmarkParse:
        return BenchmarkParse(q, a, (), question_type, reason)

    if not text or not text.strip():
        return reject("empty")
    if detect_refusal(text):
        return reject("refusal")
    return benchmark_from_fields(extract_fields(text), question_type)


def benchmark_from_fields(fields: dict[str, str], question_type: str) -> BenchmarkParse:
    """:func:`parse_benchmark`'s checks on fields already found (by label, or as the keys
    of a structured answer: raypipe.llm.structured)."""

    def reject(reason: str, q: str | None = None, a: str | None = None) -> BenchmarkParse:
        return BenchmarkParse(q, a, (), question_type, reason)

    for name in ("question", "response", "keywords"):
        if name not in fields:
            return reject(f"missing_field:{name}")
        if not fields[name]:
            return reject(f"empty_field:{name}")
    question = strip_emphasis(fields["question"], prose=True)
    answer = strip_emphasis(fields["response"], prose=True)
    if not question.endswith("?"):
        question = question.rstrip(".") + "?"
    if len(question.split()) > MAX_QUESTION_WORDS or len(answer.split()) > MAX_ANSWER_WORDS:
        return reject("too_long", question, answer)
    problem = _question_type_problem(question, answer, question_type)
    if problem:
        return reject(problem, question, answer)
    keywords = _split_keywords(fields["keywords"])
    if not keywords:
        return reject("empty_field:keywords", question, answer)
    if not mentions_any(answer, keywords):
        return reject("keywords_not_in_answer", question, answer)
    return BenchmarkParse(question, answer, keywords, question_type, None)
