"""Turn rows of the supported formats into one shape: a list of chat messages (or raw text).

Formats:
  alpaca    {"instruction", "input"?, "output", "system"?}
  messages  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}   (OpenAI style)
  sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}
  text      {"text": str}   (every token trained: continued pre-training style)
  unpaired  {"prompt", "completion", "label": true|false}   (KTO: one reply, marked desirable or not)
  prompt    {"prompt", ...any other fields}   (GRPO, PPO: the model answers the prompt itself; the other fields
            go to the reward functions, e.g. the expected answer)
  preference {"prompt", "chosen", "rejected"}: strings, or chat messages (TRL's standard and conversational
            forms, and its implicit-prompt form of two whole conversations); also {"instruction", "input"?,
            "chosen", "rejected", "system"?}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tunesmith.config.explain import choice
from tunesmith.data.reading import BadRow, Row
from tunesmith.errors import DataError

_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class Example:
    messages: list[dict[str, str]] | None = None
    """The conversation; for a preference pair, the prompt and the chosen reply."""
    text: str | None = None
    where: str = ""
    rejected: str | None = None
    """A preference pair's rejected reply (its prompt is that of `messages`)."""
    desirable: bool | None = None
    """An unpaired (KTO) row's label: is the reply in `messages` a good one?"""
    fields: dict | None = None
    """A prompt row's other fields, for reward functions (then `messages` is the prompt alone)."""
    prompt: object = None
    """A prompt row's prompt as written (a string or chat messages): what reward functions are given."""

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """Everything before the last assistant reply: what a user would send at inference."""
        assert self.messages is not None
        return self.messages if self.fields is not None else self.messages[:-1]

    @property
    def reference(self) -> str:
        """The last assistant reply: the answer eval compares against."""
        assert self.messages is not None
        return self.messages[-1]["content"]


def _field(row: Row, name: str, columns: dict[str, str]) -> str:
    return columns.get(name, name)


def _string(row: Row, columns: dict[str, str], name: str, required: bool, allow_empty: bool = False) -> str | None:
    key = _field(row, name, columns)
    shown = name if key == name else f"{key}' (mapped to '{name}"
    if key not in row.data or row.data[key] is None:
        if required:
            raise BadRow(f"{row.where}: missing field '{shown}'")
        return None
    value = row.data[key]
    if not isinstance(value, str):
        raise BadRow(f"{row.where}: field '{shown}' must be a string, got {type(value).__name__}")
    if not allow_empty and required and not value.strip():
        raise BadRow(f"{row.where}: field '{shown}' is empty")
    return value


def _alpaca_prompt(row: Row, columns: dict[str, str]) -> list[dict[str, str]]:
    instruction = _string(row, columns, "instruction", required=True)
    extra = _string(row, columns, "input", required=False)
    system = _string(row, columns, "system", required=False)
    user = instruction if not extra or not extra.strip() else f"{instruction}\n\n{extra}"
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def _alpaca(row: Row, columns: dict[str, str]) -> Example:
    prompt = _alpaca_prompt(row, columns)
    output = _string(row, columns, "output", required=True)
    return Example(messages=prompt + [{"role": "assistant", "content": output}], where=row.where)


def _text(row: Row, columns: dict[str, str]) -> Example:
    return Example(text=_string(row, columns, "text", required=True), where=row.where)


def _chat(fmt: str) -> Callable[[Row, dict[str, str]], Example]:
    list_name, role_key, content_key = ("messages", "role", "content") if fmt == "messages" else (
        "conversations", "from", "value")

    def read(row: Row, columns: dict[str, str]) -> Example:
        list_key = _field(row, list_name, columns)
        turns = row.data.get(list_key)
        if turns is None:
            raise BadRow(f"{row.where}: missing field '{list_key}'")
        if not isinstance(turns, list) or not turns:
            raise BadRow(f"{row.where}: field '{list_key}' must be a non-empty list of messages")
        messages = []
        for i, turn in enumerate(turns):
            where = f"{row.where}: {list_key}[{i}]"
            if not isinstance(turn, dict):
                raise BadRow(f"{where}: each message must be an object with '{role_key}' and '{content_key}'")
            role, content = turn.get(role_key), turn.get(content_key)
            if fmt == "sharegpt":
                role = _SHAREGPT_ROLES.get(role) if isinstance(role, str) else None
            if role not in ("system", "user", "assistant"):
                raise BadRow(f"{where}: field '{role_key}' must be one of "
                             f"{'system/user/assistant' if fmt == 'messages' else 'system/human/gpt'}, got {turn.get(role_key)!r}")
            if not isinstance(content, str):
                raise BadRow(f"{where}: field '{content_key}' must be a string, got {type(content).__name__}")
            messages.append({"role": role, "content": content})
        if messages[-1]["role"] != "assistant":
            raise BadRow(f"{row.where}: the last message must be the assistant's reply (role 'assistant'), "
                         f"got '{messages[-1]['role']}'")
        if not messages[-1]["content"].strip():
            raise BadRow(f"{row.where}: {list_key}[{len(messages) - 1}]: the assistant's reply is empty")
        if not any(m["role"] == "user" for m in messages):
            raise BadRow(f"{row.where}: field '{list_key}' has no user message")
        return Example(messages=messages, where=row.where)
    return read


