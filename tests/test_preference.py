"""Preference stages (dpo and its losses, orpo, simpo): the data they read, their losses against TRL's on the
same batch, micro-batching, the reference, exact resume, and that training moves the preference."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny_model, build_tiny_tokenizer
from test_faults import assert_same_run, losses
from tunesmith.data.formats import Example, detect_format, to_example
from tunesmith.data.reading import BadRow, Row
from tunesmith.data.templates import IGNORE
from tunesmith.errors import TrainingStopped
from tunesmith.training.loop import train



def quiet(*_):
    pass


def pairs(n: int, seed: int = 0) -> list[dict]:
    """Prompts whose chosen reply shouts the words and whose rejected reply whispers them."""
    import random

    rng = random.Random(seed)
    words = ["cat", "river", "blue", "seven", "mountain", "ok", "paper", "lamp"]
    rows = []
    for _ in range(n):
        picked = " ".join(rng.choice(words) for _ in range(rng.randint(1, 5)))
        rows.append({"prompt": f"Say: {picked}", "chosen": picked.upper() + "!", "rejected": picked + "..."})
    return rows


def row(data: dict) -> Row:
    return Row(data=data, where="pairs.jsonl line 3")


# ------------------------------------------------------------------------------------------------ data


def test_every_form_of_preference_row_reads_as_one_pair():
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}]
    forms = [
        {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": msgs, "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
        {"chosen": msgs + [{"role": "assistant", "content": "Hello!"}],
         "rejected": msgs + [{"role": "assistant", "content": "Go away."}]},
        {"instruction": "Hi?", "input": "", "chosen": "Hello!", "rejected": "Go away.", "system": "Be kind."},
    ]
    for data in forms:
        assert detect_format(row(data), {}) == "preference"
        example = to_example(row(data), "preference", {})
        assert example.reference == "Hello!" and example.rejected == "Go away."
        assert example.prompt_messages[-1] == {"role": "user", "content": "Hi?"}
    assert to_example(row(forms[1]), "preference", {}).prompt_messages[0]["content"] == "Be kind."  # kept
    mapped = to_example(row({"q": "Hi?", "good": "Hello!", "bad": "No."}), "preference",
                        {"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert (mapped.prompt_messages, mapped.reference, mapped.rejected) == ([{"role": "user", "content": "Hi?"}],
                                                                           "Hello!", "No.")


@pytest.mark.parametrize("data, message", [
    ({"prompt": "Hi?", "chosen": "Hello!"}, "pairs.jsonl line 3: missing field 'rejected'"),
    ({"prompt": "Hi?", "chosen": "", "rejected": "No."}, "field 'chosen' is empty"),
    ({"prompt": "Hi?", "chosen": 3, "rejected": "No."}, "field 'chosen' must be a string"),
    ({"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "user", "content": "x"}], "rejected": "No."},
     "field 'chosen' must be the assistant's reply"),
    ({"prompt": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "x"}], "chosen": "a",
      "rejected": "b"}, "field 'prompt' must end before the reply"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "c"}]},
     "must share every message but the last"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, r"prompt\[0\]: each message must be"),
])
def test_a_bad_preference_row_names_the_line_and_the_field(data, message):
    with pytest.raises(BadRow, match=message):
        to_example(row(data), "preference", {})


def test_a_pair_shares_the_prompts_ids_and_trains_only_the_replies(tmp_path):
    from tunesmith.config.schema import DataConfig
    from tunesmith.data.pipeline import tokenize_split

    tok = build_tiny_tokenizer()
    example = to_example(row({"prompt": "Say: ok", "chosen": "OK!", "rejected": "ok..."}), "preference", {})
    [pair], report = tokenize_split("train", [example], tok, DataConfig(train_file="x", train_on_prompt=True))
    text = tok.apply_chat_template([{"role": "user", "content": "Say: ok"}], add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    n = len(prompt)
    for side, reply in ((pair.chosen, "OK!"), (pair.rejected, "ok...")):
        assert list(side.input_ids[:n]) == list(prompt)  # the same prompt ids on both sides
        assert list(side.labels[:n]) == [IGNORE] * n  # never trained, even with train_on_prompt
        assert tok.decode(side.input_ids[n:]).startswith(reply + "<|im_end|>")
        assert list(side.labels[n:]) == list(side.input_ids[n:])
    assert report.kept == 1 and report.trained_tokens == pair.chosen.n_targets + pair.rejected.n_targets
    long = to_example(row({"prompt": "Say: ok", "chosen": "OK!", "rejected": "o" * 300}), "preference", {})
    _, dropped = tokenize_split("train", [long], tok, DataConfig(train_file="x", max_seq_length=64))
    assert dropped.kept == 0 and dropped.dropped == {"longer than max_seq_length 64": 1}


def test_sft_refuses_preference_rows_and_dpo_refuses_sft_rows(make_config):
    from tunesmith.errors import TunesmithError

    with pytest.raises(TunesmithError, match="stage sft trains on .* and .* holds preference rows"):
        train(make_config(pairs(20)), log=quiet)
    with pytest.raises(TunesmithError, match="stage dpo trains on preference rows, and .* holds alpaca rows"):
        train(make_config(stage={"name": "dpo"}), log=quiet)


# ------------------------------------------------------------------------------------- losses against TRL


def trl_dpo(model, ref, loss_type: str, beta: float, tok, rows, peft_config=None, then=None):
    """TRL's DPOTrainer on the same rows: its collated batch and its loss (`then` changes its model first)."""
    import tempfile

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=tempfile.mkdtemp(), report_to=[], per_device_train_batch_size=len(rows), beta=beta,
                     loss_type=[loss_type], use_cpu=True, bf16=False, max_length=None)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, peft_config=peft_config)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    if then:
        then(trainer.model)
    with torch.no_grad():
        return batch, float(trainer.compute_loss(trainer.model, batch))


