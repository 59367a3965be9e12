"""`tunesmith bench`: measures a config's own training without touching its output directory.

Only facts that do not depend on the clock are asserted here: the tokens counted (against the data's own
token counts), the FLOPs per token (against a hand count for the tiny model and against torch's FLOP
counter), the length of the configured run, and what is recorded for later estimates. How fast, and how
close to the device's peak, is printed by benchmarks/bench_checks.py, never asserted.
"""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer, write_jsonl
from tunesmith.training.bench import bench
from tunesmith.planning.speed import training_flops_per_token

# The tiny Llama of conftest: vocabulary 259 (3 specials + 256 bytes), hidden 32, MLP 64, 2 layers, 4 query
# heads and 2 key/value heads of width 8, untied LM head.
LINEARS = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
           "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)}
VOCAB, HIDDEN, LAYERS = 259, 32, 2
EMBEDDING = VOCAB * HIDDEN                                             # 8,288 (looked up, not multiplied)
NORMS = LAYERS * 2 * HIDDEN + HIDDEN                                   # 160
LINEAR_WEIGHTS = LAYERS * sum(i * o for i, o in LINEARS.values()) + VOCAB * HIDDEN  # 18,432 + LM head 8,288
LORA_4 = LAYERS * sum(4 * (i + o) for i, o in LINEARS.values())        # 4,096 (all linears but the LM head)
# 4 FLOPs per multiplied parameter (forward 2, backward to the activations 2) + 2 per trained one (its gradient)
LORA_FLOPS = 4 * (LINEAR_WEIGHTS + NORMS + LORA_4) + 2 * LORA_4       # = 132,096
FULL_FLOPS = 6 * (LINEAR_WEIGHTS + NORMS)                              # = 161,280


def test_flops_per_token_are_the_hand_count_for_the_tiny_model():
    total = EMBEDDING + LINEAR_WEIGHTS + NORMS
    assert (LORA_FLOPS, FULL_FLOPS) == (132_096, 161_280)
    assert training_flops_per_token(total=total + LORA_4, trainable=LORA_4, embedding=EMBEDDING) == LORA_FLOPS
    assert training_flops_per_token(total=total, trainable=total, embedding=EMBEDDING) == FULL_FLOPS


@pytest.mark.parametrize("method,tolerance", [("full", 0.01), ("lora", 0.05)])
def test_flops_per_token_agree_with_torchs_flop_counter(method, tolerance):
    """torch counts the matmuls really run in one forward and backward pass. It finds 6 per linear weight
    for full fine-tuning (the count above also charges the 160 norm weights: 0.6 % over), and for LoRA a
    little less than the count (layer 0's q/k/v need no input gradient, since the embeddings do not train:
    4 % under). A wrong factor (4 N for full, or 6 N for LoRA) is 25 % or more off."""
    from torch.utils.flop_counter import FlopCounterMode

    from tunesmith.config.schema import MethodConfig
    from tunesmith.methods import get_method, parameter_counts

    model = get_method(MethodConfig(name=method, r=4)).build(build_tiny_model(VOCAB))
    trainable, total = parameter_counts(model)
    tokens = 64
    ids = torch.randint(3, VOCAB, (tokens, 1), generator=torch.Generator().manual_seed(0))  # 1-token rows: no
    with FlopCounterMode(display=False) as counter:                                       # attention to count
        model(input_ids=ids).logits.pow(2).sum().backward()
    measured = counter.get_total_flops() / tokens
    counted = training_flops_per_token(total=total, trainable=trainable, embedding=EMBEDDING)
    assert counted == (FULL_FLOPS if method == "full" else LORA_FLOPS)
    assert abs(counted - measured) <= tolerance * measured, (counted, measured)


def chat_rows(answers: list[str]) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Shout {a.lower()}"}, {"role": "assistant", "content": a}]}
            for a in answers]


def hf_token_count(row: dict) -> int:
    """The row's tokens as transformers renders the model's own chat template. The template ends every
    message with "<|im_end|>\\n"; a training row stops at the reply's EOS, so one token less."""
    tokenizer = build_tiny_tokenizer()
    text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
    assert text.endswith("<|im_end|>\n")
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) - 1


def test_bench_counts_the_datas_real_tokens_and_leaves_output_dir_alone(make_config, tmp_path, monkeypatch):
    import tempfile

    from tunesmith.training import bench as bench_module
    from tunesmith.planning.speed import device_name, known_speed

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(bench_module, "matmul_peak", lambda device, precision: 1e12)  # timing: benchmarks/

    # 8 training rows of 8 different lengths and 8 rows per optimizer step (4 × accumulation 2): every step
    # is one whole epoch, so its tokens are all the training rows' tokens, whatever order they come in.
    train_rows = chat_rows(["A", "BB CC", "DDD EEE FFF", "G" * 20, "H I J K L M N O P Q", "R" * 33, "S T" * 9, "U" * 50])
    lengths = [hf_token_count(r) for r in train_rows]
    assert len(set(lengths)) == 8  # so any micro-batch of 4 has padding, which must not be counted
    val = write_jsonl(tmp_path / "val.jsonl", chat_rows(["V", "W W"]))
    cfg = make_config(rows=train_rows, data={"val_file": str(val), "test_size": 0},
                      train={"epochs": 3, "max_steps": None, "micro_batch_size": 4, "grad_accum_steps": 2})
    result = bench(cfg, steps=2, log=lambda *_: None)

    assert not (tmp_path / "run").exists()  # the configured output.dir is never written
    assert list(scratch.iterdir()) == []  # and the scratch run is removed
    assert result.steps_measured == 2 and result.device.startswith("CPU") and result.precision == "fp32"
    assert result.peak_gpu_mb is None
    # Steps 2 and 3 are measured (step 1 warms up): 2 epochs of the 8 rows, real tokens only.
    measured_tokens = result.tokens_per_s * result.seconds_per_step * result.steps_measured
    assert round(measured_tokens) == 2 * sum(lengths)
    assert result.flops_per_token == LORA_FLOPS  # LoRA r=4 on the tiny model (make_config's method)
    assert result.run_steps == 3  # 3 epochs × 8 rows / 8 rows per step
    assert "tokens/s" in result.to_text() and "of this device's measured fp32 matmul peak" in result.to_text()

    # The measurement is kept for time estimates on this machine (tunesmith estimate, doctor CONFIG).
    here = device_name(torch.device("cpu"))
    entry = known_speed(here, "fp32", cfg.model.name_or_path, "lora")
    assert entry["tokens_per_s"] == result.tokens_per_s and entry["micro_batch_size"] == 4
    assert entry["longest_row"] == max(lengths)
    assert known_speed(here, "bf16") is None and known_speed("another GPU", "fp32") is None
    other = known_speed(here, "fp32", "another-model", "full")  # any record's FLOP/s still carries over
    assert other["achieved_tflops"] == result.achieved_tflops

    from tunesmith.planning.estimate import Plan, shape_from_model
    from tunesmith.planning.preflight import this_machine, training_speed

    plan = Plan(shape_from_model(cfg.model.name_or_path), "lora", "fp32", lora_r=4)
    speed = training_speed(plan, this_machine("cpu", "fp32"), cfg.model.name_or_path, measure=False)
    assert speed.tokens_per_s == result.tokens_per_s and "measured by `tunesmith bench`" in speed.source
