"""Golden tests for the LLM task parsers (raypipe.llm.tasks) on realistic model outputs.

Each case is a text a real chat model could return for one of raypipe's templates; the
parser must accept it (and extract the right content) or reject it with the right reason.
"""

from __future__ import annotations

import pytest

from raypipe.abilities import load_catalog
from raypipe.llm.tasks import (
    check_prompt,
    detect_refusal,
    parse_benchmark,
    parse_dialogue,
    parse_keywords,
    parse_prompts,
)
from raypipe.llm.tasks.common import extract_fields
from raypipe.matching import emphasized_keywords, mentions_keyword, strip_emphasis


@pytest.fixture(scope="module")
def color():
    return load_catalog(names=["color"])["color"]


KW = ["crimson", "teal", "ochre"]
P1 = "((crimson)) vintage car, city street at midday, realistic photo, natural daylight, 8k"
P2 = "((teal)) umbrella, rainy park, grey sky, realistic photo, soft diffuse light, 8k"
P3 = "((ochre)) ceramic vase, white marble table, sunlit kitchen, DSLR photo, natural light, 4k"

# --- SD prompts: accepted --------------------------------------------------------------

ACCEPTED_PROMPTS = {
    "well_formed": f"1. {P1}\n2. {P2}\n3. {P3}",
    "markdown_bold_and_labels": (
        f"### Prompts\n\n**Prompt 1:** {P1}\n**Prompt 2:** {P2}\n**Prompt 3:** {P3}\n"
    ),
    "bold_whole_items": f"1. **{P1}**\n2. **{P2}**\n3. **{P3}**",
    "bullets_and_quotes_and_periods": f'- "{P1}."\n* "{P2}".\n• {P3}.',
    "code_fence_crlf_trailing_space_prose": (
        "Sure! Here are 3 prompts for Stable Diffusion, one per keyword:\r\n\r\n```text\r\n"
        f"1) {P1}   \r\n2) {P2}\t\r\n3) {P3}  \r\n```\r\n\r\n"
        "Let me know if you would like more variations!"
    ),
    "label_on_its_own_line": f"Prompt 1:\n{P1}\n\nPrompt 2:\n{P2}\n\nPrompt 3:\n{P3}",
    "title_before_prompt": (
        f"1. Classic car: {P1}\n2. Rainy day - {P2}\n3. Kitchen still life: {P3}"
    ),
    "reordered": f"1. {P3}\n2. {P1}\n3. {P2}",
    "triple_brackets_and_case": (
        f"1. {P1.replace('((crimson))', '(((Crimson)))')}\n2. {P2.replace('((teal))', '(( Teal ))')}"
        f"\n3. {P3}"
    ),
    "italics_and_numbers_in_parens": f"(1) *{P1}*\n(2) _{P2}_\n(3) {P3}",
}


@pytest.mark.parametrize("case", sorted(ACCEPTED_PROMPTS))
def test_prompts_accepted(case):
    parsed = parse_prompts(ACCEPTED_PROMPTS[case], KW)
    assert [p.reason for p in parsed] == [None, None, None], parsed
    assert [p.prompt for p in parsed] == [P1, P2, P3]
    assert [p.index for p in parsed] == [0, 1, 2]
    assert [p.keyword for p in parsed] == KW


# --- SD prompts: rejected ----------------------------------------------------------------

