"""Conversations -> token ids and labels, masked by construction.

A conversation is rendered as a list of text pieces, each marked supervised or not: the
prompt pieces (system text, user turns, the assistant header) and the answer pieces (an
assistant answer plus its end-of-turn token). The ids of the text up to the end of each
piece are a prefix of the ids of the text up to the end of the next one (checked, not
assumed), so every token belongs to exactly one piece and its label follows from that
piece. Nothing is re-tokenised in fragments and nothing is matched by offsets; a
tokenizer that merges text across a piece boundary drops the sample with a reason.

Templates:

- ``vicuna_v1``: LLaVA-1.5's format, ``<s>SYSTEM USER: <image>\\nQ ASSISTANT: A</s>USER: ...``.
  Each prompt ends at ``ASSISTANT:`` and each answer starts with its space, so the space
  joins the first answer token (as ``▁It``) rather than being lost to the prompt.
- ``plain``: LLaVA-1.5's stage 1 format (``conv_llava_plain`` / ``preprocess_plain``):
  ``<s><image>CAPTION</s>``, the image then the first answer, no system prompt and no
  roles; the question's text is not used, nor are later turns. Loss on the caption and
  EOS only. LLaVA ends the caption with its separator ``"\\n"``; raypipe ends it with EOS,
  as every other answer, so the model learns to stop.
- ``chat_template``: the tokenizer's own Jinja chat template. The prompt of turn k is the
  template rendered with ``add_generation_prompt=True`` over the first k messages; the
  answer piece is what the assistant message adds, up to and including the end-of-turn
  special token. A template that ends assistant turns without a special token gets EOS
  appended, so the model learns to stop.

A row whose answer turn is empty (or only whitespace), in any of its turns, is dropped
rather than trained on a lone EOS.

``vicuna_v1`` and ``plain`` also exist as Jinja chat templates (:func:`chat_template_for`,
:mod:`raypipe.chat_templates`), written into exports so
``apply_chat_template`` (transformers, vLLM) reproduces the training ids token for token,
for string content and for lists of ``{"type": "image"}`` / ``{"type": "text"}`` parts.

After a special token (BOS, ``<image>``) sentencepiece tokenizers differ: some mark the
next word's start (``▁It``) as at the start of a text, others only at the very start of
the input (``It`` -> ``I``, ``t``; transformers' Llama default). Text that follows a
special token (the ``plain`` caption, the templates' text after BOS) is written with what
makes its first word tokenise as at the start of a text (:func:`word_start_after`): ids
as LLaVA's, which tokenises the caption on its own.

``<image>`` becomes ``num_image_tokens`` copies of the image token id (what LlavaProcessor
does to the text), always with label -100. Truncation to ``max_length`` cuts from the end
and never inside the image tokens: a sample whose image tokens do not fit, or with no
supervised token left, is returned as :class:`Dropped` with its reason.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from raypipe.chat_templates import (
    VICUNA_V1_SYSTEM,
    plain_chat_template,
    vicuna_v1_chat_template,
)
from raypipe.errors import ConfigError, ModelError

#: Label of tokens that carry no loss (the value torch's cross-entropy ignores).
IGNORE_INDEX = -100

TEMPLATES = ("vicuna_v1", "plain", "chat_template")

# Reasons a sample is dropped; the run summary counts rows by these strings.
DROP_BAD_TURNS = "turns are not human/gpt pairs"
DROP_NO_IMAGE_TOKEN = "no <image> in first human turn"
DROP_EXTRA_IMAGE_TOKEN = "more than one <image>"
DROP_IMAGE_TOO_LONG = "image tokens do not fit in max_length"
DROP_NOTHING_TO_SUPERVISE = "nothing to supervise after truncation"
DROP_EMPTY_ANSWER = "empty answer turn"
DROP_TOKEN_BOUNDARY = "tokenizer merges text across a turn boundary"
DROP_TEMPLATE_PREFIX = "chat template does not render turns as prefixes"

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def word_start_after(tokenizer: Any, special_token: str) -> str:
    """What to write between ``special_token`` and a word so the word tokenises as at the
    start of a text: "" (the tokenizer marks every word start, Llama's legacy mode,
    byte-level BPE) or " " (it marks only the input's first word)."""
    word = "USER: It is"
    alone = tokenizer(word, add_special_tokens=False)["input_ids"]
    special = tokenizer(special_token, add_special_tokens=False)["input_ids"]
    for between in ("", " "):
        ids = tokenizer(special_token + between + word, add_special_tokens=False)["input_ids"]
        if ids == special + alone:
            return between
    return ""


def chat_template_for(
    template: str, tokenizer: Any, image_token: str = "<image>", system: str | None = None
) -> str | None:
    """The Jinja chat template of training format ``template`` for ``tokenizer``.

    None for ``chat_template`` (the tokenizer's own template is the format). For
    ``vicuna_v1`` and ``plain`` the template is checked on a two-turn conversation:
    ``tokenizer.apply_chat_template`` must give the training ids (whole conversation and
    generation prompt) token for token, else ModelError.
    """
    if template not in TEMPLATES:
        raise ConfigError(f"unknown conversation template {template!r}; use one of {TEMPLATES}")
    if template == "chat_template":
        return None
    if template == "vicuna_v1":
        after_bos = word_start_after(tokenizer, tokenizer.bos_token) if tokenizer.bos_token else ""
        jinja = vicuna_v1_chat_template(
            VICUNA_V1_SYSTEM if system is None else system, image_token, after_bos
        )
    else:
        jinja = plain_chat_template(image_token, word_start_after(tokenizer, image_token))
    _check_chat_template(jinja, tokenizer, template, image_token, system)
    return jinja


def _check_chat_template(
    jinja: str, tokenizer: Any, template: str, image_token: str, system: str | None
) -> None:
    turns = [
        {"from": "human", "value": f"{image_token}\nWhat is in the picture?"},
        {"from": "gpt", "value": "It is a red square."},
        {"from": "human", "value": "Is it red?"},
        {"from": "gpt", "value": "Yes."},
    ]
    renderer = ConversationRenderer(tokenizer, template, image_token=image_token, system=system)
    rendered = renderer.render(turns, num_image_tokens=1)
    if isinstance(rendered, Dropped):
        raise ModelError(f"the {template} check conversation does not render: {rendered.reason}")
    messages = [{"role": _ROLES[t["from"]], "content": t["value"]} for t in turns]

    def ids(messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
        return list(
            tokenizer.apply_chat_template(
                messages,
                chat_template=jinja,
                tokenize=True,
                add_generation_prompt=add_generation_prompt,
                return_dict=False,
            )
        )

    prompt_end = next(i for i, label in enumerate(rendered.labels) if label != IGNORE_INDEX)
    if (
        ids(messages[:1], True) != rendered.input_ids[:prompt_end]
        or ids(messages, False) != rendered.input_ids
    ):
        raise ModelError(
            f"the {template} chat template does not reproduce the training ids with this "
            f"tokenizer ({type(tokenizer).__name__}); serve the export with the training "
            "format's text, or train with template 'chat_template'"
        )


@dataclass(frozen=True)
class Rendered:
    """Token ids and labels of one sample (labels: ``IGNORE_INDEX`` except answers + EOT)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True)
class Dropped:
    """A sample that cannot be trained on. Falsy, so ``if not result:`` catches it."""

    reason: str  #: one of the DROP_* strings (what the run summary counts)
    detail: str = ""  #: specifics for the log: lengths, the offending text, ...

    def __bool__(self) -> bool:
        return False


def normalize_image_placeholder(
    turns: list[dict[str, str]], image_token: str = "<image>"
) -> list[dict[str, str]] | Dropped:
    """Move the single ``<image>`` of the first human turn to its start, as LLaVA does.

    LLaVA data puts ``<image>`` anywhere in the first human turn; LLaVA-1.5 trains with
    ``<image>\\n`` first. A conversation with no ``<image>`` there, or with more than one
    in the whole conversation, is dropped.
    """
    if not turns or _ROLES.get(str(turns[0].get("from", "")).lower()) != "user":
        return Dropped(DROP_BAD_TURNS, "the first turn is not from the human")
    total = sum(str(t.get("value", "")).count(image_token) for t in turns)
    first = str(turns[0].get("value", ""))
    if image_token not in first:
        return Dropped(DROP_NO_IMAGE_TOKEN, first[:80])
    if total > 1:
        return Dropped(DROP_EXTRA_IMAGE_TOKEN, f"{total} {image_token} placeholders")
    text = first.replace(image_token, "").strip()
    return [{"from": turns[0]["from"], "value": f"{image_token}\n{text}"}] + [
        {"from": t["from"], "value": t["value"]} for t in turns[1:]
    ]


def render_conversation(
    turns: list[dict[str, str]],
    tokenizer: Any,
    template: str,
    num_image_tokens: int,
    image_token: str = "<image>",
    max_length: int | None = None,
    *,
    system: str | None = None,
    chat_template: str | None = None,
) -> Rendered | Dropped:
    """Render LLaVA-style turns (``[{"from": "human"|"gpt", "value": str}]``) to ids + labels.

    One-off convenience over :class:`ConversationRenderer` (which validates the tokenizer
    and template once; use it when rendering many samples).
    """
    renderer = ConversationRenderer(
        tokenizer, template, image_token=image_token, system=system, chat_template=chat_template
    )
    return renderer.render(turns, num_image_tokens, max_length)


class ConversationRenderer:
    """Renders conversations for one tokenizer and template.

    Args:
        tokenizer: a fast Hugging Face tokenizer that has ``image_token`` as one token.
        template: "vicuna_v1", "plain" or "chat_template".
        image_token: the placeholder text in the turns, expanded to image token ids.
        system: system prompt for vicuna_v1 (default: LLaVA-1.5's); for chat_template, a
            system message passed to the template (default: none, the template decides);
            plain has none.
        chat_template: overrides ``tokenizer.chat_template`` (e.g. a processor's template).
    """

    def __init__(
        self,
        tokenizer: Any,
        template: str,
        *,
        image_token: str = "<image>",
        system: str | None = None,
        chat_template: str | None = None,
    ):
        if template not in TEMPLATES:
            raise ConfigError(f"unknown conversation template {template!r}; use one of {TEMPLATES}")
        self.tokenizer = tokenizer
        self.template = template
        self.image_token = image_token
        self.system = system
        self.image_token_id = _single_token_id(tokenizer, image_token)
        if tokenizer.eos_token is None:
            raise ModelError(
                "the tokenizer has no EOS token; LLaVA training needs one to end turns"
            )
        self.eos_token = tokenizer.eos_token
        # Written before the plain caption, so it tokenises as LLaVA's (on its own).
        self._after_image = word_start_after(tokenizer, image_token) if template == "plain" else ""
        self.chat_template = None
        self._parts_content = False
        if template == "chat_template":
            self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
            if not self.chat_template:
                raise ConfigError(
                    "template 'chat_template' needs a tokenizer (or processor) with a chat "
                    "template; this one has none: use template 'vicuna_v1' or pick a model "
                    "whose tokenizer_config.json defines chat_template"
                )
            self._parts_content = _wants_content_parts(tokenizer, self.chat_template)
            # Special tokens that can end an assistant turn (EOS, <|im_end|>, <|eot_id|>, ...).
            specials = set(tokenizer.all_special_tokens) - {image_token}
            self._end_tokens = sorted(specials, key=len, reverse=True)

    def render(
        self,
        turns: list[dict[str, str]],
        num_image_tokens: int,
        max_length: int | None = None,
    ) -> Rendered | Dropped:
        # 1. Check the turns: (human, gpt) pairs with non-empty answers; an unanswered
        #    last human turn is ignored.
        pairs = _pairs(turns)
        if isinstance(pairs, Dropped):
            return pairs
        # 2. Text pieces, each supervised or not.
        if self.template == "vicuna_v1":
            pieces = self._vicuna_pieces(pairs)
            prefix = [] if self.tokenizer.bos_token_id is None else [self.tokenizer.bos_token_id]
        elif self.template == "plain":
            pieces = self._plain_pieces(pairs)
            prefix = [] if self.tokenizer.bos_token_id is None else [self.tokenizer.bos_token_id]
        else:
            pieces = self._chat_template_pieces(pairs)
            prefix = []  # chat templates write their own BOS text
        if isinstance(pieces, Dropped):
            return pieces
        # 3. Ids and labels by cumulative prefixes.
        encoded = self._encode_pieces(pieces, prefix)
        if isinstance(encoded, Dropped):
            return encoded
        ids, labels = encoded
        # 4. Image placeholder -> the processor's number of image tokens.
        ids, labels = self._expand_image_tokens(ids, labels, num_image_tokens)
        # 5. Truncate without cutting image tokens.
        return self._truncate(ids, labels, max_length)

    # -- templates -----------------------------------------------------------------------

    def _vicuna_pieces(self, pairs: list[tuple[str, str]]) -> list[tuple[str, bool]]:
        system = VICUNA_V1_SYSTEM if self.system is None else self.system
        pieces: list[tuple[str, bool]] = []
        head = f"{system} " if system else ""
        for question, answer in pairs:
            pieces.append((f"{head}USER: {question} ASSISTANT:", False))
            pieces.append((f" {answer}{self.eos_token}", True))
            head = ""
        return pieces

    def _plain_pieces(self, pairs: list[tuple[str, str]]) -> list[tuple[str, bool]] | Dropped:
        question, caption = pairs[0]  # LLaVA's plain samples are one (image, caption) pair
        images = question.count(self.image_token)
        if not images:
            return Dropped(DROP_NO_IMAGE_TOKEN, question[:80])
        return [
            (self.image_token * images, False),
            (f"{self._after_image}{caption}{self.eos_token}", True),
        ]

    def _chat_template_pieces(
        self, pairs: list[tuple[str, str]]
    ) -> list[tuple[str, bool]] | Dropped:
        messages: list[dict[str, Any]] = []
        if self.system:
            messages.append(self._message("system", self.system))
        pieces: list[tuple[str, bool]] = []
        rendered_so_far = ""
        # Text after an answer's end-of-turn token (e.g. a newline) opens the next prompt
        # piece: alone, a lone space would tokenise differently from the space before a word.
        pending = ""
        for question, answer in pairs:
            messages.append(self._message("user", question))
            prompt = self._apply(messages, add_generation_prompt=True)
            messages.append(self._message("assistant", answer))
            full = self._apply(messages, add_generation_prompt=False)
            if not prompt.startswith(rendered_so_far) or not full.startswith(prompt):
                return Dropped(
                    DROP_TEMPLATE_PREFIX, "a turn's rendering is not a prefix of the next"
                )
            added = full[len(prompt) :]
            at = added.find(answer)
            if at < 0:
                return Dropped(DROP_TEMPLATE_PREFIX, "the template rewrites the answer text")
            lead, rest = added[:at], added[at + len(answer) :]
            header = pending + prompt[len(rendered_so_far) :]
            if lead.strip():  # e.g. a role header the generation prompt did not include
                # Its trailing space stays with the answer (it belongs to the first word).
                head = lead.rstrip()
                header, lead = header + head, lead[len(head) :]
            pieces.append((header, False))
            end = self._end_of_turn(rest)
            if end is None:
                pieces.append((f"{lead}{answer}{self.eos_token}", True))
                pending = rest
            else:
                pieces.append((f"{lead}{answer}{rest[:end]}", True))
                pending = rest[end:]
            rendered_so_far = full
        # Text after the last end-of-turn token carries nothing to learn: left out.
        return pieces

    def _message(self, role: str, text: str) -> dict[str, Any]:
        if self._parts_content:
            return {"role": role, "content": [{"type": "text", "text": text}]}
        return {"role": role, "content": text}

    def _apply(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def _end_of_turn(self, rest: str) -> int | None:
        """End offset of the special token that closes the answer (after optional spaces)."""
        start = len(rest) - len(rest.lstrip())
        for token in self._end_tokens:
            if rest.startswith(token, start):
                return start + len(token)
        return None

    # -- tokens --------------------------------------------------------------------------

    def _encode_pieces(
        self, pieces: list[tuple[str, bool]], prefix: list[int]
    ) -> tuple[list[int], list[int]] | Dropped:
        texts = list(itertools.accumulate(text for text, _ in pieces))
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids = list(prefix)
        labels = [IGNORE_INDEX] * len(prefix)
        previous: list[int] = []
        for (text, supervised), current in zip(pieces, encoded):
            if current[: len(previous)] != previous:
                return Dropped(DROP_TOKEN_BOUNDARY, f"before {text[:40]!r}")
            new = current[len(previous) :]
            ids += new
            labels += new if supervised else [IGNORE_INDEX] * len(new)
            previous = current
        return ids, labels

    def _expand_image_tokens(
        self, ids: list[int], labels: list[int], num_image_tokens: int
    ) -> tuple[list[int], list[int]]:
        if self.image_token_id not in ids:
            return ids, labels
        out_ids: list[int] = []
        out_labels: list[int] = []
        for token, label in zip(ids, labels):
            if token == self.image_token_id:
                out_ids += [token] * num_image_tokens
                out_labels += [IGNORE_INDEX] * num_image_tokens
            else:
                out_ids.append(token)
                out_labels.append(label)
        return out_ids, out_labels

    def _truncate(
        self, ids: list[int], labels: list[int], max_length: int | None
    ) -> Rendered | Dropped:
        if max_length is not None and len(ids) > max_length:
            image_positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
            if image_positions and image_positions[-1] >= max_length:
                return Dropped(
                    DROP_IMAGE_TOO_LONG,
                    f"image tokens end at {image_positions[-1] + 1} > max_length {max_length}",
                )
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            return Dropped(DROP_NOTHING_TO_SUPERVISE, f"{len(ids)} tokens, max_length {max_length}")
        return Rendered(input_ids=ids, labels=labels)


def _pairs(turns: list[dict[str, str]]) -> list[tuple[str, str]] | Dropped:
    """(question, answer) pairs, stripped. Dropped: turns that are not human/gpt pairs, or
    any answer that is empty or only whitespace (the whole row: a conversation with a
    missing answer is not one to learn from, and its later turns may refer to it)."""
    roles = [_ROLES.get(str(t.get("from", "")).lower()) for t in turns]
    if len(turns) > 1 and len(turns) % 2 == 1 and roles[-1] == "user":
        turns, roles = turns[:-1], roles[:-1]  # a last question without an answer
    if not turns or len(turns) % 2:
        return Dropped(DROP_BAD_TURNS, f"{len(turns)} turns")
    pairs = []
    for k in range(0, len(turns), 2):
        if roles[k] != "user" or roles[k + 1] != "assistant":
            return Dropped(DROP_BAD_TURNS, f"turn {k}: {roles[k]!r} then {roles[k + 1]!r}")
        answer = str(turns[k + 1]["value"] or "").strip()
        if not answer:
            return Dropped(DROP_EMPTY_ANSWER, f"turn {k + 1} of {len(turns)}")
        pairs.append((str(turns[k]["value"]).strip(), answer))
    return pairs


def _single_token_id(tokenizer: Any, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ModelError(
            f"the tokenizer splits {token!r} into {len(ids)} tokens; add it as a special token "
            "(tokenizer.add_special_tokens) and resize the model's embeddings"
        )
    return ids[0]


def _wants_content_parts(tokenizer: Any, chat_template: str) -> bool:
    """Whether the template reads message content as a list of parts (llava-hf style)."""
    probe = "raypipe-probe-text"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": probe}], chat_template=chat_template, tokenize=False
        )
        if probe in text:
            return False
    except Exception:  # noqa: BLE001 - a template that fails on strings may take parts
        pass
    parts = [{"role": "user", "content": [{"type": "text", "text": probe}]}]
    try:
        text = tokenizer.apply_chat_template(parts, chat_template=chat_template, tokenize=False)
    except Exception as exc:
        raise ConfigError(f"the chat template fails on a one-message conversation: {exc}") from exc
    if probe not in text:
        raise ConfigError("the chat template drops the message text; use template 'vicuna_v1'")
    return True
