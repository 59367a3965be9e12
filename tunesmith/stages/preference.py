"""Preference stages: DPO (with its sigmoid, hinge, IPO and KTO-pair losses), ORPO and SimPO, on rows of a
prompt with a chosen and a rejected reply.

A micro-batch of k pairs is one padded batch of 2k rows, the chosen replies first. Each row's score is the
sum of its reply tokens' log-probabilities (the prompt is never scored, and the prompt's ids are the same
in both rows of a pair). A pair's loss depends on that pair alone, so `loss_sum` is a sum over pairs and the
loop divides by the pairs of the whole step: micro-batching does not change the loss (DESIGN rule 1).

DPO compares the policy with the starting model (the reference): for adapter methods the same model with its
adapters switched off (no second copy of the weights), for full and freeze a frozen copy taken before
training, or, with `stage.precompute_reference`, scores computed once before the first step.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from tunesmith.data.batching import collate
from tunesmith.data.templates import IGNORE
from tunesmith.data.token_store import Pair
from tunesmith.models.attention import use_packed_attention
from tunesmith.models.device import autocast
from tunesmith.stages.base import Stage
from tunesmith.stages.tokens import sequence_logps, token_logps

REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Mächler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_batch(pairs, pad_id: int) -> dict[str, torch.Tensor]:
    """k pairs as one padded batch of 2k rows: the chosen replies first, then the rejected ones."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


def shared_prompt_batch(pairs) -> dict[str, torch.Tensor]:
    """k pairs packed in one row with no padding, each as its prompt, the chosen reply, then the rejected reply
    as a branch that continues the prompt (positions restart at the prompt's length; models/attention.py):
    the prompt's tokens go through the model once for both replies. Sequences are numbered as in pair_batch
    (chosen 0..k-1, rejected k..2k-1), and each scored token is read where its own sequence predicts it: the
    rejected reply's first token from the prompt's last position."""
    ids, positions, where, tokens, seqs = [], [], [], [], []
    k = len(pairs)
    for i, pair in enumerate(pairs):
        chosen, rejected = list(pair.chosen.input_ids), list(pair.rejected.input_ids)
        c_labels, r_labels = list(pair.chosen.labels), list(pair.rejected.labels)
        shared = 0  # the prompt: the common prefix before either side's first label
        limit = min(len(chosen), len(rejected), _first_label(c_labels), _first_label(r_labels))
        while shared < limit and chosen[shared] == rejected[shared]:
            shared += 1
        start = len(ids)
        ids += chosen
        positions += range(len(chosen))
        branch = len(ids)
        ids += rejected[shared:]
        positions += range(shared, len(rejected))
        for side, labels, seq in ((0, c_labels, i), (1, r_labels, k + i)):
            for t in range(1, len(labels)):
                if labels[t] == IGNORE:
                    continue
                s = t - 1  # the sequence position whose output predicts token t
                where.append(start + s if side == 0 or s < shared else branch + s - shared)
                tokens.append(labels[t])
                seqs.append(seq)
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
            "score_from": torch.tensor(where), "score_token": torch.tensor(tokens), "score_seq": torch.tensor(seqs),
            "n_sequences": torch.tensor(2 * k)}


def _first_label(labels) -> int:
    return next((t for t, label in enumerate(labels) if label != IGNORE), len(labels))


def reference_memory(plan, note: str) -> list[tuple[str, float, str]]:
    """What a stage's Reference adds to `estimate`: nothing for adapter methods (adapters switched off give
    it), a copy of the model as it trains (fp32 weights) for full and freeze, the named model for
    stage.reference, and nothing when the stage keeps none (precomputed scores, kl_coef 0)."""
    setting = plan.stage_setting
    if setting("precompute_reference") or setting("kl_coef", 1) == 0:
        return []
    if setting("reference"):
        return [("reference model", plan.shape.params * 4.0, f"{setting('reference')} (stage.reference), frozen, "
                 "fp32, assumed the size of this model")]
    if plan.method not in ("full", "freeze"):
        return []
    return [("reference model", plan.shape.params * 4.0, note)]


