"""The optimizers `optimizer.name` names, one entry each: its config section (its own settings and the methods
it accepts, in config/schema.py), how it is built, the packages it needs beyond the core install, and its
memory formula for `tunesmith estimate`. Nothing else keeps a list of optimizers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from tunesmith.config.explain import choice
from tunesmith.config.schema import OPTIMIZER_SECTIONS, TrainConfig
from tunesmith.optim.groups import param_groups

Build = Callable[..., torch.optim.Optimizer]
"""build(named_params, train config, optimizer section, lr_multiplier, model, log) -> the optimizer."""
Memory = Callable[[Any, int], tuple[float, float, str]]
"""memory(plan, trainable) -> (gradient bytes, optimizer-state bytes, what the states are), where `plan` is a
planning.estimate.Plan (duck-typed: planning sits above this layer)."""


@dataclass(frozen=True)
class Optimizer:
    name: str
    build: Build
    memory: Memory
    packages: tuple[tuple[str, str], ...] = ()
    """(import name, what to pip install) for each package it needs beyond the core install."""
    needs_model: bool = False
    """GaLore and BAdam work on the model's decoder layers."""

    @property
    def section(self):
        """Its config model: `optimizer:` holds these keys when `optimizer.name` is this optimizer."""
        return OPTIMIZER_SECTIONS[self.name]

    @property
    def methods(self) -> tuple[str, ...] | None:
        """The methods it accepts (None: every one); config validation enforces this."""
        return self.section.methods

    def fields(self) -> list[str]:
        """Its own optimizer.* keys: what `tunesmith init` adds when it is picked."""
        return [k for k in self.section.model_fields if k != "name"]

    def explanation(self) -> dict[str, str]:
        return choice("optimizer.name", self.name)


BNB = ("bitsandbytes", "pip install 'bitsandbytes>=0.49' (or tunesmith[qlora])")
GALORE = ("galore_torch", "pip install galore-torch (or tunesmith[galore])")


def _groups(named_params, cfg: TrainConfig, lr_multiplier) -> list[dict]:
    return param_groups(named_params, cfg.weight_decay, cfg.lr, lr_multiplier)


# ---------------------------------------------------------------------------------------------- builders


def _adamw(named_params, cfg, opt, lr_multiplier, model, log):
    return torch.optim.AdamW(_groups(named_params, cfg, lr_multiplier), lr=cfg.lr, betas=cfg.adam_betas,
                             eps=cfg.adam_eps)