def _turns(value, where: str, field: str) -> list[dict[str, str]]:
    """A list of chat messages of a preference row's field, checked like the messages format's."""
    if not isinstance(value, list) or not value:
        raise BadRow(f"{where}: field '{field}' must be a string or a non-empty list of messages")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant") \
                or not isinstance(turn.get("content"), str):
            raise BadRow(f"{where}: {field}[{i}]: each message must be an object with 'role' (system/user/"
                         "assistant) and 'content' (a string)")
        out.append({"role": turn["role"], "content": turn["content"]})
    return out


def _reply(row: Row, columns: dict[str, str], name: str) -> str:
    """A chosen or rejected reply: a string, or a list holding one assistant message."""
    key = _field(row, name, columns)
    value = row.data.get(key)
    if isinstance(value, list):
        turns = _turns(value, row.where, key)
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise BadRow(f"{row.where}: field '{key}' must be the assistant's reply: a string or one message with "
                         "role 'assistant' (the prompt goes in 'prompt')")
        value = turns[0]["content"]
        if not value.strip():
            raise BadRow(f"{row.where}: field '{key}' is empty")
        return value
    return _string(row, columns, name, required=True)


def _preference(row: Row, columns: dict[str, str]) -> Example:
    chosen_key, rejected_key = _field(row, "chosen", columns), _field(row, "rejected", columns)
    if _field(row, "instruction", columns) in row.data:  # alpaca-style pairs
        prompt = _alpaca_prompt(row, columns)
    elif _field(row, "prompt", columns) in row.data:
        key = _field(row, "prompt", columns)
        value = row.data[key]
        prompt = ([{"role": "user", "content": _string(row, columns, "prompt", required=True)}]
                  if not isinstance(value, list) else _turns(value, row.where, key))
        if not any(m["role"] == "user" for m in prompt):
            raise BadRow(f"{row.where}: field '{key}' has no user message")
        if prompt[-1]["role"] == "assistant":
            raise BadRow(f"{row.where}: field '{key}' must end before the reply (its last message is the "
                         "assistant's); the replies go in 'chosen' and 'rejected'")
    else:  # TRL's implicit prompt: two whole conversations that differ only in the last reply
        both = [row.data.get(chosen_key), row.data.get(rejected_key)]
        if not all(isinstance(v, list) for v in both):
            raise BadRow(f"{row.where}: missing field 'prompt' (or 'instruction'); without one, '{chosen_key}' and "
                         f"'{rejected_key}' must be whole conversations that share everything but the last reply")
        chosen, rejected = (_turns(v, row.where, k) for v, k in zip(both, (chosen_key, rejected_key)))
        if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise BadRow(f"{row.where}: '{chosen_key}' and '{rejected_key}' must share every message but the last, "
                         "and each must end with the assistant's reply")
        if not chosen[-1]["content"].strip() or not rejected[-1]["content"].strip():
            raise BadRow(f"{row.where}: a reply in '{chosen_key}' or '{rejected_key}' is empty")
        return Example(messages=chosen, rejected=rejected[-1]["content"], where=row.where)
    chosen, rejected = _reply(row, columns, "chosen"), _reply(row, columns, "rejected")
    return Example(messages=prompt + [{"role": "assistant", "content": chosen}], rejected=rejected, where=row.where)


