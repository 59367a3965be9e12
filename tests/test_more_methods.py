"""LoRA's options (DoRA, rsLoRA, init, LoRA+, modules to save), IA3, OFT, BOFT and freeze by regex, on the
tiny model: only the intended parameters train (a count from the layer shapes), loss falls, save → load
gives the same outputs, merged = unmerged, and a run directory applies its method when loaded."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model
from test_methods_and_export import IDS, logits, perturb
from tunesmith.config.schema import MethodConfig, TrainConfig
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.methods import get_method, parameter_counts

# The tiny model's linear layers per decoder layer as (in, out); 2 layers, vocabulary 300, hidden 32.
SHAPES = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
          "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)}
LAYERS = 2


def lora_count(r: int, dora: bool = False) -> int:
    return LAYERS * sum(r * (i + o) + (o if dora else 0) for i, o in SHAPES.values())


def oft_count(block: int) -> int:  # per module: in/block blocks, each a skew-symmetric block (upper triangle)
    return LAYERS * sum(i // block * block * (block - 1) // 2 for i, _ in SHAPES.values())


def boft_count(block: int) -> int:  # per module: in/block full blocks, plus a scale per output
    return LAYERS * sum(i // block * block * block + o for i, o in SHAPES.values())


CASES = [
    (MethodConfig(name="lora", r=2, alpha=4, use_dora=True), lora_count(2, dora=True), "lora_"),
    (MethodConfig(name="lora", r=4, alpha=4, use_rslora=True, init="gaussian"), lora_count(4), "lora_"),
    (MethodConfig(name="lora", r=2, alpha=4, modules_to_save=["lm_head"]), lora_count(2) + 300 * 32, ""),
    (MethodConfig(name="ia3"), LAYERS * (16 + 16 + 64), "ia3_"),  # keys' and values' outputs, down_proj's input
    (MethodConfig(name="oft", block_size=8), oft_count(8), "oft_"),
    (MethodConfig(name="boft", block_size=4), boft_count(4), "boft_"),
    (MethodConfig(name="freeze", trainable_layers=0, trainable_regex=r"self_attn\.(q|v)_proj"),
     LAYERS * (32 * 32 + 32 * 16), "_proj"),
]


def train_steps(model, method, steps: int = 8, lr: float = 1e-2) -> list[float]:
    from tunesmith.stages.tokens import token_loss_sum
    from tunesmith.optim.build import build_optimizer

    optimizer = build_optimizer(method.trainable_parameters(model), TrainConfig(lr=lr, weight_decay=0.0),
                                method.lr_multiplier)
    batch = {"input_ids": IDS, "labels": IDS.clone(), "attention_mask": torch.ones_like(IDS)}
    model.train()
    losses = []
    for _ in range(steps):
        summed, n = token_loss_sum(model, batch)
        (summed / n).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(summed.detach()) / n)
    return losses


@pytest.mark.parametrize("cfg,expected,marker", CASES, ids=lambda x: getattr(x, "name", None) or "")
def test_only_the_intended_parameters_train_and_loss_falls(cfg, expected, marker):
    method = get_method(cfg)
    model = method.build(build_tiny_model(300))
    trainable, total = parameter_counts(model)
    assert trainable == expected and trainable < total
    assert all(marker in name for name, _ in method.trainable_parameters(model))
    losses = train_steps(model, method, lr=5e-2 if cfg.name == "ia3" else 1e-2)  # IA3's few vectors want more
    assert losses[-1] < 0.9 * losses[0] and losses[-1] == min(losses), losses


@pytest.mark.parametrize("cfg,expected,marker", CASES, ids=lambda x: getattr(x, "name", None) or "")
def test_save_load_and_merge_give_the_same_outputs(tmp_path, cfg, expected, marker):
    method = get_method(cfg)
    model = method.build(build_tiny_model(300))
    perturb(model)  # as if trained: every method's update is no longer the identity
    want = logits(model, IDS)
    assert not torch.allclose(want, logits(build_tiny_model(300), IDS), atol=1e-3)  # the method changed outputs

    method.save(model, tmp_path / "saved")
    reloaded = method.load(lambda: build_tiny_model(300), tmp_path / "saved")
    torch.testing.assert_close(logits(reloaded, IDS), want)
    merged = method.merge(reloaded)
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(logits(merged, IDS), want, rtol=1e-4, atol=1e-4)

    fresh = method.build(build_tiny_model(300))  # resume: a freshly built model takes the saved weights back
    method.restore(fresh, tmp_path / "saved")
    torch.testing.assert_close(logits(fresh, IDS), want)


def test_lora_plus_gives_the_b_matrices_a_higher_learning_rate():
    from tunesmith.optim.build import build_optimizer

    method = get_method(MethodConfig(name="lora", r=2, lora_plus_ratio=16))
    model = method.build(build_tiny_model(300))
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = build_optimizer(method.trainable_parameters(model), TrainConfig(lr=1e-3), method.lr_multiplier)
    for group in optimizer.param_groups:
        kinds = {"lora_B" in names[id(p)] for p in group["params"]}
        assert len(kinds) <= 1  # A and B never share a group
        if kinds == {True}:
            assert group["lr"] == pytest.approx(16e-3)
        elif kinds == {False}:
            assert group["lr"] == pytest.approx(1e-3)
    assert any(g["lr"] == pytest.approx(16e-3) and g["params"] for g in optimizer.param_groups)


def test_bad_settings_are_clear_config_errors():
    with pytest.raises(ConfigError, match=r"block_size 5 does not divide .*q_proj \(32\).*fit: 4, 8, 16, 32"):
        get_method(MethodConfig(name="oft", block_size=5)).build(build_tiny_model(300))
    with pytest.raises(ConfigError, match="trainable_regex: no parameter name matches"):
        get_method(MethodConfig(name="freeze", trainable_layers=0, trainable_regex="nothing_here")).build(
            build_tiny_model(300))
    from tunesmith.config.schema import config_from_dict

    with pytest.raises(ConfigError, match="method.trainable_regex: not a valid regular expression"):
        config_from_dict({"data": {"train_file": "x.jsonl"}, "method": {"name": "freeze", "trainable_regex": "(("}})


@pytest.mark.parametrize("name", ["ia3", "oft", "boft", "adapter"])
def test_a_run_directory_applies_its_method_when_loaded(make_config, name, tmp_path):
    from tunesmith.export import export_run
    from tunesmith.inference.loading import load_for_inference
    from tunesmith.training.loop import train

    cfg = make_config(method={"name": name, "block_size": 8, "adapter_layers": 1}, train={"max_steps": 2, "lr": 1e-2})
    run = train(cfg, log=lambda *_: None)
    loaded = load_for_inference(str(run))  # told nothing about the method
    assert loaded.method.name == name
    peft_type = {"adapter": "adaption_prompt"}.get(name, name)
    assert loaded.model.peft_config["default"].peft_type.value.lower() == peft_type
    export_run(run, "adapter", tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    if name == "adapter":  # prompts have no place in the weights
        with pytest.raises(ConfigError, match="cannot be merged"):
            export_run(run, "merged", tmp_path / "merged")
        assert not (tmp_path / "merged").exists()
    else:
        export_run(run, "merged", tmp_path / "merged")
        assert (tmp_path / "merged" / "config.json").exists()


# ----------------------------------------------------------------------------------------------- QLoRA


@pytest.fixture(scope="module")
def tiny64_dir(tmp_path_factory):
    """A tiny model whose layers are 64 wide: bitsandbytes quantizes in blocks of 64 inputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import build_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny64")
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
                                         initializer_range=0.1))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def load_quantized(path, method):
    from tunesmith.models.loading import ModelSource, load_causal_lm

    return lambda quantized=True, on=None: load_causal_lm(
        ModelSource(str(path)), **(method.load_kwargs(on or torch.device("cpu")) if quantized else {}))


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_lora_on_a_quantized_base_and_merges_into_its_dequantized_weights(tiny64_dir, tmp_path, bits):
    import bitsandbytes as bnb

    method = get_method(MethodConfig(name="qlora", r=4, alpha=8, bits=bits, compute_dtype="fp32"))
    load_base = load_quantized(tiny64_dir, method)
    model = method.build(load_base())
    quantized = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    layer = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, quantized)
    # (in, out) of the 64-wide model's linears, times r, over 2 layers: only the adapters train
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    trainable, total = parameter_counts(model)
    assert trainable == 2 * sum(4 * (i + o) for i, o in shapes)
    assert total == parameter_counts(load_base(quantized=False))[1] + trainable  # 4-bit weights counted whole
    assert all("lora_" in n for n, _ in method.trainable_parameters(model))
    losses = train_steps(model, method, steps=6, lr=2e-2)
    assert losses[-1] < 0.9 * losses[0], losses

    want = logits(model, IDS)
    method.save(model, tmp_path / "saved")
    reloaded = method.load(load_base, tmp_path / "saved")
    torch.testing.assert_close(logits(reloaded, IDS), want)
    with pytest.warns(UserWarning, match="quantization gap"):
        merged = method.merge(reloaded)
    assert isinstance(merged.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # de-quantized, full precision
    # It computes what was trained (8-bit also rounds activations, so less exactly); the adapter on the original
    # base is further off by the quantization gap.
    gap = (logits(merged, IDS) - want).abs().max()
    assert gap < (0.005 if bits == 4 else 0.01) * want.abs().max()
    on_original = logits(get_method(MethodConfig(name="lora", r=4, alpha=8)).load(
        lambda: load_base(quantized=False), tmp_path / "saved"), IDS)
    assert gap < (on_original - want).abs().max()


def capture_trained(monkeypatch, probe):
    """What `probe(model)` gives on the model train() is about to save as final/: the trained model itself."""
    from tunesmith.training import session

    seen: dict = {}
    real = session.save_final

    def capturing(method, model, run_dir, *stage):
        was_training = model.training
        seen["value"] = probe(model)
        model.train(was_training)
        return real(method, model, run_dir, *stage)

    monkeypatch.setattr(session, "save_final", capturing)
    return seen


def last_val_loss(run) -> float:
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r][-1]


