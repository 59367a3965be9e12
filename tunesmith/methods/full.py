"""Full fine-tuning: every weight trains and the whole model is saved."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from tunesmith.methods.base import LoadBase, Method


class FullMethod(Method):
    name = "full"

    def build(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(True)
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir)  # safetensors, tied weights stored once

    def load(self, load_base: LoadBase, saved_dir: Path) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(saved_dir, dtype=torch.float32)

    def merge(self, model: nn.Module) -> nn.Module:
        return model
