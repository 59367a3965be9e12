"""Shared fixtures: a tiny byte-level tokenizer and a tiny random Llama, built in seconds, no downloads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Like SmolLM2's: ChatML with a default system message when the conversation has none.
TINY_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are tiny.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_tokenizer(chat_template: str | None = TINY_TEMPLATE, merges: tuple[tuple[str, str], ...] = (),
                         split_words: bool = False):
    """Byte-level BPE, by default with no merges: every byte is a token, plus the ChatML markers; pad == eos
    like SmolLM2. `merges` adds merged tokens after the bytes; `split_words` splits text GPT-2's way first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet) + [a + b for a, b in merges])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_model(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
                         initializer_range=0.1)  # wide enough that a frozen LM head does not pin the logits near 0
    return LlamaForCausalLM(config)


@pytest.fixture()
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny model + tokenizer directory, loadable by path like any HF model."""
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable toy task: repeat a word in capitals. Lengths vary a lot on purpose."""
    import random

    rng = random.Random(seed)
    words = ["cat", "river", "blue", "seven", "mountain", "ok", "paper", "lamp"]
    rows = []
    for _ in range(n):
        picked = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
        rows.append({"instruction": "Shout this.", "input": picked, "output": picked.upper()})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def make_config(tmp_path, tiny_model_dir):
    """A Config for the tiny model on toy rows, with overrides given as nested dicts."""
    from tunesmith.config.schema import config_from_dict

    def make(rows: list | None = None, **sections) -> "object":
        data_file = write_jsonl(tmp_path / "data.jsonl", rows if rows is not None else alpaca_rows(40))
        raw = {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train_file": str(data_file), "val_size": 4, "test_size": 4, "seed": 0, "max_seq_length": 256},
            "method": {"name": "lora", "r": 4, "alpha": 8},
            "train": {"max_steps": 3, "lr": 1e-3, "micro_batch_size": 4, "precision": "fp32", "seed": 0},
            "eval": {"interval": 2, "batch_size": 4},
            "checkpoint": {"interval": 2, "keep_last": 1},
            "output": {"dir": str(tmp_path / "run")},
        }
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        return config_from_dict(raw, "test-config")

    return make