def test_qlora_run_reloads_the_trained_model_on_a_4bit_base(make_config, tiny64_dir, monkeypatch):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tunesmith.stages.tokens import mean_loss
    from tunesmith.inference.loading import load_for_inference
    from tunesmith.data.pipeline import load_data_and_tokenizer
    from tunesmith.training.loop import train

    trained = capture_trained(monkeypatch, lambda model: logits(model, IDS))
    cfg = make_config(model={"name_or_path": str(tiny64_dir)}, method={"name": "qlora", "r": 4},
                      train={"max_steps": 4, "lr": 1e-2}, eval={"interval": 4})
    run = train(cfg, log=lambda *_: None)
    loaded = load_for_inference(str(run))
    assert loaded.method.name == "qlora"
    torch.testing.assert_close(logits(loaded.model, IDS), trained["value"], rtol=0, atol=0)  # what was trained

    # The base really is 4-bit: every linear of the decoder stores its weight as NF4 codes, two per byte.
    shapes = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
              "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
    quantized = [(n, m) for n, m in loaded.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * len(shapes)
    for name, module in quantized:
        i, o = shapes[name.removesuffix(".base_layer").rsplit(".", 1)[-1]]
        assert module.weight.dtype == torch.uint8 and module.weight.numel() == i * o // 2, name
        assert tuple(module.weight.quant_state.shape) == (o, i) and module.weight.quant_state.quant_type == "nf4"

    # The same adapter through peft on a base quantized by transformers directly gives the same logits; on
    # the full-precision base it does not (the quantization gap), so the loaded base was not fp32.
    direct = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        str(tiny64_dir), quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)), run / "final")
    torch.testing.assert_close(logits(direct, IDS), trained["value"], rtol=0, atol=0)
    on_fp32 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny64_dir)), run / "final")
    assert not torch.allclose(logits(on_fp32, IDS), trained["value"], atol=1e-3)

    # Training helped: on the validation rows the adapter beats the adapter switched off, which is exactly
    # where the run started (LoRA's B starts at zero); and the reloaded model scores what the run recorded.
    _, tokenizer, data = load_data_and_tokenizer(cfg)
    val_loss, count = mean_loss(loaded.model, data.val, 4, tokenizer.pad_token_id)
    with loaded.model.disable_adapter():
        start_loss, _ = mean_loss(loaded.model, data.val, 4, tokenizer.pad_token_id)
    assert count > 0 and val_loss < start_loss, (val_loss, start_loss)
    assert val_loss == pytest.approx(last_val_loss(run), rel=1e-6)