REJECTED_PROMPTS = {
    # case: (text, expected reasons per keyword)
    "wrong_keyword": (
        f"1. {P1}\n2. {P2.replace('((teal))', '((scarlet))')}\n3. {P3}",
        [None, "wrong_keyword", None],
    ),
    "keyword_not_first": (
        f"1. vintage ((crimson)) car, city street, realistic photo, natural daylight, 8k\n2. {P2}\n3. {P3}",
        ["keyword_not_first", None, None],
    ),
    "keyword_not_emphasized": (
        f"1. {P1}\n2. teal umbrella, rainy park, grey sky, realistic photo, soft light, 8k\n3. {P3}",
        [None, "keyword_not_emphasized", None],
    ),
    "keyword_missing_no_brackets": (
        f"1. {P1}\n2. {P2}\n3. yellow vase, white marble table, kitchen, DSLR photo, 4k",
        [None, None, "keyword_missing"],
    ),
    "missing_prompt": (f"1. {P1}\n2. {P2}", [None, None, "missing_prompt"]),
    "too_short": (f"1. {P1}\n2. ((teal)) umbrella, park\n3. {P3}", [None, "too_short", None]),
    "too_long": (
        f"1. {P1}\n2. {P2}\n3. {P3}, " + ", ".join(["highly detailed sharp focus"] * 20),
        [None, None, "too_long"],
    ),
    "unbalanced_brackets": (
        f"1. ((crimson) vintage car, city street, realistic photo, natural daylight, 8k\n2. {P2}\n3. {P3}",
        ["bad_format", None, None],
    ),
    "refusal": ("I'm sorry, but I can't help with that request.", ["refusal"] * 3),
    "as_an_ai": ("As an AI language model, I cannot generate image prompts.", ["refusal"] * 3),
    "empty": ("   \n\n  ", ["empty"] * 3),
    "prose_only": (
        "Here are some ideas: a red car on a street and a blue umbrella in the rain.",
        ["missing_prompt"] * 3,
    ),
}


@pytest.mark.parametrize("case", sorted(REJECTED_PROMPTS))
def test_prompts_rejected_with_reason(case):
    text, reasons = REJECTED_PROMPTS[case]
    parsed = parse_prompts(text, KW)
    assert [p.reason for p in parsed] == reasons, parsed
    for p in parsed:
        assert (p.prompt is None) == (p.reason is not None)


def test_duplicate_prompt_for_repeated_keyword():
    parsed = parse_prompts(f"1. {P1}\n2. {P1}", ["crimson", "crimson"])
    assert [p.reason for p in parsed] == [None, "duplicate"]


def test_rejected_prompt_keeps_its_raw_line():
    parsed = parse_prompts(f"1. {P1}\n2. {P2.replace('((teal))', '((scarlet))')}", KW[:2])
    assert parsed[1].raw.startswith("((scarlet)) umbrella")


def test_extra_prompts_are_ignored():
    parsed = parse_prompts(f"1. {P1}\n2. {P2}\n3. {P3}", ["teal"])
    assert [(p.keyword, p.prompt) for p in parsed] == [("teal", P2)]


def test_prompt_normalised():
    prompt, reason = check_prompt(
        '  "((crimson))  vintage car ,city street,, realistic photo , 8k." '
    )
    assert reason is None
    assert prompt == "((crimson)) vintage car, city street, realistic photo, 8k"


# --- keywords -------------------------------------------------------------------------


def test_keywords_numbered_with_prose(color):
    text = (
        "Here are 6 more colour keywords:\n\n1. Vermilion\n2. **Cerulean** - a sky blue\n"
        "3. Crimson\n4. cerulean\n5. Color\n6. a very long keyword that is really prose\n\n"
        "I hope these help!"
    )
    parsed = parse_keywords(text, color, existing=color.keywords)
    assert parsed.items == ["vermilion", "cerulean"]
    assert [(r.reason, r.raw) for r in parsed.rejects] == [
        ("duplicate", "Crimson"),
        ("duplicate", "cerulean"),
        ("not_a_keyword", "Color"),
        ("too_long", "a very long keyword that is really prose"),
    ]


def test_keywords_bullets_crlf_and_fence(color):
    text = "```\r\n- periwinkle\r\n- *Pistachio green*\r\n- #ff0000\r\n```"
    parsed = parse_keywords(text, color)
    assert parsed.items == ["periwinkle", "pistachio green"]
    assert parsed.rejects == [("bad_format", "#ff0000")]


@pytest.mark.parametrize(
    "text",
    ["periwinkle, pistachio green, cerise", "New keywords: periwinkle, pistachio green, cerise"],
)
def test_keywords_comma_separated_line(color, text):
    parsed = parse_keywords(text, color)
    assert parsed.items == ["periwinkle", "pistachio green", "cerise"]


def test_keywords_plural_counts_as_duplicate(color):
    parsed = parse_keywords("1. periwinkles\n2. periwinkle", color, existing=[])
    assert parsed.items == ["periwinkles"]
    assert parsed.rejects[0].reason == "duplicate"


@pytest.mark.parametrize(
    "text,reason",
    [("", "empty"), (None, "empty"), ("I'm sorry, I cannot help with that.", "refusal")],
)
def test_keywords_rejected(color, text, reason):
    parsed = parse_keywords(text, color)
    assert parsed.items == []
    assert [r.reason for r in parsed.rejects] == [reason]


