"""What every peft-based method shares: wrap the base with get_peft_model, save the adapter in peft's own
format (so plain peft loads it), restore it for resume, load it onto a fresh base, and merge it."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

import torch.nn as nn

from tunesmith.errors import ConfigError
from tunesmith.methods.base import LoadBase, Method


class PeftAdapterMethod(Method):
    saves_base_weights = False

    @abstractmethod
    def peft_config(self, model: nn.Module):
        """The peft config (LoraConfig, IA3Config, ...) for this model."""

    def build(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        config = self.peft_config(model)
        try:
            return get_peft_model(model, config)
        except (ValueError, TypeError) as exc:  # peft's message names the layer; say which setting to change
            raise ConfigError(f"method {self.name}: {exc}") from None

    def starting_model(self, model: nn.Module):
        return model.disable_adapter()  # the base alone: the reference costs no second copy of the weights

    def save(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir)  # adapter_config.json + adapter_model.safetensors

    def restore(self, model: nn.Module, saved_dir: Path) -> None:
        self.restore_file(model, saved_dir / "adapter_model.safetensors")

    def restore_file(self, model: nn.Module, path: Path) -> None:
        """Put an adapter file's weights into the model; every trained weight must come from it."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(str(path), device=str(next(model.parameters()).device))
        result = set_peft_model_state_dict(model, weights)
        trained = self.peft_trained(model)
        missing = [k for k in result.missing_keys if k in trained]
        if missing:
            raise ConfigError(f"{path}: the adapter does not fit this model (missing {missing[:3]})")

    def peft_trained(self, model: nn.Module) -> set[str]:
        """The trainable parameters that peft's adapter file must bring back (restore checks each came)."""
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        if model.active_peft_config.is_prompt_learning:  # peft loads the prompt itself, outside load_state_dict
            trained = {n for n in trained if not n.startswith("prompt_encoder.")}
        return trained

    def load(self, load_base: LoadBase, saved_dir: Path) -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(load_base(), saved_dir)

    def merge(self, model: nn.Module) -> nn.Module:
        if not self.mergeable:
            raise ConfigError(f"method {self.name} cannot be merged into the weights; export it with --format adapter")
        return model.merge_and_unload()


def default_targets(target_modules):
    """method.target_modules as peft wants it: all-linear, or a list of module names."""
    return target_modules if target_modules == "all-linear" else list(target_modules)
