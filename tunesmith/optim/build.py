"""The optimizer (AdamW by default) with decay only on weight matrices (optim/schedule.py: the learning rate)."""

from __future__ import annotations

from typing import Callable

import torch

from tunesmith.config.schema import TrainConfig
from tunesmith.optim.groups import param_groups


def build_optimizer(named_params, cfg: TrainConfig, lr_multiplier: Callable[[str], float] = lambda _: 1.0,
                    model: torch.nn.Module | None = None, log=print) -> torch.optim.Optimizer:
    """train.optimizer over the parameter groups; each a well-kept implementation, except BAdam's few lines.
    GaLore and BAdam work on the model's decoder layers, so they need `model`."""
    if (cfg.optimizer.startswith("galore") or cfg.optimizer == "badam") and model is None:
        raise ValueError(f"optimizer {cfg.optimizer} needs the model (its decoder layers)")
    if cfg.optimizer == "badam":
        from tunesmith.optim.block_coordinate import build_block_adamw

        return build_block_adamw(model, named_params, cfg, lr_multiplier, log)
    projected, projection = set(), None
    if cfg.optimizer.startswith("galore"):
        from tunesmith.optim.galore import describe, projected_names

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
            from tunesmith.optim.galore import GaLoreAdafactor as Adafactor

        # train.lr and the schedule drive it, as for the others (not Adafactor's own relative step size).
        return Adafactor(groups, lr=cfg.lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if cfg.optimizer == "galore":
        from tunesmith.optim.galore import GaLoreAdamW

        return GaLoreAdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, no_deprecation_warning=True)
    if cfg.optimizer == "galore_8bit":
        from tunesmith.optim.galore import GaLoreAdamW8bit

        return GaLoreAdamW8bit(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"unknown optimizer {cfg.optimizer}")