def ours(batch: dict) -> dict:
    """TRL's batch as ours: labels where TRL's completion mask is set."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)}


def stage_for(make_config, method: str = "full", **settings):
    from tunesmith.stages import get_stage

    cfg = make_config(pairs(12), method={"name": method}, stage=settings)
    return cfg, get_stage(cfg)


def perturb(model, seed: int = 1, scale: float = 0.05):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


TRL_ROWS = [{"prompt": [{"role": "user", "content": f"Say: {w}"}], "chosen": [{"role": "assistant", "content": w.upper()}],
             "rejected": [{"role": "assistant", "content": w + "..." * i}]}
            for i, w in enumerate(["cat", "blue river", "seven", "ok paper lamp"])]


@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "ipo"])
def test_dpo_losses_equal_trls_with_a_frozen_copy_as_reference(make_config, loss):
    from tunesmith.methods import get_method

    tok = build_tiny_tokenizer()
    reference = build_tiny_model(len(tok))
    policy = copy.deepcopy(reference)
    cfg, stage = stage_for(make_config, "full", name="dpo", loss=loss, beta=0.5)
    stage.prepare(policy, get_method(cfg.method), SimpleNamespace(), torch.device("cpu"), "fp32", 2)
    perturb(policy)  # as if trained: the reference stays the starting copy
    batch, expected = trl_dpo(policy, reference, loss, 0.5, tok, TRL_ROWS)
    with torch.no_grad():
        summed, count = stage.loss_sum(policy, ours(batch))
    assert count == 4 and expected > 0
    assert float(summed) / count == pytest.approx(expected, abs=1e-5)


def test_dpo_with_adapters_uses_the_base_as_reference_like_trl(make_config):
    """TRL adds the LoRA adapter itself (peft_config) and, as we do, takes the reference with adapters off."""
    from peft import LoraConfig

    from tunesmith.methods import get_method

    tok = build_tiny_tokenizer()
    cfg, stage = stage_for(make_config, "lora", name="dpo", beta=0.1)
    state = {}

    def train_the_adapter(policy):  # as if trained: B is zero at the start, so give every LoRA weight a value
        stage.prepare(policy, get_method(cfg.method), SimpleNamespace(), torch.device("cpu"), "fp32", 2)
        torch.manual_seed(3)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn_like(p) * 0.3)
        state["policy"] = policy

    batch, expected = trl_dpo(build_tiny_model(len(tok)), None, "sigmoid", 0.1, tok, TRL_ROWS,
                              peft_config=LoraConfig(r=4, target_modules="all-linear"), then=train_the_adapter)
    assert stage.reference.copy is None  # no second copy of the weights
    with torch.no_grad():
        summed, count = stage.loss_sum(state["policy"], ours(batch))
    assert abs(expected - math.log(2)) > 1e-3  # the adapter moved the policy away from the base
    assert float(summed) / count == pytest.approx(expected, abs=1e-5)


def scores(model, batch):
    from tunesmith.stages.tokens import sequence_logps

    with torch.no_grad():
        logps, n = sequence_logps(model, batch)
    return (*logps.chunk(2), *n.chunk(2))


def test_orpo_and_simpo_equal_trls_formulas(make_config):
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    tok = build_tiny_tokenizer()
    policy = build_tiny_model(len(tok))
    batch, _ = trl_dpo(policy, copy.deepcopy(policy), "sigmoid", 0.1, tok, TRL_ROWS)
    batch = ours(batch)
    chosen, rejected, n_c, n_r = scores(policy, batch)
    mean_c, mean_r = chosen / n_c, rejected / n_r
    device = SimpleNamespace(device="cpu")

    _, orpo = stage_for(make_config, "lora", name="orpo", beta=0.2)
    odds_term = ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=0.2, accelerator=device), mean_c, mean_r)[0]
    with torch.no_grad():
        got, n = orpo.loss_sum(policy, batch)
    assert float(got) / n == pytest.approx(float((-mean_c - odds_term).mean()), abs=1e-5)

    _, simpo = stage_for(make_config, "lora", name="simpo", beta=2.0, gamma=0.8, label_smoothing=0.1)
    stub = SimpleNamespace(beta=2.0, simpo_gamma=0.8, label_smoothing=0.1, alpha=0.0, loss_type="simpo",
                           accelerator=device)
    expected = CPOTrainer.cpo_loss(stub, mean_c, mean_r)[0].mean()
    with torch.no_grad():
        got, n = simpo.loss_sum(policy, batch)
    assert float(got) / n == pytest.approx(float(expected), abs=1e-5)


def test_kto_pair_label_smoothing_and_ftx_follow_their_formulas(make_config):
    """Hand-written from the papers (TRL 1.16 no longer has kto_pair): one pair, so the KL estimates are the
    pair's own, clamped at 0; conservative DPO's smoothed sigmoid; the SFT term as the chosen mean token loss."""
    from tunesmith.methods import get_method

    tok = build_tiny_tokenizer()
    reference = build_tiny_model(len(tok))
    policy = copy.deepcopy(reference)
    batch, _ = trl_dpo(policy, reference, "sigmoid", 0.1, tok, TRL_ROWS[:1])
    batch = ours(batch)
    stages = {}
    for name, settings in (("kto_pair", {"loss": "kto_pair"}), ("smooth", {"label_smoothing": 0.2}),
                           ("ftx", {"ftx": 0.5})):
        cfg, stages[name] = stage_for(make_config, "full", name="dpo", beta=0.3, **settings)
        stages[name].prepare(policy, get_method(cfg.method), SimpleNamespace(), torch.device("cpu"), "fp32", 2)
    perturb(policy)
    with torch.no_grad():
        results = {name: float(stage.loss_sum(policy, batch)[0]) for name, stage in stages.items()}
    pc, pr, n_c, _ = scores(policy, batch)
    rc, rr, _, _ = scores(reference, batch)
    c, r = float(pc - rc), float(pr - rr)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert results["kto_pair"] == pytest.approx(((1 - sig(0.3 * (c - max(r, 0)))) + (1 - sig(0.3 * (max(c, 0) - r)))) / 2,
                                                abs=1e-6)
    m = 0.3 * (c - r)
    assert results["smooth"] == pytest.approx(-0.8 * math.log(sig(m)) - 0.2 * math.log(sig(-m)), abs=1e-6)
    assert results["ftx"] == pytest.approx(-math.log(sig(m)) + 0.5 * float(-pc / n_c), abs=1e-6)


def test_label_smoothing_needs_the_sigmoid_loss(make_config):
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError, match="stage.label_smoothing applies to stage.loss sigmoid, not hinge"):
        make_config(stage={"name": "dpo", "loss": "hinge", "label_smoothing": 0.1})


def test_padding_does_not_change_a_rows_score():
    """A row's summed log-probability is the same alone and padded beside a longer row, on both head paths."""
    from tunesmith.data.batching import collate
    from tunesmith.data.token_store import Tokenized
    from tunesmith.stages.tokens import sequence_logps

    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok))
    short = Tokenized([5, 6, 7, 8, 9], [IGNORE, IGNORE, 7, 8, 9])
    long = Tokenized(list(range(10, 40)), [IGNORE] * 10 + list(range(20, 40)))
    for labels_only in (True, False):
        with torch.no_grad():
            alone, n_alone = sequence_logps(model, collate([short], 2), labels_only)
            both, n_both = sequence_logps(model, collate([short, long], 2), labels_only)
        assert n_alone.tolist() == [3] and n_both.tolist() == [3, 20]
        assert float(both[0]) == pytest.approx(float(alone[0]), abs=1e-5)
        logits = model(input_ids=torch.tensor([short.input_ids])).logits[0, 1:4]
        by_hand = F.log_softmax(logits.float(), -1)[torch.arange(3), torch.tensor([7, 8, 9])].sum()
        assert float(alone[0]) == pytest.approx(float(by_hand), abs=1e-5)


