"""The optimizer (AdamW by default) with decay only on weight matrices, and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Callable

import torch

from tunesmith.config import TrainConfig


def param_groups(named_params: list[tuple[str, torch.nn.Parameter]], weight_decay: float, lr: float,
                 lr_multiplier: Callable[[str], float] = lambda _: 1.0) -> list[dict]:
    """Weight decay shrinks matrices toward zero; on norms and biases it only hurts, so they are exempt.
    A method may give some parameters a higher learning rate (LoRA+): they get groups of their own, after
    the two plain ones (which are always there, so checkpoints keep one layout)."""
    groups: dict[tuple[float, bool], list] = {(1.0, False): [], (1.0, True): []}
    for name, p in named_params:
        exempt = p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")
        groups.setdefault((lr_multiplier(name), exempt), []).append(p)
    return [{"params": ps, "weight_decay": 0.0 if exempt else weight_decay, "lr": lr * scale}
            for (scale, exempt), ps in groups.items()]


def build_optimizer(named_params, cfg: TrainConfig, lr_multiplier: Callable[[str], float] = lambda _: 1.0
                    ) -> torch.optim.Optimizer:
    """train.optimizer over the parameter groups; each a well-kept implementation, not ours."""
    groups = param_groups(named_params, cfg.weight_decay, cfg.lr, lr_multiplier)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
    if cfg.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if cfg.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
        return cls(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # train.lr and the schedule drive it, as for the others (not Adafactor's own relative step size).
        return Adafactor(groups, lr=cfg.lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"unknown optimizer {cfg.optimizer}")


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
