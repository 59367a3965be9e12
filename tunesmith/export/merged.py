"""Export a run: merged safetensors weights (plain transformers loads them) or a PEFT adapter."""

from __future__ import annotations

import shutil
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.run.run_dir import is_run_dir
from tunesmith.inference.loading import load_for_inference

FORMATS = ("merged", "adapter")


def export_run(run: str | Path, fmt: str, out: str | Path, checkpoint: str | None = None) -> str:
    run, out = Path(run), Path(out)
    if fmt not in FORMATS:
        raise TunesmithError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if not is_run_dir(run):
        raise TunesmithError(f"{run} is not a run directory (no run.json/config.yaml)")
    if out.exists() and any(out.iterdir()):
        raise TunesmithError(f"{out} exists and is not empty; choose a new --out directory")
    loaded = load_for_inference(run, checkpoint)
    method = loaded.method
    assert method is not None
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    if fmt == "adapter":
        if method.saves_base_weights:  # full and freeze change the weights themselves
            raise TunesmithError(f"this run used method '{method.name}', which has no adapter; use --format merged")
        method.save(loaded.model, staging)
    else:
        merged = method.merge(loaded.model)
        # The run's EOS and pad must travel with the weights, so plain `generate` stops where ours does.
        merged.generation_config.eos_token_id = loaded.tokenizer.eos_token_id
        merged.generation_config.pad_token_id = loaded.tokenizer.pad_token_id
        merged.save_pretrained(staging)
    loaded.tokenizer.save_pretrained(staging)  # with the chat template used in training
    if out.exists():
        out.rmdir()
    staging.rename(out)
    return f"wrote {fmt} export to {out}"
