"""The method protocol: a method changes how the model is built, which parameters train, and how the
result is saved, loaded back and merged. Nothing else in tunesmith branches on the method: the loop asks it (placement, soft prompts, base
precision) through the attributes and hooks below."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn
from pydantic import BaseModel

from tunesmith.config.explain import choice
from tunesmith.config.schema import MethodConfig

LoadBase = Callable[..., nn.Module]
"""Loads the base model: load_base(quantized=True, on=None); QLoRA's merge asks for the quantized base on the
CPU (on=torch.device("cpu")), where de-quantizing to full precision does not need the GPU's memory."""


class Method(ABC):
    """One registry entry (methods/__init__.py): besides building and saving, a method says what the config,
    `init`, `estimate` and the board need to know about it, so no other module keeps a list of methods."""

    name: str
    config: type[BaseModel]
    """Its own section of the config (config/schema.py): the method.* keys it reads."""
    init_values: dict[str, Any] = {}
    """Values `tunesmith init` starts a config with (train.lr above all)."""
    stages: tuple[str, ...] = ("sft", "pretrain", "dpo", "orpo", "simpo", "kto", "rm", "grpo", "ppo")
    """The training stages it supports."""
    packages: tuple[tuple[str, str], ...] = ()
    """(import name, what to pip install) for each package it needs beyond the core install (the config parses
    without them; doctor and the pre-flight name the install)."""
    saves_base_weights: bool = True
    """False for adapter methods: the frozen base is never written, so it may be held in lower precision."""
    quantized: bool = False
    """True when the base is loaded quantized (load_kwargs says how); it is then placed while loading."""
    build_on_device: bool = False
    """True when build() does heavy work on the weights (PiSSA's SVDs): the base moves to the device first."""
    mergeable: bool = True
    """False when the training cannot be folded into the weights (soft prompts, gated adapter prompts)."""
    soft_prompt: bool = False
    """True when the method puts learned positions before every input (prompt tuning): rows cannot be packed."""

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg

    @abstractmethod
    def build(self, model: nn.Module) -> nn.Module:
        """Prepare a freshly loaded base model for training (freeze, wrap) and return what trains."""

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The method.* keys besides name (`tunesmith init` writes only these)."""
        return tuple(key for key in cls.config.model_fields if key != "name")

    @classmethod
    def explanation(cls) -> dict[str, str]:
        """Its label and meaning (explanations.yaml, choices.method.name)."""
        return choice("method.name", cls.name)

    @staticmethod
    @abstractmethod
    def trainable_count(shape, plan) -> int:
        """Trained parameters for `tunesmith estimate`, from a planning.estimate ModelShape and Plan (duck-typed:
        the planning layer sits above this one)."""

    @staticmethod
    def active_layers(shape, plan) -> int:
        """Decoder layers that keep activations for the backward pass (frozen layers below the first trained one
        need none)."""
        return shape.layers

    def place_base(self, base: nn.Module, device) -> None:
        """Before build(): a quantized base was placed while it loaded; others move only if build needs it."""
        if self.build_on_device and not self.quantized:
            base.to(device)

    def place(self, model: nn.Module, device) -> None:
        """After build() and the speed switches (so a bf16 cast happens before the move and the device never
        holds the fp32 copy of frozen weights)."""
        if not self.quantized:
            model.to(device)

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def starting_model(self, model: nn.Module):
        """A context in which `model` computes what it computed before training (a stage's reference, DPO's),
        or None when the method trains the model's own weights, so a stage that needs the starting model keeps
        a frozen copy instead."""
        return None

    def load_kwargs(self, device) -> dict:
        """Extra arguments for loading the base model (a quantization config, for QLoRA)."""
        return {}

    def lr_multiplier(self, name: str) -> float:
        """How much faster than train.lr the parameter `name` learns (LoRA+ raises it for B)."""
        return 1.0

    @abstractmethod
    def save(self, model: nn.Module, out_dir: Path) -> None:
        """Write what training changed (safetensors) so `load` can rebuild the trained model."""

    @abstractmethod
    def restore(self, model: nn.Module, saved_dir: Path) -> None:
        """Put `save`'s weights back into a model fresh from `build`, still trainable (resume)."""

    @abstractmethod
    def load(self, load_base: LoadBase, saved_dir: Path) -> nn.Module:
        """Rebuild the trained model from `save`'s output; `load_base` loads the base model when needed."""

    @abstractmethod
    def merge(self, model: nn.Module) -> nn.Module:
        """A plain transformers model with the training folded into its weights."""


def parameter_count(p: nn.Parameter) -> int:
    """Weights a tensor stands for: a 4-bit bitsandbytes tensor packs two in each byte it stores."""
    state = getattr(p, "quant_state", None)
    shape = getattr(state, "shape", None)
    return int(math.prod(shape)) if shape is not None else p.numel()


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting tied weights once."""
    trainable = total = 0
    for p in model.parameters():  # parameters() yields each shared tensor once
        n = parameter_count(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def describe_counts(model: nn.Module) -> str:
    trainable, total = parameter_counts(model)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"
