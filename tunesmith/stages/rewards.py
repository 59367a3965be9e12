"""Reward functions for online stages (GRPO): the built-ins, and users' own named `module:function`.

Every reward function is called as TRL calls its reward functions, so a function written for TRL works here
unchanged: `f(prompts, completions, completion_ids, **fields)`, where `prompts` holds each row's prompt as
written (a string or chat messages), `completions` the decoded replies, `completion_ids` their token ids, and
each other field of the rows comes as one list (None where a row lacks it). It returns one number per reply,
or None where it cannot score one (a None from every function leaves the reply out of its group's baseline).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import numbers
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from tunesmith.errors import ConfigError, TunesmithError

RewardFn = Callable[..., Sequence[float | None]]


def parse_json(text: str) -> tuple[bool, Any]:
    """(parsed?, value) of a reply, allowing a ```json fence around it as models often write."""
    text = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.S)
    if fenced:
        text = fenced.group(1)
    try:
        return True, json.loads(text)
    except ValueError:
        return False, None


def _answers(reward: str, field: str, fields: dict) -> list:
    """The rows' expected answers, or an error naming the field the rows lack."""
    if field not in fields:
        raise TunesmithError(f"reward {reward} compares replies with the rows' '{field}' field, which the rows lack "
                             f"(fields: {', '.join(sorted(fields)) or 'none'}); set stage.answer_field")
    return fields[field]


def exact_match(section) -> RewardFn:
    field = section.answer_field

    def reward(prompts, completions, completion_ids, **fields):
        out = []
        for reply, answer in zip(completions, _answers("exact_match", field, fields)):
            if answer is None:
                out.append(None)
            elif isinstance(answer, str):
                ok, parsed = parse_json(answer)
                same = reply.strip() == answer.strip() or (ok and parse_json(reply) == (True, parsed))
                out.append(float(same))
            else:  # a number, list or object: the reply must parse to the same value
                out.append(float(parse_json(reply) == (True, answer)))
        return out
    return reward


def valid_json(section) -> RewardFn:
    def reward(prompts, completions, completion_ids, **fields):
        return [float(parse_json(reply)[0]) for reply in completions]
    return reward


def json_keys(section) -> RewardFn:
    default = list(section.required_keys)

    def reward(prompts, completions, completion_ids, **fields):
        per_row = fields.get("required_keys") or [None] * len(completions)
        out = []
        for reply, own in zip(completions, per_row):
            keys = own if own is not None else default
            if not keys:
                raise TunesmithError("reward json_keys needs the keys to look for: set stage.required_keys, or give "
                                     "rows a required_keys field")
            ok, value = parse_json(reply)
            out.append(sum(k in value for k in keys) / len(keys) if ok and isinstance(value, dict) else 0.0)
        return out
    return reward


def json_fields(section) -> RewardFn:
    """Partial credit where exact_match gives none: the share of the answer object's fields that a JSON
    reply holds with the same value."""
    field = section.answer_field

    def reward(prompts, completions, completion_ids, **fields):
        out = []
        for reply, answer in zip(completions, _answers("json_fields", field, fields)):
            if isinstance(answer, str):
                answer = parse_json(answer)[1]
            if not isinstance(answer, dict) or not answer:
                out.append(None)  # nothing to compare field by field
                continue
            ok, value = parse_json(reply)
            value = value if ok and isinstance(value, dict) else {}
            out.append(sum(k in value and value[k] == v for k, v in answer.items()) / len(answer))
        return out
    return reward


def length_penalty(section) -> RewardFn:
    limit = section.max_new_tokens

    def reward(prompts, completions, completion_ids, **fields):
        return [-len(ids) / limit for ids in completion_ids]
    return reward


BUILTIN: dict[str, Callable[[Any], RewardFn]] = {
    "exact_match": exact_match, "valid_json": valid_json, "json_keys": json_keys, "json_fields": json_fields,
    "length_penalty": length_penalty}
"""Built-in rewards by name; each is made from the stage's section (the fields and keys it reads)."""


def load_function(spec: str) -> RewardFn:
    """`package.module:function` (importable) or `path/to/file.py:function`."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ConfigError(f"stage.rewards: {spec!r} is neither a built-in ({', '.join(BUILTIN)}) nor a "
                          "'module:function' or 'file.py:function' path")
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser()
            if not path.is_file():
                raise ConfigError(f"stage.rewards: {spec!r}: no file {path}")
            loaded = importlib.util.spec_from_file_location(f"tunesmith_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as exc:  # the user's module failed to import: say which and why
        raise ConfigError(f"stage.rewards: {spec!r}: importing {where} failed: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"stage.rewards: {spec!r}: {where} has no function {name}")
    return fn


def reward_functions(section) -> list[tuple[str, RewardFn]]:
    """(name, function) for each entry of stage.rewards, resolved now so a typo stops the run before training."""
    return [(spec, BUILTIN[spec](section) if spec in BUILTIN else load_function(spec)) for spec in section.rewards]


def score(functions: list[tuple[str, RewardFn]], prompts: list, completions: list[str],
          completion_ids: list[list[int]], rows: list[dict]) -> list[list[float]]:
    """Each reply's reward from each function (NaN where a function returned None), replies × functions."""
    keys = sorted({k for row in rows for k in row})
    columns = {k: [row.get(k) for row in rows] for k in keys}
    table = []
    for name, fn in functions:
        try:
            values = list(fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns))
        except TunesmithError:
            raise
        except Exception as exc:
            raise TunesmithError(f"reward function {name} failed: {type(exc).__name__}: {exc}") from exc
        if len(values) != len(completions):
            raise TunesmithError(f"reward function {name} returned {len(values)} values for {len(completions)} replies")
        column = []
        for v in values:
            if v is not None and not isinstance(v, numbers.Real):
                raise TunesmithError(f"reward function {name} returned {v!r}; it must return numbers (or None)")
            column.append(math.nan if v is None else float(v))
        table.append(column)
    return [list(r) for r in zip(*table)]


class Rewards:
    """stage.rewards resolved (a typo stops the run before the model loads), with stage.reward_weights."""

    def __init__(self, section):
        self.functions = reward_functions(section)
        self.weights = torch.tensor(section.reward_weights or [1.0] * len(self.functions), dtype=torch.float64)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.functions]

    def __call__(self, prompts: list, completions: list[str], completion_ids: list[list[int]], rows: list[dict]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(replies × functions rewards, each reply's weighted total; NaN where no function scored it)."""
        table = torch.tensor(score(self.functions, prompts, completions, completion_ids, rows), dtype=torch.float64)
        total = (torch.nan_to_num(table) * self.weights).sum(1)
        total[table.isnan().all(1)] = math.nan
        return table, total


def nanmean(x: torch.Tensor) -> float:
    """The mean of the values that are not NaN (NaN when none is)."""
    return float(torch.nanmean(x.double())) if (~x.isnan()).any() else float("nan")