def test_qlora_without_bitsandbytes_parses_and_the_preflight_names_the_install(monkeypatch, make_config):
    """A run's config reads without the optional extras (a saved run can be inspected anywhere); the pre-flight
    of doctor and train says what to install."""
    import importlib.util

    from tunesmith.config.schema import config_from_dict
    from tunesmith.planning.preflight import packages

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("bitsandbytes", "galore_torch") else real(name, *a))
    cfg = config_from_dict({"data": {"train_file": "x.jsonl"}, "method": {"name": "qlora"}})
    [finding] = packages(cfg)
    assert finding.severity == "error" and "method qlora needs bitsandbytes" in finding.message
    assert "pip install 'bitsandbytes>=0.49'" in finding.suggestion
    galore = config_from_dict({"data": {"train_file": "x.jsonl"}, "method": {"name": "full"},
                               "train": {"optimizer": "galore_8bit"}})
    assert [f.message for f in packages(galore)] == [
        "optimizer.name galore_8bit needs galore_torch, which is not installed",
        "optimizer.name galore_8bit needs bitsandbytes, which is not installed"]
    with pytest.raises(TunesmithError, match="pre-flight checks found 1 error"):
        from tunesmith.training.loop import train

        train(make_config(method={"name": "qlora"}), log=lambda *_: None)


