"""LoRA's decomposition-based starts: PiSSA and OLoRA (lora) rewrite the frozen base and save an ordinary
LoRA on the original weights; LoftQ (qlora, 4-bit) starts the adapter from the quantization error."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_model
from test_faults import RESUMABLE, assert_same_run, quiet
from test_methods_and_export import IDS, logits, perturb
from test_more_methods import lora_count, load_quantized, tiny64_dir, train_steps  # noqa: F401 - fixture
from tunesmith.config.schema import MethodConfig, config_from_dict
from tunesmith.errors import ConfigError, TrainingStopped
from tunesmith.methods import get_method, parameter_counts
from tunesmith.training.loop import train


def q_proj(model):
    return model.get_base_model().model.layers[0].self_attn.q_proj


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_start_unchanged_from_a_rewritten_base(init):
    original = build_tiny_model(300)
    w = original.model.layers[0].self_attn.q_proj.weight.detach().clone()
    method = get_method(MethodConfig(name="lora", r=4, alpha=8, init=init))
    model = method.build(build_tiny_model(300))
    assert parameter_counts(model)[0] == lora_count(4)
    torch.testing.assert_close(logits(model, IDS), logits(original, IDS), rtol=1e-4, atol=1e-4)

    layer = q_proj(model)
    residual = layer.base_layer.weight.detach()
    moved = w - residual  # what the adapter took over from the frozen weight
    assert moved.abs().max() > 1e-3
    lora = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach() * layer.scaling["default"]
    torch.testing.assert_close(lora, moved, rtol=1e-4, atol=1e-5)
    if init == "pissa":  # the rank-4 part of W along its largest singular directions
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        torch.testing.assert_close(moved, u[:, :4] @ torch.diag(s[:4]) @ vh[:4], rtol=1e-4, atol=1e-5)
    losses = train_steps(model, method)
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_the_saved_adapter_is_an_ordinary_lora_on_the_original_weights(tmp_path, init):
    from peft import PeftModel

    method = get_method(MethodConfig(name="lora", r=4, alpha=8, init=init))
    model = method.build(build_tiny_model(300))
    perturb(model)
    want = logits(model, IDS)

    method.save(model, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["init_lora_weights"] is True
    plain = PeftModel.from_pretrained(build_tiny_model(300), tmp_path / "saved")  # plain peft, original base
    torch.testing.assert_close(logits(plain, IDS), want, rtol=1e-4, atol=1e-4)
    reloaded = method.load(lambda: build_tiny_model(300), tmp_path / "saved")
    merged = method.merge(reloaded)
    torch.testing.assert_close(logits(merged, IDS), want, rtol=1e-4, atol=1e-4)

    fresh = method.build(build_tiny_model(300))  # resume: the rewritten base again, the adapter as trained
    method.restore(fresh, tmp_path / "saved")
    torch.testing.assert_close(logits(fresh, IDS), want)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_pissa_or_olora_run_resumes_exactly_and_its_run_dir_loads(make_config, tmp_path, init):
    from tunesmith.inference.loading import load_for_inference

    # Dropout draws from the RNG: a checkpoint's conversion of the adapter must not move it.
    method = {"name": "lora", "r": 4, "init": init, "dropout": 0.1}
    whole = train(make_config(method=method, output={"dir": str(tmp_path / "whole")}, **RESUMABLE), log=quiet)
    cfg = make_config(method=method, output={"dir": str(tmp_path / "split")}, **RESUMABLE)
    with pytest.raises(TrainingStopped):
        train(cfg, log=quiet, stop_at_step=5)
    train(cfg, log=quiet, resume=True)
    assert_same_run(whole, tmp_path / "split")

    loaded = load_for_inference(str(whole))
    assert loaded.model.peft_config["default"].r == 8  # the converted adapter, on the original base


def loftq_check(model, original) -> None:
    """Each weight: 4-bit + adapter is the best rank-8 correction of its rounding error (the SVD's tail is left).
    Before any forward pass: bitsandbytes' CPU kernels may repack the 4-bit weights on first use."""
    import bitsandbytes as bnb

    layer = q_proj(model)
    base = layer.get_base_layer().weight
    rounding = (original.model.layers[0].self_attn.q_proj.weight
                - bnb.functional.dequantize_4bit(base.data, base.quant_state)).detach()
    adapter = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]).detach()
    tail = torch.linalg.svdvals(rounding)[8:].square().sum().sqrt()
    torch.testing.assert_close(torch.linalg.norm(rounding - adapter), tail, rtol=1e-3, atol=1e-5)
    assert tail < 0.9 * torch.linalg.norm(rounding)


def test_loftq_starts_qlora_closer_to_the_full_precision_model(tiny64_dir):
    from tunesmith.models.loading import ModelSource, load_causal_lm

    original = load_causal_lm(ModelSource(str(tiny64_dir)))
    full = logits(original, IDS)
    errors = {}
    for init in ("default", "loftq"):
        method = get_method(MethodConfig(name="qlora", r=8, alpha=16, init=init, compute_dtype="fp32"))
        model = method.build(load_quantized(tiny64_dir, method)())
        if init == "loftq":
            loftq_check(model, original)
        errors[init] = float((logits(model, IDS) - full).abs().mean())
    assert errors["loftq"] < errors["default"], errors
    losses = train_steps(model, method, steps=6, lr=2e-2)  # and it trains from there
    assert losses[-1] < 0.9 * losses[0], losses


def test_loftq_needs_the_base_as_safetensors(tmp_path):
    method = get_method(MethodConfig(name="qlora", r=4, init="loftq"))
    model = build_tiny_model(300)  # built in memory: no weights file to read the full-precision weights from
    with pytest.raises(ConfigError, match="loftq reads the full-precision weights from the model's safetensors"):
        method.build(model)


@pytest.mark.parametrize("method,message", [
    ({"name": "qlora", "init": "pissa"}, "applies to method lora only"),
    ({"name": "lora", "init": "loftq"}, "qlora with bits 4"),
    ({"name": "qlora", "bits": 8, "init": "loftq"}, "qlora with bits 4"),
    ({"name": "lora", "init": "olora", "use_dora": True}, "use_dora"),
    ({"name": "lora", "init": "pissa", "modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_inits_that_do_not_apply_fail_at_config_validation(method, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"data": {"train_file": "x.jsonl"}, "method": method})
