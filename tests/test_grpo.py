"""GRPO: the loss against TRL's GRPOTrainer on the same batch, group advantages against TRL's formula, the
rewards, prompt rows through the data layer, micro-batching, exact resume (the sampling included), and a run
that raises its reward."""

from __future__ import annotations

import contextlib
import copy
import json
import types
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer, write_jsonl
from test_faults import assert_same_run, losses
from tunesmith.data.templates import IGNORE
from tunesmith.errors import ConfigError, TrainingStopped, TunesmithError
from tunesmith.training.loop import train


def quiet(*_):
    pass


def prompts(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    words = ["cat", "river", "blue", "seven", "ok", "lamp"]
    return [{"prompt": f"Say {w}", "answer": w.upper(), "topic": "words"} for w in
            (rng.choice(words) for _ in range(n))]


SETTINGS = dict(train={"max_steps": 6, "micro_batch_size": 2, "grad_accum_steps": 2, "lr": 1e-2, "warmup_steps": 0,
                       "lr_scheduler": "constant"},
                eval={"interval": 3}, checkpoint={"interval": 2, "keep_last": 2})


def grpo_config(make_config, tmp_path, name, stage=None, method=None, rows=None, **extra):
    train_settings = {**SETTINGS["train"], **extra.pop("train", {})}
    sections = {**SETTINGS, **extra}
    stage = stage or {}
    if stage.get("name", "grpo") == "grpo":  # (ppo's tests bring their own settings)
        stage = {"name": "grpo", "rewards": ["length_penalty"], "max_new_tokens": 12, "num_generations": 4, **stage}
    return make_config(rows or prompts(40), stage=stage, method=method or {"name": "lora", "r": 4, "alpha": 8},
                       output={"dir": str(tmp_path / name)}, train=train_settings,
                       **{k: v for k, v in sections.items() if k != "train"})


def metrics(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- against TRL


def trl_grpo_loss(model, inputs, beta: float, eps: float, temperature: float) -> float:
    """TRL's GRPOTrainer._compute_loss (loss_type "dapo", its default) on the attributes of a trainer it reads,
    with TRL's own fused LM head computing the log-probabilities (on a copy of the model)."""
    from trl import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    scorer = copy.deepcopy(model).train()
    add_fused_lm_head(scorer, temperature=temperature, outputs=("log_probs", "entropy"))
    identity = SimpleNamespace(num_processes=1, autocast=contextlib.nullcontext, gather=lambda x: x,
                               gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x,
                               sync_gradients=True, is_main_process=True)
    trainer = SimpleNamespace(
        model=scorer, accelerator=identity, beta=beta, loss_type="dapo", epsilon_low=eps, epsilon_high=eps,
        importance_sampling_level="token", top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        use_vllm=False, vllm_importance_sampling_correction=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1, temperature=temperature,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    trainer._get_per_token_logps_and_entropies = types.MethodType(GRPOTrainer._get_per_token_logps_and_entropies,
                                                                  trainer)
    with torch.no_grad():
        return float(GRPOTrainer._compute_loss(trainer, scorer, inputs))


@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (0.04, 1.0), (0.04, 0.7)])
def test_grpo_loss_equals_trls_on_the_same_batch(make_config, tmp_path, beta, temperature):
    """Prompts of one length, replies of different lengths, old log-probabilities off by up to ±0.5 so both
    sides of the clip are hit, and a reference: the loss per reply token equals TRL's within 1e-5."""
    from tunesmith.data.batching import collate
    from tunesmith.stages import get_stage

    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok)).eval()
    stage = get_stage(grpo_config(make_config, tmp_path, "x", stage={"kl_coef": beta, "temperature": temperature,
                                                                      "clip_range": 0.2}))
    g = torch.Generator().manual_seed(3)
    n, plen, longest = 6, 5, 7
    prompt = torch.randint(3, len(tok), (n, plen), generator=g)
    lengths = [7, 3, 5, 1, 6, 4]
    completion = torch.randint(3, len(tok), (n, longest), generator=g)
    completion_mask = (torch.arange(longest)[None] < torch.tensor(lengths)[:, None]).long()
    advantages = torch.randn(n, generator=g)
    old = -3 + torch.rand(n, longest, generator=g)  # shifted below
    ref = -3 + torch.rand(n, longest, generator=g)

    rows = [SimpleNamespace(input_ids=prompt[i].tolist() + completion[i, :lengths[i]].tolist(),
                            labels=[IGNORE] * plen + completion[i, :lengths[i]].tolist(), starts=())
            for i in range(n)]
    batch = collate(rows, tok.pad_token_id)
    scored = batch["labels"][:, 1:] != IGNORE
    batch["advantages"] = advantages
    with torch.no_grad():
        from tunesmith.stages.tokens import token_logps

        current, _ = token_logps(model, batch, temperature=temperature)
        shift = (torch.rand(scored.shape, generator=g) - 0.5)
        old_ours = torch.where(scored, current + shift, torch.zeros_like(current))
        ref_ours = torch.zeros_like(current)
        ref_ours[scored] = ref[completion_mask.bool()]
    batch["old_logps"], batch["ref_logps"] = old_ours, ref_ours
    if not beta:
        del batch["ref_logps"]
    with torch.no_grad():
        stage.reference = object() if beta else None
        losses, mask, _ = stage.token_losses(model, batch)
        ours = float(losses.sum() / mask.sum())

    old_trl = torch.zeros(n, longest)
    old_trl[completion_mask.bool()] = old_ours[scored]
    inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt),
              "completion_ids": completion * completion_mask, "completion_mask": completion_mask,
              "advantages": advantages, "old_per_token_logps": old_trl, "ref_per_token_logps": ref * completion_mask,
              "num_items_in_batch": completion_mask.sum()}
    reference = trl_grpo_loss(model, inputs, beta, 0.2, temperature)
    assert ours == pytest.approx(reference, abs=1e-5)
    ratio = torch.exp(current - old_ours)[scored]
    assert ((ratio < 0.8) | (ratio > 1.2)).any() and ((ratio > 0.8) & (ratio < 1.2)).any()  # both clip regions


