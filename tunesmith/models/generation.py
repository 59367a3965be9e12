"""Sampling replies from token ids: left-padded batches through `generate`, with the KV cache on.

Used where replies are made during training (GRPO's rollouts) and by the inference commands; both give the
prompt ids exactly as training built them (data.templates.encode_prompt).
"""

from __future__ import annotations

from typing import Sequence

import torch


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) with every prompt ending at the last column, so replies start together."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def until_stop(ids: list[int], stop_ids: Sequence[int], keep_stop: bool) -> list[int]:
    """The reply up to its first stop token (kept or not); all of it if it never stopped."""
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[: i + 1] if keep_stop else ids[:i]
    return ids


@torch.no_grad()
def sample_replies(model, prompts: Sequence[Sequence[int]], pad_id: int, stop_ids: Sequence[int],
                   max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                   repetition_penalty: float = 1.0, batch_size: int = 16, keep_stop: bool = True) -> list[list[int]]:
    """Reply ids for each prompt, in batches of `batch_size`; temperature 0 decodes greedily. The model is put
    in eval mode while it generates (gradient checkpointing would otherwise turn the KV cache off)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sampling = (dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)  # 0: no top-k cut
                if temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None))
    replies: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            ids, mask = left_padded(prompts[start:start + batch_size], pad_id)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True,
                                 max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids), pad_token_id=pad_id,
                                 repetition_penalty=repetition_penalty, **sampling)
            replies += [until_stop(row.tolist(), stop_ids, keep_stop) for row in out[:, ids.shape[1]:]]
    finally:
        model.train(was_training)
    return replies