class Reference:
    """The starting model a stage compares with: for adapter methods the same model with its adapters off
    (Method.starting_model), for methods that train the weights themselves a frozen copy taken now, before
    any step or resume (unless `copy_weights` is False: the caller scores everything before training), or
    the model the user named (stage.reference)."""

    def __init__(self, model, method, copy_weights: bool = True, external=None):
        self._starting = lambda: method.starting_model(model)
        self.copy = external  # stage.reference: a model or run the user named, loaded frozen by the session
        if external is not None:
            use_packed_attention(external)  # it scores the same (possibly packed) batches as the policy
        if external is None and copy_weights and method.starting_model(model) is None:
            self.copy = copy.deepcopy(model).eval().requires_grad_(False)

    def starting(self):
        """A context in which the training model computes the starting model's outputs (a no-op for a copy)."""
        return self._starting() or contextlib.nullcontext()

    @torch.no_grad()
    def _score(self, scorer, model, *args):
        """`scorer(starting model, *args)`: on the frozen copy, or on `model` with its adapters off."""
        if self.copy is not None:
            return scorer(self.copy, *args)
        with self.starting():
            return scorer(model, *args)

    def logps(self, model, batch, labels_only: bool = True) -> torch.Tensor:
        """Each sequence's summed label-token log-probability under the starting model."""
        return self._score(sequence_logps, model, batch, labels_only)[0]

    def token_logps(self, model, batch, labels_only: bool = True, temperature: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each label token's log-probability under the starting model (see tokens.token_logps)."""
        return self._score(token_logps, model, batch, labels_only, temperature)


class PreferenceStage(Stage):
    """What the preference stages share: pairs in, pairs counted, rewards logged."""

    can_pack = True
    packs_by_default = True  # the shared-prompt layout, wherever the model's attention allows it
    rows_per_item = 2
    init_values = {"data.format": "preference"}

    def __init__(self, cfg, run):
        super().__init__(cfg, run)
        self._stats: dict[str, float] = {}

    def count(self, rows: Sequence[Pair]) -> int:
        return len(rows)

    def batches(self, rows, size, pad_id, packed):
        self._stats = {}  # a new attempt at the step (after out-of-memory, with smaller micro-batches) starts over
        out = []
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            batch = shared_prompt_batch(chunk) if packed else pair_batch(chunk, pad_id)
            if chunk[0].reference is not None:
                batch["reference"] = torch.tensor([p.reference[0] for p in chunk] + [p.reference[1] for p in chunk],
                                                  dtype=torch.float32)
            out.append(batch)
        return out

    def scores(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chosen log-prob sums, rejected sums, chosen reply tokens, rejected reply tokens), one per pair."""
        logps, tokens = sequence_logps(model, batch, self.run.train.logits_at_labels_only)
        return (*logps.chunk(2), *tokens.chunk(2))

    def pair_losses(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss per pair, chosen reward per pair, rejected reward per pair)."""
        raise NotImplementedError

    def loss_sum(self, model, batch):
        losses, chosen, rejected = self.pair_losses(model, batch)
        for key, value in zip(REWARDS, (chosen, rejected, chosen - rejected, (chosen > rejected).float())):
            self._stats[key] = self._stats.get(key, 0.0) + float(value.detach().sum())
        return losses.sum(), len(losses)

    def step_metrics(self, rows):
        out = {key: value / len(rows) for key, value in self._stats.items()}
        return {**out, "tokens": sum(len(p.chosen) + len(p.rejected) for p in rows)}

    @torch.no_grad()
    def evaluate(self, model, rows, batch_size, pad_id, precision, max_batches):
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        kept, self._stats = self._stats, {}
        total, n = 0.0, 0
        for i, batch in enumerate(self.batches(rows, batch_size, pad_id, False)):
            if max_batches is not None and i >= max_batches:
                break
            with autocast(device, precision):
                summed, count = self.loss_sum(model, {k: v.to(device) for k, v in batch.items()})
            total, n = total + float(summed), n + count
        metrics = {"val_loss": total / n if n else float("nan"),
                   **{f"val_{key}": value / max(n, 1) for key, value in self._stats.items()}}
        self._stats = kept
        model.train(was_training)
        return metrics


class DpoStage(PreferenceStage):
    """Direct preference optimisation (Rafailov et al. 2023) and its loss variants."""

    name = "dpo"
    needs_reference = True

    @staticmethod
    def extra_memory(plan) -> list[tuple[str, float, str]]:
        return reference_memory(plan, "a frozen copy of the starting weights")

    def prepare(self, model, method, data, device, precision, pad_id) -> None:
        """Set up the reference: adapters off, a frozen copy, or every pair scored once now."""
        self.reference = Reference(model, method, copy_weights=not self.cfg.precompute_reference,
                                   external=self.models.get("reference"))
        if self.cfg.precompute_reference:
            for name in ("train", "val"):
                setattr(data, name, _with_reference(getattr(data, name), self, model, device, precision, pad_id))

    def reference_scores(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if "reference" in batch:
            return batch["reference"].chunk(2)
        return self.reference.logps(model, batch, self.run.train.logits_at_labels_only).chunk(2)

    def pair_losses(self, model, batch):
        chosen, rejected, n_chosen, n_rejected = self.scores(model, batch)
        ref_chosen, ref_rejected = self.reference_scores(model, batch)
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        beta, kind, smooth = self.cfg.beta, self.cfg.loss, self.cfg.label_smoothing
        margin = chosen_ratio - rejected_ratio
        if kind == "sigmoid":
            losses = -(1 - smooth) * F.logsigmoid(beta * margin) - smooth * F.logsigmoid(-beta * margin)
        elif kind == "hinge":
            losses = torch.relu(1 - beta * margin)
        elif kind == "ipo":  # per-token log ratios, as TRL and the IPO authors use them
            per_token = chosen_ratio / n_chosen.clamp(min=1) - rejected_ratio / n_rejected.clamp(min=1)
            losses = (per_token - 1 / (2 * beta)) ** 2
        else:  # kto_pair: each side against the other side's KL estimate, here the pair's own (clamped at 0)
            chosen_kl, rejected_kl = chosen_ratio.clamp(min=0), rejected_ratio.clamp(min=0)
            losses = ((1 - torch.sigmoid(beta * (chosen_ratio - rejected_kl)))
                      + (1 - torch.sigmoid(beta * (chosen_kl - rejected_ratio)))) / 2
        if self.cfg.ftx:
            losses = losses + self.cfg.ftx * (-chosen / n_chosen.clamp(min=1))
        return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class OrpoStage(PreferenceStage):
    """Odds-ratio preference optimisation (Hong et al. 2024): the chosen reply's SFT loss minus beta times the
    log-sigmoid of the log odds ratio of chosen over rejected (mean token log-probabilities). The SFT term is
    over the reply's tokens, as in the paper (TRL's ORPOTrainer also counts the prompt's)."""

    name = "orpo"

    def pair_losses(self, model, batch):
        chosen, rejected, n_chosen, n_rejected = self.scores(model, batch)
        chosen, rejected = chosen / n_chosen.clamp(min=1), rejected / n_rejected.clamp(min=1)
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        losses = -chosen - self.cfg.beta * F.logsigmoid(log_odds)
        return losses, self.cfg.beta * chosen.detach(), self.cfg.beta * rejected.detach()


class SimpoStage(PreferenceStage):
    """Simple preference optimisation (Meng et al. 2024): DPO's sigmoid loss on mean token log-probabilities,
    with no reference and a target margin gamma."""

    name = "simpo"

    def pair_losses(self, model, batch):
        chosen, rejected, n_chosen, n_rejected = self.scores(model, batch)
        chosen, rejected = chosen / n_chosen.clamp(min=1), rejected / n_rejected.clamp(min=1)
        beta, smooth = self.cfg.beta, self.cfg.label_smoothing
        logits = beta * (chosen - rejected) - self.cfg.gamma
        losses = -(1 - smooth) * F.logsigmoid(logits) - smooth * F.logsigmoid(-logits)
        if self.cfg.ftx:
            losses = losses + self.cfg.ftx * (-chosen)
        return losses, beta * chosen.detach(), beta * rejected.detach()


class _Scored(Sequence):
    """Pairs with their reference scores attached (stage.precompute_reference)."""

    def __init__(self, pairs, scores: torch.Tensor):
        self.pairs, self.scores = pairs, scores

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def lengths(self):
        return self.pairs.lengths if hasattr(self.pairs, "lengths") else [len(p) for p in self.pairs]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        pair = self.pairs[i]
        return Pair(pair.chosen, pair.rejected, reference=(float(self.scores[i, 0]), float(self.scores[i, 1])))


@torch.no_grad()
def _with_reference(pairs, stage: DpoStage, model, device, precision, pad_id, size: int = 8):
    """Every pair scored once by the starting model (before any step, so the weights are still the start)."""
    if not len(pairs):
        return pairs
    was_training = model.training
    model.eval()
    scores = torch.empty(len(pairs), 2)
    for start in range(0, len(pairs), size):
        chunk = [pairs[i] for i in range(start, min(start + size, len(pairs)))]
        batch = {k: v.to(device) for k, v in pair_batch(chunk, pad_id).items()}
        with autocast(device, precision):  # the reference: adapters off, or the model stage.reference names
            chosen, rejected = stage.reference.logps(model, batch, stage.run.train.logits_at_labels_only).chunk(2)
        scores[start:start + len(chunk)] = torch.stack([chosen, rejected], 1).float().cpu()
    model.train(was_training)
    return _Scored(pairs, scores)
