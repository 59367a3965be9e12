"""Reward modelling: a scalar head on the causal LM, trained on preference pairs with the Bradley–Terry loss
-log σ(r_chosen − r_rejected), so that the reward of a reply predicts which of two replies people prefer.

The head is one linear map from the last hidden state to a number, read at each row's last token that is not
padding — the rule transformers' *ForSequenceClassification models use, so that an export of the run as one
(export/formats.py) scores every row as training did. The head trains fully beside any method (LoRA trains
the body's adapters, full the body itself) and is saved as `stage_modules.safetensors` (stages/base.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from tunesmith.models.layers import causal_lm
from tunesmith.stages.preference import PreferenceStage
from tunesmith.stages.tokens import model_inputs, virtual_tokens

HEAD = "score"
"""The head's name: a *ForSequenceClassification model's `score` layer holds the same weight."""


def new_head(model) -> torch.nn.Linear:
    """A zero-bias scalar head, initialised as transformers initialises a classification head."""
    config = causal_lm(model).config
    head = torch.nn.Linear(config.hidden_size, 1, bias=False)
    torch.nn.init.normal_(head.weight, std=getattr(config, "initializer_range", 0.02))
    return head


def load_head(model, weights: Path) -> torch.nn.Module:
    """An rm run's trained head, from its weights directory (final/ or a checkpoint), beside `model`."""
    from tunesmith.stages.base import MODULES_FILE, load_modules

    head = new_head(model).to(next(model.parameters()).device)
    load_modules({HEAD: head}, weights / MODULES_FILE)
    return head.eval()


def last_tokens(batch: dict[str, torch.Tensor], pad_id: int) -> torch.Tensor:
    """Each row's last position that holds a token other than padding (transformers' pooling rule)."""
    ids = batch["input_ids"]
    real = ids != pad_id
    if batch.get("attention_mask") is not None:
        real &= batch["attention_mask"].bool()
    positions = torch.arange(ids.shape[1], device=ids.device)
    return (positions * real).argmax(-1)


def rewards(model, head: torch.nn.Module, batch: dict[str, torch.Tensor], pad_id: int) -> torch.Tensor:
    """One reward per row of a padded batch."""
    virtual = virtual_tokens(model)
    if virtual is None:
        hidden = causal_lm(model).get_decoder()(**model_inputs(batch)).last_hidden_state
    else:  # soft prompts exist only inside peft's forward, which puts `virtual` positions first
        hidden = model(**model_inputs(batch), output_hidden_states=True).hidden_states[-1][:, virtual:]
    last = hidden[torch.arange(len(hidden), device=hidden.device), last_tokens(batch, pad_id)]
    return head(last.to(head.weight.dtype)).squeeze(-1).float()


class RewardStage(PreferenceStage):
    """rm: rewards/chosen and rewards/rejected are the head's scores; accuracy is how often chosen wins."""

    name = "rm"
    can_pack = False  # the head reads each row's last token: padded rows, one sequence each
    packs_by_default = False

    @staticmethod
    def extra_memory(plan) -> list[tuple[str, float, str]]:
        # The head's weight, its gradient and two AdamW moments, in fp32.
        return [("reward head", plan.shape.hidden * 4.0 * 4, "the scalar head (weights, gradient, AdamW state)")]

    def prepare(self, model, method, data, device, precision, pad_id) -> None:
        self.head = new_head(model).to(device)
        self.pad_id = pad_id

    def modules(self):
        return {HEAD: self.head}

    def pair_losses(self, model, batch):
        chosen, rejected = rewards(model, self.head, batch, self.pad_id).chunk(2)
        losses = -F.logsigmoid(chosen - rejected)
        if self.cfg.center_rewards:  # keeps rewards near zero, so their scale means something (Eisenstein 2023)
            losses = losses + self.cfg.center_rewards * (chosen + rejected) ** 2
        return losses, chosen.detach(), rejected.detach()
