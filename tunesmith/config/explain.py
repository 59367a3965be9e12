"""Plain-language explanations of every config field and of the words a run prints.

The texts live in explanations.yaml (one source of truth); defaults and allowed values come from the typed
config itself, so they cannot drift. `tunesmith explain`, `tunesmith init`'s comments and the CLI help
all read from here.
"""

from __future__ import annotations

import textwrap
import typing
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml
from pydantic import BaseModel

from tunesmith.config.schema import Config
from tunesmith.errors import ConfigError


@lru_cache(maxsize=1)
def texts() -> dict[str, dict[str, Any]]:
    # The CLI reads these at start-up (the key list in `train --help`): the C loader, where built, is ~10x faster.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(resources.files("tunesmith.config").joinpath("explanations.yaml").read_text(encoding="utf-8"), loader)


@dataclass
class FieldInfo:
    path: str
    default: Any
    choices: list[Any] | None


def config_fields(model: type[BaseModel] = Config, prefix: str = "") -> dict[str, FieldInfo]:
    """Every leaf field of the config by dotted path, with its default and allowed values. A section that is a
    union (method: one model per method) lists every member's keys, its default member's first."""
    out: dict[str, FieldInfo] = {}
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out.update(config_fields(kind, f"{prefix}{name}."))
            continue
        members = [a for a in typing.get_args(kind) if isinstance(a, type) and issubclass(a, BaseModel)]
        if members and len(members) == len(typing.get_args(kind)):
            default = field.get_default(call_default_factory=True)
            for member in [type(default), *members]:
                for path, info in config_fields(member, f"{prefix}{name}.").items():
                    out.setdefault(path, info)
            tags = [t for m in members for t in typing.get_args(m.model_fields["name"].annotation)]
            out[f"{prefix}{name}.name"] = FieldInfo(f"{prefix}{name}.name", default.name, tags)
            continue
        default = field.get_default(call_default_factory=True)
        out[prefix + name] = FieldInfo(prefix + name, default, _choices(kind))
    return out


def _choices(kind: Any) -> list[Any] | None:
    if kind is bool:
        return [True, False]
    if typing.get_origin(kind) is typing.Literal:
        return list(typing.get_args(kind))
    for arg in typing.get_args(kind):  # Optional[Literal[...]] and the like
        found = _choices(arg) if arg is not type(None) else None
        if found:
            return found
    return None


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def choice(key: str, name: str) -> dict[str, str]:
    """The label and meaning of one choice of a key (a registry entry's explanation): choice("method.name", "lora")."""
    try:
        return texts()["choices"][key][name]
    except KeyError:
        raise ConfigError(f"explanations.yaml has no entry choices.{key}.{name}") from None


def choices_of(key: str) -> dict[str, dict[str, str]]:
    return texts()["choices"].get(key, {})


def _renamed(topic: str) -> str:
    """Keys of 0.1 that moved: train.optimizer is optimizer.name, train.galore_rank is optimizer.rank."""
    from tunesmith.config.schema import OPTIMIZER_SECTIONS

    moved = {"optimizer": "name", **{old: new for c in OPTIMIZER_SECTIONS.values() for old, new in c.flat_keys.items()}}
    key = topic.removeprefix("train.")
    if key in moved and (topic != key or key != "optimizer"):
        return f"optimizer.{moved[key]}"
    return topic


def resolve_topic(topic: str) -> tuple[str, str]:
    """(kind, key) for a field path, a bare field name when unique, a section, a concept, a choice (`badam`,
    `pretrain`: key/name), or `all`."""
    fields, data = config_fields(), texts()
    topic = _renamed(topic.strip().lower().replace("-", "_"))
    if topic in ("all", ""):
        return "all", ""
    if topic in fields:
        return "field", topic
    if topic in data["sections"]:
        return "section", topic
    if topic in data["concepts"]:
        return "concept", topic
    by_name = [path for path in fields if path.split(".")[-1] == topic]
    if len(by_name) == 1:
        return "field", by_name[0]
    if by_name:
        raise ConfigError(f"'{topic}' is ambiguous: {', '.join(by_name)}")
    owners = [key for key, entries in data.get("choices", {}).items() if topic in entries]
    if owners:
        return "choice", f"{owners[0]}/{topic}"
    import difflib

    close = difflib.get_close_matches(topic, list(fields) + list(data["sections"]) + list(data["concepts"]), n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ConfigError(f"nothing to explain under '{topic}'.{hint} `tunesmith explain` lists every topic.")


def _wrap(label: str, text: str, indent: int = 2) -> list[str]:
    pad = " " * indent
    return textwrap.wrap(" ".join(str(text).split()), width=100, initial_indent=f"{pad}{label}",
                         subsequent_indent=pad + " " * len(label))


def explain_field(path: str) -> str:
    info, entry = config_fields()[path], texts()["fields"][path]
    lines = [f"{path}  (default: {_show(info.default)}"
             + (f"; one of: {', '.join(_show(c) for c in info.choices)})" if info.choices else ")")]
    lines += _wrap("", entry["meaning"])
    lines += _wrap("unit: ", entry["unit"])
    lines += _wrap("typical: ", entry["typical"])
    if entry.get("too_high"):
        lines += _wrap("too high: ", entry["too_high"])
    if entry.get("too_low"):
        lines += _wrap("too low: ", entry["too_low"])
    if entry.get("interacts"):
        lines += _wrap("see also: ", ", ".join(entry["interacts"]))
    for name, described in choices_of(path).items():
        lines += _wrap(f"{name}: ", f"{described['label']}. {described['meaning']}", indent=4)
    return "\n".join(lines)


def explain_choice(key_and_name: str) -> str:
    key, name = key_and_name.split("/")
    described = choice(key, name)
    return "\n".join([f"{key}: {name}  ({described['label']})"] + _wrap("", described["meaning"]))


def explain_concept(name: str) -> str:
    entry = texts()["concepts"][name]
    lines = [name.replace("_", " ")] + _wrap("", entry["meaning"])
    if entry.get("see"):
        lines += _wrap("see also: ", ", ".join(entry["see"]))
    return "\n".join(lines)


def explain_section(section: str) -> str:
    head = [f"[{section}]"] + _wrap("", texts()["sections"][section]["meaning"])
    fields = [explain_field(p) for p in config_fields() if p.split(".")[0] == section]
    return "\n\n".join(["\n".join(head)] + fields)


def explain(topic: str = "all") -> str:
    kind, key = resolve_topic(topic)
    if kind == "field":
        return explain_field(key)
    if kind == "section":
        return explain_section(key)
    if kind == "concept":
        return explain_concept(key)
    if kind == "choice":
        return explain_choice(key)
    sections = [explain_section(s) for s in Config.model_fields]
    concepts = "\n\n".join(explain_concept(c) for c in texts()["concepts"])
    return "\n\n\n".join(sections + ["Words you will meet in the output\n\n" + concepts])


def one_line(path: str) -> str:
    """The first sentence of a field's meaning (for comments and help listings)."""
    meaning = " ".join(texts()["fields"][path]["meaning"].split())
    return meaning.split(". ")[0].rstrip(".") + "."
