"""The run directory: everything a run produced, and how chat/eval/export load a trained model from it.

runs/NAME/
  config.yaml          fully resolved config
  run.json             base model source, method, template, data format, status
  tokenizer/           tokenizer with the chat template used in training (chat/eval/export use it)
  data/                the rows of each split (train/val/test.jsonl) and data_report.json
  metrics.jsonl        one object per optimizer step, plus evaluation objects
  tensorboard/         TensorBoard event files
  loss.png             train and validation loss curves
  checkpoints/step-N/  periodic checkpoints (weights or adapter + trainer_state.json)
  final/               the trained weights or adapter
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import Config, config_from_dict
from tunesmith.errors import TunesmithError
from tunesmith.device import pick_device
from tunesmith.methods import Method, get_method
from tunesmith.models import ModelSource, load_causal_lm, load_tokenizer, resolve

import yaml


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "run.json").exists() and (Path(path) / "config.yaml").exists()


def prepare_run_dir(cfg: Config) -> Path:
    """Create the run directory; refuse to reuse one unless `output.overwrite` says so."""
    run_dir = Path(cfg.output.dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not cfg.output.overwrite:
            raise TunesmithError(f"{run_dir} already exists and is not empty; choose another output.dir "
                                 "or pass --output.overwrite=true to replace it")
        if not is_run_dir(run_dir):
            raise TunesmithError(f"{run_dir} is not a tunesmith run directory; refusing to delete it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def update_run_info(run_dir: Path, **fields: Any) -> None:
    """Merge fields into run.json (status, steps, ...), atomically."""
    path = run_dir / "run.json"
    info = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    info.update(fields)
    if fields.get("status") in ("running", "complete"):
        info.pop("error", None)
    write_json(path, info)


def read_run_config(run_dir: Path) -> Config:
    raw = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    return config_from_dict(raw, str(run_dir / "config.yaml"))


@dataclass
class Loaded:
    """A model ready for generation: base or trained, with the tokenizer that carries the right template."""

    model: torch.nn.Module
    tokenizer: Any
    method: Method | None
    config: Config | None
    run_dir: Path | None

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
    cfg = read_run_config(path)
    weights = path / "checkpoints" / checkpoint if checkpoint else path / "final"
    if not weights.exists():
        raise TunesmithError(f"{weights} does not exist: the run has not finished (checkpoints: "
                             f"{', '.join(p.name for p in sorted((path / 'checkpoints').glob('step-*'))) or 'none'})")
    source = resolve(cfg.model.name_or_path, cfg.model.gguf_file)
    method = get_method(cfg.method)
    device = pick_device("auto") if method.quantized else torch.device("cpu")

    def load_base(quantized: bool = True, on: torch.device | None = None):
        extra = method.load_kwargs(on or device) if quantized else {}
        return load_causal_lm(source, trust_remote_code=cfg.model.trust_remote_code, **extra)

    model = method.load(load_base, weights)
    model.eval()
    tokenizer = load_tokenizer(ModelSource(str(path / "tokenizer")))
    return Loaded(model, tokenizer, method, cfg, path)
