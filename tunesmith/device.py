"""Pick the device and the precision, and give the autocast context the loop and eval share."""

from __future__ import annotations

import contextlib
import warnings

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
        return torch.cuda.is_bf16_supported()
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
