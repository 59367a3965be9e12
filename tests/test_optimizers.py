"""train.optimizer: each choice trains (loss falls), resumes bit-identically from a checkpoint (8-bit
states included), and refuses to resume with a different optimizer."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from test_faults import RESUMABLE, assert_same_run, losses, quiet
from tunesmith.config.schema import OptimizerConfig
from tunesmith.errors import TrainingStopped, TunesmithError
from tunesmith.training.loop import train

CHOICES = [("adamw_8bit", 1e-2), ("paged_adamw_8bit", 1e-2), ("adafactor", 1e-2), ("sgd", 1e-1)]


@pytest.mark.parametrize("optimizer,lr", CHOICES)
def test_each_optimizer_trains_and_resumes_exactly(make_config, tmp_path, optimizer, lr):
    def config(name):
        settings = {**RESUMABLE, "train": {**RESUMABLE["train"], "optimizer": optimizer, "lr": lr}}
        return make_config(method={"name": "full"}, output={"dir": str(tmp_path / name)}, **settings)

    whole = train(config("whole"), log=quiet)
    steps = losses(whole)
    assert min(loss for _, loss in steps[-3:]) < 0.8 * steps[0][1], steps

    cfg = config("split")
    with pytest.raises(TrainingStopped):
        train(cfg, log=quiet, stop_at_step=5)
    train(cfg, log=quiet, resume=True)
    assert_same_run(whole, tmp_path / "split")

    if optimizer.endswith("8bit"):  # the embedding (300 × 32) is big enough for 8-bit states
        state = load_file(str(sorted((tmp_path / "split" / "checkpoints").iterdir())[-1] / "optimizer.safetensors"))
        assert any(t.dtype.itemsize == 1 for t in state.values())
        meta = json.loads((sorted((tmp_path / "split" / "checkpoints").iterdir())[-1] / "optimizer.json").read_text())
        assert any(isinstance(v, dict) and "__nested__" in v for v in meta["scalars"].values())


def test_resume_with_another_optimizer_is_refused(make_config, tmp_path):
    cfg = make_config(output={"dir": str(tmp_path / "run")}, **RESUMABLE)
    with pytest.raises(TrainingStopped):
        train(cfg, log=quiet, stop_at_step=4)
    cfg.optimizer = OptimizerConfig(name="sgd")
    with pytest.raises(TunesmithError, match="optimizer.name: was 'adamw', now 'sgd'"):
        train(cfg, log=quiet, resume=True)
