"""Methods (build, trainable parameters, save/load, merge) and export on the tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import build_tiny_model
from tunesmith.config.schema import MethodConfig
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
def other_eos_base(tmp_path_factory):
    """A tiny base whose own config and generation config name another EOS (<|endoftext|>, id 0) than the
    tokenizer the run trains with (<|im_end|>, id 2), as base checkpoints often do: whatever generates or
    exports must use the run's EOS itself."""
    from conftest import build_tiny_tokenizer

    path = tmp_path_factory.mktemp("other-eos-base")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer))
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.unk_token_id
    model.generation_config.pad_token_id = tokenizer.unk_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 0 != tokenizer.eos_token_id
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, other_eos_base):
    """A short LoRA run on the tiny model (shared by the export tests)."""
    from conftest import alpaca_rows, write_jsonl
    from tunesmith.config.schema import config_from_dict
    from tunesmith.training.loop import train

    tmp = tmp_path_factory.mktemp("run")
    data = write_jsonl(tmp / "rows.jsonl", alpaca_rows(40))
    cfg = config_from_dict({
        "model": {"name_or_path": str(other_eos_base)},
        "data": {"train_file": str(data), "val_size": 4, "test_size": 6, "template": "chatml"},
        "method": {"name": "lora", "r": 4, "alpha": 16},
        "train": {"max_steps": 8, "lr": 2e-2, "micro_batch_size": 8, "precision": "fp32"},
        "output": {"dir": str(tmp / "run")},
    })
    return train(cfg, log=lambda *_: None)


def scripted_reply(model, tokenizer, eos_id: int) -> None:
    """Make greedy decoding after a generation prompt (which ends in "\n") produce "a", "b", EOS and then, only
    if generation goes on past EOS, "c" forever: a bias on the next token given the previous one."""
    a, b, c = tokenizer.convert_tokens_to_ids(["a", "b", "c"])
    (newline,) = tokenizer("\n", add_special_tokens=False)["input_ids"]
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    causal.generation_config.sequence_bias = {(newline, a): 1e4, (a, b): 1e4, (b, eos_id): 1e4, (eos_id, c): 1e4,
                                              (c, c): 1e4}


def test_merged_export_loads_with_plain_transformers_and_matches(trained_run, tmp_path, other_eos_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data.templates import CHATML, encode_prompt
    from tunesmith.export import export_run
    from tunesmith.inference.loading import load_for_inference

    export_run(trained_run, "merged", tmp_path / "merged")
    out = tmp_path / "merged"
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    # the base's generation config says EOS is 0; the export must carry the run's EOS (<|im_end|>, 2) instead
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2

    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHATML  # the template the run trained with travels with the weights
    loaded = load_for_inference(trained_run)
    prompt = encode_prompt(loaded.tokenizer, [{"role": "user", "content": "Shout this.\n\ncat ok"}])
    ids = torch.tensor([prompt])
    # merged weights give the adapter model's logits, up to float rounding of W + BA (values here are O(1))
    want = logits(loaded.model, ids)
    torch.testing.assert_close(logits(plain, ids), want, rtol=1e-4, atol=1e-4)
    base = logits(AutoModelForCausalLM.from_pretrained(other_eos_base), ids)
    assert (base - want).abs().max() > 0.1  # non-vacuous: the trained adapter moved the logits far beyond that
    # plain `generate` on the export, with no eos passed, stops at the run's EOS
    scripted_reply(plain, tokenizer, tokenizer.eos_token_id)
    with torch.no_grad():
        reply = plain.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert tokenizer.convert_ids_to_tokens(reply[0, len(prompt):].tolist()) == ["a", "b", "<|im_end|>"]
    # and the plain tokenizer renders the same prompt text as training did
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Shout this.\n\ncat ok"}], tokenize=False,
                                         add_generation_prompt=True)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == prompt