# ------------------------------------------------------------------------------------------- training runs

SETTINGS = dict(train={"max_steps": 6, "micro_batch_size": 2, "grad_accum_steps": 2, "lr": 5e-3, "warmup_steps": 0,
                       "lr_scheduler": "constant"},
                eval={"interval": 3}, checkpoint={"interval": 2, "keep_last": 2})


def run(make_config, tmp_path, name, stage, method=None, **extra):
    sections = {**SETTINGS, **extra}
    sections["train"] = {**SETTINGS["train"], **extra.get("train", {})}
    cfg = make_config(pairs(40), stage=stage, method=method or {"name": "lora", "r": 4, "alpha": 8},
                      output={"dir": str(tmp_path / name)}, **{k: v for k, v in sections.items() if k != "train"},
                      train=sections["train"])
    return cfg


def metrics(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", [{"name": "dpo"}, {"name": "orpo"}, {"name": "simpo"},
                                   {"name": "dpo", "loss": "ipo"}])
def test_micro_batching_does_not_change_the_step(make_config, tmp_path, stage):
    """4 pairs per step as 2 × 2 or 1 × 4 (accumulated): the same losses and the same adapter."""
    a = train(run(make_config, tmp_path, "a", stage, train={"max_steps": 3}), log=quiet)
    b = train(run(make_config, tmp_path, "b", stage, train={"max_steps": 3, "micro_batch_size": 1,
                                                            "grad_accum_steps": 4}), log=quiet)
    for (_, la), (_, lb) in zip(losses(a), losses(b), strict=True):
        assert la == pytest.approx(lb, abs=1e-5)
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "final" / "adapter_model.safetensors")), load_file(str(b / "final" / "adapter_model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("stage, method", [({"name": "dpo"}, None), ({"name": "dpo"}, {"name": "full"}),
                                           ({"name": "dpo", "precompute_reference": True}, {"name": "full"}),
                                           ({"name": "orpo"}, None)])
