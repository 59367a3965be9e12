"""LoRA through peft: low-rank updates beside frozen weights; saved as a standard PEFT adapter."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from tunesmith.errors import ConfigError
from tunesmith.methods.base import LoadBase, Method


class LoraMethod(Method):
    name = "lora"
    saves_base_weights = False

    def build(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=self.cfg.r,
            lora_alpha=self.cfg.alpha,
            lora_dropout=self.cfg.dropout,
            target_modules=self.cfg.target_modules,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)

    def save(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir)  # adapter_config.json + adapter_model.safetensors

    def restore(self, model: nn.Module, saved_dir: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(str(saved_dir / "adapter_model.safetensors"), device=str(next(model.parameters()).device))
        result = set_peft_model_state_dict(model, weights)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing:
            raise ConfigError(f"{saved_dir}: the adapter does not fit this model (missing {missing[:3]})")

    def load(self, load_base: LoadBase, saved_dir: Path) -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(load_base(), saved_dir)

    def merge(self, model: nn.Module) -> nn.Module:
        return model.merge_and_unload()
