"""Continued pre-training on raw domain text: documents end to end, cut into blocks of data.max_seq_length
tokens (data/pipeline.py, BlockCutter), every token a target. The loss is SFT's (token cross-entropy over
the step's label tokens). By default a block's documents do not attend to each other: its micro-batches are
packed rows whose position ids restart at every document (the packed attention keeps each to itself);
with stage.cross_document_attention they are plain rows."""

from __future__ import annotations

import math

from tunesmith.data.batching import micro_batches
from tunesmith.stages.sft import SftStage
from tunesmith.stages.tokens import mean_loss


class PretrainStage(SftStage):
    name = "pretrain"
    init_values = {"data.format": "text"}

    @property
    def needs_packed_attention(self) -> bool:
        return not self.cfg.cross_document_attention

    def batches(self, rows, size, pad_id, packed):
        return micro_batches(rows, size, pad_id, packed or self.needs_packed_attention)

    def evaluate(self, model, rows, batch_size, pad_id, precision, max_batches):
        val_loss, _ = mean_loss(model, rows, batch_size, pad_id, precision, max_batches, self.needs_packed_attention)
        return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50))}
