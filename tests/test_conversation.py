"""Golden label-mask tests for raypipe.train.conversation (tiny Llama tokenizer, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from raypipe.errors import ConfigError
from raypipe.train.conversation import (
    DROP_BAD_TURNS,
    DROP_EXTRA_IMAGE_TOKEN,
    DROP_IMAGE_TOO_LONG,
    DROP_NO_IMAGE_TOKEN,
    DROP_NOTHING_TO_SUPERVISE,
    DROP_TEMPLATE_PREFIX,
    IGNORE_INDEX,
    TEMPLATES,
    VICUNA_V1_SYSTEM,
    ConversationRenderer,
    Dropped,
    Rendered,
    normalize_image_placeholder,
    render_conversation,
)

SINGLE = [
    {"from": "human", "value": "<image>\nWhat colour is the square?"},
    {"from": "gpt", "value": "It is a red square."},
]
MULTI = SINGLE + [
    {"from": "human", "value": "Is the square blue?"},
    {"from": "gpt", "value": "No."},
    {"from": "human", "value": "Describe the image in detail."},
    {"from": "gpt", "value": "The image shows a red square on a white background, é 日本."},
]
CONVERSATIONS = {"single": SINGLE, "multi": MULTI}

#: llava-hf's template shape: content as a list of parts, and no end-of-turn token.
PARTS_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ part['text'] + ' ' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.fixture(scope="module")
def processor(tiny_dir):
    from transformers import AutoProcessor

    from raypipe.tiny import resolve_tiny

    return AutoProcessor.from_pretrained(resolve_tiny("raypipe-tiny/tiny-llava"))


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))


def processor_ids(processor, text, image, add_special_tokens=True):
    """LlavaProcessor's own expansion of ``text`` (one <image>) with ``image``."""
    out = processor(
        text=[text], images=[image], return_tensors="np", add_special_tokens=add_special_tokens
    )
    return out["input_ids"][0].tolist()


def num_image_tokens(processor, image):
    ids = processor_ids(processor, "<image>", image)
    return ids.count(processor.image_token_id)


def supervised_runs(rendered: Rendered) -> list[list[int]]:
    """Maximal runs of consecutive supervised positions, as token ids."""
    runs, current = [], []
    for token, label in zip(rendered.input_ids, rendered.labels):
        if label != IGNORE_INDEX:
            assert label == token  # a label is the token at its own position (HF shifts)
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def answers(turns):
    return [t["value"] for t in turns if t["from"] == "gpt"]


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("kind", sorted(CONVERSATIONS))
def test_supervised_tokens_decode_to_answers_plus_eos(processor, image, template, kind):
    tok = processor.tokenizer
    turns = CONVERSATIONS[kind]
    n_image = num_image_tokens(processor, image)
    rendered = render_conversation(turns, tok, template, n_image)
    assert isinstance(rendered, Rendered)
    assert len(rendered.input_ids) == len(rendered.labels)
    runs = supervised_runs(rendered)
    supervised = answers(turns)[:1] if template == "plain" else answers(turns)  # caption only
    expected = [f"{a}{tok.eos_token}" for a in supervised]
    assert [tok.decode(run).strip() for run in runs] == expected
    assert all(run[-1] == tok.eos_token_id for run in runs)
    # The first answer word survives whole (the "ASSISTANT: " space pitfall).
    assert tok.decode(runs[0][:2]).strip().startswith("It is")
    # Image tokens: the processor's count, never supervised.
    image_positions = [i for i, t in enumerate(rendered.input_ids) if t == processor.image_token_id]
    assert len(image_positions) == n_image == 16
    assert all(rendered.labels[i] == IGNORE_INDEX for i in image_positions)
    # Everything that is not an answer is masked: supervised count = answer tokens.
    assert rendered.num_supervised == sum(len(r) for r in runs)


