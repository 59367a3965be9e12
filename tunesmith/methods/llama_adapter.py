"""LLaMA-Adapter (v1) through peft's adaption prompts: learned prompt vectors attended to by the top
`adapter_layers` attention layers, through a gate that starts at zero, so training starts from the
unchanged model. Very few parameters; the prompts cannot be merged into the weights."""

from __future__ import annotations

import torch.nn as nn

from tunesmith.config.schema import AdapterSection
from tunesmith.errors import ConfigError
from tunesmith.methods.peft_adapter import PeftAdapterMethod

# The model families peft's adaption prompts know how to patch.
SUPPORTED = ("llama", "mistral", "gpt2")


def check_family(model_type: str | None, method: str = "adapter") -> None:
    if model_type not in SUPPORTED:
        raise ConfigError(f"method {method} (LLaMA-Adapter) supports the {', '.join(SUPPORTED)} model families; "
                          f"this model is '{model_type}'. Use lora (or ia3, oft) instead.")


class LlamaAdapterMethod(PeftAdapterMethod):
    name = "adapter"
    config = AdapterSection
    mergeable = False
    init_values = {"train.lr": 9e-3}

    @staticmethod
    def trainable_count(shape, plan) -> int:  # the prompt vectors and a gate per adapted layer
        return min(plan.adapter_layers, shape.layers) * (plan.adapter_len * shape.hidden + 1)

    @staticmethod
    def active_layers(shape, plan) -> int:
        return min(plan.adapter_layers, shape.layers)

    def peft_config(self, model: nn.Module):
        from peft import AdaptionPromptConfig

        config = model.config
        check_family(getattr(config, "model_type", None), self.name)
        layers = getattr(config, "num_hidden_layers", 0)
        if self.cfg.adapter_layers > layers:
            raise ConfigError(f"method.adapter_layers is {self.cfg.adapter_layers} but the model has {layers} layers")
        return AdaptionPromptConfig(adapter_layers=self.cfg.adapter_layers, adapter_len=self.cfg.adapter_len,
                                    task_type="CAUSAL_LM")
