"""`tunesmith estimate`: the memory model against what autograd really keeps, exact parameter counts, and
the verdict with the changes that make a run fit. (benchmarks/memory_estimate.py checks whole-run peak
memory against measured peak RSS.)"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tunesmith.config.schema import MethodConfig, OptimizerConfig, TrainConfig
from tunesmith.planning.estimate import (GiB, HEAD_SAVED, Plan, estimate_memory, layer_activation_bytes, parse_size,
                                shape_from_model, shape_from_params, trainable_params)


def saved_activation_bytes(model, batch, precision: str) -> int:
    """Bytes of the tensors autograd keeps for the backward pass (parameters excluded, shared storage once)."""
    from tunesmith.models.device import autocast
    from tunesmith.stages.tokens import token_loss_sum

    seen: dict[int, int] = {}
    held = []  # a packed tensor stays alive, so no later storage can take its address and be counted as it

    def keep(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        held.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        with autocast(torch.device("cpu"), precision):
            token_loss_sum(model, batch, True)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in weights)


def llama(layers: int, vocab: int = 512, **dims):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(hidden_size=80, intermediate_size=200, num_attention_heads=5, num_key_value_heads=1, head_dim=16)
    shape.update(dims)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, vocab_size=vocab, tie_word_embeddings=True,
                                        **shape))


def measured(method: str, precision: str, layers: int, tokens: int, trainable_layers: int = 1,
             checkpointing: bool = False, vocab: int = 512) -> int:
    from tunesmith.methods import get_method
    from tunesmith.training.session import apply_speed_switches

    m = get_method(MethodConfig(name=method, r=8, trainable_layers=trainable_layers))
    model = m.build(llama(layers, vocab))
    apply_speed_switches(model, m, TrainConfig(gradient_checkpointing=checkpointing), precision, print)
    model.train()
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    return saved_activation_bytes(model, batch, precision)


def per_token(**kw) -> float:
    """Bytes kept per token: the slope between two lengths, so per-step constants (bf16 weight copies) cancel."""
    return (measured(tokens=160, **kw) - measured(tokens=32, **kw)) / 128


def shape_of(layers: int, vocab: int = 512):
    from tunesmith.planning.estimate import ModelShape

    return ModelShape("probe", params=0, layers=layers, hidden=80, intermediate=200, heads=5, kv_heads=1,
                      head_dim=16, vocab=vocab, tied=True)


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_activation_bytes_per_layer_and_token_are_what_autograd_keeps(method, precision):
    # A shape the coefficients were not fitted on; one layer more adds exactly the per-layer bytes per token.
    per_layer = per_token(method=method, precision=precision, layers=3) - per_token(method=method,
                                                                                     precision=precision, layers=2)
    plan = Plan(shape_of(3), method=method, precision=precision, lora_r=8)
    assert per_layer == pytest.approx(layer_activation_bytes(plan), rel=0.01)
    # The LM head keeps the scored logits in fp32 for the cross-entropy (4 bytes per vocabulary entry).
    big = per_token(method=method, precision=precision, layers=2, vocab=2048)
    small = per_token(method=method, precision=precision, layers=2)
    assert (big - small) / (2048 - 512) == pytest.approx(HEAD_SAVED[precision], rel=0.01)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_adapter_v2_layers_keep_their_linear_outputs_for_the_scales(precision):
    from tunesmith.methods import get_method
    from tunesmith.training.session import apply_speed_switches

    def kept(layers: int, tokens: int) -> int:
        method = get_method(MethodConfig(name="adapter_v2", adapter_layers=1, adapter_len=4))
        model = method.build(llama(layers))
        apply_speed_switches(model, method, TrainConfig(), precision, print)
        ids = torch.randint(0, 512, (1, tokens), generator=torch.Generator().manual_seed(0))
        return saved_activation_bytes(model.train(), {"input_ids": ids, "labels": ids.clone()}, precision)

    def slope(layers: int) -> float:
        return (kept(layers, 160) - kept(layers, 32)) / 128

    plan = Plan(shape_of(3), method="adapter_v2", precision=precision)
    assert slope(3) - slope(2) == pytest.approx(layer_activation_bytes(plan), rel=0.01)


def test_frozen_layers_below_the_trained_ones_keep_nothing_and_checkpointing_keeps_layer_inputs():
    one = per_token(method="freeze", precision="bf16", layers=4, trainable_layers=1)
    two = per_token(method="freeze", precision="bf16", layers=4, trainable_layers=2)
    deeper = per_token(method="freeze", precision="bf16", layers=6, trainable_layers=1)
    assert deeper == pytest.approx(one, rel=0.001)  # more frozen layers below: nothing more kept
    plan = Plan(shape_of(4), method="freeze", precision="bf16")
    assert two - one == pytest.approx(layer_activation_bytes(plan), rel=0.01)
    # Gradient checkpointing keeps each layer's fp32 input (4 bytes × hidden per token) during the forward pass.
    ckpt3 = per_token(method="lora", precision="bf16", layers=3, checkpointing=True)
    ckpt2 = per_token(method="lora", precision="bf16", layers=2, checkpointing=True)
    assert ckpt3 - ckpt2 == pytest.approx(4 * 80, rel=0.01)


def test_shape_and_trainable_counts_match_the_real_model(tiny_model_dir):
    from tunesmith.methods import get_method, parameter_counts
    from tunesmith.models.loading import ModelSource, load_causal_lm

    shape = shape_from_model(str(tiny_model_dir))
    base = load_causal_lm(ModelSource(str(tiny_model_dir)))
    assert shape.params == parameter_counts(base)[1]
    assert (shape.layers, shape.hidden, shape.vocab, shape.tied) == (2, 32, base.config.vocab_size, False)
    for method, extra in (("lora", {"r": 4}), ("freeze", {"trainable_layers": 1}), ("full", {}), ("ia3", {}),
                          ("oft", {"block_size": 8}), ("boft", {"block_size": 4}),
                          ("adapter", {"adapter_layers": 1, "adapter_len": 4})):
        model = get_method(MethodConfig(name=method, **extra)).build(load_causal_lm(ModelSource(str(tiny_model_dir))))
        plan = Plan(shape, method=method, lora_r=extra.get("r", 8), trainable_layers=extra.get("trainable_layers", 2),
                    block_size=extra.get("block_size", 32), adapter_layers=extra.get("adapter_layers", 8),
                    adapter_len=extra.get("adapter_len", 10))
        assert trainable_params(plan) == parameter_counts(model)[0], method


def test_verdict_and_the_changes_that_make_a_run_fit():
    shape = shape_from_params(7e9)
    assert shape.assumed == "Llama-2-7B" and shape.hidden == 4096
    qlora = estimate_memory(Plan(shape, "qlora", "bf16", micro_batch=1, seq=2048, device="cuda",
                                 device_memory=24 * GiB, gradient_checkpointing=True))
    assert qlora.fits and "fits:" in qlora.to_text()
    assert qlora.part("weights") < 5 * GiB  # 4-bit base: about half a byte per weight
    eight = estimate_memory(replace(qlora.plan, bits=8))
    assert "8-bit base" in eight.to_text() and eight.part("weights") > 1.5 * qlora.part("weights")

    full = Plan(shape, "full", "bf16", micro_batch=4, seq=2048, device="cuda", device_memory=24 * GiB)
    result = estimate_memory(full)
    assert not result.fits and "does not fit" in result.to_text()
    # fp32 weights, gradients and two AdamW moments: 16 bytes per parameter before any activation
    assert result.part("weights") + result.part("gradients") + result.part("optimizer states") == 16 * 7e9
    assert result.suggestions  # something is always proposed
    # With accumulation, earlier micro-batches' gradients are held while the next one runs.
    accumulating = estimate_memory(replace(full, grad_accum=4))
    assert accumulating.peak - result.peak == pytest.approx(result.part("gradients"))

    lora = Plan(shape_from_params(1.1e9), "lora", "bf16", micro_batch=16, seq=2048, device="cuda",
                device_memory=16 * GiB)
    result = estimate_memory(lora)
    assert not result.fits
    applied = 0
    for line in result.suggestions:  # each proposed change fits, and a micro-batch one is the largest that does
        changed = lora
        if line.startswith("train.gradient_checkpointing"):
            changed = replace(changed, gradient_checkpointing=True)
        if "train.micro_batch_size: " in line:
            micro = int(line.split("train.micro_batch_size: ")[1].split()[0])
            changed = replace(changed, micro_batch=micro)
            assert not estimate_memory(replace(changed, micro_batch=micro + 1)).fits
        if changed is not lora:
            assert estimate_memory(changed).fits, line
            applied += 1
    assert applied >= 2 and any("gradient_checkpointing" in s for s in result.suggestions)
    # checkpointing trades activations for recompute: far less memory
    assert result.activations_other_way < result.part("activations") / 4


def test_more_tokens_more_memory_and_bf16_less_than_fp32():
    shape = shape_from_params(135e6)
    small = estimate_memory(Plan(shape, micro_batch=1, seq=512)).peak
    assert small < estimate_memory(Plan(shape, micro_batch=4, seq=512)).peak < estimate_memory(
        Plan(shape, micro_batch=4, seq=1024)).peak
    assert estimate_memory(Plan(shape, precision="bf16")).peak < estimate_memory(Plan(shape, precision="fp32")).peak
    big = shape_from_params(1.1e9)  # where weights, not activations, dominate
    peak = {m: estimate_memory(Plan(big, method=m)).peak for m in ("qlora", "lora", "freeze", "full")}
    assert peak["qlora"] < peak["lora"] < peak["full"] and peak["freeze"] < peak["full"]


def test_sizes_parse_and_bad_ones_are_refused():
    assert parse_size("24GB") == parse_size("24 GiB") == parse_size("24") == 24 * GiB
    assert parse_size("800MB") == 800 * 2**20
    for bad in ("lots", "512b"):  # a bare b would be bytes: refused rather than read as GiB
        with pytest.raises(ValueError, match="not a memory size"):
            parse_size(bad)


def test_estimate_command(tiny_model_dir):
    from test_config_and_cli import run_cli

    done = run_cli("estimate", "--params", "7e9", "--method", "qlora", "--precision", "bf16", "--micro-batch", "1",
                   "--seq", "2048", "--device-memory", "24GB", "--device", "cuda", "--gradient-checkpointing",
                   "--json")
    assert done.returncode == 0, done.stderr
    for part in ("weights", "gradients", "optimizer states", "activations", "overhead", "gradient checkpointing"):
        assert part in done.stdout
    assert "\nfits:" in done.stdout
    import json

    assert json.loads(done.stdout.strip().splitlines()[-1])["fits"] is True

    done = run_cli("estimate", "--model", str(tiny_model_dir), "--micro-batch", "2", "--seq", "64", "--precision",
                   "fp32", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "time:" in done.stdout and "tokens/s" in done.stdout  # this machine: a time estimate too

    done = run_cli("estimate", "--params", "7e9", "--model", "x")
    assert done.returncode == 2 and "either --model" in done.stderr


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "sgd", "galore", "galore_8bit", "galore_adafactor",
                                       "badam"])
def test_optimizer_state_bytes_are_what_the_optimizer_keeps(optimizer):
    """After one step, the bytes in the real optimizer's state (GaLore's projections included) are the estimate's."""
    from tunesmith.planning.estimate import ModelShape, optimizer_memory
    from tunesmith.optim.build import build_optimizer

    model = llama(2, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32)
    shape = ModelShape("probe", params=sum(p.numel() for p in model.parameters()), layers=2, hidden=128,
                       intermediate=256, heads=4, kv_heads=2, head_dim=32, vocab=512, tied=True)
    opt = build_optimizer(list(model.named_parameters()), TrainConfig(), model=model, log=lambda *_: None,
                          optimizer=OptimizerConfig(name=optimizer, **({"rank": 16} if "galore" in optimizer else {})))
    if optimizer == "badam":
        opt.begin_step(1)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()

    storages: dict[int, int] = {}  # bitsandbytes' code books are shared by all parameters: count them once

    def count(value) -> None:
        if isinstance(value, torch.Tensor) and value.numel() > 1:  # step counters aside
            storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
        elif hasattr(value, "ortho_matrix"):  # GaLore's projector
            count(value.ortho_matrix)

    for state in opt.state.values():
        for value in state.values():
            count(value)
    real = sum(storages.values())
    plan = Plan(shape, method="full", optimizer=optimizer, galore_rank=16)
    _, states, _ = optimizer_memory(plan, trainable_params(plan))
    assert states == pytest.approx(real, rel=0.005)  # 8-bit: plus its two code books (2 KiB)


def test_estimate_refuses_an_optimizer_the_method_cannot_use():
    from tunesmith.errors import ConfigError
    from tunesmith.planning.preflight import estimate_command

    with pytest.raises(ConfigError, match="optimizer.name badam works on the model's own weights"):
        estimate_command(model=None, params=7e9, method="lora", precision="bf16", micro_batch=1, seq=512,
                         device_memory="24GB", device="cuda", gradient_checkpointing=False, lora_r=8,
                         trainable_layers=2, tokens=None, layers=None, hidden=None, intermediate=None, vocab=None,
                         as_json=False, optimizer="badam")
