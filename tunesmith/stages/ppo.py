"""PPO (Schulman et al. 2017) as RLHF uses it (Ouyang et al. 2022; TRL's PPOTrainer): an online stage with a
learned value head.

Every `ppo_epochs` steps, `collect` samples one answer per prompt (seeded from the run's seed and the step,
in its own fork of the RNG) and scores it once: the answer's score comes from a reward model (a run trained
with stage rm) or from reward functions (stages/rewards.py), optionally standardised over the step
(`score_norm`). Each answer token's reward is minus kl_coef times its log-ratio to the reference, and the
last token also gets the score; the value head (a linear map on the policy's last hidden state, trained
beside any method and saved as a stage module) estimates what is still to come, and generalised advantage
estimation (gamma, lam) turns rewards and values into each token's advantage (whitened over the step) and
return. The following `ppo_epochs` steps train on that same batch: PPO's clipped policy loss plus vf_coef
times the clipped value loss, summed over answer tokens and divided by the batch's answer tokens.

The sampled batch is part of the stage's state between its steps, so checkpoints keep it
(`stage_state.json`) and a run resumed in the middle of a batch trains on exactly the same answers.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from tunesmith.data.batching import collate
from tunesmith.data.templates import IGNORE
from tunesmith.data.token_store import Prompt
from tunesmith.models.device import autocast
from tunesmith.models.layers import causal_lm
from tunesmith.stages.base import Stage
from tunesmith.stages.grpo import answer_stats, decoded, generation_memory, greedy_answers, sample_step
from tunesmith.stages.preference import Reference, reference_memory
from tunesmith.stages.reward import rewards as reward_model_scores
from tunesmith.stages.rewards import Rewards
from tunesmith.stages.tokens import model_inputs, virtual_tokens

STATE_FILE = "stage_state.json"
"""Beside the weights in a checkpoint: the answers a PPO batch trains on until the next sampling."""
VALUE_HEAD = "value_head"


@dataclass
class Sampled:
    """One answer of a PPO batch, with what was measured when it was sampled (on the targets' grid)."""

    input_ids: list[int]
    labels: list[int]
    score: float
    old_logps: list[float]
    old_values: list[float]
    advantages: list[float]
    returns: list[float]
    starts: tuple = ()

    @property
    def n_targets(self) -> int:
        return len(self.old_logps)

    def __len__(self) -> int:
        return len(self.input_ids)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Standardise the masked values of x (unbiased variance, as TRL's masked_whiten)."""
    values = x[mask]
    mean, var = values.mean(), values.var() if values.numel() > 1 else torch.tensor(1.0)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by generalised advantage estimation over each row's masked positions, which run
    contiguously from the first answer token to the last (rows × positions)."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    next_value = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t].to(rewards.dtype)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = m * (delta + gamma * lam * last) + (1 - m) * last
        advantages[:, t] = m * last
        next_value = m * values[:, t] + (1 - m) * next_value
    return advantages, advantages + values


def logps_and_values(model, head, batch, temperature: float, labels_only: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probability of each label token, the value head's estimate before it, where labels are), each
    rows × positions like the targets: one pass through the decoder gives both."""
    targets = batch["labels"][:, 1:]
    scored = targets != IGNORE
    virtual = virtual_tokens(model)
    lm = causal_lm(model)
    if not labels_only or virtual is not None or getattr(lm.config, "final_logit_softcapping", None):
        out = model(**model_inputs(batch), output_hidden_states=True)
        hidden = out.hidden_states[-1][:, (virtual or 0):][:, :-1][scored]
        logits = out.logits[:, (virtual or 0):-1][scored]
    else:
        hidden = lm.get_decoder()(**model_inputs(batch)).last_hidden_state[:, :-1][scored]
        logits = lm.get_output_embeddings()(hidden)
    logits = logits.float() / temperature
    token = -torch.nn.functional.cross_entropy(logits, targets[scored], reduction="none")
    value = head(hidden.to(head.weight.dtype)).squeeze(-1).float()
    grid = torch.zeros(targets.shape, dtype=token.dtype, device=token.device)
    return grid.masked_scatter(scored, token), torch.zeros_like(grid).masked_scatter(scored, value), scored


class PpoStage(Stage):
    name = "ppo"
    can_pack = False
    # A config that loads as written: scored by exact_match until stage.reward_model names an rm run instead.
    init_values = {"data.format": "prompt", "stage.rewards": ["exact_match"]}

    def __init__(self, cfg, run):
        super().__init__(cfg, run)
        self.rewards = Rewards(cfg) if cfg.rewards else None
        self.reward_model = None  # (model, head), set by the session from stage.reward_model
        self.reference: Reference | None = None
        self._batch: list[Sampled] = []
        self._sample_stats: dict[str, float] = {}
        self._stats: dict[str, float] = {}
        self._kl, self._reward = 0.0, float("nan")

    @staticmethod
    def extra_memory(plan) -> list[tuple[str, float, str]]:
        s = plan.shape
        return [generation_memory(plan),
                *([("reward model", s.params * 4.0, "the rm run that scores answers, frozen, fp32")]
                  if plan.stage_setting("reward_model") or not plan.stage_settings else []),
                ("value head", s.hidden * 4.0 * 4, "the value head (weights, gradient, AdamW state)"),
                *reference_memory(plan, "a frozen copy of the starting weights (full and freeze)")]

    def prepare(self, model, method, data, device, precision, pad_id) -> None:
        self.device, self.precision, self.pad_id = device, precision, pad_id
        self.stop_ids = [self.tokenizer.eos_token_id]
        self.reward_model = self.models.get("reward_model")
        hidden = causal_lm(model).config.hidden_size
        self.value_head = torch.nn.Linear(hidden, 1, bias=True).to(device)
        torch.nn.init.zeros_(self.value_head.weight)  # values start at 0: the first advantages are the rewards
        torch.nn.init.zeros_(self.value_head.bias)
        if self.cfg.kl_coef:
            self.reference = Reference(model, method, external=self.models.get("reference"))

    def modules(self):
        return {VALUE_HEAD: self.value_head} if hasattr(self, "value_head") else {}

    # ---- sampling: one answer per prompt every ppo_epochs steps

    def rows_wanted(self, step: int, rows_per_step: int) -> int:
        return rows_per_step if (step - 1) % self.cfg.ppo_epochs == 0 else 0

    def collect(self, model, rows: Sequence[Prompt], step: int) -> list[Sampled]:
        if not rows:
            if not self._batch:
                raise RuntimeError("ppo: no sampled batch to train on (a checkpoint without stage_state.json?)")
            return self._batch
        cfg = self.cfg
        prompts = [list(r.input_ids) for r in rows]
        replies = sample_step(self, model, prompts, step)
        scores = self.score(model, rows, replies)
        raw = scores.clone()
        if cfg.score_norm and len(scores) > 1:
            scores = (scores - scores.mean()) / (scores.std() + 1e-8)
        items = [Sampled(p + r, [IGNORE] * len(p) + r, float(s), [], [], [], [])
                 for p, r, s in zip(prompts, replies, scores.tolist())]
        self._measure(model, items)
        self._batch = items
        self._sample_stats = {"score": float(raw.mean()), "score_std": float(raw.std()) if len(raw) > 1 else 0.0,
                              **answer_stats(replies, self.stop_ids)}
        return items

    @torch.no_grad()
    def score(self, model, rows: Sequence[Prompt], replies: list[list[int]]) -> torch.Tensor:
        """Each answer's score: the reward model's reward of prompt + answer, or the reward functions' sum."""
        if self.reward_model is not None:
            scorer, head = self.reward_model
            ids = [list(r.input_ids) + a for r, a in zip(rows, replies)]
            items = [Sampled(x, x, 0.0, [], [], [], []) for x in ids]  # (labels unused: the head reads the last token)
            batch = {k: v.to(self.device) for k, v in collate(items, self.pad_id).items() if k != "labels"}
            with autocast(self.device, self.precision):
                return reward_model_scores(scorer, head, batch, self.pad_id).float().cpu()
        _, total = self.rewards([r.prompt for r in rows], decoded(self, replies), replies, [r.fields for r in rows])
        return torch.nan_to_num(total).float()  # an answer no function scored counts 0, not NaN, in the GAE

    @torch.no_grad()
    def _measure(self, model, items: list[Sampled]) -> None:
        """Old log-probabilities and values, the reference's log-probabilities, the per-token rewards, and from
        them each token's advantage and return (GAE), for the whole batch at once."""
        batch = {k: v.to(self.device) for k, v in collate(items, self.pad_id).items()}
        labels_only = self.run.train.logits_at_labels_only
        was_training = model.training
        model.eval()
        with autocast(self.device, self.precision):
            logps, values, mask = logps_and_values(model, self.value_head, batch, self.cfg.temperature, labels_only)
            ref = (self.reference.token_logps(model, batch, labels_only, self.cfg.temperature)[0]
                   if self.reference is not None else logps)
        model.train(was_training)
        logps, values, ref, mask = logps.cpu(), values.cpu(), ref.cpu(), mask.cpu()
        kl = (logps - ref) * mask
        rewards = -self.cfg.kl_coef * kl
        last = mask.long().cumsum(1).argmax(1)  # each row's last answer position
        rows = torch.arange(len(items))
        rewards[rows, last] += torch.tensor([it.score for it in items])
        if self.cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = gae(rewards, values, mask, self.cfg.gamma, self.cfg.lam)
        advantages = masked_whiten(advantages, mask) * mask
        for i, it in enumerate(items):
            m = mask[i]
            it.old_logps, it.old_values = logps[i][m].tolist(), values[i][m].tolist()
            it.advantages, it.returns = advantages[i][m].tolist(), returns[i][m].tolist()
        self._kl = float(kl.sum() / len(items))
        self._reward = float((rewards * mask).sum() / len(items)) if not self.cfg.whiten_rewards else float("nan")

    # ---- the loss

    def count(self, rows: Sequence[Sampled]) -> int:
        return sum(r.n_targets for r in rows)

    def batches(self, rows, size, pad_id, packed):
        self._stats = {}
        out = []
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            batch = collate(chunk, pad_id)
            mask = batch["labels"][:, 1:] != IGNORE
            for key in ("old_logps", "old_values", "advantages", "returns"):
                grid = torch.zeros(mask.shape)
                grid[mask] = torch.tensor([v for r in chunk for v in getattr(r, key)])
                batch[key] = grid
            out.append(batch)
        return out

    def token_losses(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(per-token loss, answer-token mask, per-token parts for the metrics), rows × positions."""
        logps, values, mask = logps_and_values(model, self.value_head, batch, self.cfg.temperature,
                                               self.run.train.logits_at_labels_only)
        eps, adv = self.cfg.clip_range, batch["advantages"]
        ratio = torch.exp(logps - batch["old_logps"])
        policy = torch.max(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))
        old_v, ret = batch["old_values"], batch["returns"]
        clipped_v = old_v + (values - old_v).clamp(-self.cfg.value_clip, self.cfg.value_clip)
        value = 0.5 * torch.max((values - ret) ** 2, (clipped_v - ret) ** 2)
        losses = (policy + self.cfg.vf_coef * value) * mask
        parts = {"policy_loss": policy, "value_loss": value,
                 "clipfrac": ((ratio - 1).abs() > eps).float(),
                 "approx_kl": 0.5 * (logps - batch["old_logps"]) ** 2}
        return losses, mask, parts

    def loss_sum(self, model, batch):
        losses, mask, parts = self.token_losses(model, batch)
        for key, value in parts.items():
            self._stats[key] = self._stats.get(key, 0.0) + float((value.detach() * mask).sum())
        return losses.sum(), int(mask.sum())

    def step_metrics(self, rows):
        n = max(self.count(rows), 1)
        out = {**self._sample_stats, **{k: v / n for k, v in self._stats.items()}, "kl": self._kl}
        if not math.isnan(self._reward):
            out["reward"] = self._reward
        return {**out, "tokens": sum(len(r) for r in rows), "trained_tokens": self.count(rows)}

    # ---- evaluation: one greedy answer per held-out prompt, scored like training's

    @torch.no_grad()
    def evaluate(self, model, rows, batch_size, pad_id, precision, max_batches):
        rows, replies = greedy_answers(self, model, rows, batch_size, pad_id, precision, max_batches)
        if not rows:
            return {"val_loss": float("nan")}
        scores = self.score(model, rows, replies)
        return {"val_loss": -float(scores.mean()), "val_score": float(scores.mean()),
                "val_completion_length": answer_stats(replies, self.stop_ids)["completion_length"]}

    # ---- the sampled batch is state between steps: checkpoints keep it

    def save(self, directory: Path) -> None:
        super().save(directory)
        (directory / STATE_FILE).write_text(json.dumps({"batch": [asdict(it) for it in self._batch],
                                                        "sample_stats": self._sample_stats, "kl": self._kl,
                                                        "reward": self._reward if self._batch else None}),
                                            encoding="utf-8")

    def restore(self, directory: Path) -> None:
        super().restore(directory)
        path = directory / STATE_FILE
        if path.exists():
            state = json.loads(path.read_text(encoding="utf-8"))
            self._batch = [Sampled(**{**it, "starts": tuple(it["starts"])}) for it in state["batch"]]
            self._sample_stats, self._kl = state["sample_stats"], state["kl"]
            self._reward = float("nan") if state["reward"] is None else state["reward"]