PREFERENCE_STAGES = ("dpo", "orpo", "simpo", "rm")
ONLINE_STAGES = ("grpo", "ppo")
"""Stages that answer the prompts themselves during training."""


def _prompt_field(row: Row, columns: dict[str, str]) -> tuple[str, object, list[dict[str, str]]]:
    """(its key, the value as written, as chat messages) of a row's prompt that the reply must follow."""
    key = _field(row, "prompt", columns)
    if key not in row.data:
        raise BadRow(f"{row.where}: missing field '{key}'")
    value = row.data[key]
    prompt = ([{"role": "user", "content": _string(row, columns, "prompt", required=True)}]
              if not isinstance(value, list) else _turns(value, row.where, key))
    if prompt[-1]["role"] == "assistant" or not any(m["role"] == "user" for m in prompt):
        raise BadRow(f"{row.where}: field '{key}' must hold a user message and end before the reply")
    return key, value, prompt


def _unpaired(row: Row, columns: dict[str, str]) -> Example:
    """A KTO row: a prompt, one completion, and whether it is desirable."""
    _, _, prompt = _prompt_field(row, columns)
    completion = _reply(row, columns, "completion")
    label_key = _field(row, "label", columns)
    label = row.data.get(label_key)
    if not isinstance(label, bool):
        raise BadRow(f"{row.where}: field '{label_key}' must be true (a desirable completion) or false, got "
                     f"{label!r}")
    return Example(messages=prompt + [{"role": "assistant", "content": completion}], desirable=label,
                   where=row.where)


def _prompt_only(row: Row, columns: dict[str, str]) -> Example:
    """A GRPO row: a prompt for the model to answer, and fields its reward functions may read."""
    key, value, prompt = _prompt_field(row, columns)
    fields = {k: v for k, v in row.data.items() if k != key}
    return Example(messages=prompt, fields=fields, prompt=value, where=row.where)


@dataclass(frozen=True)
class DataFormat:
    name: str
    marker: str
    """The key whose presence in the first row identifies the format (after data.columns' mapping)."""
    read: Callable[[Row, dict[str, str]], Example]
    """One row into an Example; raises BadRow naming the row and field when it does not fit."""
    stages: tuple[str, ...]
    """The training stages its rows can train."""
    paired: bool = False
    """Each row is a preference pair (a chosen and a rejected reply to one prompt)."""
    prompts_only: bool = False
    """Rows hold prompts without replies: the stage generates the replies (kept in memory, with their fields)."""

    def explanation(self) -> dict[str, str]:
        return choice("data.format", self.name)


FORMATS: dict[str, DataFormat] = {f.name: f for f in (
    DataFormat("alpaca", "instruction", _alpaca, ("sft",)),
    DataFormat("messages", "messages", _chat("messages"), ("sft",)),
    DataFormat("sharegpt", "conversations", _chat("sharegpt"), ("sft",)),
    DataFormat("text", "text", _text, ("sft", "pretrain")),
    DataFormat("preference", "chosen", _preference, PREFERENCE_STAGES, paired=True),
    DataFormat("unpaired", "completion", _unpaired, ("kto",)),
    DataFormat("prompt", "prompt", _prompt_only, ONLINE_STAGES, prompts_only=True),
)}
DETECTION_ORDER = ("preference", "unpaired", "prompt", "messages", "sharegpt", "alpaca", "text")  # the order a first row's keys are tried in


def detect_format(row: Row, columns: dict[str, str]) -> str:
    keys = set(row.data)
    for fmt in DETECTION_ORDER:
        if _field(row, FORMATS[fmt].marker, columns) in keys:
            return fmt
    raise DataError(
        f"{row.where}: cannot tell the data format from the keys {sorted(keys)}. Expected 'instruction'+'output' "
        "(alpaca), 'messages' (OpenAI chat), 'conversations' (ShareGPT), 'text', 'prompt'+'chosen'+'rejected' "
        "(preference pairs), 'prompt'+'completion'+'label' (KTO) or 'prompt' alone (GRPO). Set data.format, and map "
        "your column names with data.columns, e.g. {instruction: question, output: answer}."
    )


def to_example(row: Row, fmt: str, columns: dict[str, str]) -> Example:
    """Normalise one row; raises BadRow naming the row and field when it does not fit the format."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format '{fmt}'; expected one of {', '.join(FORMATS)}")
    return FORMATS[fmt].read(row, columns)