def test_group_advantages_follow_trls_formula():
    """Reward minus the group mean over (the group's std, Bessel-corrected, + 1e-4), as TRL's nanstd; an
    unscored reply (NaN) stays out of its group's statistics and gets 0."""
    from trl.trainer.utils import nanstd

    from tunesmith.stages.grpo import advantages

    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25, 2.0, 2.0, 2.0, 2.0, 1.0, float("nan"), 3.0, 2.0], dtype=torch.float64)
    grouped = rewards.view(3, 4)
    expected = (grouped - torch.nanmean(grouped, 1, keepdim=True)) / (nanstd(grouped, dim=1, keepdim=True) + 1e-4)
    expected = torch.nan_to_num(expected.view(-1), nan=0.0)
    assert torch.allclose(advantages(rewards, 4, "group"), expected)
    assert torch.equal(advantages(rewards, 4, "group")[4:8], torch.zeros(4))  # a group with one reward: no signal
    batch_scaled = (grouped - torch.nanmean(grouped, 1, keepdim=True)) / (nanstd(rewards) + 1e-4)
    assert torch.allclose(advantages(rewards, 4, "batch"), torch.nan_to_num(batch_scaled.view(-1)))
    assert torch.allclose(advantages(rewards, 4, "none"),
                          torch.nan_to_num((grouped - torch.nanmean(grouped, 1, keepdim=True)).view(-1)))


# ---------------------------------------------------------------------------------------------- rewards


def test_built_in_rewards():
    from tunesmith.config.schema import GrpoStageSection
    from tunesmith.stages.rewards import reward_functions, score

    section = GrpoStageSection(rewards=["exact_match", "valid_json", "json_keys", "length_penalty", "json_fields"],
                               required_keys=["a", "b"], max_new_tokens=10)
    replies = [' {"a": 1, "b": 2} ', "```json\n{\"a\": 1}\n```", "CAT", "not json", '{"a": 1, "b": 3}']
    rows = [{"answer": {"b": 2, "a": 1}}, {"answer": '{"a": 1, "c": 0}', "required_keys": ["a"]}, {"answer": "CAT"},
            {"answer": None}, {"answer": {"a": 1, "b": 2}}]
    table = score(reward_functions(section), ["p"] * 5, replies, [[1] * 4, [1] * 2, [1], [1] * 10, [1] * 5], rows)
    assert table[0] == [1.0, 1.0, 1.0, -0.4, 1.0]  # JSON equal to the answer object, both keys
    assert table[1] == [0.0, 1.0, 1.0, -0.2, 0.5]  # fenced JSON parses; the row's own required_keys; a JSON string answer
    assert table[2][:4] == [1.0, 0.0, 0.0, -0.1] and table[2][4] != table[2][4]  # no object to compare fields with
    assert table[3][0] != table[3][0]  # no answer: not scored (NaN)
    assert table[3][1:4] == [0.0, 0.0, -1.0]
    assert table[4] == [0.0, 1.0, 1.0, -0.5, 0.5]  # one field of two right


