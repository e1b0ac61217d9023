"""How a render call batches rows whose prompts have different numbers of chunks.

A row's text embedding has 77 tokens per chunk of its prompt (prompts over 77 tokens
take several, :mod:`raypipe.generate.emphasis`), so a render call of rows with 1 and 2
chunks stacks embeddings of different lengths. The call pads them to its longest and
tells the UNet's cross-attention which keys are padding (``encoder_attention_mask``), so
a row attends to its own tokens only, in whatever call it is: every render call can
carry ``render.batch_size`` rows. Three wrappers of the UNet's ``forward``:

- :func:`masked_forward` adds the mask of the call under way (:class:`KeyLengths`);
- :func:`rowwise_forward` runs one row (and its guidance twin) per UNet call, for
  ``render.batch_invariant``;
- :func:`trim_forward` cuts the keys that every row of its call masks, so a row run on
  its own (batch-invariant) computes exactly what its own prompt alone computes.
"""

from __future__ import annotations


class KeyLengths:
    """The cross-attention keys of each row of the render call under way (its own text
    embedding's length); ``None`` while every row of the call has the same."""

    def __init__(self):
        self.lengths: list[int] | None = None


def masked_forward(forward, keys: KeyLengths):
    """Wrap a UNet ``forward`` to pass the call's key mask: 1 for a row's own tokens, 0
    for the padding up to the call's longest. Under classifier-free guidance diffusers
    stacks [uncond rows; cond rows]; a row's two halves have the same length."""
    import torch

    def run(sample, *args, **kwargs):
        if keys.lengths is not None:
            states = kwargs.get("encoder_hidden_states")
            if states is None:
                raise RuntimeError(
                    "the UNet was called without encoder_hidden_states as a keyword; "
                    "raypipe cannot mask the padding of rows with fewer prompt chunks"
                )
            lengths = torch.tensor(keys.lengths, device=sample.device)
            positions = torch.arange(states.shape[1], device=sample.device)
            mask = (positions[None, :] < lengths[:, None]).to(sample.dtype)
            kwargs["encoder_attention_mask"] = mask.repeat(sample.shape[0] // len(mask), 1)
        return forward(sample, *args, **kwargs)

    return run


def trim_forward(forward):
    """Wrap a UNet ``forward`` to drop the keys every row of its call masks (the mask is
    a prefix per row), and the mask itself once no row needs it."""

    def run(sample, *args, encoder_attention_mask=None, **kwargs):
        if encoder_attention_mask is not None:
            keep = int(encoder_attention_mask.sum(1).max())
            kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"][:, :keep]
            mask = encoder_attention_mask[:, :keep]
            encoder_attention_mask = None if bool(mask.all()) else mask
        return forward(sample, *args, encoder_attention_mask=encoder_attention_mask, **kwargs)

    return run


def rowwise_forward(forward, guided: bool):
    """Wrap a UNet ``forward`` to run one row (and its CFG twin) per call.

    Under classifier-free guidance diffusers stacks the batch as [uncond rows; cond
    rows], so row i's pair is (i, i + n/2). Every tensor argument whose first dimension
    is the batch is sliced alike (SDXL's ``added_cond_kwargs`` included); the outputs are
    put back in the original order.
    """
    import torch

    def take(x, idx, n):
        if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == n:
            return x[idx]
        if isinstance(x, dict):
            return {k: take(v, idx, n) for k, v in x.items()}
        return x

    def run(sample, *args, **kwargs):
        n = sample.shape[0]
        half = n // 2 if guided and n % 2 == 0 else 0
        groups = [[i, i + half] for i in range(half)] if half else [[i] for i in range(n)]
        outs, order = [], []
        for idx in groups:
            out = forward(
                sample[idx],
                *[take(a, idx, n) for a in args],
                **{k: take(v, idx, n) for k, v in kwargs.items()},
            )
            outs.append(out[0] if isinstance(out, tuple) else out.sample)
            order += idx
        result = torch.empty_like(sample, dtype=outs[0].dtype)
        result[order] = torch.cat(outs)
        return (result,) if isinstance(out, tuple) else type(out)(sample=result)

    return run
