"""PPO: GAE and the clipped losses against their definitions, the value head trained and checkpointed, the
sampled batch reused for ppo_epochs steps and kept across a resume, a reward model (an rm run) or reward
functions as the scorer, micro-batching, and a run that raises its reward.

TRL 1.16 (the test dependency) no longer ships a PPOTrainer, so the losses are checked against the formulas
of TRL's last PPOTrainer (0.x: per-token k1 KL reward with the score on the last token, GAE, whitened
advantages, clipped policy and value losses), written out here token by token."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from test_faults import assert_same_run
from test_grpo import grpo_config, metrics, prompts
from tunesmith.errors import TrainingStopped, TunesmithError
from tunesmith.training.loop import train


def quiet(*_):
    pass


def ppo_config(make_config, tmp_path, name, stage=None, **extra):
    stage = {"name": "ppo", "rewards": ["length_penalty"], "max_new_tokens": 12, "ppo_epochs": 2,
             "kl_coef": 0.05, **(stage or {})}
    return grpo_config(make_config, tmp_path, name, stage=stage, **extra)


def test_gae_equals_its_definition():
    """A_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γ V_{t+1} − V_t over each row's answer tokens (V after the last
    is 0), and returns = A + V."""
    from tunesmith.stages.ppo import gae

    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 9, generator=g), torch.randn(3, 9, generator=g)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, 2:9], mask[1, 4:6], mask[2, 0:1] = True, True, True
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards * mask, values * mask, mask, gamma, lam)
    for i in range(3):
        pos = mask[i].nonzero()[:, 0].tolist()
        r, v = rewards[i, pos], values[i, pos]
        v_next = torch.cat([v[1:], torch.zeros(1)])
        delta = r + gamma * v_next - v
        want = torch.tensor([sum((gamma * lam) ** l * delta[t + l] for l in range(len(pos) - t))
                             for t in range(len(pos))])
        assert torch.allclose(adv[i, pos], want, atol=1e-6)
        assert torch.allclose(ret[i, pos], want + v, atol=1e-6)
        assert not adv[i][~mask[i]].any()


def test_ppo_losses_follow_the_ppo_formulas(make_config, tmp_path):
    """Policy: max(−A ρ, −A clip(ρ, 1±ε)); value: ½ max((V−R)², (clip(V, V_old±c)−R)²); the step's loss is
    their sum over answer tokens (value weighted by vf_coef) over the answer tokens, token by token."""
    from tunesmith.data.batching import collate
    from tunesmith.stages import get_stage
    from tunesmith.stages.ppo import Sampled, logps_and_values

    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok)).eval()
    stage = get_stage(ppo_config(make_config, tmp_path, "x", stage={"vf_coef": 0.3, "value_clip": 0.1}))
    stage.value_head = torch.nn.Linear(32, 1)
    g = torch.Generator().manual_seed(2)
    items = []
    for n_prompt, n_answer in ((5, 4), (3, 7), (6, 1)):
        ids = torch.randint(3, len(tok), (n_prompt + n_answer,), generator=g).tolist()
        items.append(Sampled(ids, [-100] * n_prompt + ids[n_prompt:], 0.0, *[
            (torch.randn(n_answer, generator=g) * s + o).tolist() for s, o in ((0.3, -3), (0.5, 0), (1, 0), (1, 0))]))
    with torch.no_grad():
        batch = collate(items, tok.pad_token_id)
        logps, values, mask = logps_and_values(model, stage.value_head, batch, 1.0)
        for it, lp, row_mask in zip(items, logps, mask):  # old log-probabilities near the current ones: both clips hit
            it.old_logps = (lp[row_mask] + torch.randn(int(row_mask.sum()), generator=g) * 0.4).tolist()
        [batch] = stage.batches(items, 3, tok.pad_token_id, False)
        losses, mask, _ = stage.token_losses(model, batch)
        ours = float(losses.sum() / mask.sum())

    total, n = 0.0, 0
    for i, it in enumerate(items):
        pos = mask[i].nonzero()[:, 0].tolist()
        for k, t in enumerate(pos):
            ratio = float(torch.exp(logps[i, t] - it.old_logps[k]))
            a, v, v_old, r = it.advantages[k], float(values[i, t]), it.old_values[k], it.returns[k]
            policy = max(-a * ratio, -a * min(max(ratio, 0.8), 1.2))
            v_clipped = v_old + min(max(v - v_old, -0.1), 0.1)
            value = 0.5 * max((v - r) ** 2, (v_clipped - r) ** 2)
            total, n = total + policy + 0.3 * value, n + 1
    assert ours == pytest.approx(total / n, abs=1e-5)


def test_sampling_rewards_are_the_kl_penalty_and_the_score_on_the_last_token(make_config, tmp_path):
    """Before GAE: r_t = −kl_coef (log π − log π_ref) per answer token, and the score on the last one."""
    from tunesmith.methods import get_method
    from tunesmith.stages import get_stage
    from tunesmith.stages.ppo import Sampled, gae, masked_whiten

    tok = build_tiny_tokenizer()
    cfg = ppo_config(make_config, tmp_path, "x", stage={"kl_coef": 0.2, "gamma": 1.0, "lam": 1.0},
                     method={"name": "full"})
    stage = get_stage(cfg)
    model = get_method(cfg.method).build(build_tiny_model(len(tok)))
    stage.tokenizer = tok
    stage.prepare(model, get_method(cfg.method), None, torch.device("cpu"), "fp32", tok.pad_token_id)
    with torch.no_grad():  # the policy moves away from the frozen reference copy
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        stage.value_head.weight.normal_(std=0.5)
    items = [Sampled([5, 6, 7, 8, 9, 10], [-100, -100, -100, 8, 9, 10], 1.5, [], [], [], []),
             Sampled([5, 6, 11, 12], [-100, -100, 11, 12], -0.5, [], [], [], [])]
    stage._measure(model, items)
    from tunesmith.data.batching import collate
    from tunesmith.stages.ppo import logps_and_values

    batch = collate(items, tok.pad_token_id)
    with torch.no_grad():
        logps, values, mask = logps_and_values(model, stage.value_head, batch, 1.0)
        ref = stage.reference.token_logps(model, batch)[0]
    for i, it in enumerate(items):
        m = mask[i]
        r = -0.2 * (logps[i][m] - ref[i][m])
        r[-1] += it.score
        # gamma = lam = 1: the advantage before whitening is the sum of rewards still to come minus the value
        want = torch.flip(torch.cumsum(torch.flip(r, [0]), 0), [0]) - values[i][m]
        assert torch.allclose(torch.tensor(it.returns), want + values[i][m], atol=1e-5)
        assert torch.allclose(torch.tensor(it.old_logps), logps[i][m], atol=1e-6)
    adv = torch.cat([torch.tensor(it.advantages) for it in items])
    assert abs(float(adv.mean())) < 1e-5 and float(adv.std()) == pytest.approx(1.0, abs=1e-4)  # whitened


def test_a_batch_is_sampled_every_ppo_epochs_steps_and_a_resume_keeps_it(make_config, tmp_path):
    """ppo_epochs 2: rows are taken at steps 1, 3, 5 only; stopped after step 3 (mid-batch) and resumed, the
    run trains on the same answers and ends with the same weights and value head as one that never stopped."""
    from safetensors.torch import load_file

    whole = train(ppo_config(make_config, tmp_path, "whole"), log=quiet)
    cfg = ppo_config(make_config, tmp_path, "cut")
    with pytest.raises(TrainingStopped):
        train(cfg, log=quiet, stop_at_step=3)
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert state["data_position"] == 2 * 4  # two sampled batches of 4 prompts in 3 steps
    assert (tmp_path / "cut" / "checkpoints" / "step-000003" / "stage_state.json").exists()
    resumed = train(cfg, log=quiet, resume=True)
    assert_same_run(whole, resumed)
    a = [(m["score"], m["completion_length"]) for m in metrics(whole) if "score" in m]
    b = [(m["score"], m["completion_length"]) for m in metrics(resumed) if "score" in m]
    assert a == b and a[0] == a[1] and a[2] == a[3]  # each batch trained on twice
    ha, hb = (load_file(str(r / "final" / "stage_modules.safetensors")) for r in (whole, resumed))
    assert torch.equal(ha["value_head.weight"], hb["value_head.weight"]) and ha["value_head.weight"].abs().sum() > 0


def test_ppo_micro_batching_does_not_change_the_step(make_config, tmp_path):
    from safetensors.torch import load_file

    a = train(ppo_config(make_config, tmp_path, "a", train={"max_steps": 3}), log=quiet)
    b = train(ppo_config(make_config, tmp_path, "b", train={"max_steps": 3, "grad_accum_steps": 4,
                                                            "micro_batch_size": 1}), log=quiet)
    for x, y in zip([m for m in metrics(a) if "score" in m], [m for m in metrics(b) if "score" in m], strict=True):
        assert x["score"] == y["score"] and x["loss"] == pytest.approx(y["loss"], abs=1e-5)
    wa, wb = (load_file(str(r / "final" / "adapter_model.safetensors")) for r in (a, b))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_ppo_with_a_reward_model_trained_by_rm(make_config, tmp_path):
    """stage.reward_model names an rm run: its head scores the answers (the metrics' score), and the value
    head trains; a run of another stage is refused with a clear message."""
    from test_preference import pairs

    rm_run = train(make_config(pairs(24), stage={"name": "rm"}, output={"dir": str(tmp_path / "rm")},
                               train={"max_steps": 2, "micro_batch_size": 2, "lr": 1e-3}), log=quiet)
    run = train(ppo_config(make_config, tmp_path, "ppo", stage={"rewards": [], "reward_model": str(rm_run)},
                           train={"max_steps": 2}), log=quiet)
    steps = [m for m in metrics(run) if "score" in m]
    assert len(steps) == 2 and all(m["value_loss"] > 0 for m in steps) and steps[0]["score"] != 0
    sft_run = train(make_config(output={"dir": str(tmp_path / "sft")}, train={"max_steps": 1}), log=quiet)
    with pytest.raises(TunesmithError, match="trained with stage sft, not rm"):
        train(ppo_config(make_config, tmp_path, "bad", stage={"rewards": [], "reward_model": str(sft_run)}),
              log=quiet)


def test_ppo_needs_exactly_one_scorer(make_config, tmp_path):
    from tunesmith.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match="exactly one of"):
        ppo_config(make_config, tmp_path, "x", stage={"rewards": []})


def test_ppo_raises_the_reward(make_config, tmp_path):
    """A reward for short answers: the answers get shorter, and the metrics carry score, KL, the policy and
    value losses and the clipped share."""
    run = train(ppo_config(make_config, tmp_path, "learn", stage={"ppo_epochs": 1, "kl_coef": 0.0},
                           train={"max_steps": 16, "lr": 3e-2, "micro_batch_size": 4}), log=quiet)
    steps = [m for m in metrics(run) if "score" in m]
    assert {"score", "kl", "policy_loss", "value_loss", "clipfrac", "approx_kl", "completion_length"} <= set(steps[0])
    assert sum(m["score"] for m in steps[-4:]) > sum(m["score"] for m in steps[:4]) + 0.4


def test_the_estimate_knows_what_each_online_stage_keeps(make_config, tmp_path):
    """grpo: the KV cache of the step's G answers per prompt, a reference only with kl_coef; ppo: a value
    head, the reward model when one scores, the reference of full fine-tuning; dpo with precomputed scores
    keeps none."""
    from test_preference import pairs
    from tunesmith.planning.estimate import estimate_memory, shape_from_params
    from tunesmith.planning.preflight import Machine, plan_for

    shape = shape_from_params(135e6)
    machine = Machine(device="cpu", name="cpu", precision="fp32", memory=None, bf16_native=False, compiler=False)

    def parts(cfg):
        plan = plan_for(cfg, shape, machine)
        return plan, {p.name: p.bytes for p in estimate_memory(plan).parts}

    plan, grpo = parts(grpo_config(make_config, tmp_path, "g", stage={"num_generations": 8}, method={"name": "full"}))
    assert plan.micro_batch == 8 * 2  # two prompts' groups of 8 answers per micro-batch
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * plan.seq * plan.micro_batch * plan.grad_accum * 4
    assert grpo["generation KV cache"] == kv and "reference model" not in grpo
    _, grpo_kl = parts(grpo_config(make_config, tmp_path, "g", stage={"kl_coef": 0.04}, method={"name": "full"}))
    assert grpo_kl["reference model"] == shape.params * 4
    _, ppo = parts(ppo_config(make_config, tmp_path, "p", method={"name": "full"}))
    assert "value head" in ppo and "reward model" not in ppo and ppo["reference model"] == shape.params * 4
    _, ppo_rm = parts(ppo_config(make_config, tmp_path, "p", stage={"rewards": [], "reward_model": "runs/rm"}))
    assert ppo_rm["reward model"] == shape.params * 4 and "reference model" not in ppo_rm  # lora: adapters off
    _, dpo = parts(make_config(pairs(20), method={"name": "full"}, stage={"name": "dpo", "precompute_reference": True}))
    assert "reference model" not in dpo


def test_an_online_run_exports_and_evaluates_like_any_other(make_config, tmp_path):
    """A ppo run's directory is an ordinary run: export merged and adapter (the value head stays behind: it
    is for training only), and the merged model scores a prompt as the run's model does."""
    from transformers import AutoModelForCausalLM

    from tunesmith.export import export_run
    from tunesmith.inference.loading import load_for_inference

    run = train(ppo_config(make_config, tmp_path, "ppo", train={"max_steps": 2}), log=quiet)
    export_run(run, "merged", tmp_path / "merged")
    export_run(run, "adapter", tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "stage_modules.safetensors").exists()
    loaded = load_for_inference(run)
    assert loaded.head is None
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, loaded.model(ids).logits, atol=1e-4)
