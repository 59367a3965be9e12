"""The run directory: everything a run produced, laid out here and nowhere else.

runs/NAME/
  config.yaml          fully resolved config
  run.json             base model source, method, stage, template, data format, status
  tokenizer/           tokenizer with the chat template used in training (chat/eval/export use it)
  data/                the rows of each split (train/val/test.jsonl) and data_report.json
  metrics.jsonl        one object per optimizer step, plus evaluation objects
  tensorboard/         TensorBoard event files
  loss.png             train and validation loss curves
  checkpoints/step-N/  periodic checkpoints (weights or adapter + trainer_state.json), see checkpoint.py
  final/               the trained weights or adapter

inference/loading.py turns `weights()` into a model for chat, eval and export.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from tunesmith.config.schema import Config, config_from_dict
from tunesmith.errors import TunesmithError


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


class RunDir(os.PathLike):
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- the layout
    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def info(self) -> Path:
        return self.path / "run.json"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer"

    @property
    def data(self) -> Path:
        return self.path / "data"

    def split(self, name: str) -> Path:
        """data/train.jsonl, data/val.jsonl, data/test.jsonl: the rows each split held."""
        return self.data / f"{name}.jsonl"

    @property
    def data_report(self) -> Path:
        return self.data / "data_report.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    # ---- reading and writing
    def exists(self) -> bool:
        return self.info.exists() and self.config.exists()

    @classmethod
    def create(cls, cfg: Config) -> "RunDir":
        """A new run directory for `cfg`; an existing one is replaced only with `output.overwrite`, and a
        directory that is not a run is never deleted."""
        run = cls(cfg.output.dir)
        if run.path.exists() and any(run.path.iterdir()):
            if not cfg.output.overwrite:
                raise TunesmithError(f"{run.path} already exists and is not empty; choose another output.dir "
                                     "or pass --output.overwrite=true to replace it")
            if not run.exists():
                raise TunesmithError(f"{run.path} is not a tunesmith run directory; refusing to delete it")
            shutil.rmtree(run.path)
        run.path.mkdir(parents=True, exist_ok=True)
        return run

    def read_config(self) -> Config:
        raw = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        return config_from_dict(raw, str(self.config))

    def read_info(self) -> dict[str, Any]:
        return json.loads(self.info.read_text(encoding="utf-8")) if self.info.exists() else {}

    def update_info(self, **fields: Any) -> None:
        """Merge fields into run.json (status, steps, ...), atomically."""
        info = self.read_info()
        info.update(fields)
        if fields.get("status") in ("running", "complete"):
            info.pop("error", None)
        write_json(self.info, info)

    def weights(self, checkpoint: str | None = None) -> Path:
        """final/, or the named checkpoint: where the trained weights or adapter of the run are."""
        weights = self.checkpoints / checkpoint if checkpoint else self.final
        if not weights.exists():
            names = ", ".join(p.name for p in sorted(self.checkpoints.glob("step-*"))) or "none"
            raise TunesmithError(f"{weights} does not exist: the run has not finished (checkpoints: {names})")
        return weights


def is_run_dir(path: str | os.PathLike) -> bool:
    return RunDir(path).exists()


def read_run_config(path: str | os.PathLike) -> Config:
    return RunDir(path).read_config()