# --- dialogue --------------------------------------------------------------------------

DESC = (
    "A teal umbrella stands out against a grey, rainy park. Raindrops bead on its "
    "blue-green canopy, and the wet path behind it is muted grey."
)

ACCEPTED_DIALOGUES = {
    "well_formed": f"Prompt: {P2}\nDescription: {DESC}",
    "markdown_bold": f"**Prompt:** {P2}\n\n**Description:** {DESC}",
    "heading_value_below": f"### Prompt\n{P2}\n\n### Description\n{DESC}",
    "multi_line_value": "Prompt: {}\nDescription:\n{}.\n{}".format(P2, *DESC.split(". ")),
    "fence_crlf_prose_after": (
        f"```\r\nPrompt: {P2}\r\nDescription: {DESC}   \r\n```\r\n\r\nHope this helps!"
    ),
    "answer_label_and_quotes": f'Prompt: "{P2}"\nAnswer: "{DESC}"',
    "description_with_brackets": f"Prompt: {P2}\nDescription: A ((teal)) umbrella{DESC[15:]}",
}


@pytest.mark.parametrize("case", sorted(ACCEPTED_DIALOGUES))
def test_dialogue_accepted(case):
    parsed = parse_dialogue(ACCEPTED_DIALOGUES[case], P2, "teal")
    assert parsed.reason is None, parsed
    assert parsed.description == DESC


REJECTED_DIALOGUES = {
    "missing_field": (f"Prompt: {P2}\n\n{DESC}", "missing_field:description"),
    "no_labels": (DESC, "missing_field:description"),
    "empty_field": (f"Prompt: {P2}\nDescription:\n", "empty_field:description"),
    "refusal": ("I'm sorry, but I can't describe images I cannot see.", "refusal"),
    "refusal_inside_field": (
        f"Prompt: {P2}\nDescription: As an AI, I am unable to view the image you describe.",
        "refusal",
    ),
    "keyword_missing": (
        f"Prompt: {P2}\nDescription: A red car is parked on a sunny street next to a lamp post.",
        "keyword_missing",
    ),
    "mentions_prompt": (
        f"Prompt: {P2}\nDescription: The prompt asks for a teal umbrella in a rainy park.",
        "mentions_prompt",
    ),
    "too_short": (f"Prompt: {P2}\nDescription: A teal umbrella.", "too_short"),
    "too_long": (f"Prompt: {P2}\nDescription: " + " ".join([DESC] * 10), "too_long"),
    "empty": ("", "empty"),
}


@pytest.mark.parametrize("case", sorted(REJECTED_DIALOGUES))
def test_dialogue_rejected_with_reason(case):
    text, reason = REJECTED_DIALOGUES[case]
    parsed = parse_dialogue(text, P2, "teal")
    assert parsed.reason == reason
    assert parsed.description is None


def test_dialogue_keyword_defaults_to_prompt_emphasis():
    assert parse_dialogue(f"Description: {DESC}", P2).ok
    assert parse_dialogue(f"Description: {DESC}", P1).reason == "keyword_missing"


def test_dialogue_paraphrased_long_keyword():
    prompt = "((giraffe in a narrow corridor)), office building, realistic photo, 8k"
    text = (
        "Description: A tall giraffe squeezes down a narrow office hallway, its neck bent "
        "under the ceiling. This is unusual because giraffes live on open savannas."
    )
    assert parse_dialogue(text, prompt).ok


# --- benchmark -------------------------------------------------------------------------

ACCEPTED_BENCHMARKS = {
    "wh": (
        f"Prompt: {P1}\nQuestion: What colour is the car?\nResponse: The car is crimson.\n"
        "Keywords: crimson, red",
        "wh",
        ("crimson", "red"),
    ),
    "yes_no_markdown": (
        f"**Prompt:** {P2}\n**Question:** Is the umbrella teal?\n**Response:** Yes, the "
        "umbrella is teal.\n**Answer keywords:** yes",
        "yes_no",
        ("yes",),
    ),
    "either_or_numbered_fenced": (
        "```\n1. Prompt: " + P3 + "\n2. Question: Is the vase ochre or navy blue?\n"
        '3. Answer: The vase is ochre.\n4. Keywords: "ochre"\n```',
        "either_or",
        ("ochre",),
    ),
    "question_mark_added": (
        "Question: Which colour is the umbrella\nResponse: It is teal.\nKeywords: teal",
        "wh",
        ("teal",),
    ),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED_BENCHMARKS))
