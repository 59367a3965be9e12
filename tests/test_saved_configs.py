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
    assert cfg.optimizer.name == raw["train"]["optimizer"] and cfg.data.system_prompt == "Be brief."
    flat = {"name": "optimizer", **{own: old for old, own in type(cfg.optimizer).flat_keys.items()}}
    for key, value in cfg.optimizer.model_dump(mode="json").items():  # its settings moved out of train
        assert raw["train"][flat[key]] == value, key
    moved = {"optimizer", "momentum"} | {k for k in raw["train"] if k.startswith(("galore_", "badam_"))}
    assert cfg.train.model_dump(mode="json") == {k: v for k, v in raw["train"].items() if k not in moved}
    for section in ("model", "data", "eval", "checkpoint", "output"):
        dumped = getattr(cfg, section).model_dump(mode="json")
        assert {k: dumped[k] for k in raw[section]} == raw[section], section
        defaults = type(getattr(cfg, section))().model_dump(mode="json") if section != "data" else None
        newer = {k: v for k, v in dumped.items() if k not in raw[section]}  # keys added since 0.1.0: their defaults
        assert defaults is None and not newer or newer == {k: defaults[k] for k in newer}, section
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


def test_a_changed_optimizer_setting_is_caught_against_an_old_fingerprint():
    """0.1.0's fingerprint names the GaLore rank train.galore_rank; it is compared as optimizer.rank."""
    from tunesmith.run.checkpoint import CheckpointError

    saved = json.loads((DATA / "saved_fingerprints_0.1.0.json").read_text())["full"]
    assert saved["train.optimizer"] == "galore" and saved["train.galore_rank"] == 128
    raw = yaml.safe_load((DATA / "saved_config_0.1.0_full.yaml").read_text())
    raw["train"]["galore_rank"] = 64
    with pytest.raises(CheckpointError, match="optimizer.rank: was 128, now 64"):
        check_resumable(saved, fingerprint(config_from_dict(raw), HASHES), force=False)
    raw["train"].update(galore_rank=128, optimizer="galore_8bit")
    with pytest.raises(CheckpointError, match="optimizer.name: was 'galore', now 'galore_8bit'"):
        check_resumable(saved, fingerprint(config_from_dict(raw), HASHES), force=False)


# ------------------------------------------------------------------ the optimizer's section and its old spelling

BASE = {"data": {"train_file": "x.jsonl"}, "method": {"name": "full"}}


def test_the_old_flat_optimizer_keys_land_in_the_optimizers_section():
    cfg = config_from_dict({**BASE, "train": {"optimizer": "badam", "badam_switch_every": 7, "lr": 1e-3}})
    assert cfg.optimizer.model_dump() == {"name": "badam", "switch_every": 7, "order": "random"}
    assert cfg.train.lr == 1e-3 and "optimizer" not in cfg.train.model_dump()
    assert config_from_dict({**BASE, "optimizer": "galore"}).optimizer.rank == 128  # the shorthand
    again = config_from_dict(cfg.to_dict())  # what a run saves reads back the same
    assert again.optimizer == cfg.optimizer and again.to_yaml() == cfg.to_yaml()


def test_an_override_switches_the_optimizer_of_a_config_file(tmp_path):
    """--train.optimizer=sgd over a file with a GaLore section: the GaLore keys at their defaults go quietly,
    one set to something else goes with a warning naming the optimizers it belongs to."""
    from tunesmith.config.schema import load_config

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "optimizer": {"name": "galore", "rank": 32, "scale": 0.25}}))
    with pytest.warns(UserWarning, match="optimizer.rank applies to optimizer galore, galore_8bit, galore_adafactor, "
                                         "not sgd"):
        cfg = load_config(path, ["--train.optimizer=sgd", "--optimizer.momentum=0.5"])
    assert cfg.optimizer.model_dump() == {"name": "sgd", "momentum": 0.5}
    assert load_config(path, ["--optimizer.rank=8"]).optimizer.rank == 8


def test_the_optimizers_section_rejects_what_is_not_its_own():
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown key 'optimizer.rnak' \(optimizer galore\)\. Did you mean "
                                          r"'optimizer.rank'\?"):
        config_from_dict({**BASE, "optimizer": {"name": "galore", "rnak": 4}})
    with pytest.raises(ConfigError, match="optimizer.name: 'adam' is not an optimizer; .* Did you mean 'adamw'"):
        config_from_dict({**BASE, "optimizer": "adam"})
    with pytest.raises(ConfigError, match="optimizer.name is 'sgd' and train.optimizer .* is 'adamw'"):
        config_from_dict({**BASE, "optimizer": "sgd", "train": {"optimizer": "adamw"}})
    with pytest.raises(ConfigError, match="unknown key 'stage.beta' \\(stage sft\\)"):
        config_from_dict({**BASE, "stage": {"name": "sft", "beta": 0.1}})


def test_explain_finds_a_moved_key_by_its_old_name():
    from tunesmith.config.explain import explain

    assert explain("train.galore_rank").startswith("optimizer.rank  (default: 128)")
    assert explain("badam_order").startswith("optimizer.order  (default: random")
    assert explain("train.optimizer").startswith("optimizer.name  (default: adamw")
