"""Prompt templates and the one masking contract: `render(...) -> (input_ids, labels)`.

A template is a Jinja chat template (the format transformers uses). The chosen template is written into
the run directory's tokenizer, so chat, eval, serve and export use exactly what training used.

Masking works on text segments: for each assistant turn we render the conversation up to it with and
without the reply; the difference is the reply. Segments are tokenized one by one, so the prompt ids seen
in training are byte-for-byte the ids `encode_prompt` produces at inference.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.data.formats import Example
from tunesmith.errors import ConfigError, DataError

IGNORE = -100

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

ALPACA = (
    "{% set default_system = 'Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.' %}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
    "{% else %}{{ default_system + '\\n\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
)

NAMED_TEMPLATES = {"chatml": CHATML, "alpaca": ALPACA}
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]


def resolve_template(name: str, tokenizer) -> str:
    """The Jinja text for `data.template`: `model`, a named template, or a path to a .jinja file."""
    if name == "model":
        if not tokenizer.chat_template:
            raise ConfigError(
                "this model's tokenizer has no chat template; set data.template to one of "
                f"{', '.join(NAMED_TEMPLATES)} or to a Jinja file"
            )
        return tokenizer.chat_template
    if name in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[name]
    path = Path(name)
    if path.suffix in (".jinja", ".j2", ".txt") and path.exists():
        return path.read_text(encoding="utf-8")
    raise ConfigError(f"data.template: unknown template '{name}'; use model, {', '.join(NAMED_TEMPLATES)}, "
                      "or the path of a .jinja file")


def install_template(tokenizer, template: str) -> None:
    """Make `template` the tokenizer's chat template, adding ChatML markers as special tokens if needed."""
    if template == CHATML:
        missing = [t for t in CHATML_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            # New special tokens need new embedding rows; we refuse rather than train untrained rows silently.
            raise ConfigError(
                f"data.template: chatml needs the tokens {missing}, which this tokenizer lacks; "
                "use data.template: model or alpaca"
            )
    tokenizer.chat_template = template
    if tokenizer.pad_token is None:
        # Padding positions are masked by position (attention mask and labels), so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def conversation_segments(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False
                          ) -> list[tuple[str, bool]]:
    """Split a rendered conversation into (text, is_target) pieces; targets are assistant replies + EOS."""
    eos = tokenizer.eos_token
    segments: list[tuple[str, bool]] = []
    done = ""  # rendered text already assigned to segments
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError("the chat template renders earlier turns differently once later turns are added, "
                            "so replies cannot be located for masking; use data.template: chatml or alpaca")
        segments.append((prompt[len(done):], False))
        reply = full[len(prompt):]
        end = reply.find(eos, len(message["content"].rstrip())) if eos else -1
        target = reply[: end + len(eos)] if end >= 0 else reply
        segments.append((target, True))
        done = prompt + target
    if add_generation_prompt:
        prompt = _render(tokenizer, messages, add_generation_prompt=True)
        if not prompt.startswith(done):
            raise DataError("the chat template renders earlier turns differently once later turns are added")
        segments.append((prompt[len(done):], False))
    return segments


def _tokenize(tokenizer, segments: list[tuple[str, bool]]) -> list[tuple[list[int], bool]]:
    """Tokenize each segment on its own; a target that does not end with EOS gets the EOS id appended."""
    eos_id = tokenizer.eos_token_id
    pieces = []
    for text, is_target in segments:
        piece = _encode(tokenizer, text)
        if is_target and (not piece or piece[-1] != eos_id):
            piece = piece + [eos_id]
        pieces.append((piece, is_target))
    return pieces


def render(tokenizer, example: Example, train_on_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and labels for one example; labels are IGNORE where the loss must not look.

    Every target ends with EOS. When the template already emits EOS it is kept as rendered; otherwise the
    EOS id is appended. EOS positions are labels by position, so this holds even when pad == EOS.
    """
    if example.text is not None:
        ids = tokenizer(example.text, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        return ids, list(ids)
    ids: list[int] = []
    labels: list[int] = []
    for piece, is_target in _tokenize(tokenizer, conversation_segments(tokenizer, example.messages or [])):
        ids += piece
        labels += piece if (is_target or train_on_prompt) else [IGNORE] * len(piece)
    return ids, labels


def encode_prompt(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Prompt ids for generation, built exactly as training built the prompt part of each example."""
    segments = conversation_segments(tokenizer, messages, add_generation_prompt=True)
    return [i for piece, _ in _tokenize(tokenizer, segments) for i in piece]
