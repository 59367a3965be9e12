"""Training speed on this machine: the device's measured matmul peak, FLOPs per token, and the kept
`tunesmith bench` measurements that estimate and doctor read (training/bench.py takes them)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tunesmith.config.schema import Config


@dataclass
class BenchResult:
    device: str
    precision: str
    steps_measured: int
    tokens_per_s: float
    seconds_per_step: float
    peak_rss_mb: float
    peak_gpu_mb: float | None
    flops_per_token: float
    achieved_tflops: float
    matmul_peak_tflops: float
    share_of_peak: float
    run_steps: int
    run_hours: float

    def to_text(self) -> str:
        gpu = f", peak GPU memory {self.peak_gpu_mb:,.0f} MB" if self.peak_gpu_mb is not None else ""
        return "\n".join([
            f"{self.device} in {self.precision}, {self.steps_measured} optimizer steps measured (after one warm-up step)",
            f"  {self.tokens_per_s:,.0f} tokens/s (real tokens, padding excluded), {self.seconds_per_step:.2f} s per step",
            f"  peak RSS {self.peak_rss_mb:,.0f} MB{gpu}",
            f"  {self.achieved_tflops * 1e3:,.1f} GFLOP/s achieved ({self.flops_per_token / 1e6:,.0f} MFLOP per token) = "
            f"{100 * self.share_of_peak:.0f} % of this device's measured {self.precision} matmul peak "
            f"({self.matmul_peak_tflops * 1e3:,.0f} GFLOP/s)",
            f"  the configured run: {self.run_steps:,} steps ≈ {duration(self.run_hours)} of training "
            "(plus evaluation and checkpoints)",
        ])


def matmul_peak(device: torch.device, precision: str, repeats: int = 10, trials: int = 3) -> float:
    """Measured dense matmul FLOP/s (the best of a few timings): the ceiling a training step could reach."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = 4096 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(trials):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * repeats / best


def duration(hours: float) -> str:
    return f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.0f} min" if hours * 60 >= 1 else f"{hours * 3600:.0f} s"


def training_flops_per_token(total: int, trainable: int, embedding: int) -> float:
    """Matmul FLOPs per trained token: forward 2N and backward to the activations 2N over the parameters a
    token multiplies (all but the embedding lookup), plus 2 per trainable one for its weight gradient.
    Attention scores are left out, so this slightly under-counts (the usual convention)."""
    multiplied = max(total - embedding, 0)
    return 4.0 * multiplied + 2.0 * min(trainable, multiplied)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def results_file() -> Path:
    from tunesmith.models.loading import cache_dir

    return cache_dir() / "bench_results.jsonl"


def record(cfg: Config, result: BenchResult, longest: int | None = None) -> None:
    """Keep the measurement, so estimates of run time on this machine can use it (tunesmith estimate, doctor)."""
    entry = {"model": cfg.model.name_or_path, "method": cfg.method.name,
             "micro_batch_size": cfg.train.micro_batch_size, "max_seq_length": cfg.data.max_seq_length,
             "gradient_checkpointing": cfg.train.gradient_checkpointing,
             "longest_row": longest, "when": time.strftime("%Y-%m-%d %H:%M"), **asdict(result)}
    try:
        results_file().parent.mkdir(parents=True, exist_ok=True)
        with results_file().open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
    except OSError:
        pass  # a read-only cache costs only the better time estimate


def known_speed(device: str, precision: str, model: str | None = None, method: str | None = None,
                micro_batch: int | None = None, seq: int | None = None, checkpointing: bool | None = None
                ) -> dict | None:
    """The latest `tunesmith bench` measurement on this device and precision: preferably of the same model,
    method and batch shape, else of the same model and method (its tokens/s apply directly), else any (its
    FLOP/s carry over)."""
    try:
        lines = results_file().read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("device") == device and entry.get("precision") == precision:
            found.append(entry)
    same = [e for e in found if e.get("model") == model and e.get("method") == method]
    shape = [e for e in same if e.get("micro_batch_size") == micro_batch and seq in (e.get("longest_row"),
             e.get("max_seq_length")) and e.get("gradient_checkpointing") == checkpointing]
    return (shape or same or found or [None])[-1]


def result_json(result: BenchResult) -> str:
    return json.dumps(asdict(result))
