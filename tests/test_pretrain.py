"""Continued pre-training: documents (text rows, .txt/.md files, folders of them) cut into blocks of
max_seq_length with EOS between documents, nothing cut short or dropped, attention kept within each document
unless stage.cross_document_attention, and a run that resumes exactly and lowers the text's perplexity."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from test_faults import assert_same_run
from tunesmith.config.schema import DataConfig
from tunesmith.data.formats import Example
from tunesmith.data.pipeline import BlockCutter, SplitReport
from tunesmith.data.templates import IGNORE
from tunesmith.data.token_store import TokenStore
from tunesmith.errors import DataError, TrainingStopped
from tunesmith.training.loop import train


def quiet(*_):
    pass


DOCS = ["the cat sat on the mat. " * 2, "rivers run to the sea", "seven blue lamps " * 4]


def doc_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=True)["input_ids"] + [tok.eos_token_id]


@pytest.mark.parametrize("isolated", [True, False])
def test_documents_are_cut_into_blocks_with_nothing_lost(tmp_path, isolated):
    tok = build_tiny_tokenizer()
    report = SplitReport("train")
    store = TokenStore(tmp_path, "train")
    cutter = BlockCutter(32, store, report, isolated)
    for text in DOCS:
        cutter.add(Example(text=text), tok)
    cutter.close()
    store.close()
    blocks = [store[i] for i in range(len(store))]
    whole = [i for text in DOCS for i in doc_ids(tok, text)]
    assert [len(b) for b in blocks] == [32] * (len(whole) // 32) + ([len(whole) % 32] if len(whole) % 32 else [])
    assert [int(i) for b in blocks for i in b.input_ids] == whole  # every token, in order, EOS after each document
    boundaries = [sum(len(doc_ids(tok, t)) for t in DOCS[:k]) for k in (1, 2)]
    found = [k * 32 + s for k, b in enumerate(blocks) for s in b.starts]
    assert found == ([b for b in boundaries if b % 32] if isolated else [])
    for k, b in enumerate(blocks):
        for pos, label in enumerate(b.labels):
            masked = isolated and (k * 32 + pos) in boundaries
            assert (int(label) == IGNORE) == masked, (k, pos)
    assert (report.rows, report.kept, report.blocks) == (3, len(blocks), True)
    assert report.trained_tokens == sum(b.n_targets for b in blocks)
    assert report.to_dict()["documents"] == 3 and report.to_dict()["tokens"] == len(whole)


def test_a_block_of_two_documents_scores_each_as_if_alone(make_config):
    """The packed row restarts positions at the second document and the attention keeps them apart, so the
    block's summed loss is the two documents' own losses; letting them attend across (the control) changes it."""
    from tunesmith.models.attention import use_packed_attention
    from tunesmith.stages import get_stage
    from tunesmith.stages.tokens import token_loss_sum

    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok))
    assert use_packed_attention(model)
    first, second = doc_ids(tok, DOCS[0]), doc_ids(tok, DOCS[1])
    sums = {}
    for joined in (False, True):
        report = SplitReport("train")
        blocks: list = []
        cutter = BlockCutter(len(first) + len(second), blocks, report, isolated=not joined)
        for text in DOCS[:2]:
            cutter.add(Example(text=text), tok)
        cutter.close()
        stage = get_stage(make_config([{"text": "x"}], stage={"name": "pretrain", "cross_document_attention": joined}))
        [batch] = stage.batches(blocks, 4, tok.pad_token_id, packed=False)
        with torch.no_grad():
            sums[joined] = token_loss_sum(model, batch)
    alone = []
    for ids in (first, second):
        batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([ids]),
                 "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        with torch.no_grad():
            alone.append(token_loss_sum(model, batch))
    assert sums[False][1] == alone[0][1] + alone[1][1] == len(first) + len(second) - 2
    assert float(sums[False][0]) == pytest.approx(float(alone[0][0] + alone[1][0]), rel=1e-5)
    assert sums[True][1] == len(first) + len(second) - 1  # the second document's first token is a target too
    assert abs(float(sums[True][0]) - float(alone[0][0] + alone[1][0])) > 1e-3


def test_text_files_and_folders_are_documents(tmp_path):
    from tunesmith.data.reading import iter_rows

    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.md").write_text("# Two\nsecond", encoding="utf-8")
    (folder / "a.txt").write_text("first", encoding="utf-8")
    (folder / "sub" / "c.txt").write_text("third", encoding="utf-8")
    (folder / "skip.json").write_text("{}", encoding="utf-8")
    rows = list(iter_rows(folder))
    assert [r.data["text"] for r in rows] == ["first", "# Two\nsecond", "third"]
    assert rows[0].where.endswith("a.txt")
    assert [r.data["text"] for r in iter_rows(folder / "b.md")] == ["# Two\nsecond"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is a folder with no .txt/.md"):
        list(iter_rows(tmp_path / "empty"))
    (folder / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match=r"bad.txt:1: not valid UTF-8"):
        list(iter_rows(folder))


def corpus(tmp_path, n: int = 30):
    folder = tmp_path / "corpus"
    folder.mkdir(exist_ok=True)
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    for i in range(n):
        text = " ".join(words[(i + k) % 5] for k in range(8 + i % 7)) + "."
        (folder / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return folder


def pretrain_config(make_config, tmp_path, name, folder, **stage):
    cfg = make_config([{"text": "x"}], stage={"name": "pretrain", **stage}, output={"dir": str(tmp_path / name)},
                      train={"max_steps": 8, "lr": 1e-2, "micro_batch_size": 2, "grad_accum_steps": 2,
                             "lr_scheduler": "constant"},
                      eval={"interval": 4}, checkpoint={"interval": 3, "keep_last": 2})
    cfg.data.train_file = str(folder)
    cfg.data.max_seq_length = 48
    return cfg


@pytest.mark.parametrize("stage", [{}, {"cross_document_attention": True}])
def test_pretraining_a_folder_resumes_exactly_and_lowers_perplexity(make_config, tmp_path, stage):
    folder = corpus(tmp_path)
    whole = train(pretrain_config(make_config, tmp_path, "whole", folder, **stage), log=quiet)
    report = json.loads((whole / "data" / "data_report.json").read_text())
    assert report["splits"]["train"]["documents"] == 22 and report["splits"]["train"]["blocks"] > 0
    rows = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    ppl = [r["val_perplexity"] for r in rows if "val_perplexity" in r]
    assert ppl[-1] < 0.8 * ppl[0]
    cfg = pretrain_config(make_config, tmp_path, "split", folder, **stage)
    with pytest.raises(TrainingStopped):
        train(cfg, log=quiet, stop_at_step=5)
    train(cfg, log=quiet, resume=True)
    assert_same_run(whole, tmp_path / "split")


def test_pretrain_refuses_chat_rows(make_config):
    from tunesmith.errors import TunesmithError

    with pytest.raises(TunesmithError, match="stage pretrain trains on text rows, and .* holds alpaca rows"):
        train(make_config(stage={"name": "pretrain"}), log=quiet)
