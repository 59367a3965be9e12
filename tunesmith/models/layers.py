"""Finding the parts of a causal LM that methods, optimizers and losses work on, wrapped or not."""

from __future__ import annotations

import torch.nn as nn

from tunesmith.errors import ConfigError


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a possible PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module, who: str = "method freeze") -> nn.ModuleList:
    """The stack of transformer blocks (model.model.layers for Llama-style models); `who` names the setting
    that needs it in the error when there is none."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ConfigError(f"{who}: could not find the model's decoder layers")
    return max(lists, key=len)