def test_user_reward_functions_are_called_as_trl_calls_them(tmp_path):
    from tunesmith.config.schema import GrpoStageSection
    from tunesmith.stages.rewards import reward_functions, score

    (tmp_path / "my_rewards.py").write_text(
        "def says_topic(prompts, completions, completion_ids, topic, **kwargs):\n"
        "    return [float(t in c) if t else None for c, t in zip(completions, topic)]\n")
    section = GrpoStageSection(rewards=[f"{tmp_path / 'my_rewards.py'}:says_topic"])
    table = score(reward_functions(section), ["p", "q"], ["about cats", "dogs"], [[1], [2]],
                  [{"topic": "cat"}, {"topic": "cat"}])
    assert table == [[1.0], [0.0]]
    with pytest.raises(ConfigError, match="no function nope"):
        reward_functions(GrpoStageSection(rewards=[f"{tmp_path / 'my_rewards.py'}:nope"]))
    with pytest.raises(ConfigError, match="neither a built-in"):
        reward_functions(GrpoStageSection(rewards=["exact_mach"]))
    (tmp_path / "bad.py").write_text("def r(prompts, completions, **kw):\n    return ['high'] * len(completions)\n")
    with pytest.raises(TunesmithError, match="must return numbers"):
        score(reward_functions(GrpoStageSection(rewards=[f"{tmp_path / 'bad.py'}:r"])), ["p"], ["x"], [[1]], [{}])


def test_a_reward_typo_stops_the_run_before_the_model_loads(make_config, tmp_path):
    with pytest.raises(ConfigError, match="stage.rewards"):
        train(grpo_config(make_config, tmp_path, "typo", stage={"rewards": ["exactmatch"]}), log=quiet)
    assert not (tmp_path / "typo").exists()


# ---------------------------------------------------------------------------------------------- data


def test_prompt_rows_through_the_data_layer(make_config, tmp_path):
    from tunesmith.data.pipeline import prepare_data
    from tunesmith.data.templates import encode_prompt
    from tunesmith.data.token_store import Prompt

    tok = build_tiny_tokenizer()
    rows = prompts(10) + [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                           "answer": "HI"}]
    cfg = grpo_config(make_config, tmp_path, "d", rows=rows)
    data = prepare_data(cfg.data, tok)
    assert data.format == "prompt"
    items = list(data.train) + list(data.val)
    assert all(isinstance(p, Prompt) for p in items) and len(items) + len(data.test_examples) == 11
    chat = next(p for p in items + [None] if p is not None and isinstance(p.prompt, list))
    assert list(chat.input_ids) == encode_prompt(tok, chat.prompt)  # the system message kept, ends ready to reply
    assert chat.fields == {"answer": "HI"}
    assert "the replies are generated" in data.report.to_text()

    bad = write_jsonl(tmp_path / "bad.jsonl", prompts(3) + [{"prompt": [{"role": "assistant", "content": "x"}]}])
    from tunesmith.errors import DataError

    with pytest.raises(DataError, match=r"bad.jsonl:4: field 'prompt'"):
        prepare_data(cfg.data.model_copy(update={"train_file": str(bad)}), tok)


# ---------------------------------------------------------------------------------------------- training


def test_grpo_micro_batching_does_not_change_the_step(make_config, tmp_path):
    """4 prompts per step as 2 × 2 or 1 × 4: the same answers (a step samples in one batch), the same losses
    and the same adapter."""
    from safetensors.torch import load_file

    a = train(grpo_config(make_config, tmp_path, "a", train={"max_steps": 3}), log=quiet)
    b = train(grpo_config(make_config, tmp_path, "b", train={"max_steps": 3, "grad_accum_steps": 4,
                                                             "micro_batch_size": 1}), log=quiet)
    ma = [m for m in metrics(a) if "reward" in m]
    mb = [m for m in metrics(b) if "reward" in m]
    assert len(ma) == len(mb) == 3
    for x, y in zip(ma, mb):
        assert (x["reward"], x["completion_length"]) == (y["reward"], y["completion_length"])
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
    wa, wb = (load_file(str(r / "final" / "adapter_model.safetensors")) for r in (a, b))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_grpo_accumulation_is_normalised_over_the_whole_step(make_config, tmp_path):
    """The same rollouts split into micro-batches of 1 or 2 prompts: the same loss and gradients (the sum
    over reply tokens divided by the step's reply tokens)."""
    from tunesmith.methods import get_method
    from tunesmith.stages import get_stage
    from tunesmith.stages.grpo import Rollout

    tok = build_tiny_tokenizer()
    cfg = grpo_config(make_config, tmp_path, "x", stage={"kl_coef": 0.1, "num_generations": 2})
    stage = get_stage(cfg)
    model = get_method(cfg.method).build(build_tiny_model(len(tok)))
    stage.tokenizer = tok
    stage.prepare(model, get_method(cfg.method), SimpleNamespace(), torch.device("cpu"), "fp32", tok.pad_token_id)
    g = torch.Generator().manual_seed(0)
    rollouts = []
    for i in range(8):
        p = torch.randint(3, 200, (4 + i % 3,), generator=g).tolist()
        r = torch.randint(3, 200, (1 + (5 * i) % 7,), generator=g).tolist()
        rollouts.append(Rollout(p + r, [IGNORE] * len(p) + r, float(torch.randn(1, generator=g)), 0.0))
    stage._reference_logps(model, rollouts)

    def step(size):
        model.zero_grad()
        count, total = stage.count(rollouts), 0.0
        for batch in stage.batches(rollouts, size, tok.pad_token_id, False):
            summed, _ = stage.loss_sum(model, batch)
            (summed / count).backward()
            total += float(summed)
        return total / count, [p.grad.clone() for _, p in get_method(cfg.method).trainable_parameters(model)]

    (la, ga), (lb, gb) = step(1), step(4)
    assert la == pytest.approx(lb, abs=1e-6)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ga, gb))


