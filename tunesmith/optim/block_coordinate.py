"""BAdam (Luo et al. 2024, arXiv:2404.02827): block-coordinate descent with AdamW, one decoder layer at a time.

Only the active block has gradients and AdamW moments, so full fine-tuning costs the memory of one layer's
gradients and moments instead of the whole model's. A block trains for `optimizer.switch_every` optimizer
steps, then the next takes over with fresh moments; a round visits every block once, in
optimizer.order. Which block is active is a function of the step alone, so a resumed run recomputes it.

Written here rather than taken from the `badam` package, which prints, empties the CUDA cache every step
and keeps its position in the block order only in memory (a resumed run would start the order again).
"""

from __future__ import annotations

import contextlib
import random
from typing import Callable, Iterator

import torch
import torch.nn as nn

from tunesmith.config.schema import BadamOptimizerSection, TrainConfig
from tunesmith.errors import ConfigError
from tunesmith.models.layers import decoder_layers
from tunesmith.optim.groups import param_groups


def block_order(round_index: int, n_blocks: int, order: str, seed: int) -> list[int]:
    """The blocks in the order round `round_index` visits them; random: a fresh shuffle per round from the seed."""
    if order == "ascending":
        return list(range(n_blocks))
    if order == "descending":
        return list(range(n_blocks - 1, -1, -1))
    rng = random.Random(f"badam/{seed}/{round_index}")  # str seeds and random() are stable across Pythons
    keys = [rng.random() for _ in range(n_blocks)]
    return sorted(range(n_blocks), key=keys.__getitem__)


def active_block(step: int, n_blocks: int, switch_every: int, order: str, seed: int) -> int:
    """The block that optimizer step `step` (1-based, as in the training loop) trains."""
    window = (step - 1) // switch_every
    return block_order(window // n_blocks, n_blocks, order, seed)[window % n_blocks]


class BlockAdamW(torch.optim.AdamW):
    """AdamW over one block of parameters at a time. Call `begin_step(step)` before each step's forward pass.

    The param groups keep one layout (the plain groups of `param_groups`, each with a "block" entry): at a
    switch only their parameter lists change, so the LR schedule, which sets each group's "lr", carries on,
    and a checkpoint's state fits the groups once they hold the block it was saved with (load_state_dict).
    """

    def __init__(self, blocks: list[list[tuple[str, nn.Parameter]]], outside: list[nn.Parameter], cfg: TrainConfig,
                 opt: BadamOptimizerSection, lr_multiplier: Callable[[str], float] = lambda _: 1.0):
        groups = param_groups([pair for block in blocks for pair in block], cfg.weight_decay, cfg.lr, lr_multiplier)
        self._group_of = {id(p): i for i, group in enumerate(groups) for p in group["params"]}
        self.blocks = [[p for _, p in block] for block in blocks]
        self.outside = outside
        self.schedule = (len(blocks), opt.switch_every, opt.order, cfg.seed)
        first = active_block(1, *self.schedule)
        for i, group in enumerate(groups):
            group["params"] = self._members(first, i)
            group["block"] = first
        super().__init__(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
        for p in outside:
            p.requires_grad_(False)
            p.grad = None

    def _members(self, block: int, group_index: int) -> list[nn.Parameter]:
        return [p for p in self.blocks[block] if self._group_of[id(p)] == group_index]

    def _hold(self, block: int) -> None:
        for i, group in enumerate(self.param_groups):
            group["params"] = self._members(block, i)
            group["block"] = block

    def begin_step(self, step: int) -> int:
        """Make the block of optimizer step `step` the only one with gradients; returns its index."""
        block = active_block(step, *self.schedule)
        if block != self.param_groups[0]["block"]:
            self.state.clear()  # the next block starts with fresh moments, as in BAdam
            self._hold(block)
        for i, params in enumerate(self.blocks):
            for p in params:
                p.requires_grad_(i == block)  # backward stops at the active block and keeps no other gradient
                if i != block:
                    p.grad = None
        return block

    def load_state_dict(self, state_dict: dict) -> None:
        block = state_dict["param_groups"][0].get("block")
        if block is None or not 0 <= block < len(self.blocks):
            raise ValueError("this optimizer state was not saved by BAdam over the same blocks")
        self._hold(block)  # the saved moments are the block's that was active when it was saved
        super().load_state_dict(state_dict)

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Every parameter the method made trainable marked so again while inside (a method's `save` writes
        those), then back as the step needs them."""
        params = [p for block in self.blocks for p in block] + self.outside
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)


def build_block_adamw(model: nn.Module, named_params: list[tuple[str, nn.Parameter]], cfg: TrainConfig,
                      opt: BadamOptimizerSection, lr_multiplier: Callable[[str], float] = lambda _: 1.0, log=print) -> BlockAdamW:
    """Blocks: the decoder layers that hold trainable parameters, in layer order. Trainable parameters outside
    them (embeddings, LM head, final norm) stay frozen, the BAdam paper's default."""
    layer_of = {id(p): i for i, layer in enumerate(decoder_layers(model, "optimizer.name badam")) for p in layer.parameters()}
    by_layer: dict[int, list[tuple[str, nn.Parameter]]] = {}
    outside = []
    for name, p in named_params:
        if id(p) in layer_of:
            by_layer.setdefault(layer_of[id(p)], []).append((name, p))
        else:
            outside.append((name, p))
    if not by_layer:
        raise ConfigError("optimizer.name badam trains decoder layers one at a time, and no trainable parameter "
                          "is in a decoder layer; use adamw, or make layers trainable")
    blocks = [by_layer[i] for i in sorted(by_layer)]
    log(f"badam: {len(blocks)} blocks (decoder layers) take turns, {opt.switch_every} steps each, "
        f"in {opt.order} order")
    if outside:
        names = ", ".join(name for name, _ in outside[:3])
        names += f" and {len(outside) - 3} more" if len(outside) > 3 else ""
        log(f"note: badam keeps the trainable parameters outside the decoder layers frozen ({names}), as the "
            "BAdam paper does")
    return BlockAdamW(blocks, [p for _, p in outside], cfg, opt, lr_multiplier)
