"""Configs and checkpoint fingerprints saved by tunesmith 0.1.0 (before the layered layout) still load and
resume: tests/data holds them as that release wrote them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunesmith.config.schema import config_from_dict
from tunesmith.run.checkpoint import check_resumable, fingerprint
from tunesmith.run.run_dir import RunDir

DATA = Path(__file__).parent / "data"
METHODS = ["lora", "qlora", "full", "freeze", "prompt"]
HASHES = {"train_file": "ab" * 32, "val_file": None, "test_file": None}


@pytest.mark.parametrize("method", METHODS)
def test_a_config_saved_by_0_1_0_loads_unchanged(method, tmp_path):
    saved = DATA / f"saved_config_0.1.0_{method}.yaml"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(saved.read_text())
    (run / "run.json").write_text("{}")
    cfg = RunDir(run).read_config()
    raw = yaml.safe_load(saved.read_text())
    assert cfg.method.name == method and cfg.stage.name == "sft"
    assert cfg.train.optimizer == raw["train"]["optimizer"] and cfg.data.system_prompt == "Be brief."
    for section in ("model", "data", "train", "eval", "checkpoint", "output"):
        assert getattr(cfg, section).model_dump(mode="json") == raw[section], section
    for key, value in cfg.method.model_dump(mode="json").items():
        assert raw["method"][key] == value, key


@pytest.mark.parametrize("method", METHODS)
def test_a_checkpoint_of_0_1_0_still_resumes(method):
    """Its fingerprint matches the same config read today, so --resume needs no --force."""
    saved = json.loads((DATA / "saved_fingerprints_0.1.0.json").read_text())[method]
    cfg = config_from_dict(yaml.safe_load((DATA / f"saved_config_0.1.0_{method}.yaml").read_text()))
    assert check_resumable(saved, fingerprint(cfg, HASHES), force=False) == []


def test_a_changed_setting_is_still_caught_against_an_old_fingerprint():
    from tunesmith.run.checkpoint import CheckpointError

    saved = json.loads((DATA / "saved_fingerprints_0.1.0.json").read_text())["lora"]
    raw = yaml.safe_load((DATA / "saved_config_0.1.0_lora.yaml").read_text())
    raw["method"]["r"] = 16
    with pytest.raises(CheckpointError, match="method"):
        check_resumable(saved, fingerprint(config_from_dict(raw), HASHES), force=False)
    raw["method"]["r"], raw.setdefault("stage", {})["name"] = 8, "pretrain"
    with pytest.raises(CheckpointError, match="stage.name: was 'sft', now 'pretrain'"):
        check_resumable(saved, fingerprint(config_from_dict(raw), HASHES), force=False)
