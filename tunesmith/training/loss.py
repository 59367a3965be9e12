"""Summed token cross-entropy, computed only where labels exist.

The LM head (vocabulary × hidden) is the largest matrix multiply per token, and prompt and padding
positions have no label, so we project only the hidden states that are scored. The caller divides the sum
by the number of label tokens in the whole optimizer step (DESIGN rule 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.data.templates import IGNORE


def causal_lm(model):
    """The transformers *ForCausalLM inside a possible PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of per-token losses, number of scored tokens) for one micro-batch."""
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE
    n = int(scored.sum())
    lm = causal_lm(model)
    if getattr(lm.config, "final_logit_softcapping", None):
        # Models that post-process logits (Gemma-2 soft-capping) take the plain, full-head path.
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        return F.cross_entropy(logits[scored].float(), targets[scored], reduction="sum"), n
    hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = lm.get_output_embeddings()(hidden[:, :-1][scored])
    return F.cross_entropy(logits.float(), targets[scored], reduction="sum"), n
