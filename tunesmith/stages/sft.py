"""Supervised fine-tuning: next-token cross-entropy on the reply tokens (the labels the template marks),
summed per micro-batch and divided by the label tokens of the whole step."""

from __future__ import annotations

import math
from typing import Sequence

from tunesmith.data.batching import micro_batches
from tunesmith.data.token_store import Tokenized
from tunesmith.stages.base import Stage
from tunesmith.stages.tokens import mean_loss, token_loss_sum


class SftStage(Stage):
    name = "sft"

    def count(self, rows: Sequence[Tokenized]) -> int:
        return sum(r.n_targets for r in rows)

    def batches(self, rows, size, pad_id, packed):
        return micro_batches(rows, size, pad_id, packed)

    def loss_sum(self, model, batch):
        return token_loss_sum(model, batch, self.run.train.logits_at_labels_only)

    def evaluate(self, model, rows, batch_size, pad_id, precision, max_batches):
        val_loss, _ = mean_loss(model, rows, batch_size, pad_id, precision, max_batches)
        return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50))}

    def step_metrics(self, rows):
        return {"tokens": sum(len(r.input_ids) for r in rows), "trained_tokens": self.count(rows)}
