"""Parameter groups: which parameters decay, which learn faster, which GaLore projects."""

from __future__ import annotations

from typing import Callable, Collection

import torch


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
