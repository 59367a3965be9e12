"""What a run watches while it trains: eval.metric (early stopping) and checkpoint.best_by (which checkpoint
is the best), each either one of the stage's held-out numbers (val_loss, val_reward, val_rewards/accuracy, …)
or a metric of the model's greedy answers to the validation rows (exact_match, token_f1, rouge_l, bleu,
json_valid, json_schema_match), generated with the KV cache in batches of eval.batch_size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.config.schema import Config
from tunesmith.data.pipeline import load_examples
from tunesmith.data.templates import encode_prompt
from tunesmith.errors import TunesmithError
from tunesmith.models.device import autocast
from tunesmith.models.generation import sample_replies
from tunesmith.scoring import GENERATED_METRICS, higher_is_better, load_json_schema, text_metrics


def watched_metrics(cfg: Config) -> list[str]:
    """The metrics the run's settings watch (none when it only logs val_loss)."""
    out = [cfg.eval.metric] if cfg.eval.early_stopping_patience or cfg.eval.metric != "val_loss" else []
    if cfg.checkpoint.best_by and cfg.checkpoint.best_by not in out:
        out.append(cfg.checkpoint.best_by)
    return out


def generated(cfg: Config) -> list[str]:
    """The watched metrics that need greedy answers."""
    return [m for m in watched_metrics(cfg) if m in GENERATED_METRICS]


@dataclass
class Tracker:
    """The best value of one metric so far, where it was, and how many evaluations since it improved."""

    metric: str
    best: float | None = None
    step: int | None = None
    stale: int = 0

    def update(self, step: int, metrics: dict[str, Any]) -> bool:
        """Take one evaluation; True when it is a new best."""
        if self.metric not in metrics:
            measured = ", ".join(sorted(k for k, v in metrics.items() if isinstance(v, (int, float))))
            raise TunesmithError(f"the run watches '{self.metric}' (eval.metric / checkpoint.best_by), which this "
                                 f"stage does not measure; it measures: {measured}")
        value = metrics[self.metric]
        if value is None or not math.isfinite(value):  # a NaN never counts as better
            self.stale += 1
            return False
        better = self.best is None or (value > self.best if higher_is_better(self.metric) else value < self.best)
        if better:
            self.best, self.step, self.stale = float(value), step, 0
        else:
            self.stale += 1
        return better

    def describe(self) -> str:
        return f"{self.metric} {self.best:.4g} at step {self.step}" if self.best is not None else f"{self.metric}: none"


@dataclass
class Watch:
    """eval.metric with its patience, and checkpoint.best_by; their state travels in checkpoints."""

    patience: int | None
    stopping: Tracker | None
    best: Tracker | None

    @classmethod
    def of(cls, cfg: Config) -> "Watch":
        patience = cfg.eval.early_stopping_patience
        return cls(patience, Tracker(cfg.eval.metric) if patience else None,
                   Tracker(cfg.checkpoint.best_by) if cfg.checkpoint.best_by else None)

    def update(self, step: int, metrics: dict[str, Any]) -> tuple[bool, str | None]:
        """(is this a new best by checkpoint.best_by, why the run stops early or None)."""
        improved = self.best.update(step, metrics) if self.best else False
        if self.stopping is None:
            return improved, None
        self.stopping.update(step, metrics)
        if self.stopping.stale >= self.patience:
            return improved, (f"stopped early after step {step}: {self.stopping.metric} has not improved for "
                              f"{self.stopping.stale} evaluations (eval.early_stopping_patience: {self.patience}; "
                              f"best {self.stopping.describe()})")
        return improved, None

    def state(self) -> dict[str, Any]:
        return {name: asdict(t) for name, t in (("stopping", self.stopping), ("best", self.best)) if t is not None}

    def restore(self, state: dict[str, Any]) -> None:
        for name in ("stopping", "best"):
            tracker, saved = getattr(self, name), state.get(name)
            if tracker is not None and saved and saved["metric"] == tracker.metric:
                setattr(self, name, Tracker(**saved))


class Answers:
    """Greedy answers to the validation rows, scored against their references: the generated metrics."""

    def __init__(self, cfg: Config, val_file: Path, data_format: str, tokenizer):
        _, pairs = load_examples(str(val_file), cfg.data, data_format, [])
        answer_field = getattr(cfg.stage, "answer_field", "answer")
        self.prompts, self.references = [], []
        for _, ex in pairs:
            if ex.messages is None or ex.rejected is not None or ex.desirable is not None:
                continue  # documents and preference rows have no one reference answer
            reference = ex.fields.get(answer_field) if ex.fields is not None else ex.reference
            if reference is None:
                continue
            self.prompts.append(encode_prompt(tokenizer, ex.prompt_messages))
            self.references.append(reference if isinstance(reference, str) else str(reference))
        if not self.prompts:
            raise TunesmithError(f"{', '.join(generated(cfg))} scores answers against a reference, and the validation "
                                 f"rows of {val_file} have none (they are {data_format} rows); watch val_loss instead")
        limit = cfg.eval.max_batches and cfg.eval.max_batches * cfg.eval.batch_size
        self.prompts, self.references = self.prompts[:limit or None], self.references[:limit or None]
        self.schema = load_json_schema(cfg.eval.json_schema) if cfg.eval.json_schema else None
        self.tokenizer, self.cfg = tokenizer, cfg.eval

    @torch.no_grad()
    def __call__(self, model, precision: str) -> dict[str, Any]:
        device = next(model.parameters()).device
        tok = self.tokenizer
        with autocast(device, precision):
            replies = sample_replies(model, self.prompts, tok.pad_token_id, [tok.eos_token_id], self.cfg.max_new_tokens,
                                     batch_size=self.cfg.batch_size, keep_stop=False)
        answers = [tok.decode(ids, skip_special_tokens=True) for ids in replies]
        return {k: v for k, v in text_metrics(answers, self.references, self.schema).items() if v is not None}
