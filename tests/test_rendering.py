"""The masking contract at its edges, each against ids or text worked out independently of the code: text
rows, a BOS-adding tokenizer, several replies, a reply that contains the EOS text, an empty reply, a template
that writes EOS twice, templates that render earlier turns differently, template files and the errors that
name what to do. Fast (no model): `tools/mutation.py rendering` runs these with tests/test_data.py."""

from __future__ import annotations

import pytest

from conftest import build_tiny_tokenizer
from tunesmith.data.formats import Example
from tunesmith.data.templates import (CHATML, IGNORE, conversation_segments, encode_prompt, install_template, render,
                                      resolve_template)
from tunesmith.errors import ConfigError, DataError


def byte_ids(tokenizer, text: str) -> list[int]:
    """The ids of `text` in the tiny byte-level vocabulary, looked up one byte at a time."""
    table = {b: ch for b, ch in zip(range(256), _byte_chars())}
    return [tokenizer.convert_tokens_to_ids(table[b]) for b in text.encode("utf-8")]


def _byte_chars() -> list[str]:
    # GPT-2's byte-to-unicode table, written out: printable bytes map to themselves, the rest above 255.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def with_bos(tokenizer):
    """The tiny tokenizer with a post-processor that puts BOS (<|endoftext|>, id 0) first, as Llama's does."""
    from tokenizers import processors

    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    return tokenizer


def ids_of(tokenizer, *parts: str) -> list[int]:
    ids = []
    for part in parts:
        ids += ([tokenizer.convert_tokens_to_ids(part)] if part in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
                else byte_ids(tokenizer, part))
    return ids


def chat(*turns: str) -> list[dict[str, str]]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def trained(ids: list[int], labels: list[int]) -> list[int]:
    return [i for i, label in zip(ids, labels) if label != IGNORE]


def test_a_text_row_is_every_token_a_target_with_bos_and_eos():
    tok = with_bos(build_tiny_tokenizer())
    ids, labels = render(tok, Example(text="ab c"))
    assert ids == [0, *byte_ids(tok, "ab c"), tok.convert_tokens_to_ids("<|im_end|>")]
    assert labels == ids


def test_conversation_segments_are_tokenized_without_special_tokens():
    """A BOS-adding tokenizer must not put BOS in front of every segment: the ids are the rendered text's."""
    tok = with_bos(build_tiny_tokenizer(CHATML))
    ids, labels = render(tok, Example(messages=chat("hi", "yo")))
    assert ids == ids_of(tok, "<|im_start|>", "user\nhi", "<|im_end|>", "\n", "<|im_start|>", "assistant\n", "yo",
                         "<|im_end|>")  # an example ends with its last reply's EOS
    assert trained(ids, labels) == ids_of(tok, "yo", "<|im_end|>")
    assert 0 not in encode_prompt(tok, chat("hi"))


def test_every_reply_of_a_conversation_is_trained_with_its_eos():
    tok = build_tiny_tokenizer(CHATML)
    ids, labels = render(tok, Example(messages=chat("a", "b", "c", "d")))
    assert trained(ids, labels) == ids_of(tok, "b", "<|im_end|>", "d", "<|im_end|>")
    assert ids == ids_of(tok, "<|im_start|>", "user\na", "<|im_end|>", "\n", "<|im_start|>", "assistant\n", "b",
                         "<|im_end|>", "\n", "<|im_start|>", "user\nc", "<|im_end|>", "\n", "<|im_start|>",
                         "assistant\n", "d", "<|im_end|>")


def test_a_reply_that_contains_the_eos_text_is_trained_whole():
    """The reply ends at the template's EOS after the content, not at an EOS-looking string inside it."""
    tok = build_tiny_tokenizer(CHATML)
    segments = conversation_segments(tok, chat("q", "say <|im_end|> then stop"))
    assert segments[-1] == ("say <|im_end|> then stop<|im_end|>", True)


def test_an_empty_reply_trains_only_its_eos():
    tok = build_tiny_tokenizer(CHATML)
    assert conversation_segments(tok, chat("q", ""))[-1] == ("<|im_end|>", True)


