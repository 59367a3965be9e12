"""Every registry (methods, stages, optimizers, export and data formats) is complete: each entry carries its
explanation, its config keys, its `init` template, its memory formula and its constraints, the config and the
CLI name exactly the registry's entries, and the README's tables are the registry's."""

from __future__ import annotations

import typing
from pathlib import Path
from types import SimpleNamespace

import pytest

from tunesmith.config.explain import config_fields, texts
from tunesmith.config.schema import METHOD_SECTIONS, OPTIMIZER_SECTIONS, STAGE_SECTIONS, DataConfig, TrainConfig
from tunesmith.data.formats import FORMATS as DATA_FORMATS
from tunesmith.export import FORMATS as EXPORTS
from tunesmith.methods import METHODS
from tunesmith.optim.registry import OPTIMIZERS
from tunesmith.planning.estimate import Plan, shape_from_params
from tunesmith.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
SHAPE = shape_from_params(135e6)


def literal(model, field: str) -> list:
    kind = model.model_fields[field].annotation
    while typing.get_origin(kind) is not typing.Literal:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return list(typing.get_args(kind))


def explanation_problems(entry, key: str) -> list[str]:
    found = []
    written = texts()["choices"].get(key, {}).get(entry.name)
    if not written or not written.get("label") or len(written.get("meaning", "").split()) < 15:
        found.append(f"{key} {entry.name}: no label and meaning in explanations.yaml (choices.{key})")
    elif entry.explanation() != written:
        found.append(f"{key} {entry.name}: explanation() is not its explanations.yaml entry")
    return found


def keys_problems(name: str, prefix: str, keys, model) -> list[str]:
    """Each key the entry owns is a key of its config section and has its explanation."""
    found = [f"{name}: {prefix}.{k} is not a config key" for k in keys if k not in model.model_fields]
    return found + [f"{name}: {prefix}.{k} has no explanation in explanations.yaml" for k in keys
                    if f"{prefix}.{k}" not in texts()["fields"]]


def init_problems(name: str, values: dict) -> list[str]:
    fields = config_fields()
    return [f"{name}: init value for {path}, which is not a config key" for path in values if path not in fields]


def method_problems(method) -> list[str]:
    found = explanation_problems(method, "method.name")
    found += keys_problems(method.name, "method", method.fields(), method.config)
    if METHOD_SECTIONS.get(method.name) is not method.config:
        found.append(f"{method.name}: its config is not the config's section for method.name {method.name}")
    found += init_problems(method.name, method.init_values)
    if "train.lr" not in method.init_values:
        found.append(f"{method.name}: its init template sets no train.lr")
    found += [f"{method.name}: supports unknown stage {s}" for s in method.stages if s not in STAGES] or (
        [] if method.stages else [f"{method.name}: supports no stage"])
    plan = Plan(SHAPE, method=method.name)
    try:
        count = method.trainable_count(SHAPE, plan)
        layers = method.active_layers(SHAPE, plan)
    except Exception as exc:  # noqa: BLE001 - the report names what broke
        return found + [f"{method.name}: memory formula fails ({type(exc).__name__}: {exc})"]
    if not (isinstance(count, int) and 0 < count <= SHAPE.params):
        found.append(f"{method.name}: trainable_count gives {count!r}")
    if not 0 < layers <= SHAPE.layers:
        found.append(f"{method.name}: active_layers gives {layers!r}")
    found += [f"{method.name}: package entry {p!r} is not (import name, install)" for p in method.packages
              if not (len(p) == 2 and "pip install" in p[1])]
    return found


def optimizer_problems(opt) -> list[str]:
    found = explanation_problems(opt, "optimizer.name") + keys_problems(opt.name, "optimizer", opt.fields(), opt.section)
    if OPTIMIZER_SECTIONS.get(opt.name) is not opt.section or opt.name not in opt.section.names():
        found.append(f"{opt.name}: its section is not the config's section")
    found += [f"{opt.name}: accepts unknown method {m}" for m in opt.methods or () if m not in METHODS]
    method = (opt.methods or ("lora",))[0]
    plan = Plan(SHAPE, method=method, optimizer=opt.name)
    try:
        grads, states, note = opt.memory(plan, METHODS[method].trainable_count(SHAPE, plan))
    except Exception as exc:  # noqa: BLE001
        return found + [f"{opt.name}: memory formula fails ({type(exc).__name__}: {exc})"]
    if not (grads > 0 and states >= 0 and note):
        found.append(f"{opt.name}: memory formula gives {(grads, states, note)!r}")
    if not callable(opt.build):
        found.append(f"{opt.name}: no build")
    return found


def stage_problems(stage) -> list[str]:
    found = explanation_problems(stage, "stage.name") + init_problems(stage.name, stage.init_values)
    found += keys_problems(stage.name, "stage", stage.fields(), stage.section())
    if not stage.data_formats():
        found.append(f"{stage.name}: no data format can train it")
    extra = stage.extra_memory(Plan(SHAPE))
    if not isinstance(extra, list):
        found.append(f"{stage.name}: extra_memory gives {extra!r}")
    return found


