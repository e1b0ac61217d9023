"""The training formats as Jinja chat templates (``vicuna_v1``, LLaVA's ``plain``).

Training renders conversations with :mod:`raypipe.train.conversation`; these templates
say the same in Jinja, so exports (``apply_chat_template``, transformers pipelines,
``vllm serve``) prompt a tuned model as it was trained, and the tiny test models
(:mod:`raypipe.tiny`) carry them. They live below ``train`` so that both can use them.
"""

from __future__ import annotations

import json

#: LLaVA-1.5's system prompt (conv_vicuna_v1).
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# -- Jinja chat templates of the training formats ---------------------------------------
# One line of Jinja each (no newlines, so trim_blocks and lstrip_blocks change nothing).
# A message's content is a string or a list of parts; image parts ("image", "image_url")
# render as the image token, text parts are joined with "\n". Text is stripped, as
# training strips turns.

_JINJA_TEXT = (
    "{%- macro text_of(content) -%}"
    "{%- if content is string -%}{{ content | replace(image_token, '') | trim }}"
    "{%- else -%}{%- for part in content if part['type'] == 'text' -%}"
    "{{ part['text'] | replace(image_token, '') | trim }}{%- if not loop.last -%}"
    "{{ '\\n' }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- macro images_of(content, after='') -%}"
    "{%- if content is string -%}{%- set n = content.split(image_token) | length - 1 -%}"
    "{%- else -%}{%- set n = content | selectattr('type', 'in', ['image', 'image_url'])"
    " | list | length -%}{%- endif -%}"
    "{{ (image_token + after) * n }}"
    "{%- endmacro -%}"
)


def _jinja_str(text: str) -> str:
    """A Jinja string literal (JSON's escapes are Jinja's)."""
    return json.dumps(text)


def vicuna_v1_chat_template(
    system: str = VICUNA_V1_SYSTEM, image_token: str = "<image>", after_bos: str = " "
) -> str:
    """The ``vicuna_v1`` format as a Jinja chat template.

    ``<s>SYSTEM USER: <image>\\nQ ASSISTANT: A</s>USER: ...``: images go first in a user
    turn, each as ``image_token + "\\n"`` (LLaVA's ``<image>\\n`` before the question); the
    generation prompt ends at ``ASSISTANT:``. A first message with role ``system`` replaces
    ``system`` (an empty one: no system text), as ``ConversationRenderer(system=...)``.
    ``after_bos`` is written after BOS: " " for tokenizers that mark a word start only at
    the start of the input (see :func:`word_start_after`), else "".
    """
    return (
        "{%- set image_token = "
        + _jinja_str(image_token)
        + " -%}"
        + _JINJA_TEXT
        + "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = text_of(messages[0]['content']) -%}"
        "{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = " + _jinja_str(system) + " -%}"
        "{%- set turns = messages -%}{%- endif -%}"
        "{{ bos_token }}{{ " + _jinja_str(after_bos) + " }}"
        "{%- if system -%}{{ system + ' ' }}{%- endif -%}"
        "{%- for message in turns -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ 'USER: ' + (images_of(message['content'], '\\n') + text_of(message['content']))"
        " | trim + ' ' }}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{ 'ASSISTANT: ' + text_of(message['content']) + eos_token }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )


def plain_chat_template(image_token: str = "<image>", after_image: str = " ") -> str:
    """The ``plain`` format as a Jinja chat template: ``<s><image> CAPTION</s>``.

    Renders the images of the first user message, then the first assistant message and
    EOS; system messages, the user's text and later turns are left out, as in training.
    The generation prompt adds nothing (the caption follows the image). ``after_image``
    is written before the caption (see :func:`word_start_after`).
    """
    return (
        "{%- set image_token = "
        + _jinja_str(image_token)
        + " -%}"
        + _JINJA_TEXT
        + "{%- set state = namespace(asked=false, answered=false) -%}"
        "{{ bos_token }}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' and not state.asked -%}"
        "{{ images_of(message['content']) }}{%- set state.asked = true -%}"
        "{%- elif message['role'] == 'assistant' and not state.answered -%}"
        "{{ " + _jinja_str(after_image) + " + text_of(message['content']) + eos_token }}"
        "{%- set state.answered = true -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


#: ``vicuna_v1`` as a Jinja chat template, for tokenizers that mark a word start only at
#: the start of the input (transformers' Llama default, the tiny test models); exports use
#: :func:`chat_template_for`, which fits it to their tokenizer.
VICUNA_V1_CHAT_TEMPLATE = vicuna_v1_chat_template()

#: ``plain`` as a Jinja chat template (same tokenizers as VICUNA_V1_CHAT_TEMPLATE).
PLAIN_CHAT_TEMPLATE = plain_chat_template()
