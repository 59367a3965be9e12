"""Reward modelling (stage rm): the loss against TRL's RewardTrainer on the same batch, the head trained,
checkpointed and resumed beside any method, micro-batching, held-out pairwise accuracy, and the exports (a
merged export is a plain transformers sequence classifier that scores as training did)."""

from __future__ import annotations

import copy
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from test_faults import assert_same_run, losses
from test_preference import SETTINGS, metrics, pairs
from tunesmith.errors import TrainingStopped
from tunesmith.training.loop import train


def quiet(*_):
    pass


def rm_config(make_config, tmp_path, name, method=None, stage=None, n=40, **extra):
    sections = {**SETTINGS, **extra}
    sections["train"] = {**SETTINGS["train"], **extra.get("train", {})}
    return make_config(pairs(n), stage={"name": "rm", **(stage or {})},
                       method=method or {"name": "lora", "r": 4, "alpha": 8}, output={"dir": str(tmp_path / name)},
                       **{k: v for k, v in sections.items() if k != "train"}, train=sections["train"])


def prepared(make_config, method="full", **stage):
    from tunesmith.methods import get_method
    from tunesmith.stages import get_stage

    tok = build_tiny_tokenizer()
    cfg = make_config(pairs(12), method={"name": method}, stage={"name": "rm", **stage})
    rm = get_stage(cfg)
    model = get_method(cfg.method).build(build_tiny_model(len(tok)))
    torch.manual_seed(5)
    rm.prepare(model, get_method(cfg.method), SimpleNamespace(), torch.device("cpu"), "fp32", tok.pad_token_id)
    with torch.no_grad():  # a head and body that score pairs differently (a fresh head scores near zero)
        rm.head.weight.mul_(30)
    return tok, model, rm


def trl_reward_loss(scorer, batch, center: float | None):
    """TRL's RewardTrainer.compute_loss on a 2k-row batch (chosen rows first), called on the few attributes it
    reads of a trainer, so that no training data set has to be built."""
    from trl import RewardTrainer

    identity = SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = SimpleNamespace(model=scorer, args=SimpleNamespace(center_rewards_coefficient=center),
                              accelerator=identity, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                              _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        return float(RewardTrainer.compute_loss(trainer, scorer, inputs))


def as_classifier(model, head, pad_id: int):
    """The same body and head as transformers' LlamaForSequenceClassification."""
    from transformers import LlamaForSequenceClassification

    config = copy.deepcopy(model.config)
    config.num_labels, config.pad_token_id = 1, pad_id
    scorer = LlamaForSequenceClassification(config)
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    scorer.load_state_dict({**body, "score.weight": head.weight}, strict=True)
    return scorer.eval()


@pytest.mark.parametrize("center", [0.0, 0.05])
def test_rm_loss_equals_trls_reward_trainer_on_the_same_batch(make_config, center):
    from tunesmith.data.pipeline import tokenize_split
    from tunesmith.data.formats import to_example
    from tunesmith.data.reading import Row
    from tunesmith.stages.preference import pair_batch

    tok, model, rm = prepared(make_config, center_rewards=center)
    cfg = rm.run
    examples = [to_example(Row(r, f"line {i}"), "preference", {}) for i, r in enumerate(pairs(5, seed=3))]
    tokenized, _ = tokenize_split("train", examples, tok, cfg.data)
    batch = pair_batch(tokenized, tok.pad_token_id)
    assert len({int(m.sum()) for m in batch["attention_mask"]}) > 1  # rows of different lengths: padding matters
    expected = trl_reward_loss(as_classifier(model, rm.head, tok.pad_token_id), batch, center or None)
    with torch.no_grad():
        summed, count = rm.loss_sum(model, batch)
    assert count == 5 and expected > 0
    assert float(summed) / count == pytest.approx(expected, abs=1e-5)


def test_padding_does_not_change_a_reward(make_config):
    from tunesmith.stages.reward import rewards

    tok, model, rm = prepared(make_config, method="lora")
    ids = torch.tensor([[1, 40, 41, 42, 43, 2]])
    alone = rewards(model, rm.head, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 2)
    padded_ids = torch.cat([ids, torch.full((1, 5), 2)], 1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 5, dtype=torch.long)], 1)
    padded = rewards(model, rm.head, {"input_ids": padded_ids, "attention_mask": mask}, 2)
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-6)


def test_micro_batching_does_not_change_an_rm_step(make_config, tmp_path):
    a = train(rm_config(make_config, tmp_path, "a", train={"max_steps": 3}), log=quiet)
    b = train(rm_config(make_config, tmp_path, "b", train={"max_steps": 3, "micro_batch_size": 1,
                                                             "grad_accum_steps": 4}), log=quiet)
    for (_, la), (_, lb) in zip(losses(a), losses(b), strict=True):
        assert la == pytest.approx(lb, abs=1e-5)
    from safetensors.torch import load_file

    ha, hb = (load_file(str(p / "final" / "stage_modules.safetensors"))["score.weight"] for p in (a, b))
    torch.testing.assert_close(ha, hb, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", [None, {"name": "full"}])
def test_an_rm_run_resumes_exactly_with_its_head(make_config, tmp_path, method):
    whole = train(rm_config(make_config, tmp_path, "whole", method), log=quiet)
    cfg = rm_config(make_config, tmp_path, "split", method)
    with pytest.raises(TrainingStopped):
        train(cfg, log=quiet, stop_at_step=3)
    assert (tmp_path / "split" / "checkpoints" / "step-000003" / "stage_modules.safetensors").exists()
    train(cfg, log=quiet, resume=True)
    assert_same_run(whole, tmp_path / "split")  # final/'s head included


def test_an_rm_run_learns_the_preference_and_evaluates_and_exports_it(make_config, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from tunesmith.evaluation.evaluate import evaluate_file
    from tunesmith.export.formats import export_run
    from tunesmith.inference.loading import load_for_inference
    from tunesmith.stages.preference import pair_batch
    from tunesmith.stages.reward import rewards

    path = train(rm_config(make_config, tmp_path, "rm", train={"max_steps": 12, "lr": 1e-2}), log=quiet)
    rows = metrics(path)
    steps = [r for r in rows if "loss" in r]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"} <= set(steps[0])
    evals = [r for r in rows if "val_loss" in r]
    assert evals[-1]["val_rewards/accuracy"] == 1.0 and evals[-1]["val_rewards/margin"] > 1.0

    held_out = tmp_path / "held_out.jsonl"
    from conftest import write_jsonl

    write_jsonl(held_out, pairs(16, seed=9))
    result = evaluate_file(load_for_inference(path), held_out)
    assert result["pairwise_accuracy"] >= 0.9 and result["reward_margin"] > 1.0

    # merged: a plain transformers classifier that gives every row the reward we give it
    export_run(path, "merged", tmp_path / "merged")
    scorer = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    loaded = load_for_inference(path)
    from tunesmith.data.pipeline import load_examples, tokenize_split

    _, read = load_examples(str(held_out), loaded.config.data, "preference", [])
    tokenized, _ = tokenize_split("eval", [ex for _, ex in read], loaded.tokenizer, loaded.config.data)
    batch = pair_batch(tokenized[:6], loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        ours = rewards(loaded.model, loaded.head, batch, loaded.tokenizer.pad_token_id)
        theirs = scorer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
    chosen, rejected = theirs.chunk(2)
    assert bool((chosen > rejected).all())

    # adapter: the PEFT adapter and, beside it, the head
    export_run(path, "adapter", tmp_path / "adapter")
    assert {"adapter_model.safetensors", "stage_modules.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