# ------------------------------------------------------------------------------------- LLaMA-Adapter


def assert_round_trip_that_cannot_merge(method, model, tmp_path) -> None:
    """Save → load and save → restore give the trained outputs; merging is refused with a clear error."""
    want = logits(model, IDS)
    method.save(model, tmp_path / "saved")
    torch.testing.assert_close(logits(method.load(lambda: build_tiny_model(300), tmp_path / "saved"), IDS), want)
    fresh = method.build(build_tiny_model(300))
    method.restore(fresh, tmp_path / "saved")
    torch.testing.assert_close(logits(fresh, IDS), want)
    with pytest.raises(ConfigError, match="cannot be merged"):
        method.merge(model)


def test_llama_adapter_trains_gated_prompts_in_the_top_layers(tmp_path):
    method = get_method(MethodConfig(name="adapter", adapter_layers=1, adapter_len=4))
    model = method.build(build_tiny_model(300))
    names = [n for n, _ in method.trainable_parameters(model)]
    assert parameter_counts(model)[0] == 1 * (4 * 32 + 1)  # prompts (len × hidden) and a gate, top layer only
    assert names and all("layers.1.self_attn.adaption_" in n for n in names)
    torch.testing.assert_close(logits(model, IDS), logits(build_tiny_model(300), IDS))  # the gate starts closed
    losses = train_steps(model, method, steps=20, lr=1e-1)  # the gate opens slowly: more steps than the others
    assert losses[-1] < 0.9 * losses[0] and losses[-1] == min(losses), losses

    assert_round_trip_that_cannot_merge(method, model, tmp_path)


