"""Exact resume for every adapter method (IA3, OFT, BOFT, LLaMA-Adapter, prompt and prefix tuning, DoRA and
QLoRA in 4-bit, 8-bit and 4-bit with LoftQ), and that a finished run, loaded back or exported, computes what
was trained: through plain peft for every method, and as a plain transformers model for merged QLoRA.

The tiny base has attention dropout, so every method (also those without dropout of their own) draws random
numbers in each training step: a resume that does not restore the RNG gives different losses after the
interruption, which the sensitivity tests at the end show. Each expectation comes from a path independent of
the one under test: an uninterrupted run, the model in memory at the end of training, or plain peft and
transformers on the saved files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import alpaca_rows, build_tiny_tokenizer, write_jsonl
from tunesmith.errors import TrainingStopped

STEPS, STOP = 4, 2  # stop after step 2 of 4; no periodic checkpoint, so resume starts from the stop's checkpoint

# Method settings: dropout > 0 wherever the method has dropout of its own (LoRA/DoRA, OFT, BOFT).
METHODS = {
    "ia3": {"name": "ia3"},
    "oft": {"name": "oft", "block_size": 16, "dropout": 0.2},
    # BOFT's CPU forward is slow (~10x OFT's); two target modules keep the case to seconds.
    "boft": {"name": "boft", "block_size": 8, "dropout": 0.2, "target_modules": ["q_proj", "v_proj"]},
    "adapter": {"name": "adapter", "adapter_layers": 1, "adapter_len": 4},
    "prompt": {"name": "prompt", "num_virtual_tokens": 4},
    "prefix": {"name": "prefix", "num_virtual_tokens": 4},
    "dora": {"name": "lora", "r": 2, "alpha": 4, "use_dora": True, "dropout": 0.2},
}
QUANTIZED = {
    "qlora4": {"name": "qlora", "r": 2, "alpha": 4, "bits": 4, "dropout": 0.2, "compute_dtype": "fp32"},
    "qlora4-bf16": {"name": "qlora", "r": 2, "alpha": 4, "bits": 4, "dropout": 0.2},  # the default compute dtype
    "qlora8": {"name": "qlora", "r": 2, "alpha": 4, "bits": 8, "dropout": 0.2},
    "qlora4-loftq": {"name": "qlora", "r": 2, "alpha": 4, "bits": 4, "init": "loftq", "dropout": 0.2,
                     "compute_dtype": "fp32"},
}
# Soft prompts and the gated adapter move slowly at 1e-2; a higher rate makes their steps' losses differ.
LR = {"ia3": 5e-2, "adapter": 1e-1, "prompt": 1e-1, "prefix": 5e-2}


def quiet(*_):
    pass


def save_tiny_base(path: Path, width: int) -> Path:
    """A tiny Llama with attention dropout (so every method's step draws random numbers), saved with the
    tiny tokenizer. width 64 for QLoRA: bitsandbytes quantizes in blocks of 64 inputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        pad_token_id=2, tie_word_embeddings=False, initializer_range=0.1, attention_dropout=0.1))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("resume-bases")
    return {w: save_tiny_base(root / f"w{w}", w) for w in (32, 64)}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("resume-data") / "data.jsonl", alpaca_rows(24))


def make_cfg(key: str, base: Path, data: Path, out: Path):
    from tunesmith.config.schema import config_from_dict

    method = {**METHODS, **QUANTIZED}[key]
    return config_from_dict({
        "model": {"name_or_path": str(base)},
        "data": {"train_file": str(data), "val_size": 4, "test_size": 0, "seed": 0, "max_seq_length": 128},
        "method": method,
        "train": {"max_steps": STEPS, "lr": LR.get(key, 1e-2), "micro_batch_size": 2, "grad_accum_steps": 2,
                  "lr_scheduler": "cosine", "warmup_steps": 1, "weight_decay": 0.01, "precision": "fp32",
                  "seed": 0, "device": "cpu"},
        "eval": {"batch_size": 4},
        "checkpoint": {"keep_last": 2},
        "output": {"dir": str(out)},
    }, f"test-{key}")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def step_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics(run) if "loss" in r]