def test_adapter_export_loads_with_plain_peft(trained_run, tmp_path, other_eos_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.export import export_run
    from tunesmith.inference.loading import load_for_inference

    export_run(trained_run, "adapter", tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(other_eos_base), tmp_path / "adapter")
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


def test_eval_loss_is_the_token_mean_that_plain_transformers_computes(trained_run, other_eos_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.evaluation.evaluate import evaluate_file
    from tunesmith.inference.loading import load_for_inference

    loaded = load_for_inference(trained_run)
    # one row per batch, and 4 + 2 rows with padding
    results = [evaluate_file(loaded, trained_run / "data" / "test.jsonl", batch_size=size, max_new_tokens=1)
               for size in (1, 4)]
    # Independently: plain transformers + peft, each test row rendered by the run's saved chat template, the loss
    # on the reply + EOS only (transformers' own shift and mean), weighted by the row's reply tokens.
    tokenizer = AutoTokenizer.from_pretrained(trained_run / "tokenizer")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(other_eos_base), trained_run / "final")
    model.eval()
    rows = [json.loads(x) for x in (trained_run / "data" / "test.jsonl").read_text().splitlines()]
    sums, counts = [], []
    for row in rows:
        user = {"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"}
        prompt = tokenizer(tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
        reply = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            mean = model(input_ids=torch.tensor([prompt + reply]),
                         labels=torch.tensor([[-100] * len(prompt) + reply])).loss.item()
        sums.append(mean * len(reply))
        counts.append(len(reply))
    want = sum(sums) / sum(counts)
    for result in results:
        assert result["n"] == len(rows) == 6 and result["tokens"] == sum(counts)
        assert result["loss"] == pytest.approx(want, rel=1e-5)
        assert result["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    mean_of_means = sum(x / n for x, n in zip(sums, counts)) / len(rows)
    assert abs(mean_of_means - want) > 1e-3  # the rows' lengths differ enough that the per-row mean would show


def test_eval_exact_match_counts_the_rows_whose_prediction_is_the_reference(trained_run, monkeypatch):
    import tunesmith.evaluation.evaluate as evaluate
    from tunesmith.inference.loading import load_for_inference

    rows = [json.loads(x) for x in (trained_run / "data" / "test.jsonl").read_text().splitlines()]
    refs = [row["output"] for row in rows]
    assert len(refs) == 6 and all(len(r) > 1 for r in refs)
    # rows 0, 2 and 5 answer exactly (row 5 with the newline a reply may end with); the others are near misses:
    # the reference plus more, nothing, and the reference cut short
    preds = [refs[0], refs[1] + " AND MORE", refs[2], "", refs[4][:-1], refs[5] + "\n"]
    seen = []

    def fake_generate(model, tokenizer, conversations, sampling, batch_size=16):
        seen.append([c[-1]["content"] for c in conversations])
        return preds[:len(conversations)]

    monkeypatch.setattr(evaluate, "generate_batch", fake_generate)
    result = evaluate.evaluate_file(load_for_inference(trained_run), trained_run / "data" / "test.jsonl",
                                    max_new_tokens=4)
    assert seen == [[f"{row['instruction']}\n\n{row['input']}" for row in rows]]  # each row's prompt, in order
    assert result["exact_match"] == pytest.approx(3 / 6)
    assert [(s["reference"], s["prediction"]) for s in result["samples"]] == list(zip(refs, preds))
    assert evaluate.exact_match(["A", "B"], ["A", "A"]) == 0.5 and evaluate.exact_match(["X"], ["Y"]) == 0.0


def test_eval_batches_rows_by_the_runs_eval_batch_size(trained_run, monkeypatch):
    import tunesmith.evaluation.evaluate as evaluate
    import tunesmith.stages.tokens as tokens
    from tunesmith.inference.loading import load_for_inference

    sizes = []
    real = tokens.eval_batches
    monkeypatch.setattr(tokens, "eval_batches",
                        lambda data, size, pad, *rest: sizes.append(size) or real(data, size, pad, *rest))
    loaded = load_for_inference(trained_run)
    evaluate.evaluate_file(loaded, trained_run / "data" / "test.jsonl", max_new_tokens=2)
    evaluate.evaluate_file(loaded, trained_run / "data" / "test.jsonl", max_new_tokens=2, batch_size=3)
    assert sizes == [loaded.config.eval.batch_size, 3]


def test_generation_stops_at_eos(trained_run, monkeypatch):
    from tunesmith.data.templates import encode_prompt
    from tunesmith.inference.generate import Sampling, generate_batch
    from tunesmith.inference.loading import load_for_inference

    loaded = load_for_inference(trained_run)
    model, tokenizer = loaded.model, loaded.tokenizer
    eos = tokenizer.eos_token_id
    scripted_reply(model, tokenizer, eos)  # "a", "b", EOS, then "c" for as long as generation goes on
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a longer question, left-padded"}]]
    ids = torch.tensor([encode_prompt(tokenizer, prompts[0])])

    # Control: with the base's own generation config (EOS 0) and no EOS given, the script runs on past EOS.
    with torch.no_grad():
        went_on = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, pad_token_id=eos)
    assert tokenizer.convert_ids_to_tokens(went_on[0, ids.shape[1]:].tolist()) == ["a", "b", "<|im_end|>"] + ["c"] * 3

    generated = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: generated.append(real(**kw)) or generated[-1])
    replies = generate_batch(model, tokenizer, prompts, Sampling(max_new_tokens=10))
    assert replies == ["ab", "ab"]
    (out,) = generated
    width = max(len(encode_prompt(tokenizer, p)) for p in prompts)
    assert out.shape == (2, width + 3)  # a, b, EOS: generation stopped at EOS, not at max_new_tokens (10)
    assert out[:, -1].tolist() == [eos, eos]


def test_sampling_settings_reach_generate():
    from tunesmith.inference.generate import Sampling

    class Tok:
        eos_token_id, pad_token_id = 2, 2

    greedy_kwargs = Sampling().generate_kwargs(Tok())
    assert greedy_kwargs["do_sample"] is False
    kw = Sampling(max_new_tokens=7, temperature=0.8, top_p=0.9, top_k=20, repetition_penalty=1.2).generate_kwargs(Tok())
    assert kw == {**kw, "do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 20,
                  "repetition_penalty": 1.2, "max_new_tokens": 7, "eos_token_id": 2}


def test_chat_session_keeps_the_history_and_replies_as_generate_does(trained_run):
    """The chat the CLI, a server and the board share: each reply is what generate gives for the whole
    conversation so far (system prompt first); /reset keeps only the system prompt; commands are recognised."""
    from tunesmith.inference.chat import ChatSession
    from tunesmith.inference.generate import Sampling, generate_batch
    from tunesmith.inference.loading import load_for_inference

    loaded = load_for_inference(trained_run)
    sampling = Sampling(max_new_tokens=5)
    session = ChatSession(loaded, system="Answer briefly.", sampling=sampling)
    first = session.ask("Shout this. cat")
    second = session.ask("And this. dog")
    conversation = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Shout this. cat"},
                    {"role": "assistant", "content": first}, {"role": "user", "content": "And this. dog"}]
    assert second == generate_batch(loaded.model, loaded.tokenizer, [conversation], sampling)[0]
    assert session.history == conversation + [{"role": "assistant", "content": second}]
    assert first == generate_batch(loaded.model, loaded.tokenizer, [conversation[:2]], sampling)[0]
    session.reset()
    assert session.history == conversation[:1]
    assert [session.command(t) for t in ("/exit", " /reset ", "", "/quit", "hello")] == [
        "exit", "reset", "empty", "exit", None]
