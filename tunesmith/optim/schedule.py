"""How many optimizer steps a run takes, and the learning rate at each: linear warmup, then constant, linear or
cosine decay to `min_lr_ratio` of train.lr."""

from __future__ import annotations

import math

import torch

from tunesmith.config.schema import Config, TrainConfig


def total_steps(cfg: Config, n_train: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    rows_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    repeats = getattr(cfg.stage, "ppo_epochs", 1)  # ppo trains on each sampled batch for this many steps
    return max(1, math.ceil(cfg.train.epochs * n_train / rows_per_step)) * repeats


def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Multiplier on cfg.lr for the update made at `step` (0-based): linear warmup, then the schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_scheduler == "constant":
        return 1.0
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    shape = 1.0 - progress if cfg.lr_scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer, total_steps: int, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))
