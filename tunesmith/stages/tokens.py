"""Summed token cross-entropy, by default computed only where labels exist.

The LM head (vocabulary × hidden) is the largest matrix multiply per token, and prompt and padding
positions have no label, so by default we project only the hidden states that are scored
(`train.logits_at_labels_only`). The caller divides the sum by the number of label tokens in the whole
optimizer step (DESIGN rule 1).

A batch may be packed (several examples in one row, see batching.pack): it then carries `position_ids`
that restart at 0 for each example and no attention mask, and the attention (training/attention.py) keeps
each example to itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith.data.batching import eval_batches
from tunesmith.data.templates import IGNORE
from tunesmith.data.token_store import Tokenized
from tunesmith.models.device import autocast
from tunesmith.models.layers import causal_lm


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool | None]:
    # No KV cache in training: transformers would otherwise build one (config.use_cache) and, with a cache,
    # it would not recognise packed rows.
    return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
            "position_ids": batch.get("position_ids"), "use_cache": False}


def virtual_tokens(model) -> int | None:
    """For soft-prompt methods (peft prompt learning), the positions peft puts before the input (0 for prefix
    tuning, whose prefix lives in the attention cache); None for every other model."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return None
    return 0 if config.peft_type.value == "PREFIX_TUNING" else config.num_virtual_tokens


def token_loss_sum(model, batch: dict[str, torch.Tensor], labels_only: bool = True) -> tuple[torch.Tensor, int]:
    """(sum of per-token losses, number of scored tokens) for one micro-batch."""
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE
    n = int(scored.sum())
    virtual = virtual_tokens(model)
    lm = causal_lm(model)
    if not labels_only or virtual is not None or getattr(lm.config, "final_logit_softcapping", None):
        # The plain path: logits at every position, through the model's own forward. Models that post-process
        # logits (Gemma-2's soft-capping) always take it, and so do soft prompts: only peft's forward adds
        # them, and their `virtual` positions come first and are not scored.
        logits = model(**model_inputs(batch)).logits[:, (virtual or 0):-1]
        return F.cross_entropy(logits[scored].float(), targets[scored], reduction="sum"), n
    hidden = lm.get_decoder()(**model_inputs(batch)).last_hidden_state
    logits = lm.get_output_embeddings()(hidden[:, :-1][scored])
    return F.cross_entropy(logits.float(), targets[scored], reduction="sum"), n


def token_logps(model, batch: dict[str, torch.Tensor], labels_only: bool = True, temperature: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each label token, where labels are), both shaped like the targets (rows × length-1;
    0 where there is no label): what the per-token objectives (GRPO) weigh, under the distribution sampled at
    `temperature`. The same two paths as token_loss_sum."""
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE
    virtual = virtual_tokens(model)
    lm = causal_lm(model)
    if not labels_only or virtual is not None or getattr(lm.config, "final_logit_softcapping", None):
        logits = model(**model_inputs(batch)).logits[:, (virtual or 0):-1][scored]
    else:
        hidden = lm.get_decoder()(**model_inputs(batch)).last_hidden_state
        logits = lm.get_output_embeddings()(hidden[:, :-1][scored])
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    values = -F.cross_entropy(logits, targets[scored], reduction="none")
    out = torch.zeros(targets.shape, dtype=values.dtype, device=values.device)
    return out.masked_scatter(scored, values), scored


def sequence_logps(model, batch: dict[str, torch.Tensor], labels_only: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of each sequence's label-token log-probabilities, its label-token count): the score preference
    stages compare. A padded batch holds one sequence per row; a packed one (with `score_from`) says for each
    scored token where its prediction is read, which token it is and whose sequence it belongs to."""
    if "score_from" in batch:
        return indexed_logps(model, batch, labels_only)
    logps, scored = token_logps(model, batch, labels_only)
    return logps.sum(1), scored.sum(1)


def indexed_logps(model, batch: dict[str, torch.Tensor], labels_only: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_logps for one packed row whose tokens are scored at explicit positions: `score_from` (the
    position whose output predicts the token), `score_token`, `score_seq` (the sequence it counts for)."""
    where, tokens, seqs = batch["score_from"], batch["score_token"], batch["score_seq"]
    n = int(batch["n_sequences"])
    lm = causal_lm(model)
    if not labels_only or getattr(lm.config, "final_logit_softcapping", None):
        logits = model(**model_inputs(batch)).logits[0, where]
    else:
        hidden = lm.get_decoder()(**model_inputs(batch)).last_hidden_state
        logits = lm.get_output_embeddings()(hidden[0, where])
    values = -F.cross_entropy(logits.float(), tokens, reduction="none")
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, seqs, values)
    return sums, torch.bincount(seqs, minlength=n)


@torch.no_grad()
def mean_loss(model, data: list[Tokenized], batch_size: int, pad_id: int, precision: str = "fp32",
              max_batches: int | None = None, packed: bool = False) -> tuple[float, int]:
    """Mean loss per label token over `data` (token-weighted, like training) and the token count."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i, batch in enumerate(eval_batches(data, batch_size, pad_id, packed)):
        if max_batches is not None and i >= max_batches:
            break
        with autocast(device, precision):
            loss_sum, n = token_loss_sum(model, {k: v.to(device) for k, v in batch.items()})
        total += float(loss_sum)
        count += n
    model.train(was_training)
    return (total / count if count else float("nan")), count