def test_a_template_that_writes_eos_twice_trains_the_first():
    tok = build_tiny_tokenizer("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                               "{% if m['role'] == 'assistant' %}<|im_end|><|im_end|>{% endif %}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    assert conversation_segments(tok, chat("q", "r"))[-1] == ("r<|im_end|>", True)


def test_a_tokenizer_without_eos_trains_the_whole_rendered_reply():
    """Without an EOS to cut at, a reply is what its own turn renders, and never the turns after it."""
    tok = build_tiny_tokenizer(CHATML)
    tok.eos_token = None
    assert conversation_segments(tok, chat("q", "r"))[-1] == ("r<|im_end|>\n", True)
    segments = conversation_segments(tok, chat("q", "r", "q2", "r2"))
    assert [text for text, target in segments if target] == ["r<|im_end|>\n", "r2<|im_end|>\n"]


COUNTING = ("turns {{ messages | length }}\n{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")


def test_a_template_that_rewrites_earlier_turns_cannot_be_masked():
    tok = build_tiny_tokenizer(COUNTING)
    with pytest.raises(DataError) as caught:
        render(tok, Example(messages=chat("q", "r")))
    assert str(caught.value) == ("the chat template renders earlier turns differently once later turns are added, "
                                 "so replies cannot be located for masking; use data.template: chatml or alpaca")


def test_a_generation_prompt_that_rewrites_the_conversation_is_refused():
    # Consistent for the reply's own prompt (one message), rewritten once the conversation is longer.
    tok = build_tiny_tokenizer("{% if add_generation_prompt and messages | length > 2 %}GEN {% endif %}"
                               "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError) as caught:
        encode_prompt(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"},
                            {"role": "user", "content": "again"}])
    assert str(caught.value) == "the chat template renders earlier turns differently once later turns are added"


def test_a_model_without_a_chat_template_names_the_choices():
    with pytest.raises(ConfigError) as caught:
        resolve_template("model", build_tiny_tokenizer(None))
    assert str(caught.value) == ("this model's tokenizer has no chat template; set data.template to one of "
                                 "chatml, alpaca or to a Jinja file")


@pytest.mark.parametrize("suffix", [".jinja", ".j2", ".txt"])
def test_a_template_file_is_read_as_utf8(tmp_path, suffix):
    path = tmp_path / f"tpl{suffix}"
    path.write_bytes("{{ 'é ' }}{% for m in messages %}{{ m['content'] }}{% endfor %}".encode("utf-8"))
    assert resolve_template(str(path), build_tiny_tokenizer()) == "{{ 'é ' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.mark.parametrize("name", ["tpl.yaml", "missing.jinja", "vicuna"])
def test_anything_else_is_an_unknown_template(tmp_path, name):
    (tmp_path / "tpl.yaml").write_text("{{ messages }}")
    path = str(tmp_path / name) if name != "vicuna" else name
    with pytest.raises(ConfigError) as caught:
        resolve_template(path, build_tiny_tokenizer())
    assert str(caught.value) == (f"data.template: unknown template '{path}'; use model, chatml, alpaca, "
                                 "or the path of a .jinja file")


def test_chatml_needs_its_markers_in_the_vocabulary():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    plain = Tokenizer(models.WordLevel(vocab={"a": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=plain, eos_token="<eos>", unk_token="<unk>")
    with pytest.raises(ConfigError) as caught:
        install_template(tok, CHATML)
    assert str(caught.value) == ("data.template: chatml needs the tokens ['<|im_start|>', '<|im_end|>'], which this "
                                 "tokenizer lacks; use data.template: model or alpaca")
    install_template(tok, "{{ messages }}")  # any other template installs
    assert tok.chat_template == "{{ messages }}" and tok.pad_token == "<eos>"  # no pad: EOS pads


def test_a_tokenizer_with_a_pad_token_keeps_it():
    tok = build_tiny_tokenizer()
    tok.pad_token = "<|endoftext|>"
    install_template(tok, CHATML)
    assert tok.pad_token == "<|endoftext|>" and tok.chat_template == CHATML