@pytest.mark.parametrize("name", ["adapter", "adapter_v2"])
def test_llama_adapter_on_an_unsupported_family_fails_before_training(make_config, tmp_path, name):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from conftest import build_tiny_tokenizer
    from tunesmith.errors import TunesmithError
    from tunesmith.training.loop import train

    path = tmp_path / "qwen"
    tokenizer = build_tiny_tokenizer()
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    cfg = make_config(model={"name_or_path": str(path)}, method={"name": name, "adapter_layers": 1},
                      output={"dir": str(tmp_path / "run")})
    lines: list[str] = []
    with pytest.raises(TunesmithError, match="pre-flight checks found 1 error"):
        train(cfg, log=lines.append)
    assert any(f"method {name} (LLaMA-Adapter) supports the llama, mistral, gpt2 model families; this model is "
               "'qwen2'" in line for line in lines)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ soft prompts


def loss_through_peft(model, ids) -> float:
    """peft's own loss (it pads the labels for the virtual positions itself): the reference for ours. The
    first real token is left out, as everywhere in tunesmith (a row's first token is never a target)."""
    labels = ids.clone()
    labels[:, 0] = -100
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=ids, labels=labels).loss)


@pytest.mark.parametrize("name,expected", [("prompt", 6 * 32), ("prefix", 6 * LAYERS * 2 * 16)])
def test_soft_prompts_train_score_only_real_tokens_and_round_trip(tmp_path, name, expected):
    from tunesmith.stages.tokens import token_loss_sum

    method = get_method(MethodConfig(name=name, num_virtual_tokens=6))
    model = method.build(build_tiny_model(300))
    assert parameter_counts(model)[0] == expected  # prompt: 6 × hidden; prefix: 6 × layers × (key + value) width
    batch = {"input_ids": IDS, "labels": IDS.clone(), "attention_mask": torch.ones_like(IDS)}
    model.eval()
    with torch.no_grad():
        summed, n = token_loss_sum(model, batch)
    assert n == IDS.shape[1] - 1 and float(summed) / n == pytest.approx(loss_through_peft(model, IDS), rel=1e-5)

    losses = train_steps(model, method, lr=1e-1)
    assert losses[-1] < 0.9 * losses[0], losses
    assert_round_trip_that_cannot_merge(method, model, tmp_path)


def test_prompt_starts_from_the_embeddings_of_a_text(tiny_model_dir):
    from tunesmith.models.loading import ModelSource, load_causal_lm, load_tokenizer

    text = "Shout it"
    method = get_method(MethodConfig(name="prompt", num_virtual_tokens=4, prompt_init_text=text))
    base = load_causal_lm(ModelSource(str(tiny_model_dir)))
    embeddings = base.get_input_embeddings().weight.detach().clone()
    model = method.build(base)
    ids = load_tokenizer(ModelSource(str(tiny_model_dir)))(text)["input_ids"][:4]
    prompt = next(p for n, p in model.named_parameters() if p.requires_grad)
    torch.testing.assert_close(prompt.detach(), embeddings[ids])


