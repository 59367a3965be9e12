"""A trained run's model, as its method saved it: what inference loads, and what a stage loads as its
reference or reward model (stage.reference, stage.reward_model)."""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.config.schema import Config
from tunesmith.methods import Method, get_method
from tunesmith.models.device import pick_device
from tunesmith.models.loading import ModelSource, load_causal_lm, load_tokenizer, resolve
from tunesmith.run.run_dir import RunDir, is_run_dir


def load_run_model(path: str | Path, checkpoint: str | None = None, device: torch.device | None = None
                   ) -> tuple[torch.nn.Module, Method, Config, Path]:
    """(model in eval mode, its method, the run's config, the weights directory) of a run: its final weights
    or a named checkpoint, on `device` (default: CPU, or the GPU a quantized method needs)."""
    run = RunDir(path)
    cfg = run.read_config()
    weights = run.weights(checkpoint)
    source = resolve(cfg.model.name_or_path, cfg.model.gguf_file)
    method = get_method(cfg.method)
    device = device or (pick_device("auto") if method.quantized else torch.device("cpu"))

    def load_base(quantized: bool = True, on: torch.device | None = None):
        extra = method.load_kwargs(on or device) if quantized else {}
        return load_causal_lm(source, trust_remote_code=cfg.model.trust_remote_code, **extra)

    model = method.load(load_base, weights)
    return model.eval(), method, cfg, weights


def run_tokenizer(path: str | Path):
    """The tokenizer a run trained with (it carries the run's chat template)."""
    return load_tokenizer(ModelSource(str(RunDir(path).tokenizer)))


def load_model_or_run(name: str, device: torch.device | None = None) -> tuple[torch.nn.Module, object]:
    """(model in eval mode, tokenizer) of a run dir (its final weights) or of a plain model (path, hub id,
    short name)."""
    if is_run_dir(name):
        model = load_run_model(name, device=device)[0]
        return model, run_tokenizer(name)
    source = resolve(name)
    return load_causal_lm(source).eval(), load_tokenizer(source)
