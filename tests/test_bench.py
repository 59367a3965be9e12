"""`tunesmith bench`: measures a config's own training without touching its output directory."""

from __future__ import annotations

import math

import pytest

from tunesmith.bench import bench, training_flops_per_token


def test_flops_per_token_follow_the_usual_counts():
    # LoRA (almost nothing trains) ≈ 4 N, full fine-tuning ≈ 6 N, over the parameters a token multiplies.
    assert training_flops_per_token(total=110, trainable=0, embedding=10) == 400
    assert training_flops_per_token(total=110, trainable=110, embedding=10) == 600


def test_bench_measures_the_config_and_leaves_output_dir_alone(make_config, tmp_path):
    from tunesmith.training.loop import total_steps

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