def test_a_prompt_tuned_run_evaluates_and_generates(make_config, tiny_model_dir, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.stages.tokens import mean_loss
    from tunesmith.inference.generate import Sampling, generate_batch
    from tunesmith.methods.prompt_tuning import PromptTuningMethod
    from tunesmith.models.loading import ModelSource, load_tokenizer
    from tunesmith.inference.loading import load_for_inference
    from tunesmith.stages import sft
    from tunesmith.data.pipeline import load_data_and_tokenizer
    from tunesmith.training.loop import train

    initial: dict = {}
    real_build = PromptTuningMethod.build

    def build(self, model):  # the soft prompt the run starts from
        built = real_build(self, model)
        initial["prompt"] = {n: p.detach().clone() for n, p in built.named_parameters() if p.requires_grad}
        return built

    monkeypatch.setattr(PromptTuningMethod, "build", build)
    trained = capture_trained(monkeypatch, lambda model: logits(model, IDS))
    packed: list[bool] = []
    real_batches = sft.micro_batches
    monkeypatch.setattr(sft, "micro_batches", lambda rows, size, pad_id, p=False: packed.append(p) or real_batches(
        rows, size, pad_id, p))

    cfg = make_config(method={"name": "prompt", "num_virtual_tokens": 4},
                      train={"max_steps": 6, "lr": 1e-1, "packing": True}, eval={"interval": 3})
    lines: list[str] = []
    run = train(cfg, log=lines.append)
    assert any("packing is off" in line for line in lines)  # soft prompts and packed rows do not mix
    assert packed and not any(packed)  # and the loop really padded them
    loaded = load_for_inference(str(run))
    assert loaded.method.name == "prompt"
    torch.testing.assert_close(logits(loaded.model, IDS), trained["value"], rtol=0, atol=0)

    # On the validation rows the trained prompt beats the prompt the run started from, and the reloaded
    # model scores what the run itself recorded at its last step.
    _, tokenizer, data = load_data_and_tokenizer(cfg)
    val_loss, count = mean_loss(loaded.model, data.val, 4, tokenizer.pad_token_id)
    assert count > 0 and val_loss == pytest.approx(last_val_loss(run), rel=1e-6)
    params = {n: p for n, p in loaded.model.named_parameters() if "prompt_encoder" in n}
    assert len(params) == len(initial["prompt"]) == 1
    with torch.no_grad():
        next(iter(params.values())).copy_(next(iter(initial["prompt"].values())))
    start_loss, _ = mean_loss(loaded.model, data.val, 4, tokenizer.pad_token_id)
    assert val_loss < start_loss, (val_loss, start_loss)
    loaded = load_for_inference(str(run))  # the trained prompt again

    # Replies equal greedy generation through peft directly, from the run's own tokenizer and template.
    # (One conversation per batch: left-padded batches of soft-prompted rows differ, see the xfail below.)
    convos = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "shout river blue seven"}]]
    replies = generate_batch(loaded.model, loaded.tokenizer, convos, Sampling(max_new_tokens=6), batch_size=1)
    run_tokenizer = load_tokenizer(ModelSource(str(run / "tokenizer")))
    direct = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), run / "final").eval()
    eos = run_tokenizer.eos_token_id
    for convo, reply in zip(convos, replies):
        ids = torch.tensor([run_tokenizer(run_tokenizer.apply_chat_template(convo, tokenize=False,
                                                                            add_generation_prompt=True),
                                          add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = direct.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                  do_sample=False, eos_token_id=eos, pad_token_id=eos)[0, ids.shape[1]:].tolist()
        new = out[: out.index(eos)] if eos in out else out
        assert new and reply == run_tokenizer.decode(new, skip_special_tokens=True), (convo, reply)
        with torch.no_grad():  # the prompt changes what the model predicts
            prompted = direct(input_ids=ids).logits[0, -1]
            plain = direct.get_base_model()(input_ids=ids).logits[0, -1]
        assert not torch.allclose(plain, prompted, atol=1e-3)


@pytest.mark.xfail(strict=True, reason="known bug: peft ignores position_ids for prompt tuning ('Position ids are "
                   "not supported ... Ignoring'), so a left-padded batch does not give each conversation its own "
                   "positions and batched greedy replies differ from the replies the conversations get alone "
                   "(generate.generate_batch pads soft-prompted rows; the plain base model batches correctly)")
def test_a_soft_prompt_gives_the_same_greedy_replies_batched_as_alone():
    from conftest import build_tiny_tokenizer
    from tunesmith.inference.generate import Sampling, generate_batch

    tokenizer = build_tiny_tokenizer()
    method = get_method(MethodConfig(name="prompt", num_virtual_tokens=4))
    model = method.build(build_tiny_model(len(tokenizer)))
    perturb(model)
    model.eval()
    convos = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "shout river blue seven"}]]
    alone = [generate_batch(model, tokenizer, [c], Sampling(max_new_tokens=6))[0] for c in convos]
    assert generate_batch(model, tokenizer, convos, Sampling(max_new_tokens=6)) == alone
