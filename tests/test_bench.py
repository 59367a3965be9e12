"""`tunesmith bench`: measures a config's own training without touching its output directory."""

from __future__ import annotations

import math

import pytest

from tunesmith.bench import bench, training_flops_per_token


def test_flops_per_token_follow_the_usual_counts():
    # LoRA (almost nothing trains) ≈ 4 N, full fine-tuning ≈ 6 N, over the parameters a token multiplies.
    assert training_flops_per_token(total=110, trainable=0, embedding=10) == 400
    assert training_flops_per_token(total=110, trainable=110, embedding=10) == 600


def test_bench_measures_the_config_and_leaves_output_dir_alone(make_config, tmp_path, monkeypatch):
    from tunesmith.bench import device_name, known_speed
    from tunesmith.training.loop import total_steps

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))

    cfg = make_config(train={"epochs": 3, "max_steps": None, "micro_batch_size": 4, "grad_accum_steps": 2})
    result = bench(cfg, steps=2, log=lambda *_: None)
    assert not (tmp_path / "run").exists()  # the configured output.dir is never written
    assert result.steps_measured == 2 and result.device.startswith("CPU") and result.precision == "fp32"
    assert result.tokens_per_s > 0 and result.peak_rss_mb > 0 and result.peak_gpu_mb is None
    assert result.seconds_per_step == pytest.approx(result.run_hours * 3600 / result.run_steps)
    assert result.run_steps == total_steps(cfg, 40 - 4 - 4) == math.ceil(3 * 32 / 8)
    assert 0 < result.share_of_peak < 1
    assert result.achieved_tflops == pytest.approx(result.tokens_per_s * result.flops_per_token / 1e12)
    assert "tokens/s" in result.to_text() and "of this device's measured fp32 matmul peak" in result.to_text()

    # The measurement is kept for time estimates on this machine (tunesmith estimate, doctor CONFIG).
    import torch

    here = device_name(torch.device("cpu"))
    entry = known_speed(here, "fp32", cfg.model.name_or_path, "lora")
    assert entry["tokens_per_s"] == result.tokens_per_s and entry["micro_batch_size"] == 4
    assert known_speed(here, "bf16") is None and known_speed("another GPU", "fp32") is None
    other = known_speed(here, "fp32", "another-model", "full")  # any record's FLOP/s still carries over
    assert other["achieved_tflops"] == result.achieved_tflops

    from tunesmith.estimate import Plan, shape_from_model
    from tunesmith.preflight import this_machine, training_speed

    plan = Plan(shape_from_model(cfg.model.name_or_path), "lora", "fp32", lora_r=4)
    speed = training_speed(plan, this_machine("cpu", "fp32"), cfg.model.name_or_path, measure=False)
    assert speed.tokens_per_s == result.tokens_per_s and "measured by `tunesmith bench`" in speed.source
