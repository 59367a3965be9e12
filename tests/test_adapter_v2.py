"""LLaMA-Adapter v2 on the tiny model: exactly the prompts, gates, per-linear scales and biases and the norms
train (a count from the layer shapes); the model is unchanged at the start; a real run lowers the loss and
resumes exactly; save → load and restore give the trained outputs; merging is refused; a run directory
applies the method by itself and exports it with its extra file; unsupported families fail before training."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_tiny_model, build_tiny_tokenizer
from test_faults import RESUMABLE, assert_same_run, losses, quiet
from test_methods_and_export import IDS, logits, perturb
from test_more_methods import LAYERS, SHAPES
from tunesmith.config.schema import MethodConfig
from tunesmith.errors import ConfigError, TrainingStopped
from tunesmith.methods import get_method, parameter_counts
from tunesmith.methods.llama_adapter_v2 import EXTRAS

HIDDEN, ADAPTER_LAYERS, ADAPTER_LEN = 32, 1, 4
PROMPTS = ADAPTER_LAYERS * (ADAPTER_LEN * HIDDEN + 1)  # prompt vectors and a gate per adapted layer
SCALES_AND_BIASES = LAYERS * sum(2 * out for _, out in SHAPES.values())  # a scale and a bias per linear output
NORMS = (2 * LAYERS + 1) * HIDDEN  # input and post-attention RMSNorm per layer, and the final norm


def method():
    return get_method(MethodConfig(name="adapter_v2", adapter_layers=ADAPTER_LAYERS, adapter_len=ADAPTER_LEN))


def trained(seed: int = 1):
    """A built model moved as if trained: prompts, gates, scales, biases and norms all off their start."""
    m = method()
    model = m.build(build_tiny_model(300))
    torch.manual_seed(seed)
    perturb(model)
    return m, model


def test_trains_prompts_scales_biases_and_norms_and_starts_unchanged():
    m = method()
    model = m.build(build_tiny_model(300))
    trainable, total = parameter_counts(model)
    assert trainable == PROMPTS + SCALES_AND_BIASES + NORMS and trainable < total
    names = [n for n, _ in m.trainable_parameters(model)]
    kinds = {"adaption_": 0, "adapter_v2_": 0, "norm.weight": 0}
    for n in names:
        kind = next(k for k in kinds if k in n)  # nothing else trains (no weight matrix, no LM head)
        kinds[kind] += 1
    assert kinds == {"adaption_": 2 * ADAPTER_LAYERS, "adapter_v2_": 2 * LAYERS * len(SHAPES), "norm.weight": 5}
    assert all("layers.1." in n for n in names if "adaption_" in n)  # prompts in the top layer only
    torch.testing.assert_close(logits(model, IDS), logits(build_tiny_model(300), IDS), rtol=0, atol=0)

    with torch.no_grad():  # the scales are applied: moving them alone changes the outputs
        for n, p in model.named_parameters():
            if n.endswith("adapter_v2_scale"):
                p.mul_(1.5)
    assert not torch.allclose(logits(model, IDS), logits(build_tiny_model(300), IDS), atol=1e-3)


def test_save_load_and_restore_give_the_trained_outputs_and_merge_is_refused(tmp_path):
    m, model = trained()
    want = logits(model, IDS)
    assert not torch.allclose(want, logits(build_tiny_model(300), IDS), atol=1e-3)
    m.save(model, tmp_path / "saved")
    prompts = load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))
    extras = load_file(str(tmp_path / "saved" / EXTRAS))
    assert all("adaption_" in k for k in prompts) and len(prompts) == 2 * ADAPTER_LAYERS
    assert sum(t.numel() for t in extras.values()) == SCALES_AND_BIASES + NORMS

    reloaded = m.load(lambda: build_tiny_model(300), tmp_path / "saved")
    torch.testing.assert_close(logits(reloaded, IDS), want)

    fresh = m.build(build_tiny_model(300))  # resume: a freshly built model takes the saved weights back
    m.restore(fresh, tmp_path / "saved")
    torch.testing.assert_close(logits(fresh, IDS), want)
    assert parameter_counts(fresh)[0] == PROMPTS + SCALES_AND_BIASES + NORMS  # and still trains all of it

    with pytest.raises(ConfigError, match="cannot be merged.*--format adapter"):
        m.merge(reloaded)


def test_missing_or_mismatched_extras_are_clear_errors_naming_the_directory(tmp_path):
    m, model = trained()
    saved = tmp_path / "saved"
    m.save(model, saved)
    tensors = load_file(str(saved / EXTRAS))
    key = next(k for k in tensors if k.endswith("q_proj.adapter_v2_scale"))

    save_file({**tensors, key: torch.ones(7)}, str(saved / EXTRAS))
    with pytest.raises(ConfigError, match=rf"{saved}: {EXTRAS} does not fit this model \(wrong shape .*q_proj"):
        m.load(lambda: build_tiny_model(300), saved)
    save_file({k: v for k, v in tensors.items() if k != key}, str(saved / EXTRAS))
    with pytest.raises(ConfigError, match=rf"{saved}: {EXTRAS} does not fit this model \(missing .*q_proj"):
        m.restore(m.build(build_tiny_model(300)), saved)
    (saved / EXTRAS).unlink()
    with pytest.raises(ConfigError, match=rf"{saved}: {EXTRAS} is missing"):
        m.load(lambda: build_tiny_model(300), saved)


def test_bf16_keeps_the_scales_fp32_and_the_activations_bf16():
    from tunesmith.training.session import store_frozen_weights_in_bf16
    from tunesmith.stages.tokens import token_loss_sum

    m, model = trained()
    assert store_frozen_weights_in_bf16(model) == LAYERS * len(SHAPES) + 1  # every frozen linear, and the LM head
    layer = model.get_base_model().model.layers[0].mlp.down_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.adapter_v2_scale.dtype == torch.float32
    seen = []
    layer.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))  # runs after the scale and bias
    batch = {"input_ids": IDS, "labels": IDS.clone(), "attention_mask": torch.ones_like(IDS)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        summed, n = token_loss_sum(model, batch)
    (summed / n).backward()
    assert seen == [torch.bfloat16]
    assert layer.adapter_v2_scale.grad.dtype == torch.float32 and layer.adapter_v2_scale.grad.abs().sum() > 0


def test_a_run_lowers_the_loss_resumes_exactly_and_its_directory_applies_the_method(make_config, tmp_path):
    from tunesmith.export import export_run
    from tunesmith.inference.loading import load_for_inference
    from tunesmith.training.loop import train

    settings = {**RESUMABLE, "train": {**RESUMABLE["train"], "lr": 5e-2}}

    def config(name):
        return make_config(method={"name": "adapter_v2", "adapter_layers": 1}, output={"dir": str(tmp_path / name)},
                           **settings)

    whole = train(config("whole"), log=quiet)
    steps = [loss for _, loss in losses(whole)]  # untrained, these batches score 5.6 to 5.8
    assert sum(steps[-3:]) / 3 < 0.9 * steps[0], steps
    assert (whole / "final" / EXTRAS).exists()

    split = config("split")  # interrupted mid-epoch, off the checkpoint interval, then resumed
    with pytest.raises(TrainingStopped):
        train(split, log=quiet, stop_at_step=5)
    train(split, log=quiet, resume=True)
    assert_same_run(whole, tmp_path / "split")  # losses and final weights (prompts and extras) bit-identical

    assert json.loads((whole / "run.json").read_text())["method"] == "adapter_v2"
    loaded = load_for_inference(str(whole))  # told nothing about the method
    assert loaded.method.name == "adapter_v2"
    norm = loaded.model.get_base_model().model.norm.weight
    torch.testing.assert_close(norm, load_file(str(whole / "final" / EXTRAS))["model.norm.weight"])
    assert not torch.equal(norm, torch.ones_like(norm))  # the trained norm, not the base's

    export_run(whole, "adapter", tmp_path / "adapter")
    for name in ("adapter_config.json", "adapter_model.safetensors", EXTRAS):
        assert (tmp_path / "adapter" / name).exists(), name
    torch.testing.assert_close(logits(get_method(loaded.method.cfg).load(lambda: build_tiny_model(len(
        build_tiny_tokenizer())), tmp_path / "adapter"), IDS), logits(loaded.model, IDS))
    with pytest.raises(ConfigError, match="cannot be merged"):
        export_run(whole, "merged", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()

def test_gpt2_scales_its_conv1d_layers_and_trains_its_layer_norms():
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=1, eos_token_id=2))

    m = method()
    model = m.build(gpt2())
    outputs = LAYERS * (3 * 32 + 32 + 4 * 32 + 32)  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    layer_norms = (2 * LAYERS + 1) * 2 * 32  # ln_1, ln_2 and ln_f: weight and bias
    assert parameter_counts(model)[0] == PROMPTS + 2 * outputs + layer_norms
    torch.testing.assert_close(logits(model, IDS), logits(gpt2(), IDS), rtol=0, atol=0)


def test_the_estimate_counts_the_same_trainable_parameters(tiny_model_dir):
    from tunesmith.planning.estimate import Plan, estimate_memory, shape_from_model, trainable_params
    from tunesmith.models.loading import ModelSource, load_causal_lm

    model = method().build(load_causal_lm(ModelSource(str(tiny_model_dir))))
    plan = Plan(shape_from_model(str(tiny_model_dir)), method="adapter_v2", adapter_layers=ADAPTER_LAYERS,
                adapter_len=ADAPTER_LEN)
    assert trainable_params(plan) == parameter_counts(model)[0]
    assert "LLaMA-Adapter v2" in estimate_memory(plan).to_text()
