"""Freeze tuning: train only the last N decoder layers, named modules and/or parameters matching a regular
expression; save only those tensors."""

from __future__ import annotations

import re
from pathlib import Path

import torch.nn as nn
from safetensors.torch import load_file, save_file

from tunesmith.config.schema import FreezeSection
from tunesmith.errors import ConfigError
from tunesmith.methods.base import LoadBase, Method
from tunesmith.models.layers import decoder_layers

WEIGHTS = "trainable.safetensors"


class FreezeMethod(Method):
    name = "freeze"
    config = FreezeSection
    init_values = {"train.lr": 1e-4}

    @staticmethod
    def trainable_count(shape, plan) -> int:
        return min(plan.trainable_layers, shape.layers) * shape.layer_params()

    @staticmethod
    def active_layers(shape, plan) -> int:
        return min(plan.trainable_layers, shape.layers)

    def build(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        layers = decoder_layers(model)
        n = self.cfg.trainable_layers
        if n > len(layers):
            raise ConfigError(f"method.trainable_layers is {n} but the model has {len(layers)} layers")
        for layer in list(layers)[len(layers) - n:] if n else []:
            layer.requires_grad_(True)
        names = self.cfg.trainable_modules
        unmatched = set(names)
        for pname, param in model.named_parameters():
            for wanted in names:
                if wanted in pname:
                    param.requires_grad_(True)
                    unmatched.discard(wanted)
        if unmatched:
            raise ConfigError(f"method.trainable_modules: no parameter name contains {sorted(unmatched)}")
        if self.cfg.trainable_regex:
            pattern = re.compile(self.cfg.trainable_regex)
            matched = [p for pname, p in model.named_parameters() if pattern.search(pname)]
            if not matched:
                raise ConfigError(f"method.trainable_regex: no parameter name matches {self.cfg.trainable_regex!r} "
                                  f"(names look like {next(iter(dict(model.named_parameters())))!r})")
            for param in matched:
                param.requires_grad_(True)
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError("method freeze: nothing to train; set method.trainable_layers, trainable_modules or "
                              "trainable_regex")
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().contiguous() for n, p in self.trainable_parameters(model)}
        save_file(tensors, str(out_dir / WEIGHTS))

    def restore(self, model: nn.Module, saved_dir: Path) -> None:
        tensors = load_file(str(saved_dir / WEIGHTS), device=str(next(model.parameters()).device))
        result = model.load_state_dict(tensors, strict=False)
        if result.unexpected_keys:
            raise ConfigError(f"{saved_dir}: weights do not fit this base model: {result.unexpected_keys[:3]}")

    def load(self, load_base: LoadBase, saved_dir: Path) -> nn.Module:
        model = load_base()
        self.restore(model, saved_dir)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        return model