def val_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in metrics(run) if "val_loss" in r]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted((run / "final").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def fixed_batch() -> torch.Tensor:
    tokenizer = build_tiny_tokenizer()
    texts = ["<|im_start|>user\nShout this.\n\ncat river<|im_end|>\n<|im_start|>assistant\n",
             "<|im_start|>user\nShout this.\n\nlamp ok<|im_end|>\n<|im_start|>assistant\nLAMP"]
    rows = [tokenizer(t)["input_ids"] for t in texts]
    n = min(len(r) for r in rows)
    return torch.tensor([r[:n] for r in rows])


IDS = fixed_batch()


def logits_of(model) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits.float().cpu()
    model.train(was)
    return out


_RUNS: dict[str, tuple[Path, torch.Tensor]] = {}


def whole_run(key: str, bases, data_file, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """An uninterrupted run (once per method in this module), and the logits on IDS of the model in memory at
    the end of training, taken just before the final weights are written."""
    if key not in _RUNS:
        import tunesmith.training.loop as loop
        from tunesmith.training import session

        captured: list[torch.Tensor] = []
        real = session.save_final

        def save_final(method, model, run_dir, *stage):
            captured.append(logits_of(model))
            return real(method, model, run_dir, *stage)

        base = bases[64 if key in QUANTIZED else 32]
        out = tmp_path_factory.mktemp(f"whole-{key}") / "run"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(session, "save_final", save_final)
            run = loop.train(make_cfg(key, base, data_file, out), log=quiet)
        assert len(captured) == 1
        _RUNS[key] = (run, captured[0])
    return _RUNS[key]


def interrupted_run(key: str, bases, data_file, out: Path) -> tuple[Path, list[str]]:
    from tunesmith.training.loop import train

    cfg = make_cfg(key, bases[64 if key in QUANTIZED else 32], data_file, out)
    with pytest.raises(TrainingStopped, match=f"stopped after step {STOP}"):
        train(cfg, log=quiet, stop_at_step=STOP)
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert [s for s, _ in step_losses(out)] == list(range(1, STOP + 1))  # really stopped there
    assert not (out / "final").exists()
    lines: list[str] = []
    train(cfg, log=lines.append, resume=True)
    return out, lines


def assert_resumed_run_is_the_whole_run(whole: Path, split: Path, lines: list[str]) -> None:
    assert any(f"resuming from step-{STOP:06d}: step {STOP} of {STEPS}" in line for line in lines), lines
    info = json.loads((split / "run.json").read_text())
    assert info["status"] == "complete" and info["resumed_from"] == f"step-{STOP:06d}"
    want = step_losses(whole)
    assert [s for s, _ in want] == list(range(1, STEPS + 1))
    assert len({v for _, v in want}) == STEPS, want  # every step's loss differs: equality below means something
    assert step_losses(split) == want  # bit-identical floats, steps after the resume included
    assert val_losses(split) == val_losses(whole) and val_losses(whole)
    wa, wb = final_weights(whole), final_weights(split)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ------------------------------------------------------------------------------------ exact resume


@pytest.mark.parametrize("key", list(METHODS) + list(QUANTIZED))
def test_interrupted_and_resumed_run_is_bit_identical_to_an_uninterrupted_one(key, bases, data_file,
                                                                               tmp_path_factory, tmp_path):
    whole, _ = whole_run(key, bases, data_file, tmp_path_factory)
    split, lines = interrupted_run(key, bases, data_file, tmp_path / "split")
    assert_resumed_run_is_the_whole_run(whole, split, lines)


# ------------------------------------------------------------- a finished run computes what was trained


def plain_base(path: Path, quantization=None):
    """The base model as plain transformers loads it (optionally quantized by a config built here)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                **({"quantization_config": quantization} if quantization else {}))


def through_plain_peft(base, run: Path) -> torch.Tensor:
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():  # BOFT's CUDA kernel cannot build on a CPU; peft warns and does without
        warnings.filterwarnings("ignore", message=".*(CUDA extension|boft_n_butterfly_factor).*")
        return logits_of(PeftModel.from_pretrained(base, str(run / "final")))


@pytest.mark.parametrize("key", list(METHODS))
def test_a_loaded_run_gives_the_trained_logits_and_so_does_plain_peft(key, bases, data_file, tmp_path_factory):
    """Every non-quantized method here saves a peft adapter, so each has a plain-peft form (none skipped)."""
    from tunesmith.inference.loading import load_for_inference

    run, trained = whole_run(key, bases, data_file, tmp_path_factory)
    untrained = logits_of(plain_base(bases[32]))
    if METHODS[key]["name"] == "prompt":  # peft puts the virtual tokens' logits first; the base has none
        untrained = torch.cat([torch.zeros(IDS.shape[0], METHODS[key]["num_virtual_tokens"], untrained.shape[-1]),
                               untrained], dim=1)
    # Training moved the outputs, so the equalities below are not the base's logits twice.
    assert trained.shape == untrained.shape and (trained - untrained).abs().max() > 1e-3

    loaded = load_for_inference(str(run))
    assert loaded.method is not None and loaded.method.name == METHODS[key]["name"]
    torch.testing.assert_close(logits_of(loaded.model), trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(through_plain_peft(plain_base(bases[32]), run), trained, rtol=1e-5, atol=1e-5)


def bnb_config(method: dict):
    """The quantization a QLoRA run's method settings describe, written out here independently."""
    from transformers import BitsAndBytesConfig

    if method["bits"] == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.float32 if method.get("compute_dtype") == "fp32" else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


@pytest.mark.parametrize("key", list(QUANTIZED))
def test_a_loaded_qlora_run_gives_the_trained_logits_on_its_quantized_base(key, bases, data_file,
                                                                          tmp_path_factory):
    import bitsandbytes as bnb

    from tunesmith.inference.loading import load_for_inference

    run, trained = whole_run(key, bases, data_file, tmp_path_factory)
    assert (trained - logits_of(plain_base(bases[64], bnb_config(QUANTIZED[key])))).abs().max() > 1e-3

    loaded = load_for_inference(str(run))
    kind = bnb.nn.Linear4bit if QUANTIZED[key]["bits"] == 4 else bnb.nn.Linear8bitLt
    assert isinstance(loaded.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer, kind)
    # The same quantized base and adapter on the same CPU kernels: the same numbers, up to fp32 noise.
    torch.testing.assert_close(logits_of(loaded.model), trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(through_plain_peft(plain_base(bases[64], bnb_config(QUANTIZED[key])), run), trained,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", list(QUANTIZED))
def test_merged_export_of_a_qlora_run_is_a_plain_model_close_to_the_trained_one(key, bases, data_file,
                                                                               tmp_path_factory, tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from tunesmith.export import export_run

    run, trained = whole_run(key, bases, data_file, tmp_path_factory)
    with pytest.warns(UserWarning, match="quantization gap"):
        export_run(run, "merged", tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert not getattr(merged, "is_quantized", False)
    linears = [m for m in merged.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 7 + 1 and all(type(m) is torch.nn.Linear for m in linears)
    assert all(m.weight.dtype == torch.float32 for m in linears)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in merged.modules())

    # The merged weight is the de-quantized base weight plus the adapter's update, computed here from the
    # files: the base quantized by transformers itself, the adapter read from final/.
    quantized = plain_base(bases[64], bnb_config(QUANTIZED[key]))
    layer = quantized.model.layers[1].self_attn.v_proj
    if QUANTIZED[key]["bits"] == 4:
        base_w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    else:
        base_w = layer.weight.CB.float() * layer.weight.SCB.float()[:, None] / 127
    adapter = load_file(str(run / "final" / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.1.self_attn.v_proj"
    a, b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
    assert b.abs().max() > 0  # the adapter trained (B starts at zero unless LoftQ set it)
    scale = QUANTIZED[key]["alpha"] / QUANTIZED[key]["r"]
    torch.testing.assert_close(merged.model.layers[1].self_attn.v_proj.weight, base_w + scale * b @ a,
                               rtol=1e-5, atol=1e-5)

    # Independently of tunesmith's merge: transformers de-quantizes its own quantized base, plain peft puts the
    # adapter on top, unmerged. The merged export computes exactly that (up to fp32 summation order).
    got = logits_of(merged)

    def dequantize():
        return plain_base(bases[64], bnb_config(QUANTIZED[key])).dequantize(dtype=torch.float32)

    torch.testing.assert_close(got, through_plain_peft(dequantize(), run), rtol=1e-4, atol=1e-4)

    # Against the trained (quantized) model: the merged one computes in fp32 what the quantized base computes
    # with its kernels. With 4-bit weights and fp32 compute the kernels add nothing (the project claims 0.5 % of
    # the logits' range); bf16 compute rounds each matmul's inputs to bf16 and LLM.int8 rounds activations to
    # 8 bits, so there the bound is the gap those kernels open on the untrained base (measured here, ~1 % and
    # ~3 % on this model), with room for the adapter's share.
    gap = float((got - trained).abs().max() / trained.abs().max())
    quantized_base = logits_of(plain_base(bases[64], bnb_config(QUANTIZED[key])))
    kernels = float((quantized_base - logits_of(dequantize())).abs().max() / quantized_base.abs().max())
    # bitsandbytes' 4-bit CPU path with fp32 compute used to be exact (kernels 0.0); with bitsandbytes 0.50.2
    # under transformers 5.25 it is not (~1 %), so the bound follows what the kernels measure here.
    exact_kernels = QUANTIZED[key]["bits"] == 4 and QUANTIZED[key].get("compute_dtype") == "fp32" and kernels == 0.0
    if exact_kernels:
        assert gap < 0.005, gap
    else:
        assert 1e-3 < kernels and gap < 1.5 * kernels + 0.005, (gap, kernels)
    # ... and closer than the same adapter on the original (never quantized) weights: the base really is the
    # de-quantized one, not the original.
    on_original = through_plain_peft(plain_base(bases[64]), run)
    assert (got - trained).abs().max() < (on_original - trained).abs().max()


# ------------------------------------------------------------- the resume tests catch a broken resume


def skip_rng_restore(mp) -> None:
    import tunesmith.run.checkpoint as checkpoint

    mp.setattr(checkpoint, "_restore_rng", lambda tensors, meta: None)


def skip_optimizer_restore(mp) -> None:
    from tunesmith.training import session

    real = session.load_checkpoint

    class Untouched:
        def load_state_dict(self, state):
            pass

    mp.setattr(session, "load_checkpoint", lambda path, state, method, model, optimizer, scheduler, *stage:
               real(path, state, method, model, Untouched(), scheduler, *stage))


def skip_weight_restore(mp) -> None:
    from tunesmith.methods.peft_adapter import PeftAdapterMethod

    mp.setattr(PeftAdapterMethod, "restore", lambda self, model, saved_dir: None)


@pytest.mark.parametrize("key,breaking,first_wrong", [
    ("ia3", skip_rng_restore, STOP + 1),  # IA3 has no dropout: only the base's attention dropout draws numbers
    ("dora", skip_rng_restore, STOP + 1),
    # The optimizer's moments first shape the update after the resume, so the loss after that one differs.
    ("prefix", skip_optimizer_restore, STOP + 2),
    ("qlora4", skip_weight_restore, STOP + 1),
], ids=["ia3-no-rng", "dora-no-rng", "prefix-no-optimizer", "qlora4-no-weights"])
def test_a_broken_resume_is_caught(key, breaking, first_wrong, bases, data_file, tmp_path_factory, tmp_path):
    whole, _ = whole_run(key, bases, data_file, tmp_path_factory)
    with pytest.MonkeyPatch.context() as mp:
        breaking(mp)
        split, lines = interrupted_run(key, bases, data_file, tmp_path / "split")
    got, want = step_losses(split), step_losses(whole)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, STEPS + 1))
    assert got[:first_wrong - 1] == want[:first_wrong - 1]  # the same run up to where the break shows ...
    assert all(g != w for g, w in zip(got[first_wrong - 1:], want[first_wrong - 1:])), (got, want)  # ... not after
    with pytest.raises(AssertionError):
        assert_resumed_run_is_the_whole_run(whole, split, lines)


def test_the_qlora_merge_gap_is_measured_on_the_test_split_and_reported(bases, data_file, tmp_path):
    """Merging into the de-quantized base changes the numbers a little: the export says by how much, as the
    test-split loss of the trained model (quantized base + adapter) beside the merged model's."""
    import re

    from transformers import AutoModelForCausalLM

    from tunesmith.evaluation.evaluate import evaluate_file
    from tunesmith.export import export_run
    from tunesmith.inference.loading import Loaded, load_for_inference
    from tunesmith.training.loop import train

    cfg = make_cfg("qlora4", bases[64], data_file, tmp_path / "run")
    cfg.data.test_size = 4
    run = train(cfg, log=quiet)
    with pytest.warns(UserWarning, match="quantization gap"):
        said = export_run(run, "merged", tmp_path / "merged")
    found = re.search(r"merge gap on 4 test rows \((\d+) tokens\): loss ([\d.]+) trained .* ([\d.]+) merged", said)
    assert found, said
    trained, merged = float(found[2]), float(found[3])
    test = run / "data" / "test.jsonl"
    assert trained == pytest.approx(evaluate_file(load_for_inference(run), test)["loss"], abs=1e-4)
    plain = load_for_inference(run)  # the merged export, loaded by transformers alone, scored the same way
    export = Loaded(AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")), plain.tokenizer, plain.method,
                    plain.config, None)
    assert merged == pytest.approx(evaluate_file(export, test)["loss"], abs=1e-4)
    assert abs(merged - trained) < 0.05 * trained  # 4-bit with fp32 compute: a small gap

    cfg.data.test_size, cfg.output.dir = 0, str(tmp_path / "no-test")
    with pytest.warns(UserWarning, match="quantization gap"):
        said = export_run(train(cfg, log=quiet), "merged", tmp_path / "merged2")
    assert "merge gap: not measured (the run has no test split" in said
