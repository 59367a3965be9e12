"""stage.reference: a model or a run dir as the reference of dpo (and kto, grpo, ppo, through the same
Reference): the base named by path gives what the default (adapters off) gives; a trained run gives its own
scores; another vocabulary is refused."""

from __future__ import annotations

import pytest

from test_preference import SETTINGS, metrics, pairs, run
from tunesmith.errors import TunesmithError
from tunesmith.training.loop import train


def quiet(*_):
    pass


def test_the_base_named_as_reference_equals_the_default(make_config, tmp_path, tiny_model_dir):
    default = train(run(make_config, tmp_path, "default", {"name": "dpo"}, train={"max_steps": 2}), log=quiet)
    named = train(run(make_config, tmp_path, "named", {"name": "dpo", "reference": str(tiny_model_dir)},
                      train={"max_steps": 2}), log=quiet)
    for a, b in zip(metrics(default), metrics(named), strict=True):
        for key in ("loss", "rewards/chosen", "rewards/margin"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-5)


@pytest.mark.parametrize("precompute", [False, True])
def test_a_run_dir_as_reference_scores_with_that_run(make_config, tmp_path, precompute):
    """An sft run trained on the chosen replies as the reference: at step 1 the policy is the base, so the
    chosen replies' reward beta·(log π − log π_ref) is negative (the reference likes them more), unlike with
    the base as reference, where it is exactly 0."""
    sft_rows = [{"instruction": p["prompt"], "output": p["chosen"]} for p in pairs(40)]
    sft = train(make_config(sft_rows, output={"dir": str(tmp_path / "sft")},
                            train={"max_steps": 8, "lr": 1e-2, "micro_batch_size": 4}), log=quiet)
    stage = {"name": "dpo", "reference": str(sft), "precompute_reference": precompute}
    dpo = train(run(make_config, tmp_path, "dpo", stage, train={"max_steps": 1}), log=quiet)
    first = metrics(dpo)[0]
    assert first["rewards/chosen"] < -1e-3
    base = train(run(make_config, tmp_path, "base", {"name": "dpo"}, train={"max_steps": 1}), log=quiet)
    assert metrics(base)[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)


def test_a_reference_with_another_vocabulary_is_refused(make_config, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import build_tiny_tokenizer

    other = tmp_path / "other"
    tok = build_tiny_tokenizer()
    tok.add_tokens(["<extra>"])
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(TunesmithError, match="stage.reference: .* another vocabulary"):
        train(run(make_config, tmp_path, "x", {"name": "dpo", "reference": str(other)}), log=quiet)
