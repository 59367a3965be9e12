"""Held-out evaluation: token loss and perplexity, and exact match of greedy answers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


import torch

from tunesmith.data.pipeline import load_examples, tokenize_split
from tunesmith.data.token_store import Pair
from tunesmith.inference.generate import Sampling, generate_batch
from tunesmith.stages.preference import pair_batch
from tunesmith.stages.reward import rewards
from tunesmith.stages.tokens import mean_loss, sequence_logps


def exact_match(predictions: list[str], references: list[str]) -> float:
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / max(len(references), 1)


@torch.no_grad()
def pairwise(model, pairs: list[Pair], batch_size: int, pad_id: int, head=None) -> dict[str, float]:
    """Share of pairs whose chosen reply scores higher, and the mean difference: scored by the summed
    log-probability, or for a reward model (`head`) by its reward."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wins, margins = 0, 0.0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = {k: v.to(device) for k, v in pair_batch(chunk, pad_id).items()}
        scores = rewards(model, head, batch, pad_id) if head is not None else sequence_logps(model, batch)[0]
        chosen, rejected = scores.chunk(2)
        wins += int((chosen > rejected).sum())
        margins += float((chosen - rejected).sum())
    model.train(was_training)
    margin = "reward_margin" if head is not None else "logp_margin"
    return {"pairwise_accuracy": wins / max(len(pairs), 1), margin: margins / max(len(pairs), 1)}


def evaluate_file(loaded, data_file: str | Path, limit: int | None = None, batch_size: int | None = None,
                  max_new_tokens: int = 256) -> dict[str, Any]:
    """Loss, perplexity and exact match of `loaded` (see run_dir.load_for_inference) on a data file, in
    batches of `batch_size` rows (default: the run's eval.batch_size)."""
    from tunesmith.config.schema import DataConfig, EvalConfig

    if batch_size is None:
        batch_size = (loaded.config.eval if loaded.config else EvalConfig()).batch_size

    cfg = loaded.config.data.model_copy() if loaded.config else DataConfig(train_file=str(data_file))
    cfg.on_bad_row = "error"
    _, pairs = load_examples(str(data_file), cfg, cfg.format if loaded.config else None, [])
    examples = [ex for _, ex in pairs][:limit]
    tokenized, report = tokenize_split("eval", examples, loaded.tokenizer, cfg)
    paired = bool(tokenized) and isinstance(tokenized[0], Pair)
    # Preference pairs: the loss and perplexity are the chosen replies'; pairwise accuracy says how often the
    # model gives the chosen reply a higher log-probability than the rejected one.
    scored = [p.chosen for p in tokenized] if paired else tokenized
    loss, n_tokens = mean_loss(loaded.model, scored, batch_size, loaded.tokenizer.pad_token_id)
    result: dict[str, Any] = {"loss": loss, "perplexity": math.exp(loss) if loss == loss else float("nan"),
                              "tokens": n_tokens, "n": len(examples), "scored_rows": report.kept}
    if paired:
        result.update(pairwise(loaded.model, tokenized, batch_size, loaded.tokenizer.pad_token_id, loaded.head))
    chats = [ex for ex in examples if ex.messages is not None]
    if chats:
        preds = generate_batch(loaded.model, loaded.tokenizer, [ex.prompt_messages for ex in chats],
                               Sampling(max_new_tokens=max_new_tokens), batch_size=batch_size)
        result["exact_match"] = exact_match(preds, [ex.reference for ex in chats])
        result["samples"] = [{"prompt": ex.prompt_messages[-1]["content"], "reference": ex.reference, "prediction": p}
                             for ex, p in zip(chats, preds)]
    else:
        result["exact_match"] = None
    return result
