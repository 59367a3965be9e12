"""IA3 through peft: learned vectors that rescale the keys, values and feed-forward inputs (no matrices),
so very few parameters train; mergeable into the weights."""

from __future__ import annotations

import torch.nn as nn

from tunesmith.config.schema import Ia3Section
from tunesmith.methods.peft_adapter import PeftAdapterMethod


class Ia3Method(PeftAdapterMethod):
    name = "ia3"
    config = Ia3Section
    init_values = {"train.lr": 1e-3}

    @staticmethod
    def trainable_count(shape, plan) -> int:  # a vector per key and value output, and one per MLP-down input
        return shape.layers * (2 * shape.kv_heads * shape.head_dim + shape.intermediate)

    def peft_config(self, model: nn.Module):
        from peft import IA3Config

        targets = self.cfg.target_modules
        if targets == "all-linear":  # peft's per-architecture choice: keys, values and the MLP's down projection
            return IA3Config(task_type="CAUSAL_LM")
        feedforward = [t for t in targets if t in ("down_proj", "fc2", "c_proj", "w2", "dense_4h_to_h")]
        return IA3Config(target_modules=list(targets), feedforward_modules=feedforward, task_type="CAUSAL_LM")
