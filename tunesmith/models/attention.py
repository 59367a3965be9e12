"""tunesmith's attention for training: SDPA that knows packed rows.

Packed rows (batching.pack) hold several examples end to end, with position ids restarting at 0 for each.
transformers' own SDPA path keeps attention within each example with a dense block-causal mask over the
whole row: (sum of lengths)² scores, most of them masked. Here each example gets its own causal SDPA call,
so attention costs the sum of squared lengths, as it would unpacked. Padded batches (with an attention
mask) take transformers' SDPA path.

A segment whose positions restart at p > 0 instead of 0 is a branch of the example before it: it continues
that example's first p tokens (its shared prefix) in place of what followed them. A preference pair packs as
prompt + chosen reply, then the rejected reply as a branch at the prompt's length, so the prompt is computed
once for both replies (stages/preference.py).
"""

from __future__ import annotations

import torch

from tunesmith.models.layers import causal_lm

NAME = "tunesmith_sdpa"


def _segments(position_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(start, end, first position) of each run of consecutive positions in a packed row."""
    positions = position_ids[0]
    breaks = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten().add(1).tolist()
    bounds = [0] + breaks + [len(positions)]
    return [(a, b, int(positions[a])) for a, b in zip(bounds[:-1], bounds[1:])]


def packed_sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.pop("position_ids", None)
    if attention_mask is not None or position_ids is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    segments = _segments(position_ids)
    if len(segments) == 1 and segments[0][2] == 0:  # one example per row: plain causal attention
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)
    if query.shape[0] != 1:
        raise ValueError("packed attention expects one packed row per batch")
    pieces, example = [], 0
    for a, b, first in segments:
        if first == 0:  # a new example: causal within itself
            example = a
            pieces.append(sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                                 is_causal=True, **kwargs)[0])
            continue
        # a branch: its queries see the example's first `first` tokens, then themselves causally
        keys = torch.cat([key[:, :, example:example + first], key[:, :, a:b]], dim=2)
        values = torch.cat([value[:, :, example:example + first], value[:, :, a:b]], dim=2)
        n = b - a
        allowed = torch.ones(n, first + n, dtype=torch.bool, device=query.device)
        allowed[:, first:] = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
        pieces.append(sdpa_attention_forward(module, query[:, :, a:b], keys, values, allowed[None, None],
                                             is_causal=False, **kwargs)[0])
    return torch.cat(pieces, dim=1), None  # outputs are (batch, sequence, heads, head_dim)


def _mask(*args, attention_mask=None, **kwargs):
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None  # the attention function keeps each example causal and to itself
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def use_packed_attention(model) -> bool:
    """Switch a transformers model (possibly inside a PEFT wrapper) to this attention. False when the model
    does not route attention through transformers' AttentionInterface (then it cannot be given packed rows)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa)
    AttentionMaskInterface.register(NAME, _mask)
    base = causal_lm(model)
    try:
        base.set_attn_implementation(NAME)
    except (ValueError, NotImplementedError, AttributeError):
        return False
    return base.config._attn_implementation == NAME