def _adamw_8bit(paged: bool) -> Build:
    def build(named_params, cfg, opt, lr_multiplier, model, log):
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
        return cls(_groups(named_params, cfg, lr_multiplier), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
    return build


def _adafactor(named_params, cfg, opt, lr_multiplier, model, log):
    from transformers.optimization import Adafactor

    # train.lr and the schedule drive it, as for the others (not Adafactor's own relative step size).
    return Adafactor(_groups(named_params, cfg, lr_multiplier), lr=cfg.lr, scale_parameter=False,
                     relative_step=False, warmup_init=False)


def _sgd(named_params, cfg, opt, lr_multiplier, model, log):
    return torch.optim.SGD(_groups(named_params, cfg, lr_multiplier), lr=cfg.lr, momentum=opt.momentum)


def _galore(kind: str) -> Build:
    def build(named_params, cfg, opt, lr_multiplier, model, log):
        from tunesmith.optim import galore

        projected = galore.projected_names(model, named_params)
        projection = {"rank": opt.rank, "update_proj_gap": opt.update_interval, "scale": opt.scale,
                      "proj_type": opt.proj_type}
        log(galore.describe(named_params, projected, opt.rank, opt.update_interval))
        groups = param_groups(named_params, cfg.weight_decay, cfg.lr, lr_multiplier, projected, projection)
        if kind == "adafactor":
            return galore.GaLoreAdafactor(groups, lr=cfg.lr, scale_parameter=False, relative_step=False,
                                          warmup_init=False)
        if kind == "8bit":
            return galore.GaLoreAdamW8bit(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
        return galore.GaLoreAdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                  no_deprecation_warning=True)
    return build


def _badam(named_params, cfg, opt, lr_multiplier, model, log):
    from tunesmith.optim.block_coordinate import build_block_adamw

    return build_block_adamw(model, named_params, cfg, opt, lr_multiplier, log)


# ---------------------------------------------------------------------------------------------- memory


def adam_state_bytes(values: float, eight_bit: bool) -> float:
    """AdamW's two moments for a tensor of `values`: 8-bit ones keep an fp32 scale per block of 256, and
    tensors under 4,096 values stay fp32 (bitsandbytes' rule)."""
    return values * (2 + 8 / 256 if eight_bit and values >= 4096 else 8.0)


def _layers_and_norms(plan) -> tuple[int, int]:
    """Decoder layers whose own weights train (full, freeze), and their norm vectors (always fp32 moments)."""
    s = plan.shape
    layers = {"full": s.layers, "freeze": min(plan.trainable_layers, s.layers)}.get(plan.method, 0)
    return layers, 2 * layers * s.hidden + (s.hidden if plan.method == "full" else 0)


def _plain(per: float, note: str) -> Memory:
    return lambda plan, trainable: (trainable * 4.0, trainable * per, note)


def _eight_bit_memory(paged: bool) -> Memory:
    def memory(plan, trainable):
        _, norms = _layers_and_norms(plan)
        return (trainable * 4.0, adam_state_bytes(trainable - norms, True) + norms * 8.0,
                "8-bit AdamW: two 8-bit moments per trainable parameter" + (" (pageable)" if paged else ""))
    return memory


def _galore_memory(kind: str) -> Memory:
    def memory(plan, trainable):
        s = plan.shape
        layers, norms = _layers_and_norms(plan)
        if not layers:
            return trainable * 4.0, trainable * 8.0, "AdamW: two fp32 moments per trainable parameter"
        r = plan.galore_rank
        # Each layer matrix keeps its moments at rank r along its longer side, plus the r × shorter projection.
        mats = [(min(r, n_in, n_out), min(n_in, n_out), max(n_in, n_out)) for n_in, n_out in s.matrices().values()]
        projections = sum(rank * short for rank, short, _ in mats) * layers * 4.0
        rest = trainable - layers * sum(short * long for _, short, long in mats) - norms  # embeddings, head
        if kind == "adafactor":  # row and column averages of each matrix, full averages of vectors
            factored = sum(rank + long for rank, _, long in mats) * layers
            embeddings = (s.vocab + s.hidden) * (1 if s.tied else 2) if rest else 0
            states = (factored + embeddings + norms) * 4.0
        else:
            eight_bit = kind == "8bit"
            states = (sum(adam_state_bytes(rank * long, eight_bit) for rank, _, long in mats) * layers
                      + adam_state_bytes(rest, eight_bit) + norms * 8.0)
        return trainable * 4.0, states + projections, f"GaLore: moments at rank {r} for the layer matrices, full for the rest"
    return memory


def _badam_memory(plan, trainable):  # one decoder layer trains at a time; the rest of the model is frozen meanwhile
    layer = plan.shape.layer_params()
    return layer * 4.0, layer * 8.0, "BAdam: AdamW's two fp32 moments for the active layer only"


# ---------------------------------------------------------------------------------------------- the registry

OPTIMIZERS: dict[str, Optimizer] = {o.name: o for o in (
    Optimizer("adamw", _adamw, _plain(8.0, "AdamW: two fp32 moments per trainable parameter")),
    Optimizer("adamw_8bit", _adamw_8bit(False), _eight_bit_memory(False), packages=(BNB,)),
    Optimizer("paged_adamw_8bit", _adamw_8bit(True), _eight_bit_memory(True), packages=(BNB,)),
    Optimizer("adafactor", _adafactor,
              _plain(0.1, "Adafactor: row and column averages (at most about 0.1 byte per parameter)")),
    Optimizer("sgd", _sgd, _plain(4.0, "SGD: one fp32 momentum per trainable parameter")),
    Optimizer("galore", _galore("adamw"), _galore_memory("adamw"), packages=(GALORE, BNB), needs_model=True),
    Optimizer("galore_8bit", _galore("8bit"), _galore_memory("8bit"), packages=(GALORE, BNB), needs_model=True),
    Optimizer("galore_adafactor", _galore("adafactor"), _galore_memory("adafactor"), packages=(GALORE, BNB),
              needs_model=True),
    Optimizer("badam", _badam, _badam_memory, needs_model=True),
)}
