"""What a training run tells the world: typed events, the sinks that receive them, and stop requests.

The loop emits events and never prints. Sinks turn them into the progress bar, metrics.jsonl and
TensorBoard; a caller (the CLI, a server, the board, a test) can add its own and can stop a run cleanly by
holding a StopRequest: the step in flight finishes, a checkpoint is written, and the run ends with
TrainingStopped. SIGTERM and SIGINT go through the same request (training/interrupts.py).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

from tqdm import tqdm

from tunesmith.scoring import GENERATED_METRICS
from tunesmith.run.metrics import MetricsLog


@dataclass(frozen=True)
class Started:
    start: int
    steps: int
    run_dir: Path


@dataclass(frozen=True)
class Step:
    step: int
    epoch: int
    loss: float
    lr: float
    grad_norm: float
    skipped: bool
    time_s: float
    metrics: dict[str, float] = field(default_factory=dict)
    """The stage's own numbers (tokens, trained_tokens for SFT)."""

    def record(self) -> dict[str, Any]:
        """The metrics.jsonl line."""
        tokens = self.metrics.get("tokens")
        return {"step": self.step, "epoch": self.epoch, "loss": self.loss, "lr": self.lr, "grad_norm": self.grad_norm,
                **self.metrics, **({"tokens_per_s": tokens / self.time_s} if tokens is not None else {}),
                "step_time_s": self.time_s, **({"skipped": True} if self.skipped else {})}


@dataclass(frozen=True)
class Eval:
    step: int
    metrics: dict[str, float]

    def record(self) -> dict[str, Any]:
        return {"step": self.step, **self.metrics}


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path


@dataclass(frozen=True)
class Note:
    """Something the run says while it trains (a skipped update, a smaller micro-batch after out-of-memory)."""

    text: str


@dataclass(frozen=True)
class Stopping:
    step: int
    checkpoint: Path
    reason: str


@dataclass(frozen=True)
class Done:
    run_dir: Path
    steps: int
    skipped_steps: int
    train_time_s: float
    stopped_early: str | None = None
    """Why the watched metric ended the run before its last step (eval.early_stopping_patience)."""


@dataclass(frozen=True)
class Error:
    step: int | None
    error: BaseException


Event = Union[Started, Step, Eval, Checkpoint, Note, Stopping, Done, Error]
Sink = Callable[[Event], None]


class StopRequest:
    """Ask a run to stop after its current step (it checkpoints first). Callable: `stop()` says whether asked."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.exit_code = 0

    def request(self, reason: str = "stop requested", exit_code: int = 0) -> None:
        if self.reason is None:
            self.reason, self.exit_code = reason, exit_code

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def __call__(self) -> bool:
        return self.requested


class Events:
    """Hands every event to every sink, in order; a sink with close() is closed at the end of the run."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            sink(event)

    def note(self, text: str) -> None:
        self.emit(Note(text))

    def close(self) -> None:
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()


class ProgressBar:
    """The console: a bar with loss, learning rate and tokens/s (its ETA comes with it), and the notes."""

    def __init__(self, log_interval: int):
        self.log_interval = log_interval
        self.bar: tqdm | None = None
        self.seen_tokens, self.started = 0, time.perf_counter()

    def __call__(self, event: Event) -> None:
        if isinstance(event, Started):
            self.bar = tqdm(total=event.steps, initial=event.start, desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=True)
            self.steps, self.started = event.steps, time.perf_counter()
            return
        write = ((lambda text: self.bar.write(text, file=sys.stderr)) if self.bar is not None
                 else (lambda text: print(text, file=sys.stderr, flush=True)))
        if isinstance(event, Step):
            self.seen_tokens += event.metrics.get("tokens", 0)
            self.bar.update(1)
            if event.step % self.log_interval == 0 or event.step == self.steps:
                online = {k: f"{event.metrics[k]:.3f}" for k in ("reward", "score") if k in event.metrics}
                self.bar.set_postfix(loss=f"{event.loss:.4f}", **online, lr=f"{event.lr:.2e}",
                                     tok_s=f"{self.seen_tokens / (time.perf_counter() - self.started):.0f}")
        elif isinstance(event, Eval):
            loss = event.metrics.get("val_loss", float("nan"))
            line = f"step {event.step}: val_loss {loss:.4f}"
            if "val_perplexity" in event.metrics:  # a preference loss has no perplexity
                line += f"  perplexity {event.metrics['val_perplexity']:.2f}"
            for key in ("val_reward", "val_score"):  # online stages: the greedy answers' reward
                if key in event.metrics:
                    line += f"  held-out reward {event.metrics[key]:.3f}"
            for key in GENERATED_METRICS:  # eval.metric / checkpoint.best_by scored on greedy answers
                if key in event.metrics:
                    line += f"  {key} {event.metrics[key]:.3f}"
            if "val_rewards/accuracy" in event.metrics:
                line += (f"  reward accuracy {event.metrics['val_rewards/accuracy']:.1%}  margin "
                         f"{event.metrics['val_rewards/margin']:.3f}")
            write(line)
        elif isinstance(event, Note):
            write(event.text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsFile:
    """metrics.jsonl (every step and every evaluation) and TensorBoard."""

    def __init__(self, run_dir: Path, purge_step: int | None):
        self.log = MetricsLog(run_dir, purge_step=purge_step)

    def __call__(self, event: Event) -> None:
        if isinstance(event, (Step, Eval)):
            self.log.write(event.record())

    def close(self) -> None:
        self.log.close()


def as_dict(event: Event) -> dict[str, Any]:
    """An event as plain data with its kind, for a server or board to send on."""
    data = {k: (str(v) if isinstance(v, (Path, BaseException)) else v) for k, v in asdict(event).items()}
    return {"event": type(event).__name__.lower(), **data}
