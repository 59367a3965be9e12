"""`tunesmith doctor`: what this machine and Python environment can do, before any run is started.

Each finding has a severity (ok, info, warning, error) and, where something is wrong or missing, what to do.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Literal

Severity = Literal["ok", "info", "warning", "error"]


@dataclass
class Finding:
    severity: Severity
    topic: str
    message: str
    suggestion: str = ""

    def to_text(self) -> str:
        mark = {"ok": "ok     ", "info": "info   ", "warning": "warning", "error": "error  "}[self.severity]
        return f"{mark} {self.topic}: {self.message}" + (f"\n          → {self.suggestion}" if self.suggestion else "")


@dataclass(frozen=True)
class Package:
    name: str
    minimum: str  # older is known not to work (pyproject's floor)
    tested: str  # the newest version the test suite has run against
    needed_for: str
    required: bool = True


PACKAGES = (
    Package("torch", "2.4", "2.13.0", "everything"),
    Package("transformers", "5.0", "5.24.0", "everything"),
    Package("peft", "0.17", "0.21.2", "LoRA"),
    Package("accelerate", "1.0", "1.15.0", "loading large models"),
    Package("safetensors", "0.4", "0.8.0", "reading and writing weights"),
    Package("gguf", "0.10", "0.19.0", "loading .gguf models (the default model ships as one)"),
    Package("bitsandbytes", "0.49", "0.50.2", "method qlora (a 4-bit or 8-bit base)", required=False),
    Package("datasets", "3.0", "5.2.0", "benchmarks/speed_vs_hf.py's reference recipe", required=False),
)


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    from packaging.version import Version

    return Version(version).release


def check_package(pkg: Package, version_of: Callable[[str], str | None] = installed_version) -> Finding:
    version = version_of(pkg.name)
    if version is None:
        if pkg.required:
            return Finding("error", pkg.name, f"not installed; needed for {pkg.needed_for}",
                           f"pip install '{pkg.name}>={pkg.minimum}'")
        return Finding("info", pkg.name, f"not installed; only needed for {pkg.needed_for}",
                       f"pip install '{pkg.name}=={pkg.tested}' if you want that")
    if _release(version) < _release(pkg.minimum):
        return Finding("error", pkg.name, f"{version} is older than the minimum {pkg.minimum}",
                       f"pip install -U '{pkg.name}>={pkg.minimum}'")
    if _release(version)[:2] > _release(pkg.tested)[:2]:
        return Finding("warning", pkg.name, f"{version} is newer than the tested {pkg.tested}; its API may have moved",
                       f"if something breaks: pip install '{pkg.name}=={pkg.tested}'")
    return Finding("ok", pkg.name, version)


def check_python() -> Finding:
    version = platform.python_version()
    if sys.version_info < (3, 10):
        return Finding("error", "python", f"{version} is too old", "use Python 3.10 or newer")
    return Finding("ok", "python", version)


def check_device() -> list[Finding]:
    import torch

    from tunesmith.models.device import bf16_supported, has_amx, total_ram

    findings = []
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        findings.append(Finding("ok", "gpu", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, "
                                f"bf16 {'yes' if bf16_supported(torch.device('cuda')) else 'no'}"
                                + (f" ({torch.cuda.device_count()} GPUs; tunesmith trains on one)"
                                   if torch.cuda.device_count() > 1 else "")))
    else:
        cuda_build = torch.version.cuda is not None
        findings.append(Finding("info", "gpu", "none visible" + (" (torch has CUDA support)" if cuda_build else
                                                                  " (this torch is a CPU build)"),
                                "training runs on the CPU: fine for small models (up to ~0.5B with LoRA)"))
    cpu_bf16 = bf16_supported(torch.device("cpu"))
    memory = total_ram()
    findings.append(Finding("ok", "cpu", f"{os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
                            f"bf16 {'native' + (' with AMX' if has_amx() else '') if cpu_bf16 else 'not native'}"
                            + (f", {memory / 2**30:.0f} GiB memory" if memory else "")))
    if not cpu_bf16 and not torch.cuda.is_available():
        findings.append(Finding("info", "precision", "this CPU has no native bf16, so precision auto means fp32",
                                "fp32 is correct, about 1.5-2x slower than bf16 where bf16 is native"))
    return findings


def check_tools() -> list[Finding]:
    findings = []
    from tunesmith.models.device import has_cpp_compiler

    if has_cpp_compiler():
        findings.append(Finding("ok", "c++ compiler", "present (train.compile can build CPU kernels)"))
    else:
        findings.append(Finding("info", "c++ compiler", "none found; train.compile: true will fail on CPU",
                                "install g++ (e.g. apt-get install g++) to use train.compile on CPU"))
    from tunesmith.models.loading import cache_dir

    cache = Path(cache_dir())
    probe = cache if cache.exists() else cache.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 1e9
    severity: Severity = "ok" if free >= 10 else "warning"
    findings.append(Finding(severity, "disk", f"{free:.0f} GB free at {probe} (model cache {cache})",
                            "" if free >= 10 else "checkpoints and merged exports need several GB; free some space"))
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        findings.append(Finding("info", "hub", "HF_HUB_OFFLINE=1: hub ids will not be downloaded",
                                "unset it to fetch models by hub id"))
    return findings


def check_environment(version_of: Callable[[str], str | None] = installed_version) -> list[Finding]:
    return [check_python(), *(check_package(p, version_of) for p in PACKAGES), *check_device(), *check_tools()]


def report(findings: list[Finding]) -> str:
    counts = {s: sum(f.severity == s for f in findings) for s in ("error", "warning")}
    verdict = ("ready to train" if not counts["error"] else f"{counts['error']} error(s) to fix before training")
    return "\n".join([f.to_text() for f in findings] + [f"\n{verdict}; {counts['warning']} warning(s)"])
