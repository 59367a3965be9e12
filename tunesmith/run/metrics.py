"""Where numbers go: metrics.jsonl (every step), TensorBoard, and a loss-curve PNG at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tunesmith.run.run_dir import RunDir


class MetricsLog:
    def __init__(self, run_dir: Path, purge_step: int | None = None):
        """purge_step: on resume, TensorBoard drops events from this step on (they belong to the lost part)."""
        run = RunDir(run_dir)
        self.path = run.metrics
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run.tensorboard), purge_step=purge_step)
        except ImportError:  # tensorboard is a dependency, but a stripped install still trains
            pass

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records; a line cut short by a crash (only ever the last) is ignored."""
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to `step` (a resume from that step writes the rest again)."""
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    tmp.replace(path)


REWARD_CURVES = ("rewards/chosen", "rewards/rejected", "rewards/margin", "reward", "score", "kl")
"""Per-step numbers of the preference and online stages that get their own panel beside the loss."""


def plot_losses(metrics_path: Path, out_png: Path) -> None:
    """The loss curves; for stages that report rewards (dpo, kto, rm, grpo, ppo) a second panel with them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    curves = {key: [(r["step"], r[key]) for r in records if key in r and "loss" in r] for key in REWARD_CURVES}
    curves = {key: points for key, points in curves.items() if points}
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(13 if curves else 7, 4), squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)" if not curves else "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if curves:
        ax = axes[0, 1]
        for key, points in curves.items():
            ax.plot(*zip(*points), label=key, linewidth=1)
        if "reward" in curves:  # grpo: the spread of the step's rewards around their mean
            spread = [(r["step"], r["reward"], r.get("reward_std", 0.0)) for r in records if "reward" in r and "loss" in r]
            steps, mean, std = zip(*spread)
            ax.fill_between(steps, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)], alpha=0.2)
        held_out = [(r["step"], r.get("val_reward", r.get("val_score"))) for r in records
                    if "val_reward" in r or "val_score" in r]
        if held_out:
            ax.plot(*zip(*held_out), "o-", label="held-out reward")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
