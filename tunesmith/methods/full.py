"""Full fine-tuning: every weight trains and the whole model is saved."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from tunesmith.config.schema import FullSection
from tunesmith.errors import ConfigError
from tunesmith.methods.base import LoadBase, Method


class FullMethod(Method):
    name = "full"
    config = FullSection
    init_values = {"train.lr": 2e-5, "train.weight_decay": 0.01}

    @staticmethod
    def trainable_count(shape, plan) -> int:
        return shape.params

    def build(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(True)
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir)  # safetensors, tied weights stored once

    def restore(self, model: nn.Module, saved_dir: Path) -> None:
        from safetensors.torch import load_file

        files = sorted(saved_dir.glob("model*.safetensors"))  # model.safetensors or its shards
        if not files:
            raise ConfigError(f"{saved_dir}: no .safetensors weights")
        device = str(next(model.parameters()).device)
        loaded: set[str] = set()
        for f in files:  # one file, or the shards of a large model
            tensors = load_file(str(f), device=device)
            result = model.load_state_dict(tensors, strict=False)
            if result.unexpected_keys:
                raise ConfigError(f"{f}: weights do not fit this model: {result.unexpected_keys[:3]}")
            loaded |= tensors.keys()
        tied = {k for k in (getattr(model, "_tied_weights_keys", None) or [])}
        missing = [k for k, _ in model.named_parameters() if k not in loaded and k not in tied]
        if missing:
            raise ConfigError(f"{saved_dir}: weights are missing for {missing[:3]}")

    def load(self, load_base: LoadBase, saved_dir: Path) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(saved_dir, dtype=torch.float32)

    def merge(self, model: nn.Module) -> nn.Module:
        return model
