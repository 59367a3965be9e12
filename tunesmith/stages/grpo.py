"""GRPO, group-relative policy optimisation (Shao et al. 2024): an online stage.

At the start of each step (`collect`) the model answers each of the step's prompts `num_generations` times,
sampling with the KV cache in one batch (so the answers do not depend on the micro-batching); the reward
functions (stages/rewards.py) score every answer, and an answer's advantage is its reward minus its group's mean, scaled by the group's spread (stage.scale_rewards).
The step then trains on those answers like any other rows: the loss of a reply token is PPO's clipped
objective with the answer's advantage, -min(ρA, clip(ρ, 1-ε, 1+ε)A) with ρ the token's probability ratio to
the policy that sampled it, plus kl_coef times the k3 estimate of its KL to the starting model. The sum over
reply tokens is divided by the reply tokens of the whole step (the loop's count; TRL's "dapo"
normalisation), so micro-batching does not change the step (DESIGN rule 1).

The answers are sampled from the weights of the step's start, and each step updates once, so ρ is 1 in value
and the objective's gradient is the policy gradient; the clip bounds what a large accumulation could do.

The sampling RNG is seeded from (train.seed, step) inside its own fork of the RNG, so a resumed run samples
the same answers from the same weights (exact resume), and the training RNG is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tunesmith.data.batching import collate
from tunesmith.data.templates import IGNORE
from tunesmith.data.token_store import Prompt
from tunesmith.models.device import autocast
from tunesmith.models.generation import sample_replies, until_stop
from tunesmith.stages.base import Stage
from tunesmith.stages.preference import Reference, reference_memory
from tunesmith.stages.rewards import Rewards, nanmean
from tunesmith.stages.tokens import token_logps


@dataclass
class Rollout:
    """One sampled answer to a prompt: a training row of the step that sampled it."""

    input_ids: list[int]
    """The prompt's ids, then the answer's."""
    labels: list[int]
    """IGNORE over the prompt; the answer's ids (its end token included, when it ended)."""
    advantage: float
    reward: float
    ref_logps: list[float] | None = None
    """The starting model's log-probability of each answer token (only with stage.kl_coef)."""
    starts: tuple = ()

    @property
    def n_targets(self) -> int:
        return sum(1 for label in self.labels[1:] if label != IGNORE)

    def __len__(self) -> int:
        return len(self.input_ids)


def rollout_seed(seed: int, step: int) -> int:
    """The sampling seed of a step: a function of the run's seed and the step only (exact resume)."""
    return (seed * 1_000_003 + step * 7_919) % (2 ** 63)


def row_std(values: torch.Tensor) -> torch.Tensor:
    """Each row's standard deviation with Bessel's correction, NaNs left out (0 for fewer than two values)."""
    n = (~values.isnan()).sum(1, keepdim=True)
    var = torch.nanmean((values - torch.nanmean(values, 1, keepdim=True)) ** 2, 1, keepdim=True) * n / (n - 1).clamp(min=1)
    return torch.nan_to_num(var.sqrt()) * (n > 1)


def advantages(rewards: torch.Tensor, group: int, scale: str) -> torch.Tensor:
    """Reward minus its group's mean, over the group's (scale "group") or the step's ("batch") standard
    deviation; NaN rewards (unscored answers) stay out of the means and get 0."""
    grouped = rewards.view(-1, group)
    out = grouped - torch.nanmean(grouped, 1, keepdim=True)
    if scale != "none":
        out = out / (row_std(grouped if scale == "group" else rewards.view(1, -1)) + 1e-4)
    return torch.nan_to_num(out.reshape(-1), nan=0.0)


