"""One request to a vLLM engine: the sampling parameters and prompt token ids the engine
takes, and how its answer is read back. Its cache key hashes the same body the ``openai``
backend sends (:func:`raypipe.llm.request_body.request_body`)."""

from __future__ import annotations

import json
from typing import Any

from raypipe.llm.base import LLMRequest


def sampling_params(req: LLMRequest) -> dict[str, Any]:
    """``req``'s vLLM ``SamplingParams`` as a plain dict (what Ray Data LLM rows carry)."""
    schema = req.response_schema
    return {
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "seed": req.seed,
        "structured_outputs": None
        if schema is None
        else {"json": json.dumps(schema), "disable_any_whitespace": True},
    }


def chat_ids(tokenizer: Any, messages) -> list[int]:
    """The prompt token ids of ``messages`` through the tokenizer's chat template, with
    the generation prompt (what ``vllm.LLM.chat`` feeds the engine)."""
    out = tokenizer.apply_chat_template(
        [dict(m) for m in messages], add_generation_prompt=True, tokenize=True
    )
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(i) for i in ids]


def decode(tokenizer: Any, tokens: list[int]) -> str:
    """An answer's text from its token ids, decoded whole. vLLM's incremental detokenizer
    can drop text when a byte-fallback sequence goes astray ("invalid prefix
    detokenization error ... resetting decode stream"), leaving e.g. half a JSON object."""
    return tokenizer.decode(tokens, skip_special_tokens=True)


def finish_reason(n_out: int, last_token: int | None, max_tokens: int, eos: set[int]) -> str:
    """``length`` when the engine stopped at ``max_tokens`` without an end token, else
    ``stop`` (Ray Data LLM rows carry the tokens, not vLLM's finish reason)."""
    if n_out >= max_tokens and last_token not in eos:
        return "length"
    return "stop"


def eos_ids(tokenizer: Any, path: str) -> set[int]:
    """The tokens that end an answer: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        from transformers import GenerationConfig

        extra = GenerationConfig.from_pretrained(path).eos_token_id
        ids |= set(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    except (OSError, ValueError):
        pass
    return ids


# ---------------------------------------------------------------------------------------
# Engine settings and the Ray Data LLM processor
