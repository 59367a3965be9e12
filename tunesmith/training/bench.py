"""`tunesmith bench CONFIG`: how fast, and in how much memory, a config trains on this machine.

It trains the config itself for a few optimizer steps in a scratch directory (output.dir is not touched),
then reports real (non-padding) tokens per second, seconds per step, peak memory, the FLOP/s achieved
against this device's measured matrix-multiply peak, and how long the whole configured run would take.
"""

from __future__ import annotations

import json
import resource
import shutil
import tempfile
from pathlib import Path

import torch

from tunesmith.config.schema import Config
from tunesmith.models.device import pick_device, pick_precision
from tunesmith.optim.schedule import total_steps
from tunesmith.planning.speed import BenchResult, device_name, matmul_peak, record, training_flops_per_token
from tunesmith.run.metrics import read_metrics
from tunesmith.training.loop import train


def bench(cfg: Config, steps: int = 10, log=print) -> BenchResult:
    work = Path(tempfile.mkdtemp(prefix="tunesmith-bench-"))
    scratch = cfg.model_copy(deep=True)
    scratch.output.dir, scratch.output.overwrite = str(work / "run"), True
    scratch.train.max_steps = steps + 1  # the first step warms up caches and allocators: not measured
    scratch.checkpoint.interval = None
    scratch.eval.interval, scratch.eval.max_batches = None, 1
    device = pick_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        run = train(scratch, log=log, checks="off")  # measuring, not training: the config's own checks do not apply
        train_split = json.loads((run / "data" / "data_report.json").read_text(encoding="utf-8"))["splits"]["train"]
        result = _measure(cfg, run, device, train_split["kept"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record(cfg, result, train_split["length"]["max"])
    return result


def _measure(cfg: Config, run: Path, device: torch.device, train_rows: int) -> BenchResult:
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    measured = [m for m in read_metrics(run / "metrics.jsonl") if "loss" in m and m["step"] > 1]
    seconds = sum(m["step_time_s"] for m in measured)
    tokens = sum(m["tokens"] for m in measured)
    per_token = training_flops_per_token(**info["parameters"])
    precision = pick_precision(cfg.train.precision, device)
    peak = matmul_peak(device, precision)
    run_steps = total_steps(cfg, train_rows)
    achieved = tokens / seconds * per_token
    return BenchResult(
        device=device_name(device),
        precision=precision, steps_measured=len(measured), tokens_per_s=tokens / seconds,
        seconds_per_step=seconds / len(measured),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        flops_per_token=per_token, achieved_tflops=achieved / 1e12, matmul_peak_tflops=peak / 1e12,
        share_of_peak=achieved / peak, run_steps=run_steps, run_hours=run_steps * seconds / len(measured) / 3600,
    )