def test_every_method_is_complete():
    assert not [p for m in METHODS.values() for p in method_problems(m)]


def test_every_optimizer_is_complete():
    assert not [p for o in OPTIMIZERS.values() for p in optimizer_problems(o)]


def test_every_stage_is_complete():
    assert not [p for s in STAGES.values() for p in stage_problems(s)]


def test_every_export_and_data_format_is_complete():
    found = [p for f in EXPORTS.values() for p in explanation_problems(f, "export.format")]
    found += [p for f in DATA_FORMATS.values() for p in explanation_problems(f, "data.format")]
    found += [f"data format {f.name}: trains unknown stage {s}" for f in DATA_FORMATS.values() for s in f.stages
              if s not in STAGES]
    assert not found


def test_the_checks_find_an_incomplete_entry():
    """The walk above is not vacuous: an entry missing its explanation, keys, lr or formula is reported."""
    class Broken(METHODS["lora"]):
        name = "broken"
        config = type("BrokenSection", (METHOD_SECTIONS["lora"],), {"__annotations__": {"no_such_key": int},
                                                                     "no_such_key": 0})
        init_values = {"train.no_such": 1}
        stages = ("sft", "unknown")

        @staticmethod
        def trainable_count(shape, plan):
            return 0

    found = method_problems(Broken)
    assert any("explanations.yaml" in p for p in found)
    assert any("method.no_such_key has no explanation" in p for p in found)
    assert any("not the config's section" in p for p in found) and any("train.no_such" in p for p in found)
    assert any("no train.lr" in p for p in found) and any("unknown stage" in p for p in found)
    assert any("trainable_count gives 0" in p for p in found)
    slow = SimpleNamespace(**{**vars(OPTIMIZERS["sgd"]), "name": "slow", "build": None,
                              "explanation": lambda: {}, "fields": lambda: ["nope"], "methods": ("full", "ghost"),
                              "section": OPTIMIZER_SECTIONS["sgd"], "memory": lambda plan, trainable: (0.0, -1.0, "")})
    found = optimizer_problems(slow)
    assert len(found) == 7, found  # explanation, key twice (no such key, no text), section, method, memory, build


@pytest.mark.parametrize("key, registry, names", [
    ("method.name", METHODS, list(METHOD_SECTIONS)),
    ("optimizer.name", OPTIMIZERS, list(OPTIMIZER_SECTIONS)),
    ("stage.name", STAGES, list(STAGE_SECTIONS)),
    ("data.format", DATA_FORMATS, literal(DataConfig, "format")),
    ("export.format", EXPORTS, list(EXPORTS)),
])
def test_the_config_and_the_explanations_name_exactly_the_registry(key, registry, names):
    assert list(registry) == names
    assert list(texts()["choices"][key]) == names


def test_the_cli_offers_the_registry_choices():
    import typer

    from tunesmith.cli import app

    commands = typer.main.get_command(app).commands
    for command, option, registry in (("init", "--method", METHODS), ("init", "--optimizer", OPTIMIZERS),
                                      ("init", "--stage", STAGES), ("estimate", "--method", METHODS),
                                      ("estimate", "--optimizer", OPTIMIZERS), ("estimate", "--stage", STAGES),
                                      ("export", "--format", EXPORTS)):
        [param] = [p for p in commands[command].params if option in p.opts]
        assert param.help == " | ".join(registry), (command, option)


def test_init_writes_each_entrys_keys_and_only_those(tmp_path):
    import yaml

    from tunesmith.planning.init_config import init_config

    for name, method in METHODS.items():
        written = yaml.safe_load(init_config("m", name, "d.jsonl"))
        assert set(written["method"]) == {"name", *method.fields()}, name
        assert written["train"]["lr"] == method.init_values["train.lr"]
    galore = yaml.safe_load(init_config("m", "full", "d.jsonl", optimizer="galore"))
    assert galore["optimizer"] == {"name": "galore", "rank": 128, "update_interval": 200, "scale": 0.25,
                                   "proj_type": "std"}
    assert yaml.safe_load(init_config("m", "full", "d.jsonl"))["optimizer"] == {"name": "adamw"}
    pretrain = yaml.safe_load(init_config("m", "lora", "d.jsonl", stage="pretrain"))
    assert pretrain["stage"] == {"name": "pretrain", "cross_document_attention": False}
    assert pretrain["data"]["format"] == "text"


def test_the_readme_tables_are_the_registrys():
    from tunesmith.cli.registry_tables import block, in_readme

    assert in_readme(ROOT / "README.md") == block(), (
        "README.md's registry tables are out of date: run python -m tunesmith.cli.registry_tables")