def test_a_preference_run_resumes_exactly(make_config, tmp_path, stage, method):
    whole = train(run(make_config, tmp_path, "whole", stage, method), log=quiet)
    cfg = run(make_config, tmp_path, "split", stage, method)
    with pytest.raises(TrainingStopped):
        train(cfg, log=quiet, stop_at_step=3)
    train(cfg, log=quiet, resume=True)
    assert_same_run(whole, tmp_path / "split")


@pytest.mark.parametrize("method", [None, {"name": "full"}])
def test_a_precomputed_reference_gives_the_same_run(make_config, tmp_path, method):
    a = train(run(make_config, tmp_path, "live", {"name": "dpo"}, method), log=quiet)
    b = train(run(make_config, tmp_path, "pre", {"name": "dpo", "precompute_reference": True}, method), log=quiet)
    for (_, la), (_, lb) in zip(losses(a), losses(b), strict=True):
        assert la == pytest.approx(lb, abs=1e-5)


def test_dpo_learns_the_preference_and_logs_its_rewards(make_config, tmp_path):
    path = train(run(make_config, tmp_path, "dpo", {"name": "dpo", "beta": 0.5},
                     train={"max_steps": 12, "lr": 1e-2}), log=quiet)
    rows = metrics(path)
    steps = [r for r in rows if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the first step
    assert {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "tokens"} <= set(steps[0])
    assert steps[0]["rewards/margin"] == pytest.approx(0, abs=1e-5)
    evals = [r for r in rows if "val_loss" in r]
    assert evals[-1]["val_rewards/accuracy"] == 1.0 and evals[-1]["val_rewards/margin"] > 0.5
    assert evals[-1]["val_loss"] < 0.5 * math.log(2)


def test_the_estimate_holds_the_reference_copy_and_both_rows_of_a_pair(make_config):
    from tunesmith.planning.estimate import estimate_memory, shape_from_params
    from tunesmith.planning.preflight import Machine, plan_for

    shape = shape_from_params(135e6)
    machine = Machine(device="cpu", name="cpu", precision="fp32", memory=None, bf16_native=False, compiler=False)
    for method, copy_bytes in (("full", shape.params * 4), ("lora", 0)):
        sft = plan_for(make_config(method={"name": method}), shape, machine)
        dpo = plan_for(make_config(pairs(20), method={"name": method}, stage={"name": "dpo"}), shape, machine)
        assert dpo.micro_batch == 2 * sft.micro_batch  # chosen and rejected rows in one batch
        parts = {p.name: p.bytes for p in estimate_memory(dpo).parts}
        assert parts.get("reference model", 0) == copy_bytes
    pre = plan_for(make_config(pairs(20), method={"name": "full"}, stage={"name": "orpo"}), shape, machine)
    assert "reference model" not in {p.name for p in estimate_memory(pre).parts}


# ------------------------------------------------------------------------------------------------------ kto


def kto_rows(n: int, seed: int = 0) -> list[dict]:
    return [{"prompt": r["prompt"], "completion": r["chosen"] if i % 3 else r["rejected"], "label": bool(i % 3)}
            for i, r in enumerate(pairs(n, seed))]


def test_unpaired_rows_read_with_their_label():
    example = to_example(row({"prompt": [{"role": "user", "content": "Hi?"}],
                              "completion": [{"role": "assistant", "content": "Hello!"}], "label": False}),
                         "unpaired", {})
    assert (example.prompt_messages, example.reference, example.desirable) == (
        [{"role": "user", "content": "Hi?"}], "Hello!", False)
    assert detect_format(row({"prompt": "a", "completion": "b", "label": True}), {}) == "unpaired"
    with pytest.raises(BadRow, match="field 'label' must be true .* or false, got 'yes'"):
        to_example(row({"prompt": "a", "completion": "b", "label": "yes"}), "unpaired", {})


def test_kto_loss_equals_trls_on_the_same_batch(make_config):
    """TRL's KTOTrainer builds the batch (and its mismatched KL rows); our stage scores the same tensors."""
    import tempfile

    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from tunesmith.methods import get_method

    tok = build_tiny_tokenizer()
    reference = build_tiny_model(len(tok))
    policy = copy.deepcopy(reference)
    cfg, stage = stage_for(make_config, "full", name="kto", beta=0.3, desirable_weight=1.5, undesirable_weight=0.8)
    stage.prepare(policy, get_method(cfg.method), SimpleNamespace(), torch.device("cpu"), "fp32", 2)
    perturb(policy)
    rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": i % 2 == 0} for i, r in enumerate(TRL_ROWS)]
    args = KTOConfig(output_dir=tempfile.mkdtemp(), report_to=[], per_device_train_batch_size=4, beta=0.3,
                     desirable_weight=1.5, undesirable_weight=0.8, use_cpu=True, bf16=False, max_length=None)
    trainer = KTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        expected = float(trainer.compute_loss(policy, batch))
    stage._stats, stage._kl = {}, None
    stage._kl_batches = [ours({"input_ids": batch["KL_input_ids"], "attention_mask": batch["KL_attention_mask"],
                               "completion_mask": batch["KL_completion_mask"]})]
    mine = {**ours(batch), "desirable": batch["label"].bool()}
    with torch.no_grad():
        summed, count = stage.loss_sum(policy, mine)
    assert count == 4 and stage._kl > 0
    assert float(summed) / count == pytest.approx(expected, abs=1e-5)


def test_kto_pairs_each_prompt_with_the_previous_reply_for_its_kl_estimate():
    from tunesmith.data.token_store import Tokenized
    from tunesmith.stages.kto import mismatched

    a = Tokenized([1, 2, 3, 10, 11], [IGNORE, IGNORE, IGNORE, 10, 11])
    b = Tokenized([4, 5, 20, 21, 22], [IGNORE, IGNORE, 20, 21, 22])
    kl = mismatched(a, b)
    assert list(kl.input_ids) == [1, 2, 3, 20, 21, 22] and list(kl.labels) == [IGNORE] * 3 + [20, 21, 22]


def test_kto_micro_batching_does_not_change_the_step_and_it_resumes(make_config, tmp_path):
    def cfg(name, **train_settings):
        c = make_config(kto_rows(40), stage={"name": "kto"}, method={"name": "lora", "r": 4, "alpha": 8},
                        output={"dir": str(tmp_path / name)}, eval={"interval": 3},
                        checkpoint={"interval": 2, "keep_last": 2},
                        train={**SETTINGS["train"], "max_steps": 6, **train_settings})
        return c

    a = train(cfg("a"), log=quiet)
    b = train(cfg("b", micro_batch_size=1, grad_accum_steps=4), log=quiet)
    for (_, la), (_, lb) in zip(losses(a), losses(b), strict=True):
        assert la == pytest.approx(lb, abs=1e-5)
    rows = metrics(a)
    assert {"kl", "rewards/chosen", "rewards/rejected"} <= set(rows[0])
    split = cfg("split")
    with pytest.raises(TrainingStopped):
        train(split, log=quiet, stop_at_step=3)
    train(split, log=quiet, resume=True)
    assert_same_run(a, tmp_path / "split")
    evals = [r for r in rows if "val_loss" in r]
    assert evals and "val_rewards/chosen" in evals[-1]


@pytest.mark.parametrize("labels_only", [True, False])
def test_the_shared_prompt_layout_scores_each_reply_as_its_own_padded_row(make_config, labels_only):
    """Pairs packed with the prompt computed once (the rejected reply a branch of it) give every sequence the
    same summed log-probability and token count as the padded batch of 2k rows, and the same DPO losses."""
    from tunesmith.data.pipeline import tokenize_split
    from tunesmith.data.formats import to_example
    from tunesmith.models.attention import use_packed_attention
    from tunesmith.stages import get_stage
    from tunesmith.stages.preference import pair_batch, shared_prompt_batch
    from tunesmith.stages.tokens import sequence_logps

    tok = build_tiny_tokenizer()
    cfg = make_config(pairs(12), stage={"name": "dpo"})
    examples = [to_example(row(r), "preference", {}) for r in pairs(6, seed=3)]
    items, _ = tokenize_split("t", examples, tok, cfg.data)
    model = build_tiny_model(len(tok)).eval()
    assert use_packed_attention(model)
    with torch.no_grad():
        padded = sequence_logps(model, pair_batch(items, tok.pad_token_id), labels_only)
        packed_batch = shared_prompt_batch(items)
        packed = sequence_logps(model, packed_batch, labels_only)
    assert torch.equal(padded[1], packed[1])
    assert torch.allclose(padded[0], packed[0], atol=1e-4)
    prompt = sum(len(p.chosen) for p in items) + sum(len(p.rejected) for p in items) - packed_batch["input_ids"].shape[1]
    assert prompt > 0  # the prompts' tokens were not computed twice
    stage = get_stage(cfg)
    other = build_tiny_model(len(tok), seed=1).eval()
    use_packed_attention(other)
    stage.reference = SimpleNamespace(logps=lambda model, batch, labels_only=True: sequence_logps(
        other, batch, labels_only)[0])
    with torch.no_grad():
        a = stage.pair_losses(model, pair_batch(items, tok.pad_token_id))[0]
        b = stage.pair_losses(model, packed_batch)[0]
    assert torch.allclose(a, b, atol=1e-4)
