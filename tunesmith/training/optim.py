"""The optimizer (AdamW by default) with decay only on weight matrices, and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Callable, Collection

import torch

from tunesmith.config import TrainConfig


def param_groups(named_params: list[tuple[str, torch.nn.Parameter]], weight_decay: float, lr: float,
                 lr_multiplier: Callable[[str], float] = lambda _: 1.0, projected: Collection[str] = (),
                 projection: dict | None = None) -> list[dict]:
    """Weight decay shrinks matrices toward zero; on norms and biases it only hurts, so they are exempt.
    A method may give some parameters a higher learning rate (LoRA+), and GaLore projects some weight matrices
    (`projected`, by name; their groups carry `projection`, the settings galore_torch reads from a group):
    these get groups of their own, after the two plain ones (which are always there, so checkpoints keep
    one layout)."""
    groups: dict[tuple[float, bool, bool], list] = {(1.0, False, False): [], (1.0, True, False): []}
    for name, p in named_params:
        exempt = p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias")
        groups.setdefault((lr_multiplier(name), exempt, name in projected), []).append(p)
    return [{"params": ps, "weight_decay": 0.0 if exempt else weight_decay, "lr": lr * scale,
             **(projection if low_rank and projection else {})}
            for (scale, exempt, low_rank), ps in groups.items()]


def decoder_layers_of(model: torch.nn.Module, optimizer: str) -> torch.nn.ModuleList:
    """The model's stack of decoder layers, which GaLore projects and BAdam takes in turns."""
    from tunesmith.errors import ConfigError
    from tunesmith.methods.freeze import decoder_layers

    try:
        return decoder_layers(model)
    except ConfigError:
        raise ConfigError(f"train.optimizer {optimizer}: could not find the model's decoder layers") from None


def build_optimizer(named_params, cfg: TrainConfig, lr_multiplier: Callable[[str], float] = lambda _: 1.0,
                    model: torch.nn.Module | None = None, log=print) -> torch.optim.Optimizer:
    """train.optimizer over the parameter groups; each a well-kept implementation, except BAdam's few lines.
    GaLore and BAdam work on the model's decoder layers, so they need `model`."""
    if (cfg.optimizer.startswith("galore") or cfg.optimizer == "badam") and model is None:
        raise ValueError(f"optimizer {cfg.optimizer} needs the model (its decoder layers)")
    if cfg.optimizer == "badam":
        from tunesmith.training.block_coordinate import build_block_adamw

        return build_block_adamw(model, named_params, cfg, lr_multiplier, log)
    projected, projection = set(), None
    if cfg.optimizer.startswith("galore"):
        from tunesmith.training.galore import describe, projected_names

        projected = projected_names(model, named_params)
        projection = {"rank": cfg.galore_rank, "update_proj_gap": cfg.galore_update_interval,
                      "scale": cfg.galore_scale, "proj_type": cfg.galore_proj_type}
        log(describe(named_params, projected, cfg.galore_rank, cfg.galore_update_interval))
    groups = param_groups(named_params, cfg.weight_decay, cfg.lr, lr_multiplier, projected, projection)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
    if cfg.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if cfg.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
        return cls(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
    if cfg.optimizer in ("adafactor", "galore_adafactor"):
        if cfg.optimizer == "adafactor":
            from transformers.optimization import Adafactor
        else:
            from tunesmith.training.galore import GaLoreAdafactor as Adafactor

        # train.lr and the schedule drive it, as for the others (not Adafactor's own relative step size).
        return Adafactor(groups, lr=cfg.lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if cfg.optimizer == "galore":
        from tunesmith.training.galore import GaLoreAdamW

        return GaLoreAdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, no_deprecation_warning=True)
    if cfg.optimizer == "galore_8bit":
        from tunesmith.training.galore import GaLoreAdamW8bit

        return GaLoreAdamW8bit(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
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
