"""KTO (Ethayarajh et al. 2024): learning from single replies marked desirable or not, with no pairs.

A desirable reply's loss is 1 - sigmoid(beta (r - z)), an undesirable one's 1 - sigmoid(beta (z - r)), where r
is the reply's log-ratio to the reference (summed over its tokens) and z an estimate of the policy's KL to the
reference: the mean log-ratio of mismatched rows (each prompt with the previous row's reply, as TRL pairs them),
clamped at 0 and not differentiated. Here z is estimated over the whole optimizer step, once, before its first
micro-batch, so every row's loss depends on its own tokens and the step alone: micro-batching does not change
the loss (DESIGN rule 1). With one micro-batch per step this is TRL's KTOTrainer on that batch.
"""

from __future__ import annotations

from typing import Sequence

import torch

from tunesmith.data.batching import collate
from tunesmith.data.templates import IGNORE
from tunesmith.data.token_store import Tokenized
from tunesmith.models.device import autocast
from tunesmith.stages.base import Stage
from tunesmith.stages.preference import Reference, reference_memory
from tunesmith.stages.tokens import sequence_logps


def reply_start(row: Tokenized) -> int:
    """The first position the row trains: where its reply begins."""
    labels = torch.as_tensor(row.labels)
    return int(torch.nonzero(labels != IGNORE)[0, 0])


def mismatched(prompt_row: Tokenized, reply_row: Tokenized) -> Tokenized:
    """One row's prompt followed by another row's reply (labels on the reply): a sample of the policy's KL."""
    a, b = reply_start(prompt_row), reply_start(reply_row)
    prompt = [int(t) for t in prompt_row.input_ids[:a]]
    reply = [int(t) for t in reply_row.input_ids[b:]]
    return Tokenized(prompt + reply, [IGNORE] * len(prompt) + reply)


class KtoStage(Stage):
    name = "kto"
    needs_reference = True
    can_pack = False
    init_values = {"data.format": "unpaired"}

    def __init__(self, cfg, run):
        super().__init__(cfg, run)
        self._stats: dict[str, float] = {}
        self._kl: float | None = None
        self._kl_batches: list[dict[str, torch.Tensor]] = []

    @staticmethod
    def extra_memory(plan) -> list[tuple[str, float, str]]:
        return reference_memory(plan, "a frozen copy of the starting weights")

    def prepare(self, model, method, data, device, precision, pad_id) -> None:
        self.reference = Reference(model, method, external=self.models.get("reference"))

    def count(self, rows: Sequence[Tokenized]) -> int:
        return len(rows)

    def batches(self, rows, size, pad_id, packed):
        self._stats, self._kl = {}, None  # a new step (or a new attempt at one, after out-of-memory)
        n = len(rows)
        kl_rows = [mismatched(rows[i], rows[(i - 1) % n]) for i in range(n)]  # TRL's pairing
        self._kl_batches = [collate(kl_rows[i:i + size], pad_id) for i in range(0, n, size)]
        out = []
        for i in range(0, n, size):
            batch = collate(rows[i:i + size], pad_id)
            batch["desirable"] = torch.tensor([bool(r.desirable) for r in rows[i:i + size]])
            out.append(batch)
        return out

    @torch.no_grad()
    def step_kl(self, model, device) -> float:
        """The step's KL estimate: mean log-ratio of its mismatched rows, clamped at 0."""
        labels_only = self.run.train.logits_at_labels_only
        total, n = 0.0, 0
        for batch in self._kl_batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            policy = sequence_logps(model, batch, labels_only)[0]
            total += float((policy - self.reference.logps(model, batch, labels_only)).sum())
            n += len(policy)
        return max(total / max(n, 1), 0.0)

    def loss_sum(self, model, batch):
        if self._kl is None:
            self._kl = self.step_kl(model, batch["input_ids"].device)
        logps, _ = sequence_logps(model, batch, self.run.train.logits_at_labels_only)
        ratio = logps - self.reference.logps(model, batch, self.run.train.logits_at_labels_only)
        beta, kl, good = self.cfg.beta, self._kl, batch["desirable"].bool()
        losses = torch.where(good, self.cfg.desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                             self.cfg.undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
        rewards = beta * ratio.detach()
        for key, value in (("rewards/chosen", rewards[good].sum()), ("rewards/rejected", rewards[~good].sum()),
                           ("desirable", good.sum()), ("undesirable", (~good).sum())):
            self._stats[key] = self._stats.get(key, 0.0) + float(value)
        return losses.sum(), len(losses)

    def _metrics(self, prefix: str = "") -> dict[str, float]:
        s = self._stats
        out = {f"{prefix}kl": self._kl if self._kl is not None else 0.0}
        if s.get("desirable"):
            out[f"{prefix}rewards/chosen"] = s["rewards/chosen"] / s["desirable"]
        if s.get("undesirable"):
            out[f"{prefix}rewards/rejected"] = s["rewards/rejected"] / s["undesirable"]
        return out

    def step_metrics(self, rows):
        return {**self._metrics(), "tokens": sum(len(r) for r in rows)}

    @torch.no_grad()
    def evaluate(self, model, rows, batch_size, pad_id, precision, max_batches):
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        total, n, kept = 0.0, 0, (self._stats, self._kl, self._kl_batches)
        stats: dict[str, float] = {}
        for i, start in enumerate(range(0, len(rows), batch_size)):
            if max_batches is not None and i >= max_batches:
                break
            chunk = [rows[j] for j in range(start, min(start + batch_size, len(rows)))]
            [batch] = self.batches(chunk, len(chunk), pad_id, False)  # the KL over each evaluation batch, as TRL
            with autocast(device, precision):
                summed, count = self.loss_sum(model, {k: v.to(device) for k, v in batch.items()})
            total, n = total + float(summed), n + count
            for key, value in self._stats.items():
                stats[key] = stats.get(key, 0.0) + value
        self._stats = stats
        metrics = {"val_loss": total / n if n else float("nan"), **self._metrics("val_")}
        metrics.pop("val_kl")  # the last batch's; not a held-out number
        self._stats, self._kl, self._kl_batches = kept
        model.train(was_training)
        return metrics
