"""tunesmith's attention for training: SDPA that knows packed rows.

Packed rows (batching.pack) hold several examples end to end, with position ids restarting at 0 for each.
transformers' own SDPA path keeps attention within each example with a dense block-causal mask over the
whole row: (sum of lengths)² scores, most of them masked. Here each example gets its own causal SDPA call,
so attention costs the sum of squared lengths, as it would unpacked. Padded batches (with an attention
mask) take transformers' SDPA path.
"""

from __future__ import annotations

import torch

from tunesmith.models.layers import causal_lm

NAME = "tunesmith_sdpa"


def _segment_bounds(position_ids: torch.Tensor) -> list[int]:
    starts = torch.nonzero(position_ids[0] == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    return starts + [position_ids.shape[1]]


def packed_sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.pop("position_ids", None)
    if attention_mask is not None or position_ids is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = _segment_bounds(position_ids)
    if len(bounds) == 2:  # one example per row: plain causal attention
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)
    if query.shape[0] != 1:
        raise ValueError("packed attention expects one packed row per batch")
    pieces = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None,
                                     is_causal=True, **kwargs)[0]
              for a, b in zip(bounds[:-1], bounds[1:])]
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
