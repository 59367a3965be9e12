"""Every config key is explained in one place, and `explain` / `init` read from it."""

from __future__ import annotations

import pytest

from tunesmith.methods import METHODS
import yaml

from tunesmith.config.schema import config_from_dict
from tunesmith.errors import ConfigError
from tunesmith.config.explain import config_fields, explain, resolve_topic, texts
from tunesmith.planning.init_config import init_config

REQUIRED = ("meaning", "unit", "typical", "interacts")
CONCEPTS = ("loss", "val_loss", "perplexity", "overfitting", "effective_batch_size", "tokens_per_s",
            "trainable_parameters")


def test_every_config_field_has_an_explanation():
    fields, explained = config_fields(), texts()["fields"]
    missing = [path for path in fields if path not in explained]
    assert not missing, f"config fields without an explanation in explanations.yaml: {missing}"
    incomplete = [f"{path}: {key}" for path in fields for key in REQUIRED[:3] if not explained[path].get(key)]
    incomplete += [f"{path}: interacts" for path in fields if not isinstance(explained[path].get("interacts"), list)]
    assert not incomplete, incomplete
    stale = [path for path in explained if path not in fields]
    assert not stale, f"explanations for keys the config no longer has: {stale}"
    for path, entry in explained.items():
        for other in entry["interacts"]:
            assert other in fields, f"{path} refers to unknown key {other}"
        for method, bounds in (entry.get("range") or {}).items():
            assert method in METHODS and bounds[0] < bounds[1], path


def test_every_section_and_the_output_words_are_explained():
    from tunesmith.config.schema import Config

    assert set(Config.model_fields) <= set(texts()["sections"])
    assert set(CONCEPTS) <= set(texts()["concepts"])
    for name, entry in texts()["concepts"].items():
        assert len(entry["meaning"].split()) >= 10, name
        assert all(path in config_fields() for path in entry.get("see", [])), name


def test_explain_a_field_shows_the_live_default_and_choices():
    text = explain("train.lr_scheduler")
    assert text.startswith("train.lr_scheduler  (default: cosine; one of: constant, linear, cosine)")
    assert "too high" in explain("lr") or "too low" in explain("lr")  # a bare name finds train.lr
    assert explain("lr").startswith("train.lr  (default: 0.0002)")


def test_explain_sections_concepts_and_everything():
    section = explain("method")
    assert section.startswith("[method]") and "method.r " in section and "train.lr " not in section
    assert explain("perplexity").startswith("perplexity")
    everything = explain("all")
    for path in config_fields():
        assert f"{path}  (default:" in everything, path


def test_unknown_or_ambiguous_topics_are_clear_errors():
    with pytest.raises(ConfigError, match="Did you mean 'train.lr'"):
        resolve_topic("train.lrr")
    with pytest.raises(ConfigError, match="ambiguous: train.seed, data.seed|ambiguous: data.seed, train.seed"):
        resolve_topic("seed")


@pytest.mark.parametrize("method", ["lora", "qlora", "full", "freeze", "ia3", "oft", "boft", "adapter", "prompt",
                                    "prefix"])
def test_init_writes_a_commented_config_that_loads(method):
    text = init_config("smollm2-135m-instruct", method, "data/train.jsonl")
    cfg = config_from_dict(yaml.safe_load(text), "init")
    assert cfg.method.name == method and cfg.data.train_file == "data/train.jsonl"
    assert cfg.train.lr == {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5, "freeze": 1e-4, "ia3": 1e-3, "oft": 1e-4,
                            "boft": 1e-4, "adapter": 9e-3, "prompt": 3e-2, "prefix": 1e-2}[method]
    assert ("bits: 4" in text) == (method == "qlora") and ("block_size" in text) == (method in ("oft", "boft"))
    lines = text.splitlines()
    keys = [i for i, line in enumerate(lines) if line.startswith("  ") and not line.startswith("  #")]
    assert keys and all(lines[i - 1].startswith("  # ") for i in keys)  # every key has its comment above it
    assert max(len(line) for line in lines) <= 100
    assert ("  r: 16" in lines) == (method in ("lora", "qlora")) and ("  trainable_layers: 2" in lines) == (method == "freeze")


def test_train_help_lists_every_key_with_its_meaning():
    from test_config_and_cli import run_cli

    out = run_cli("train", "--help").stdout
    assert "train.lr: The learning rate" in " ".join(out.split())
    assert all(path in out for path in config_fields())
