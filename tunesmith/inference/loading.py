"""Load a model for chat, generation, evaluation and export: a run directory (its final weights or a named
checkpoint, with the tokenizer that carries the training template) or a plain base model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.config.schema import Config
from tunesmith.methods import Method
from tunesmith.methods.runs import load_run_model, run_tokenizer
from tunesmith.models.loading import load_causal_lm, load_tokenizer, resolve
from tunesmith.run.run_dir import is_run_dir
from tunesmith.stages.reward import load_head


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
    model, method, cfg, weights = load_run_model(path, checkpoint)
    head = load_head(model, weights) if cfg.stage.name == "rm" else None
    return Loaded(model, run_tokenizer(path), method, cfg, path, head=head)
