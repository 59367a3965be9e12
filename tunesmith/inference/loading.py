"""Load a model for chat, generation, evaluation and export: a run directory (its final weights or a named
checkpoint, with the tokenizer that carries the training template) or a plain base model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.config.schema import Config
from tunesmith.methods import Method, get_method
from tunesmith.models.device import pick_device
from tunesmith.models.loading import ModelSource, load_causal_lm, load_tokenizer, resolve
from tunesmith.run.run_dir import RunDir, is_run_dir


@dataclass
class Loaded:
    """A model ready for generation: base or trained, with the tokenizer that carries the right template."""

    model: torch.nn.Module
    tokenizer: Any
    method: Method | None
    config: Config | None
    run_dir: Path | None
    head: torch.nn.Module | None = None
    """An rm run's scalar reward head (its body is `model`); None for every other run."""

    @property
    def default_system(self) -> str | None:
        """The system prompt the run trained with, so chat sees what training saw."""
        return self.config.data.system_prompt if self.config else None


def load_for_inference(run_or_model: str | Path, checkpoint: str | None = None) -> Loaded:
    """A run dir (its final weights, or a named checkpoint) with its template, or a plain base model."""
    path = Path(run_or_model)
    if not is_run_dir(path):
        source = resolve(str(run_or_model))
        tokenizer = load_tokenizer(source)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = load_causal_lm(source)
        model.eval()
        return Loaded(model, tokenizer, None, None, None)
    run = RunDir(path)
    cfg = run.read_config()
    weights = run.weights(checkpoint)
    source = resolve(cfg.model.name_or_path, cfg.model.gguf_file)
    method = get_method(cfg.method)
    device = pick_device("auto") if method.quantized else torch.device("cpu")

    def load_base(quantized: bool = True, on: torch.device | None = None):
        extra = method.load_kwargs(on or device) if quantized else {}
        return load_causal_lm(source, trust_remote_code=cfg.model.trust_remote_code, **extra)

    model = method.load(load_base, weights)
    model.eval()
    tokenizer = load_tokenizer(ModelSource(str(run.tokenizer)))
    return Loaded(model, tokenizer, method, cfg, path, head=_reward_head(model, weights))


def _reward_head(model, weights: Path) -> torch.nn.Module | None:
    from tunesmith.stages.base import MODULES_FILE, load_modules
    from tunesmith.stages.reward import HEAD, new_head

    path = weights / MODULES_FILE
    if not path.exists():
        return None
    head = new_head(model).to(next(model.parameters()).device)
    load_modules({HEAD: head}, path)
    return head.eval()
