"""Held-out evaluation: token loss and perplexity, and exact match of greedy answers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


from tunesmith.data.pipeline import load_examples, tokenize_split
from tunesmith.inference.generate import Sampling, generate_batch
from tunesmith.stages.tokens import mean_loss


def exact_match(predictions: list[str], references: list[str]) -> float:
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / max(len(references), 1)


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
    loss, n_tokens = mean_loss(loaded.model, tokenized, batch_size, loaded.tokenizer.pad_token_id)
    result: dict[str, Any] = {"loss": loss, "perplexity": math.exp(loss) if loss == loss else float("nan"),
                              "tokens": n_tokens, "n": len(examples), "scored_rows": report.kept}
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
