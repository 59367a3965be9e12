"""GGUF and Ollama export, checked in a real llama.cpp (node-llama-cpp): the f16 file's greedy output is the
merged model's, token for token; q8_0's agreement is reported; the metadata carries the run's tokenizer,
special tokens and chat template; what cannot be written is refused with the alternative named."""

from __future__ import annotations

import pytest
import torch

import real_llama_cpp as llama_cpp
from conftest import alpaca_rows, build_tiny_model, build_tiny_tokenizer, write_jsonl
from tunesmith.errors import ConfigError
from tunesmith.training.loop import train


def merged_tokenizer():
    """The tests' byte-level tokenizer with a few merges (a GGUF BPE vocabulary must have some) and the
    GPT-2 split, so llama.cpp's 'gpt-2' pre-tokenizer splits text as it does."""
    return build_tiny_tokenizer(merges=(("c", "a"), ("a", "t"), ("Ġ", "c")), split_words=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, monkeypatch_module):
    from tunesmith.config.schema import config_from_dict
    from tunesmith.export import gguf

    root = tmp_path_factory.mktemp("gguf")
    tok = merged_tokenizer()
    model = build_tiny_model(len(tok))
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tok.eos_token_id
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    monkeypatch_module.setitem(gguf.PRE_TOKENIZERS, ("llama", len(tok)), "gpt-2")
    cfg = config_from_dict({
        "model": {"name_or_path": str(root / "base")},
        "data": {"train_file": str(write_jsonl(root / "d.jsonl", alpaca_rows(40))), "val_size": 0, "test_size": 4},
        "method": {"name": "lora", "r": 4, "alpha": 8}, "output": {"dir": str(root / "run")},
        "train": {"max_steps": 4, "lr": 1e-2, "micro_batch_size": 4, "precision": "fp32"}}, "gguf test")
    return train(cfg, log=lambda *_: None)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


PROMPTS = [[1, 40, 50, 60, 70], [1, 80, 90, 100], [5, 6, 7, 8, 9, 10, 11], [1, 200, 150, 33, 2, 1, 77]]


def merged_greedy(run, n: int) -> tuple[list[list[int]], object]:
    from tunesmith.inference.loading import load_for_inference

    loaded = load_for_inference(run)
    merged = loaded.method.merge(loaded.model).eval()
    out = []
    for p in PROMPTS:
        ids = merged.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False,
                              eos_token_id=loaded.tokenizer.eos_token_id, pad_token_id=loaded.tokenizer.pad_token_id)
        out.append(llama_cpp.without_eos(ids[0, len(p):].tolist(), loaded.tokenizer.eos_token_id))
    return out, loaded.tokenizer


def test_f16_gguf_generates_what_the_merged_model_does_in_llama_cpp(tiny_run, tmp_path):
    from gguf import GGUFReader

    from tunesmith.export import export_run

    export_run(tiny_run, "gguf", tmp_path / "m.gguf", quant="f16")
    want, tok = merged_greedy(tiny_run, 12)
    got = llama_cpp.greedy(tmp_path / "m.gguf", PROMPTS, 12, tok.eos_token_id, texts=["the cat sat <|im_end|>"])
    assert [llama_cpp.without_eos(g, tok.eos_token_id) for g in got["generated"]] == want
    assert got["tokenized"][0] == tok("the cat sat <|im_end|>", add_special_tokens=False)["input_ids"]

    meta = {k: f.contents() for k, f in GGUFReader(str(tmp_path / "m.gguf")).fields.items()
            if not k.startswith("tokenizer.ggml.token") and not k.startswith("tokenizer.ggml.merges")}
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert (meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.padding_token_id"]) == (tok.eos_token_id,) * 2
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.pre"] == "gpt-2"


def test_q8_0_gguf_runs_and_its_agreement_is_reported(tiny_run, tmp_path, capsys):
    from tunesmith.export import export_run

    export_run(tiny_run, "gguf", tmp_path / "q8.gguf", quant="q8_0")
    export_run(tiny_run, "gguf", tmp_path / "f32.gguf", quant="f32")
    assert (tmp_path / "q8.gguf").stat().st_size < 0.6 * (tmp_path / "f32.gguf").stat().st_size
    want, tok = merged_greedy(tiny_run, 12)
    got = [llama_cpp.without_eos(g, tok.eos_token_id)
           for g in llama_cpp.greedy(tmp_path / "q8.gguf", PROMPTS, 12, tok.eos_token_id)["generated"]]
    same = sum(a == b for w, g in zip(want, got) for a, b in zip(w, g))
    total = sum(len(w) for w in want)
    with capsys.disabled():
        print(f"\nq8_0 GGUF: {same} of {total} greedy tokens as the merged model ({same / total:.0%})")
    assert all(len(g) > 0 for g in got)


def test_ollama_export_writes_the_gguf_and_a_modelfile(tiny_run, tmp_path):
    from tunesmith.export import export_run

    export_run(tiny_run, "ollama", tmp_path / "ollama")
    text = (tmp_path / "ollama" / "Modelfile").read_text()
    assert text.startswith(f"FROM ./{tiny_run.name}.gguf") and (tmp_path / "ollama" / f"{tiny_run.name}.gguf").exists()
    assert 'PARAMETER stop "<|im_end|>"' in text and "{{ .Content }}<|im_end|>" in text
    assert 'SYSTEM """You are tiny."""' in text  # the template's own default system message


def test_what_cannot_be_written_is_refused_with_the_way_out(tiny_run, tmp_path, make_config):
    from tunesmith.errors import TunesmithError
    from tunesmith.export import export_run

    with pytest.raises(ConfigError, match="llama-quantize"):
        export_run(tiny_run, "gguf", tmp_path / "k.gguf", quant="q4_k_m")
    (tmp_path / "there.gguf").write_text("keep me")
    with pytest.raises(TunesmithError, match="exists"):
        export_run(tiny_run, "gguf", tmp_path / "there.gguf")
    assert (tmp_path / "there.gguf").read_text() == "keep me"
    prompt_run = train(make_config(method={"name": "prompt", "num_virtual_tokens": 4}, train={"max_steps": 1},
                                   output={"dir": str(tmp_path / "p")}), log=lambda *_: None)
    with pytest.raises(ConfigError, match="--format adapter"):
        export_run(prompt_run, "gguf", tmp_path / "p.gguf")
