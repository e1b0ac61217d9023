"""Prompt emphasis and long prompts for CLIP text encoders.

StableLLaVA prompts put the ability keyword first and double-bracketed, ``((crimson))
vintage car``, a syntax that stock diffusers passes to the tokenizer as literal brackets.
Here the brackets become weights (A1111 rules, parsed by
:func:`raypipe.matching.parse_emphasis`): ``(x)`` multiplies the weight of x's tokens by
1.1, ``((x))`` by 1.1**2, ``[x]`` divides by 1.1, ``(x:1.4)`` sets a factor of 1.4, and
``\\(`` is a literal bracket. Token embeddings are multiplied by their weight and then
rescaled so the prompt's mean embedding is what it was unweighted.

Prompts longer than the encoder's window (77 tokens = BOS + 75 + EOS) are split into
75-token chunks, each encoded on its own and concatenated along the sequence axis,
instead of being cut. A chunk breaks after a comma when one lies within its last 20
tokens, so phrases stay whole. Everything is computed per prompt, so a prompt's
embeddings never depend on which other prompts share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from raypipe.matching import parse_emphasis

#: Tokens per chunk between BOS and EOS (CLIP's 77-token window).
CHUNK_TOKENS = 75
#: A chunk breaks after a comma found within this many tokens of its end.
COMMA_LOOKBACK = 20


@dataclass
class TokenChunks:
    """A prompt as fixed-size encoder windows: ``ids`` and ``weights`` are lists of
    chunks, each ``CHUNK_TOKENS + 2`` long (BOS, tokens, EOS, padding)."""

    ids: list[list[int]]
    weights: list[list[float]]

    @property
    def weighted(self) -> bool:
        return any(w != 1.0 for chunk in self.weights for w in chunk)


def tokenize_chunks(tokenizer, text: str, emphasis: bool = True) -> TokenChunks:
    """Tokenize a prompt into 77-token chunks with per-token weights.

    A chunk is ``[BOS] + up to 75 tokens + [EOS] + padding``: for a prompt that fits
    in one chunk without emphasis this is exactly what diffusers feeds the encoder.
    """
    fragments = parse_emphasis(text) if emphasis else [(text, 1.0)]
    tokens: list[int] = []
    weights: list[float] = []
    for frag, weight in fragments:
        ids = tokenizer(frag, add_special_tokens=False, truncation=False, verbose=False)[
            "input_ids"
        ]
        tokens += ids
        weights += [weight] * len(ids)

    comma = tokenizer.convert_tokens_to_ids(",</w>")
    if comma is None or comma == tokenizer.unk_token_id:
        comma = -1
    chunks: list[tuple[list[int], list[float]]] = []
    start = 0
    while start < len(tokens) or not chunks:
        end = min(start + CHUNK_TOKENS, len(tokens))
        if end < len(tokens):
            # Break after the last comma near the end, so a phrase isn't split in two.
            for i in range(end - 1, max(start, end - COMMA_LOOKBACK) - 1, -1):
                if tokens[i] == comma:
                    end = i + 1
                    break
        chunks.append((tokens[start:end], weights[start:end]))
        start = end

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out = TokenChunks([], [])
    for ids, ws in chunks:
        fill = CHUNK_TOKENS - len(ids)
        out.ids.append([bos] + ids + [eos] + [pad] * fill)
        out.weights.append([1.0] + ws + [1.0] + [1.0] * fill)
    return out


def pad_chunks(chunks: TokenChunks, tokenizer, n: int) -> TokenChunks:
    """Extend to ``n`` chunks with empty ones (the encoding of an empty prompt)."""
    empty = tokenize_chunks(tokenizer, "", emphasis=False)
    extra = n - len(chunks.ids)
    return TokenChunks(chunks.ids + empty.ids * extra, chunks.weights + empty.weights * extra)


def encode_chunks(
    text_encoder,
    chunks: list[TokenChunks],
    device,
    hidden_layer: int | None = None,
    pooled: bool = False,
):
    """Encode prompts (already padded to the same number of chunks) in one forward pass.

    Returns ``embeds`` of shape (prompts, chunks * 77, hidden) and, with ``pooled``, the
    encoder's pooled/projected output of each prompt's first chunk (SDXL's second
    encoder). ``hidden_layer`` picks a hidden state (SDXL uses -2); None = the last
    hidden state after the final layer norm, as SD 1.x/2.x pipelines use.
    """
    import torch

    n = len(chunks[0].ids)
    if any(len(c.ids) != n for c in chunks):
        raise ValueError("encode_chunks: pad every prompt to the same number of chunks first")
    ids = torch.tensor([i for c in chunks for i in c.ids], device=device)
    out = text_encoder(ids, output_hidden_states=hidden_layer is not None)
    hidden = out.last_hidden_state if hidden_layer is None else out.hidden_states[hidden_layer]
    width = hidden.shape[-1]
    hidden = hidden.reshape(len(chunks), n * hidden.shape[1], width)

    rows = []
    for row, c in zip(hidden, chunks):
        if c.weighted:
            w = torch.tensor([x for chunk in c.weights for x in chunk], device=device)
            row = _weight(row, w.to(row.dtype))
        rows.append(row)
    embeds = torch.stack(rows)
    if not pooled:
        return embeds
    # CLIPTextModelWithProjection (SDXL's second encoder) -> text_embeds; CLIPTextModel -> pooler.
    pooled_out = getattr(out, "text_embeds", None)
    if pooled_out is None:
        pooled_out = out.pooler_output
    pooled_out = pooled_out.reshape(len(chunks), n, -1)[:, 0]
    return embeds, pooled_out


def _weight(row, weights):
    """Scale token embeddings by their weights, then restore the original mean (A1111).

    The rescale keeps the prompt's overall embedding magnitude; when the mean is so close
    to zero that the ratio would flip or blow up the embeddings, it is skipped.
    """
    original = row.float().mean()
    weighted = row * weights[:, None]
    ratio = original / weighted.float().mean()
    if not (0.5 <= float(ratio) <= 2.0):
        return weighted
    return weighted * ratio.to(row.dtype)