def test_benchmark_accepted(case):
    text, qtype, keywords = ACCEPTED_BENCHMARKS[case]
    parsed = parse_benchmark(text, qtype)
    assert parsed.reason is None, parsed
    assert parsed.question.endswith("?")
    assert parsed.answer_keywords == keywords
    assert parsed.question_type == qtype


REJECTED_BENCHMARKS = {
    "missing_keywords": (
        "Question: What colour is the car?\nResponse: The car is crimson.",
        "wh",
        "missing_field:keywords",
    ),
    "missing_response": ("Question: What colour is the car?", "wh", "missing_field:response"),
    "missing_question": ("Response: Crimson.\nKeywords: crimson", "wh", "missing_field:question"),
    "empty_keywords": (
        "Question: What colour is the car?\nResponse: The car is crimson.\nKeywords:",
        "wh",
        "empty_field:keywords",
    ),
    "wh_asked_for_yes_no": (
        "Question: What colour is the car?\nResponse: The car is crimson.\nKeywords: crimson",
        "yes_no",
        "wrong_question_type",
    ),
    "yes_no_asked_for_either_or": (
        "Question: Is the car crimson?\nResponse: Yes, it is.\nKeywords: yes",
        "either_or",
        "wrong_question_type",
    ),
    "yes_no_answer_without_yes": (
        "Question: Is the car crimson?\nResponse: The car is crimson.\nKeywords: crimson",
        "yes_no",
        "answer_not_yes_no",
    ),
    "keywords_not_in_answer": (
        "Question: What colour is the car?\nResponse: The car is dark red.\nKeywords: crimson",
        "wh",
        "keywords_not_in_answer",
    ),
    "refusal": ("Sorry, I can't help with creating that.", "wh", "refusal"),
}


@pytest.mark.parametrize("case", sorted(REJECTED_BENCHMARKS))
def test_benchmark_rejected_with_reason(case):
    text, qtype, reason = REJECTED_BENCHMARKS[case]
    assert parse_benchmark(text, qtype).reason == reason


# --- helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that.",
        "I\u2019m sorry, I can\u2019t do that.",
        "I cannot help with this request.",
        "As an AI language model, I don't see images.",
        "I am unable to assist with that.",
        "I apologize, but I must decline.",
    ],
)
def test_detect_refusal_positive(text):
    assert detect_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        P1,
        DESC,
        "Prompt: x\nDescription: A sign on the door reads 'sorry, we are closed' in red paint.",
        "",
        None,
    ],
)
def test_detect_refusal_negative(text):
    assert not detect_refusal(text)


def test_emphasis_helpers():
    prompt = "((crimson)) car, ((( city street ))), (sunny:1.2), ((gold:1.3)) trim"
    assert emphasized_keywords(prompt) == ["crimson", "city street", "gold"]
    # Descriptions are prose: a single bracket there is a parenthesis, not emphasis.
    assert strip_emphasis(prompt, prose=True) == "crimson car, city street, (sunny:1.2), gold trim"
    assert strip_emphasis(prompt) == "crimson car, city street, sunny, gold trim"
    assert emphasized_keywords("no emphasis here") == []


def test_mentions_keyword():
    assert mentions_keyword("Two tabby cats sleep on a sofa.", "tabby cat")
    assert mentions_keyword("The rust-coloured door.", "rust")
    assert not mentions_keyword("A red car.", "crimson")


def test_extract_fields_first_occurrence_wins():
    fields = extract_fields("Description: first one here.\nDescription: second one.")
    assert fields == {"description": "first one here."}


@pytest.mark.parametrize(
    "junk",
    [None, "", "((((", "))))((", "Description:", "Keywords: ,,,", "1.\n2.\n3.", "\x00\ufffd", "**"],
)
def test_parsers_never_raise(color, junk):
    assert all(not p.ok for p in parse_prompts(junk, KW))
    assert not parse_dialogue(junk, P1, "crimson").ok
    assert not parse_benchmark(junk, "wh").ok
    assert parse_keywords(junk, color).items == []