@pytest.mark.parametrize("method,kl", [({"name": "lora", "r": 4, "alpha": 8}, 0.0), ({"name": "full"}, 0.05)])
def test_grpo_resumes_exactly(make_config, tmp_path, method, kl):
    """Stopped after step 3 and resumed: the same answers (sampling seeded from the step), losses, rewards
    and final weights as the run that never stopped; with a reference (full: a frozen copy) too."""
    extra = {"train": {"lr": 1e-3 if method["name"] == "full" else 1e-2}}
    whole = train(grpo_config(make_config, tmp_path, "whole", method=method, stage={"kl_coef": kl}, **copy.deepcopy(extra)),
                  log=quiet)
    cfg = grpo_config(make_config, tmp_path, "cut", method=method, stage={"kl_coef": kl}, **copy.deepcopy(extra))
    with pytest.raises(TrainingStopped):
        train(cfg, log=quiet, stop_at_step=3)
    resumed = train(cfg, log=quiet, resume=True)
    assert_same_run(whole, resumed)
    a = [(m["reward"], m["completion_length"]) for m in metrics(whole) if "reward" in m]
    b = [(m["reward"], m["completion_length"]) for m in metrics(resumed) if "reward" in m]
    assert a == b
    if kl:
        assert all(m["kl"] >= 0 for m in metrics(whole) if "kl" in m)
        assert any(m["kl"] > 0 for m in metrics(whole) if "kl" in m)


def test_grpo_raises_the_reward(make_config, tmp_path):
    """A reward for short answers: the tiny model learns to end its answers early, and the metrics carry the
    reward, its spread and the answers' length every step, and the held-out reward at evaluations."""
    run = train(grpo_config(make_config, tmp_path, "learn", train={"max_steps": 12},
                            eval={"interval": 6}), log=quiet)
    steps = [m for m in metrics(run) if "reward" in m]
    assert {"reward", "reward_std", "rewards/length_penalty", "completion_length", "groups_without_signal",
            "completions_cut"} <= set(steps[0])
    first, last = steps[:3], steps[-3:]
    assert sum(m["completion_length"] for m in last) < sum(m["completion_length"] for m in first)
    evals = [m for m in metrics(run) if "val_reward" in m]
    assert evals[-1]["val_reward"] > -1.0 and evals[-1]["val_loss"] == -evals[-1]["val_reward"]


def test_eval_of_a_grpo_run_scores_answers_with_its_rewards(make_config, tmp_path):
    """`tunesmith eval` on prompt rows: greedy answers scored by the run's own reward functions."""
    from tunesmith.evaluation.evaluate import evaluate_file
    from tunesmith.inference.loading import load_for_inference

    run = train(grpo_config(make_config, tmp_path, "ev", stage={"rewards": ["length_penalty", "exact_match"]},
                            train={"max_steps": 2}), log=quiet)
    result = evaluate_file(load_for_inference(run), run / "data" / "test.jsonl", max_new_tokens=12)
    assert result["n"] == 4 and result["exact_match"] is not None
    lengths = [len(load_for_inference(run).tokenizer(s["prediction"], add_special_tokens=False)["input_ids"])
               for s in result["samples"]]
    assert result["rewards/length_penalty"] == pytest.approx(-sum(lengths) / len(lengths) / 12, abs=1e-6)
    assert result["reward"] == pytest.approx(result["rewards/length_penalty"] + result["rewards/exact_match"])
