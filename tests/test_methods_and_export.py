"""Methods (build, trainable parameters, save/load, merge) and export on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_model
from tunesmith.config import MethodConfig
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.methods import get_method, parameter_counts


def perturb(model, names_containing: str = "") -> None:
    """Pretend training happened: move every trainable parameter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and names_containing in name:
                p.add_(torch.randn_like(p) * 0.05)


def logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 99, 3, 42, 7]])


@pytest.mark.parametrize("cfg,expected_trainable", [
    (MethodConfig(name="full"), "all"),
    (MethodConfig(name="freeze", trainable_layers=1), "layers.1."),
    (MethodConfig(name="freeze", trainable_layers=0, trainable_modules=["lm_head"]), "lm_head"),
    (MethodConfig(name="lora", r=2, alpha=4, target_modules=["q_proj", "v_proj"]), "lora_"),
])
def test_method_roundtrip(tmp_path, cfg, expected_trainable):
    method = get_method(cfg)
    model = method.build(build_tiny_model(300))
    names = [n for n, _ in method.trainable_parameters(model)]
    trainable, total = parameter_counts(model)
    if expected_trainable == "all":
        assert trainable == total
    else:
        assert names and all(expected_trainable in n for n in names)
        assert 0 < trainable < total
    perturb(model)
    want = logits(model, IDS)

    method.save(model, tmp_path / "saved")
    assert list((tmp_path / "saved").glob("*.safetensors"))
    reloaded = method.load(lambda: build_tiny_model(300), tmp_path / "saved")
    torch.testing.assert_close(logits(reloaded, IDS), want)

    merged = method.merge(reloaded)
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(logits(merged, IDS), want, rtol=1e-4, atol=1e-5)


def test_lora_all_linear_targets_every_projection():
    method = get_method(MethodConfig(name="lora", target_modules="all-linear"))
    model = method.build(build_tiny_model(300))
    wrapped = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in method.trainable_parameters(model) if "lora_A" in n}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_freeze_errors_are_clear():
    with pytest.raises(ConfigError, match="has 2 layers"):
        get_method(MethodConfig(name="freeze", trainable_layers=5)).build(build_tiny_model(300))
    with pytest.raises(ConfigError, match="no parameter name contains"):
        get_method(MethodConfig(name="freeze", trainable_layers=0, trainable_modules=["nope"])).build(build_tiny_model(300))


# ----------------------------------------------------------------------------- export and inference


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    """A short LoRA run on the tiny model (shared by the export tests)."""
    from conftest import alpaca_rows, write_jsonl
    from tunesmith.config import config_from_dict
    from tunesmith.training.loop import train

    tmp = tmp_path_factory.mktemp("run")
    data = write_jsonl(tmp / "rows.jsonl", alpaca_rows(40))
    cfg = config_from_dict({
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train_file": str(data), "val_size": 4, "test_size": 6, "template": "chatml"},
        "method": {"name": "lora", "r": 4, "alpha": 16},
        "train": {"max_steps": 8, "lr": 2e-2, "micro_batch_size": 8, "precision": "fp32"},
        "output": {"dir": str(tmp / "run")},
    })
    return train(cfg, log=lambda *_: None)


def greedy(model, tokenizer, ids: list[int], n: int = 12) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


def test_merged_export_loads_with_plain_transformers_and_matches(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data.templates import CHATML, encode_prompt
    from tunesmith.export import export_run
    from tunesmith.run_dir import load_for_inference

    export_run(trained_run, "merged", tmp_path / "merged")
    out = tmp_path / "merged"
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2

    plain = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHATML  # the template the run trained with travels with the weights
    loaded = load_for_inference(trained_run)
    prompt = encode_prompt(loaded.tokenizer, [{"role": "user", "content": "Shout this.\n\ncat ok"}])
    plain.eval()
    assert greedy(plain, tokenizer, prompt) == greedy(loaded.model, loaded.tokenizer, prompt)
    # and the plain tokenizer renders the same prompt text as training did
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Shout this.\n\ncat ok"}], tokenize=False,
                                         add_generation_prompt=True)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == prompt


def test_adapter_export_loads_with_plain_peft(trained_run, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.export import export_run
    from tunesmith.run_dir import load_for_inference

    export_run(trained_run, "adapter", tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    ids = torch.tensor([[5, 17, 99, 3]])
    torch.testing.assert_close(logits(model, ids), logits(load_for_inference(trained_run).model, ids))


def test_export_never_overwrites(trained_run, tmp_path):
    from tunesmith.export import export_run

    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(TunesmithError, match="not empty"):
        export_run(trained_run, "merged", out)
    assert (out / "mine.txt").read_text() == "keep"


def test_eval_reports_loss_perplexity_and_exact_match(trained_run):
    from tunesmith.evaluate import evaluate_file
    from tunesmith.run_dir import load_for_inference

    result = evaluate_file(load_for_inference(trained_run), trained_run / "data" / "test.jsonl", max_new_tokens=8)
    assert result["n"] == 6
    assert result["perplexity"] == pytest.approx(2.718281828 ** result["loss"], rel=1e-6)
    assert 0.0 <= result["exact_match"] <= 1.0
    assert len(result["samples"]) == 6


def test_eval_batches_rows_by_the_runs_eval_batch_size(trained_run, monkeypatch):
    import tunesmith.evaluate as evaluate
    from tunesmith.run_dir import load_for_inference

    sizes = []
    real = evaluate.eval_batches
    monkeypatch.setattr(evaluate, "eval_batches", lambda data, size, pad: sizes.append(size) or real(data, size, pad))
    loaded = load_for_inference(trained_run)
    evaluate.evaluate_file(loaded, trained_run / "data" / "test.jsonl", max_new_tokens=2)
    evaluate.evaluate_file(loaded, trained_run / "data" / "test.jsonl", max_new_tokens=2, batch_size=3)
    assert sizes == [loaded.config.eval.batch_size, 3]


def test_generation_stops_at_eos(trained_run):
    from tunesmith.generate import Sampling, generate_batch
    from tunesmith.run_dir import load_for_inference

    loaded = load_for_inference(trained_run)
    # Force EOS to be the only choice: every reply must be empty, not run to max_new_tokens.
    with torch.no_grad():
        head = loaded.model.get_base_model().lm_head
        head.bias = torch.nn.Parameter(torch.full((head.out_features,), -1e4))
        head.bias[loaded.tokenizer.eos_token_id] = 1e4
    replies = generate_batch(loaded.model, loaded.tokenizer, [[{"role": "user", "content": "hi"}]] * 2,
                             Sampling(max_new_tokens=10))
    assert replies == ["", ""]


def test_sampling_settings_reach_generate():
    from tunesmith.generate import Sampling

    class Tok:
        eos_token_id, pad_token_id = 2, 2

    greedy_kwargs = Sampling().generate_kwargs(Tok())
    assert greedy_kwargs["do_sample"] is False
    kw = Sampling(max_new_tokens=7, temperature=0.8, top_p=0.9, top_k=20, repetition_penalty=1.2).generate_kwargs(Tok())
    assert kw == {**kw, "do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 20,
                  "repetition_penalty": 1.2, "max_new_tokens": 7, "eos_token_id": 2}
