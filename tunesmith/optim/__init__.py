"""Optimizers and the learning-rate schedule. `optimizer.name` picks one (optim/build.py).

Optimizers that need the loop's attention declare it with two hooks, no-ops for the others, so the loop
never asks which optimizer it holds: `begin_step(step)` (BAdam chooses the block a step trains) and
`saving()` (a context in which every parameter the method trains is marked trainable, for its save).
"""

from __future__ import annotations

import contextlib


def begin_step(optimizer, step: int) -> None:
    hook = getattr(optimizer, "begin_step", None)
    if hook is not None:
        hook(step)


def saving(optimizer) -> contextlib.AbstractContextManager:
    hook = getattr(optimizer, "saving", None)
    return hook() if hook is not None else contextlib.nullcontext()