@pytest.mark.parametrize("kind", sorted(CONVERSATIONS))
def test_vicuna_v1_matches_llava15_text_and_processor_expansion(processor, image, kind):
    """Ids equal LlavaProcessor's tokenisation of the LLaVA-1.5 conversation string."""
    turns = CONVERSATIONS[kind]
    eos = processor.tokenizer.eos_token
    text = VICUNA_V1_SYSTEM + " "
    for q, a in zip(turns[::2], turns[1::2]):
        text += f"USER: {q['value']} ASSISTANT: {a['value']}{eos}"
    rendered = render_conversation(
        turns, processor.tokenizer, "vicuna_v1", num_image_tokens(processor, image)
    )
    assert rendered.input_ids == processor_ids(processor, text, image)


@pytest.mark.parametrize("kind", sorted(CONVERSATIONS))
def test_chat_template_matches_processor_expansion(processor, image, kind):
    turns = CONVERSATIONS[kind]
    tok = processor.tokenizer
    messages = [
        {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
        for t in turns
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    rendered = render_conversation(turns, tok, "chat_template", num_image_tokens(processor, image))
    assert rendered.input_ids == processor_ids(processor, text, image, add_special_tokens=False)


def test_image_token_count_follows_the_image_processor(processor, image):
    """A 48 px crop gives 36 image tokens; the renderer expands to whatever it is told."""
    from transformers import CLIPImageProcessorPil

    big = CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    original = processor.image_processor
    processor.image_processor = big
    try:
        n_image = num_image_tokens(processor, image)
    finally:
        processor.image_processor = original
    assert n_image == 36
    rendered = render_conversation(SINGLE, processor.tokenizer, "vicuna_v1", n_image)
    assert rendered.input_ids.count(processor.image_token_id) == 36


@pytest.mark.parametrize("kind", sorted(CONVERSATIONS))
def test_parts_chat_template_without_end_token_gets_eos(processor, kind):
    """llava-hf style templates (content parts, no EOS): answers still end with EOS."""
    tok = processor.tokenizer
    turns = CONVERSATIONS[kind]
    renderer = ConversationRenderer(tok, "chat_template", chat_template=PARTS_TEMPLATE)
    rendered = renderer.render(turns, 4)
    assert isinstance(rendered, Rendered), rendered
    runs = supervised_runs(rendered)
    assert [tok.decode(r).strip() for r in runs] == [f"{a}{tok.eos_token}" for a in answers(turns)]
    text = tok.decode(rendered.input_ids)
    assert text.startswith("USER: <image><image><image><image>\nWhat colour")
    assert "ASSISTANT: It is a red square.</s> USER:" in text or kind == "single"


def test_truncation_keeps_image_tokens_and_earlier_answers(processor):
    tok = processor.tokenizer
    full = render_conversation(MULTI, tok, "vicuna_v1", 16)
    runs = supervised_runs(full)
    # Cut inside the last answer: earlier answers whole, the last one partly.
    cut = len(full.input_ids) - 5
    short = render_conversation(MULTI, tok, "vicuna_v1", 16, max_length=cut)
    assert short.input_ids == full.input_ids[:cut] and short.labels == full.labels[:cut]
    short_runs = supervised_runs(short)
    assert short_runs[:-1] == runs[:-1] and short_runs[-1] == runs[-1][: len(short_runs[-1])]
    assert len(short_runs[-1]) < len(runs[-1])


def test_truncation_never_cuts_image_tokens(processor):
    tok = processor.tokenizer
    full = render_conversation(SINGLE, tok, "vicuna_v1", 16)
    last_image = max(i for i, t in enumerate(full.input_ids) if t == processor.image_token_id)
    for max_length in (5, last_image, last_image + 1 - 8):
        dropped = render_conversation(SINGLE, tok, "vicuna_v1", 16, max_length=max_length)
        assert isinstance(dropped, Dropped) and not dropped
        assert dropped.reason == DROP_IMAGE_TOO_LONG
    # Image tokens fit but the answer does not start: nothing to supervise.
    first_answer = full.labels.index(next(lbl for lbl in full.labels if lbl != IGNORE_INDEX))
    dropped = render_conversation(SINGLE, tok, "vicuna_v1", 16, max_length=first_answer)
    assert dropped.reason == DROP_NOTHING_TO_SUPERVISE
    kept = render_conversation(SINGLE, tok, "vicuna_v1", 16, max_length=first_answer + 1)
    assert kept.num_supervised == 1
    assert kept.input_ids.count(processor.image_token_id) == 16


def test_bad_turns_are_dropped_with_reason(processor):
    tok = processor.tokenizer
    gpt_first = [SINGLE[1], SINGLE[0]]
    assert render_conversation(gpt_first, tok, "vicuna_v1", 16).reason == DROP_BAD_TURNS
    assert render_conversation([], tok, "vicuna_v1", 16).reason == DROP_BAD_TURNS
    # A last question without an answer is left out, not an error.
    trailing = MULTI + [{"from": "human", "value": "And now?"}]
    assert render_conversation(trailing, tok, "vicuna_v1", 16) == render_conversation(
        MULTI, tok, "vicuna_v1", 16
    )


def test_template_that_rewrites_history_is_dropped(processor):
    numbered = (
        "{{ messages | length }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
        "{% endfor %}"
    )
    renderer = ConversationRenderer(processor.tokenizer, "chat_template", chat_template=numbered)
    assert renderer.render(SINGLE, 16).reason == DROP_TEMPLATE_PREFIX


def test_unknown_template_and_missing_chat_template_raise(processor):
    with pytest.raises(ConfigError, match="vicuna_v1"):
        ConversationRenderer(processor.tokenizer, "alpaca")
    tok = processor.tokenizer
    saved, tok.chat_template = tok.chat_template, None
    try:
        with pytest.raises(ConfigError, match="chat template"):
            ConversationRenderer(tok, "chat_template")
    finally:
        tok.chat_template = saved


def test_normalize_image_placeholder():
    at_end = [{"from": "human", "value": "What colour is it?\n<image>"}, SINGLE[1]]
    moved = normalize_image_placeholder(at_end)
    assert moved[0]["value"] == "<image>\nWhat colour is it?" and moved[1] == SINGLE[1]
    in_middle = [{"from": "human", "value": "Look <image> here"}, SINGLE[1]]
    assert normalize_image_placeholder(in_middle)[0]["value"] == "<image>\nLook  here"
    no_image = [{"from": "human", "value": "What colour?"}, SINGLE[1]]
    assert normalize_image_placeholder(no_image).reason == DROP_NO_IMAGE_TOKEN
    twice = SINGLE + [{"from": "human", "value": "<image> again"}, SINGLE[1]]
    assert normalize_image_placeholder(twice).reason == DROP_EXTRA_IMAGE_TOKEN
    later = [{"from": "human", "value": "Hi"}, SINGLE[1], SINGLE[0], SINGLE[1]]
    assert normalize_image_placeholder(later).reason == DROP_NO_IMAGE_TOKEN


def test_merge_across_piece_boundary_is_dropped_not_mislabelled(processor):
    """A template whose prompt ends inside a word ("... t" + "he ..."): the prompt's ids
    are not a prefix of the full ids, so the sample is dropped rather than mislabelled."""
    from raypipe.train.conversation import DROP_TOKEN_BOUNDARY

    split_word = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
        "{% else %}{{ ' t' + m['content'] + eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ ' t' }}{% endif %}"
    )
    tok = processor.tokenizer
    assert tok.tokenize(" the")[-1] != tok.tokenize(" t")[-1]  # "the" is one token
    turns = [SINGLE[0], {"from": "gpt", "value": "he image shows a square."}]
    renderer = ConversationRenderer(tok, "chat_template", chat_template=split_word)
    assert renderer.render(turns, 16).reason == DROP_TOKEN_BOUNDARY
