"""GaLore (Zhao et al. 2024, arXiv:2403.03507): optimizer moments of the layers' weight matrices kept at low rank.

Each step the gradient G (m × n) of a projected matrix is multiplied by an orthonormal basis P taken from an
SVD of G (recomputed every `update_proj_gap` steps), the optimizer runs on that rank-r gradient, and its
update is multiplied back by P and by `scale`. The moments are therefore r × n or m × r instead of m × n.

galore_torch does the work: its optimizers read rank / update_proj_gap / scale / proj_type from a parameter
group and keep a GaLoreProjector in each projected parameter's state (checkpoint.py stores and rebuilds it).
The 8-bit variant is the exception, see GaLoreAdamW8bit. Every variant here gives its parameters a
CompactProjector, which keeps only the rank-r basis.
"""

from __future__ import annotations

import bitsandbytes as bnb  # galore_torch imports it anyway
import galore_torch
import torch
import torch.nn as nn
from galore_torch.galore_projector import GaLoreProjector
from transformers.pytorch_utils import Conv1D

from tunesmith.models.layers import decoder_layers


class CompactProjector(GaLoreProjector):
    """galore_torch's projector, holding only its rank-r basis. The package's keeps the basis as a view of the
    whole SVD factor (min(m, n) wide), so a 4096-wide matrix at rank 128 would hold 32 times the memory the
    method promises; a copy of the r rows or columns lets the rest go."""

    @classmethod
    def for_group(cls, group: dict) -> "CompactProjector":
        return cls(group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"],
                   proj_type=group["proj_type"])

    def get_orthogonal_matrix(self, weights, rank, type):
        basis = super().get_orthogonal_matrix(weights, rank, type)
        return [b.clone() for b in basis] if isinstance(basis, list) else basis.clone()


def projector_from_state(settings: dict, basis) -> CompactProjector:
    """A projector as a checkpoint stored it (its settings and its basis): the optimizers' hook for resume."""
    projector = CompactProjector.for_group(settings)
    projector.verbose = settings["verbose"]
    projector.ortho_matrix = basis
    return projector


def give_projectors(optimizer: torch.optim.Optimizer) -> None:
    """A CompactProjector for each projected parameter that has none yet (galore_torch's optimizers then use
    it rather than making their own)."""
    for group in optimizer.param_groups:
        if "rank" not in group:
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if p.grad is not None and "projector" not in state:
                state["projector"] = CompactProjector.for_group(group)


class CompactProjectors:
    """Mixed into a galore_torch optimizer: its projected parameters get CompactProjectors."""

    projector_from_state = staticmethod(projector_from_state)

    @torch.no_grad()
    def step(self, closure=None):
        give_projectors(self)
        return super().step(closure)


class GaLoreAdamW(CompactProjectors, galore_torch.GaLoreAdamW):
    pass


class GaLoreAdafactor(CompactProjectors, galore_torch.GaLoreAdafactor):
    pass


def projected_names(model: nn.Module, named_params: list[tuple[str, nn.Parameter]]) -> set[str]:
    """The trainable weight matrices of the linear modules (attention and MLP) inside the decoder layers.
    Embeddings, the LM head, norms and biases are not projected: they train with the plain optimizer."""
    matrices = {id(m.weight) for layer in decoder_layers(model, "optimizer.name galore") for m in layer.modules()
                if isinstance(m, (nn.Linear, Conv1D)) and m.weight.ndim == 2}
    return {name for name, p in named_params if id(p) in matrices}


def describe(named_params: list[tuple[str, nn.Parameter]], projected: set[str], rank: int, interval: int) -> str:
    """One line for the run log: what is projected, and where the rank saves nothing."""
    shapes = [tuple(p.shape) for name, p in named_params if name in projected]
    line = (f"galore: {len(shapes)} weight matrices get rank-{rank} moments (new projection every {interval} "
            f"steps); {len(named_params) - len(shapes)} other parameters are optimized in full")
    if not shapes:
        return line + " (nothing to project: no trainable weight matrix of a decoder layer's linear modules)"
    unsaved = [s for s in shapes if rank >= min(s)]
    if unsaved:
        line += (f"; note: optimizer.rank {rank} is not below the smaller side of {len(unsaved)} of them "
                 f"(e.g. {unsaved[0][0]}×{unsaved[0][1]}), which therefore save no memory")
    return line


class GaLoreAdamW8bit(bnb.optim.AdamW8bit):
    """bitsandbytes' 8-bit AdamW on GaLore-projected gradients, with CompactProjectors.

    Not galore_torch's own GaLoreAdamW8bit (1.0): it passes two arguments by position into what are now
    other parameters of bitsandbytes' Optimizer2State (percentile_clipping=100 lands in max_unorm, which
    then clips updates against the zeroed stand-in weight below; block_wise=True lands in skip_zeros), and
    it calls torch.cuda.synchronize() for every parameter, which fails where there is no CUDA.

    The trick is the package's: while bitsandbytes steps, a projected weight is stood in for by a zero
    matrix of the low-rank shape and its gradient by the projected one, so bitsandbytes keeps low-rank
    (8-bit) moments and leaves -lr × its update in the stand-in; that is projected back onto the weight.
    Weight decay acts on the full weight afterwards (on the zero stand-in it does nothing).
    """

    projector_from_state = staticmethod(projector_from_state)

    @torch.no_grad()
    def step(self, closure=None):
        give_projectors(self)
        swapped = []
        for gindex, group in enumerate(self.param_groups):
            if "rank" not in group:
                continue
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                low = state["projector"].project(p.grad, state.get("step", 0))
                swapped.append((group, p, p.data, p.grad))
                p.data, p.grad = torch.zeros_like(low, dtype=p.dtype), low
                if "state1" not in state:  # the moments take the stand-in's (low-rank) shape
                    self.init_state(group, p, gindex, pindex)
        try:
            loss = super().step(closure)
        finally:
            updates = []
            for group, p, weight, grad in swapped:
                updates.append(p.data)
                p.data, p.grad = weight, grad
        for (group, p, weight, _), update in zip(swapped, updates):
            weight.add_(self.state[p]["projector"].project_back(update).to(weight.dtype))
            if group["weight_decay"]:  # after the update, as galore_torch's AdamW does
                weight.add_(weight, alpha=-group["lr"] * group["weight_decay"])
        return loss
