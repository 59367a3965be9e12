"""The optimizer `optimizer.name` names, over parameter groups with decay only on weight matrices (each
optimizer is an entry of optim/registry.py; optim/schedule.py: the learning rate)."""

from __future__ import annotations

from typing import Callable

import torch

from tunesmith.config.schema import OptimizerSection, PlainOptimizerSection, TrainConfig
from tunesmith.optim.registry import OPTIMIZERS


def build_optimizer(named_params, cfg: TrainConfig, lr_multiplier: Callable[[str], float] = lambda _: 1.0,
                    model: torch.nn.Module | None = None, log=print,
                    optimizer: OptimizerSection | None = None) -> torch.optim.Optimizer:
    """The config's `optimizer` section (AdamW when None) over the parameter groups, with `cfg`'s learning rate,
    decay and betas; each a well-kept implementation, except BAdam's few lines. GaLore and BAdam work on the
    model's decoder layers, so they need `model`."""
    optimizer = optimizer or PlainOptimizerSection()
    entry = OPTIMIZERS[optimizer.name]
    if entry.needs_model and model is None:
        raise ValueError(f"optimizer {optimizer.name} needs the model (its decoder layers)")
    return entry.build(named_params, cfg, optimizer, lr_multiplier, model, log)