class GrpoStage(Stage):
    name = "grpo"
    can_pack = False
    rows_per_item = 4  # the default stage.num_generations; rows_per() reads the config's
    init_values = {"data.format": "prompt"}

    def __init__(self, cfg, run):
        super().__init__(cfg, run)
        self.rewards = Rewards(cfg)  # a typo in stage.rewards stops here, before the model loads
        self.reference: Reference | None = None
        self._stats: dict[str, float] = {}
        self._kl = 0.0

    @classmethod
    def rows_per(cls, section) -> int:
        return section.num_generations

    @staticmethod
    def extra_memory(plan) -> list[tuple[str, float, str]]:
        return [generation_memory(plan), *reference_memory(plan, "a frozen copy of the starting weights "
                                                                 "(stage.kl_coef > 0)")]

    def prepare(self, model, method, data, device, precision, pad_id) -> None:
        self.device, self.precision, self.pad_id = device, precision, pad_id
        self.stop_ids = [self.tokenizer.eos_token_id]  # every trained reply ends with EOS (data.templates.render)
        if self.cfg.kl_coef:
            self.reference = Reference(model, method, external=self.models.get("reference"))

    # ---- the step's rows: answers sampled now, scored, with their advantages

    def collect(self, model, rows: Sequence[Prompt], step: int) -> list[Rollout]:
        cfg, g = self.cfg, self.cfg.num_generations
        prompts = [list(r.input_ids) for r in rows for _ in range(g)]
        replies = sample_step(self, model, prompts, step)
        table, total = self.score(rows, replies, g)
        adv = advantages(total, g, cfg.scale_rewards)
        out = [Rollout(p + r, [IGNORE] * len(p) + r, float(a), float(t))
               for p, r, a, t in zip(prompts, replies, adv.tolist(), total.tolist())]
        if self.reference is not None:
            self._reference_logps(model, out)
        grouped = total.view(-1, g)
        self._stats = {"reward": nanmean(total), "reward_std": _nanstd(total),
                       **{f"rewards/{name}": nanmean(table[:, i]) for i, name in enumerate(self.rewards.names)},
                       **answer_stats(replies, self.stop_ids),
                       "groups_without_signal": float((row_std(grouped) < 1e-6).double().mean())}
        return out

    def score(self, rows: Sequence[Prompt], replies: list[list[int]], g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(replies × functions rewards, each reply's weighted total; NaN where no function scored it)."""
        return self.rewards([r.prompt for r in rows for _ in range(g)], decoded(self, replies), replies,
                            [r.fields for r in rows for _ in range(g)])

    @torch.no_grad()
    def _reference_logps(self, model, rollouts: list[Rollout]) -> None:
        size = self.run.train.micro_batch_size * self.cfg.num_generations
        for start in range(0, len(rollouts), size):
            chunk = rollouts[start:start + size]
            batch = {k: v.to(self.device) for k, v in collate(chunk, self.pad_id).items()}
            with autocast(self.device, self.precision):
                logps, scored = self.reference.token_logps(model, batch, self.run.train.logits_at_labels_only,
                                                           self.cfg.temperature)
            for r, row, mask in zip(chunk, logps, scored):
                r.ref_logps = row[mask].tolist()

    # ---- the loss

    def count(self, rows: Sequence[Rollout]) -> int:
        return sum(r.n_targets for r in rows)

    def batches(self, rows, size, pad_id, packed):
        self._kl = 0.0  # a new attempt at the step (after out-of-memory) starts over
        per_batch = size * self.cfg.num_generations  # a micro-batch holds `size` prompts' groups
        out = []
        for start in range(0, len(rows), per_batch):
            chunk = rows[start:start + per_batch]
            batch = collate(chunk, pad_id)
            batch["advantages"] = torch.tensor([r.advantage for r in chunk], dtype=torch.float32)
            if self.reference is not None:
                ref = torch.zeros(batch["labels"][:, 1:].shape)
                ref[batch["labels"][:, 1:] != IGNORE] = torch.tensor([v for r in chunk for v in r.ref_logps])
                batch["ref_logps"] = ref
            out.append(batch)
        return out

    def token_losses(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(per-token loss, reply-token mask, per-token KL or None), rows × positions."""
        # As sampled: at the sampling temperature (as TRL scores them too).
        logps, mask = token_logps(model, batch, self.run.train.logits_at_labels_only, self.cfg.temperature)
        # The ratio to the policy that sampled: these very weights (one update per sampling), unless given.
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        ratio = torch.exp(logps - old)
        adv = batch["advantages"][:, None]
        eps = self.cfg.clip_range
        losses = -torch.min(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
        kl = None
        if "ref_logps" in batch:
            delta = batch["ref_logps"] - logps
            kl = torch.exp(delta) - delta - 1  # k3: unbiased, never negative
            losses = losses + self.cfg.kl_coef * kl
        return losses * mask, mask, kl

    def loss_sum(self, model, batch):
        losses, mask, kl = self.token_losses(model, batch)
        if kl is not None:
            self._kl += float((kl * mask).sum().detach())
        return losses.sum(), int(mask.sum())

    def step_metrics(self, rows):
        out = dict(self._stats)
        if self.reference is not None:
            out["kl"] = self._kl / max(self.count(rows), 1)
        return {**out, "tokens": sum(len(r) for r in rows), "trained_tokens": self.count(rows)}

    # ---- evaluation: one greedy answer per held-out prompt, scored by the same rewards

    @torch.no_grad()
    def evaluate(self, model, rows, batch_size, pad_id, precision, max_batches):
        rows, replies = greedy_answers(self, model, rows, batch_size, pad_id, precision, max_batches)
        if not rows:
            return {"val_loss": float("nan")}
        table, total = self.score(rows, replies, 1)
        reward = nanmean(total)
        return {"val_loss": -reward, "val_reward": reward,
                **{f"val_rewards/{name}": nanmean(table[:, i]) for i, name in enumerate(self.rewards.names)},
                "val_completion_length": answer_stats(replies, self.stop_ids)["completion_length"]}


# ---- what the online stages (grpo, ppo) share: sampling, decoding, its memory and its numbers


def sample_step(stage, model, prompts: list[list[int]], step: int) -> list[list[int]]:
    """Answers to a step's prompts, sampled in one batch (so the micro-batching cannot change them) with an RNG
    seeded from the run's seed and the step in its own fork (so a resume samples the same answers and the
    training RNG is untouched)."""
    cfg = stage.cfg
    forked = [stage.device.index or 0] if stage.device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), autocast(stage.device, stage.precision):
        torch.manual_seed(rollout_seed(stage.run.train.seed, step))
        return sample_replies(model, prompts, stage.pad_id, stage.stop_ids, cfg.max_new_tokens, cfg.temperature,
                              cfg.top_p, batch_size=len(prompts))


def decoded(stage, replies: list[list[int]]) -> list[str]:
    """The answers as text, as the reward functions read them (no end token)."""
    return [stage.tokenizer.decode(until_stop(r, stage.stop_ids, keep_stop=False), skip_special_tokens=True)
            for r in replies]


def answer_stats(replies: list[list[int]], stop_ids) -> dict[str, float]:
    """The answers' mean length and the share cut at max_new_tokens (no end token)."""
    return {"completion_length": sum(len(r) for r in replies) / len(replies),
            "completions_cut": sum(not r or r[-1] not in stop_ids for r in replies) / len(replies)}


def generation_memory(plan) -> tuple[str, float, str]:
    """`estimate`'s line for the KV cache of a step's answers, which are sampled at once."""
    s = plan.shape
    answers = plan.micro_batch * plan.grad_accum
    cache = 2 * s.layers * s.kv_heads * s.head_dim * plan.seq * answers * (2 if plan.precision == "bf16" else 4)
    return ("generation KV cache", float(cache), f"keys and values of the step's {answers} answers, sampled at once")


@torch.no_grad()
def greedy_answers(stage, model, rows, batch_size, pad_id, precision, max_batches) -> tuple[list, list[list[int]]]:
    """(the held-out prompts evaluated, one greedy answer to each): what the online stages score."""
    rows = list(rows)[: batch_size * max_batches] if max_batches is not None else list(rows)
    if not rows:
        return rows, []
    with autocast(stage.device, precision):
        return rows, sample_replies(model, [list(r.input_ids) for r in rows], pad_id, stage.stop_ids,
                                    stage.cfg.max_new_tokens, batch_size=batch_size)


def _nanstd(x: torch.Tensor) -> float:
    x = x[~x.isnan()].double()
    return float(x.std()) if len(x) > 1 else 0.0
