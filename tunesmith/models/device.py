"""Pick the device and the precision, and give the autocast context the loop and eval share."""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path

import torch


def pick_device(wanted: str = "auto") -> torch.device:
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            warnings.warn("train.device is cuda but no CUDA device is visible; using the CPU")
            return torch.device("cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def has_amx() -> bool:
    cpu = getattr(torch, "cpu", None)
    return bool(cpu and getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)  # emulated bf16 (T4, V100) is slow
    # CPUs with AVX512-BF16 or AMX run bf16 matmuls natively; elsewhere bf16 is emulated and slower than fp32.
    cpu = getattr(torch, "cpu", None)
    return bool(cpu and (cpu._is_avx512_bf16_supported() or has_amx()))


def pick_precision(wanted: str, device: torch.device) -> str:
    if wanted == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if wanted == "bf16" and not bf16_supported(device):
        warnings.warn(f"train.precision is bf16 but this {device.type} has no native bf16; it will be slow")
    return wanted


def autocast(device: torch.device, precision: str):
    """bf16 autocast keeps fp32 master weights (and fp32 LoRA/optimizer state) while matmuls run in bf16."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def has_cpp_compiler() -> bool:
    """torch.compile builds its CPU kernels with a C++ compiler."""
    return bool(shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"))


def total_ram() -> float | None:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def available_ram() -> float | None:
    """Bytes a training run in this process could use: what Linux reports as available without swapping
    (MemAvailable) plus what this process already holds; physical memory where that is not reported."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
                      if ":" in line)
        return (float(info["MemAvailable"].split()[0]) + float(status["VmRSS"].split()[0])) * 1024
    except (OSError, KeyError, ValueError):
        return total_ram()
