"""Reading, formats, bad input, splitting, templates and masking."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_TEMPLATE, alpaca_rows, build_tiny_tokenizer, write_jsonl
from tunesmith.config.schema import DataConfig
from tunesmith.data.formats import Example
from tunesmith.data.pipeline import load_examples, prepare_data, show_examples, tokenize_split
from tunesmith.data.reading import read_rows
from tunesmith.data.split import seeded_split
from tunesmith.data.templates import ALPACA, CHATML, IGNORE, encode_prompt, install_template, render, resolve_template
from tunesmith.errors import ConfigError, DataError

EXAMPLE = Example(messages=[{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yo."}])


def runs(tokenizer, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """Group a rendered example into maximal (decoded text, trained?) runs: a readable golden table."""
    out: list[tuple[str, bool]] = []
    for tok, lab in zip(ids, labels):
        trained = lab != IGNORE
        piece = tokenizer.decode([tok])
        if out and out[-1][1] == trained:
            out[-1] = (out[-1][0] + piece, trained)
        else:
            out.append((piece, trained))
    return out


# ----------------------------------------------------------------------------- masking golden tables

GOLDEN = {
    "model": [
        ("<|im_start|>system\nYou are tiny.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Yo.<|im_end|>", True),
    ],
    "chatml": [
        ("<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Yo.<|im_end|>", True),
    ],
    "alpaca": [
        ("Below is an instruction that describes a task. Write a response that appropriately completes the "
         "request.\n\n### Instruction:\nHi?\n\n### Response:\n", False),
        ("Yo.<|im_end|>", True),
    ],
}


@pytest.mark.parametrize("template", ["model", "chatml", "alpaca"])
def test_prompt_masking_matches_golden_table(template):
    tokenizer = build_tiny_tokenizer()
    install_template(tokenizer, resolve_template(template, tokenizer))
    ids, labels = render(tokenizer, EXAMPLE)
    assert runs(tokenizer, ids, labels) == GOLDEN[template]
    # Trained labels are the ids themselves (no shift here; the loss shifts).
    assert all(lab in (IGNORE, tok) for tok, lab in zip(ids, labels))


@pytest.mark.parametrize("template", ["model", "chatml", "alpaca"])
def test_train_on_prompt_trains_everything(template):
    tokenizer = build_tiny_tokenizer()
    install_template(tokenizer, resolve_template(template, tokenizer))
    ids, labels = render(tokenizer, EXAMPLE, train_on_prompt=True)
    assert labels == ids


def test_eos_is_a_trained_label_when_pad_equals_eos(tiny_tokenizer):
    install_template(tiny_tokenizer, TINY_TEMPLATE)
    assert tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id
    ids, labels = render(tiny_tokenizer, EXAMPLE)
    assert ids[-1] == tiny_tokenizer.eos_token_id
    assert labels[-1] == tiny_tokenizer.eos_token_id
    # and collation pads with the same id without masking the real EOS
    from tunesmith.data.token_store import Tokenized
    from tunesmith.data.batching import collate

    short, long_ = Tokenized(ids, labels), Tokenized(ids + ids, labels + labels)
    batch = collate([short, long_], tiny_tokenizer.pad_token_id)
    assert batch["labels"][0, len(ids) - 1] == tiny_tokenizer.eos_token_id
    assert (batch["labels"][0, len(ids):] == IGNORE).all()


def test_eos_appended_when_template_does_not_emit_it():
    template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    tokenizer = build_tiny_tokenizer(template)
    ids, labels = render(tokenizer, EXAMPLE)
    assert runs(tokenizer, ids, labels)[-1] == ("Yo.\n<|im_end|>", True)


@pytest.mark.parametrize("template", ["model", "chatml", "alpaca"])
def test_train_and_chat_render_the_same_prompt_ids(template):
    tokenizer = build_tiny_tokenizer()
    install_template(tokenizer, resolve_template(template, tokenizer))
    convo = Example(messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"},
        {"role": "assistant", "content": "1"}, {"role": "user", "content": "two  words"},
        {"role": "assistant", "content": " 2 "},
    ])
    ids, labels = render(tokenizer, convo)
    prompt = encode_prompt(tokenizer, convo.prompt_messages)
    assert ids[: len(prompt)] == prompt
    assert labels[len(prompt):] == ids[len(prompt):]
    # multi-turn: both assistant replies are trained, nothing else
    trained = [text for text, is_trained in runs(tokenizer, ids, labels) if is_trained]
    assert [t.replace("<|im_end|>", "").strip() for t in trained] == ["1", "2"]


def test_unknown_template_is_a_config_error(tiny_tokenizer):
    with pytest.raises(ConfigError, match="unknown template 'vicuna'"):
        resolve_template("vicuna", tiny_tokenizer)


def test_show_marks_trained_tokens(tiny_tokenizer):
    install_template(tiny_tokenizer, TINY_TEMPLATE)
    ids, labels = render(tiny_tokenizer, EXAMPLE)
    from tunesmith.data.token_store import Tokenized

    text = show_examples(tiny_tokenizer, [Tokenized(ids, labels)], 1)
    assert "[Y]|[o]|[.]|[<|im_end|>]" in text
    assert "[H]" not in text


# ----------------------------------------------------------------------------- formats


def test_formats_and_column_mapping(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    fmt, pairs = load_examples(str(write_jsonl(tmp_path / "m.jsonl", rows)), DataConfig(), None, [])
    assert fmt == "messages" and pairs[0][1].reference == "b"

    rows = [{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "a"},
                               {"from": "gpt", "value": "b"}]}]
    fmt, pairs = load_examples(str(write_jsonl(tmp_path / "s.jsonl", rows)), DataConfig(), None, [])
    assert fmt == "sharegpt"
    assert [m["role"] for m in pairs[0][1].messages] == ["system", "user", "assistant"]

    rows = [{"question": "q", "context": "c", "answer": "x"}]
    cfg = DataConfig(columns={"instruction": "question", "input": "context", "output": "answer"})
    fmt, pairs = load_examples(str(write_jsonl(tmp_path / "c.jsonl", rows)), cfg, None, [])
    assert fmt == "alpaca"
    assert pairs[0][1].messages == [{"role": "user", "content": "q\n\nc"}, {"role": "assistant", "content": "x"}]


def test_json_array_file_and_system_prompt(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(alpaca_rows(3)), encoding="utf-8")
    _, pairs = load_examples(str(path), DataConfig(system_prompt="Be loud."), None, [])
    assert len(pairs) == 3
    assert pairs[0][1].messages[0] == {"role": "system", "content": "Be loud."}


# ----------------------------------------------------------------------------- bad input

BAD_INPUTS = [
    # (file name, file bytes, expected message pieces)
    ("bad.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n',
     ["bad.jsonl:2", "invalid JSON"]),
    ("bad.json", b'[{"instruction": "a", "output": "b"},\n {"instruction": ]', ["bad.json:2", "invalid JSON"]),
    ("notobj.jsonl", b'{"instruction": "a", "output": "b"}\n["a", "b"]\n', ["notobj.jsonl:2", "expected a JSON object"]),
    ("notobj.json", b'[{"instruction": "a", "output": "b"}, 7]', ["notobj.json: row 2", "expected a JSON object"]),
    ("missing.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', ["missing.jsonl:2", "'output'"]),
    ("type.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 3}\n',
     ["type.jsonl:2", "'output' must be a string, got int"]),
    ("empty_out.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "  "}\n',
     ["empty_out.jsonl:2", "'output' is empty"]),
    ("latin1.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n',
     ["latin1.jsonl:2", "not valid UTF-8"]),
    ("empty.jsonl", b"  \n\n", ["empty.jsonl", "the file is empty"]),
    ("chat.jsonl", b'{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}\n',
     ["chat.jsonl:1", "messages[1]", "'role'"]),
    ("chat_last.jsonl", b'{"messages": [{"role": "user", "content": "a"}]}\n', ["chat_last.jsonl:1", "last message"]),
]


@pytest.mark.parametrize("name,content,pieces", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_file_line_and_field(tmp_path, name, content, pieces):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_examples(str(path), DataConfig(), None, [])
    for piece in pieces:
        assert piece in str(err.value)


SKIPPABLE = [b for b in BAD_INPUTS if b[0].endswith(".jsonl") and b[0] != "empty.jsonl"]


@pytest.mark.parametrize("name,content,pieces", SKIPPABLE, ids=[b[0] for b in SKIPPABLE])
def test_bad_rows_can_be_skipped_and_counted(tmp_path, name, content, pieces):
    path = tmp_path / name
    path.write_bytes(content + b'{"instruction": "x", "output": "y"}\n')
    if name.startswith("chat"):
        path.write_bytes(content + b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    skipped: list[str] = []
    _, pairs = load_examples(str(path), DataConfig(on_bad_row="skip"), None, skipped)
    assert len(skipped) == 1 and pieces[0] in skipped[0]
    # Exactly the good rows survive, in order: the valid first line (when the bad row is line 2) and the
    # valid row appended after the bad one; the bad row itself is not among them.
    bad_line = int(pieces[0].split(":")[1])
    good_lines = [n for n in range(1, bad_line + 2) if n != bad_line]
    assert [row.where for row, _ in pairs] == [f"{path}:{n}" for n in good_lines]
    assert len(pairs) == (2 if bad_line == 2 else 1)
    if name.startswith("chat"):
        assert [ex.reference for _, ex in pairs] == ["b"]
    else:
        assert [ex.reference for _, ex in pairs] == ["b", "y"]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_rows(tmp_path / "nope.jsonl")


def test_undetectable_format_suggests_columns(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"q": "a", "a": "b"}])
    with pytest.raises(DataError, match="data.columns"):
        load_examples(str(path), DataConfig(), None, [])


# ----------------------------------------------------------------------------- split and report


def test_split_is_deterministic_per_seed_and_disjoint():
    items = list(range(100))
    a = seeded_split(items, 0.1, 20, seed=1)
    b = seeded_split(items, 0.1, 20, seed=1)
    c = seeded_split(items, 0.1, 20, seed=2)
    assert a == b and a != c
    train, val, test = a
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert set(train) | set(val) | set(test) == set(items)
    assert not (set(train) & set(val)) and not (set(train) & set(test)) and not (set(val) & set(test))


def test_split_too_large_is_a_config_error():
    with pytest.raises(ConfigError, match="no training rows"):
        seeded_split(list(range(10)), 5, 5, seed=0)


def test_overlong_rows_dropped_or_truncated_and_reported(tiny_tokenizer):
    install_template(tiny_tokenizer, CHATML)
    examples = [Example(messages=[{"role": "user", "content": "x" * n}, {"role": "assistant", "content": "ok"}])
                for n in (5, 500)]
    kept, report = tokenize_split("train", examples, tiny_tokenizer, DataConfig(max_seq_length=64, overlong="drop"))
    assert len(kept) == 1 and report.dropped == {"longer than max_seq_length 64": 1}
    # Truncating the long row cuts off its reply, so it has nothing left to train and is dropped with that reason.
    kept, report = tokenize_split("train", examples, tiny_tokenizer, DataConfig(max_seq_length=64, overlong="truncate"))
    assert report.truncated == 1 and report.dropped == {"no trainable tokens": 1}
    assert max(len(k.input_ids) for k in kept) <= 64


# The tiny byte-level tokenizer, hand-decoded: <|im_start|> 1, <|im_end|> (EOS) 2, "\n" 201, " " 223, and a printable
# ASCII character c is ord(c) - 30 (the 94 of them come first in the sorted byte alphabet, after the 3 specials).
PROMPT_IDS = [1, *(ord(c) - 30 for c in "user"), 201, *(ord(c) - 30 for c in "Hi?"), 2, 201,
              1, *(ord(c) - 30 for c in "assistant"), 201]  # <|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n
HELLO_IDS = [42, 71, 78, 78, 81, 223, 86, 74, 71, 84, 71, 16]  # "Hello there."


def test_a_truncated_row_keeps_its_cut_reply_trained_without_an_eos(tiny_tokenizer):
    """Policy (data.overlong: truncate): the first max_seq_length tokens are kept; the reply that was cut keeps
    its trained tokens up to the cut and gets no EOS, neither as a token nor as a label, so the model is never
    taught to stop in mid-answer. The report counts the row as truncated (and kept)."""
    install_template(tiny_tokenizer, CHATML)
    assert len(PROMPT_IDS) == 22 and tiny_tokenizer.decode(PROMPT_IDS + HELLO_IDS) == (
        "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nHello there.")
    eos = tiny_tokenizer.eos_token_id
    example = Example(messages=[{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello there."}])
    ids, labels = render(tiny_tokenizer, example)  # 35 tokens: the whole reply is trained, EOS last
    assert ids == PROMPT_IDS + HELLO_IDS + [eos] and labels == [IGNORE] * 22 + HELLO_IDS + [eos]

    kept, report = tokenize_split("train", [example], tiny_tokenizer, DataConfig(max_seq_length=26, overlong="truncate"))
    assert [(k.input_ids, k.labels) for k in kept] == [(PROMPT_IDS + [42, 71, 78, 78], [IGNORE] * 22 + [42, 71, 78, 78])]
    assert eos not in kept[0].labels[22:]  # "Hell" is trained, and nothing tells the model to stop there
    assert (report.truncated, report.kept, dict(report.dropped), report.trained_tokens) == (1, 1, {}, 4)

    # Cut just before the EOS: every reply token is trained, the stop is not (the row still was cut).
    kept, report = tokenize_split("train", [example], tiny_tokenizer, DataConfig(max_seq_length=34, overlong="truncate"))
    assert kept[0].labels == [IGNORE] * 22 + HELLO_IDS and eos not in kept[0].input_ids[22:]
    assert report.truncated == 1
    # A row that fits exactly is not truncated and keeps its trained EOS.
    kept, report = tokenize_split("train", [example], tiny_tokenizer, DataConfig(max_seq_length=35, overlong="truncate"))
    assert kept[0].labels[-1] == eos and report.truncated == 0


def test_a_truncated_conversation_keeps_the_eos_of_replies_that_ended_before_the_cut(tiny_tokenizer):
    install_template(tiny_tokenizer, CHATML)
    eos = tiny_tokenizer.eos_token_id
    convo = Example(messages=[{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yo."},
                              {"role": "user", "content": "More"}, {"role": "assistant", "content": "Hello there."}])
    kept, report = tokenize_split("train", [convo], tiny_tokenizer, DataConfig(max_seq_length=54, overlong="truncate"))
    yo = [59, 81, 16, eos]  # "Yo." and its EOS: a complete reply, still trained to stop
    second_prompt = [201, 1, *(ord(c) - 30 for c in "user"), 201, *(ord(c) - 30 for c in "More"), 2, 201,
                     1, *(ord(c) - 30 for c in "assistant"), 201]
    assert kept[0].input_ids == PROMPT_IDS + yo + second_prompt + [42, 71, 78, 78]
    assert kept[0].labels == [IGNORE] * 22 + yo + [IGNORE] * len(second_prompt) + [42, 71, 78, 78]
    assert [lab for lab in kept[0].labels if lab == eos] == [eos]  # one trained EOS: the first reply's
    assert report.truncated == 1 and report.trained_tokens == 8


def test_the_data_report_counts_truncated_rows_and_the_store_keeps_them_cut(tmp_path, tiny_tokenizer):
    install_template(tiny_tokenizer, CHATML)
    rows = [{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": answer}]}
            for answer in ("Hello there.", "Yo.", "Hello there.", "ok")]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    data = prepare_data(DataConfig(train_file=str(path), val_size=0, test_size=0, max_seq_length=26,
                                   overlong="truncate"), tiny_tokenizer)
    train = data.report.to_dict()["splits"]["train"]
    assert (train["rows"], train["kept"], train["truncated"], train["dropped"]) == (4, 4, 2, {})
    assert "truncated     2" in data.report.to_text()
    stored = sorted((list(t.input_ids), list(t.labels)) for t in data.train)
    cut = (PROMPT_IDS + [42, 71, 78, 78], [IGNORE] * 22 + [42, 71, 78, 78])
    assert stored.count(cut) == 2  # both long rows, as kept in the memory-mapped token store
    assert sorted(len(ids) for ids, _ in stored) == [25, 26, 26, 26]  # "ok" + EOS: 25; "Yo." + EOS: exactly 26
    assert sum(ids[-1] == tiny_tokenizer.eos_token_id for ids, _ in stored) == 2  # the two short rows end in EOS


def test_prepare_report_counts(tmp_path, tiny_tokenizer):
    install_template(tiny_tokenizer, ALPACA)
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in alpaca_rows(30)) + b"not json\n")
    data = prepare_data(DataConfig(train_file=str(path), val_size=5, test_size=0.2, on_bad_row="skip"), tiny_tokenizer)
    report = data.report.to_dict()
    assert report["bad_rows_skipped"] == 1
    assert {k: v["rows"] for k, v in report["splits"].items()} == {"train": 19, "val": 5, "test": 6}
    assert report["splits"]["train"]["trained_tokens"] == sum(t.n_targets for t in data.train)
    assert "bad rows skipped: 1" in data.report.to_text()
