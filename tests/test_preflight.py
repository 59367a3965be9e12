"""`tunesmith doctor CONFIG` and the checks `train` runs first: each finding fires on the config that
deserves it, with a concrete suggestion, and stays quiet on one that does not."""

from __future__ import annotations

import pytest
import yaml

from conftest import alpaca_rows, write_jsonl
from tunesmith.planning.estimate import GiB, shape_from_model
from tunesmith.planning.preflight import Machine, Speed, check_config

CPU = Machine(device="cpu", name="CPU (test)", precision="fp32", memory=64 * GiB, bf16_native=False, compiler=True)


def unique_rows(n: int) -> list[dict]:
    """Toy rows with no duplicates, so no overlap finding fires unless a test asks for one."""
    rows = alpaca_rows(n)
    for i, row in enumerate(rows):
        row["input"] = f"{row['input']} {i}"
        row["output"] = row["input"].upper()
    return rows


def findings_for(cfg, machine: Machine = CPU, speed: Speed | None = None):
    from tunesmith.data.pipeline import load_data_and_tokenizer

    _, _, data = load_data_and_tokenizer(cfg)
    return check_config(cfg, data.report, shape_from_model(cfg.model.name_or_path), machine, speed)


def by_topic(findings, topic: str):
    return [f for f in findings if f.topic == topic]


def test_a_sound_config_gets_only_facts(make_config):
    cfg = make_config(unique_rows(400), data={"val_size": 60, "test_size": 20},
                      train={"max_steps": None, "epochs": 1, "micro_batch_size": 4, "lr": 2e-4},
                      eval={"interval": 20, "batch_size": 8, "max_batches": 2}, checkpoint={"interval": 40})
    findings = findings_for(cfg)
    assert not [f for f in findings if f.severity in ("warning", "error")], [f.to_text() for f in findings]
    steps = by_topic(findings, "steps")[0].message
    assert "effective batch 4 rows" in steps and "80 steps per epoch over 320 training rows" in steps
    assert by_topic(findings, "memory")[0].severity == "ok"


def test_schedule_findings(make_config):
    cfg = make_config(unique_rows(100), data={"val_size": 60, "test_size": 0},
                      train={"max_steps": None, "epochs": 1, "micro_batch_size": 8, "grad_accum_steps": 8,
                             "warmup_steps": 10}, eval={"interval": 50}, checkpoint={"interval": 50})
    findings = findings_for(cfg)
    batch = by_topic(findings, "batch")[0]
    assert batch.severity == "warning" and "larger than the training data (40 rows)" in batch.message
    assert "only 1 optimizer steps" in by_topic(findings, "steps")[1].message
    warm = by_topic(findings, "warmup")[0]
    assert "never reaches train.lr" in warm.message and warm.suggestion == "train.warmup_steps: 0"
    ev, ck = by_topic(findings, "eval")[0], by_topic(findings, "checkpoint")[0]
    assert "validation runs only at the end" in ev.message and ev.suggestion == "eval.interval: null (end only)"
    assert "no checkpoint before the end" in ck.message and ck.suggestion.startswith("checkpoint.interval: null")

    cfg = make_config(unique_rows(400), data={"val_size": 60, "test_size": 0},
                      train={"max_steps": None, "epochs": 1, "micro_batch_size": 4, "warmup_steps": 30})
    warm = by_topic(findings_for(cfg), "warmup")[0]
    assert "35 % of the run (30 of 85 steps)" in warm.message and warm.suggestion == "train.warmup_steps: 4"


def test_epochs_and_validation_and_overlap(make_config, tmp_path):
    rows = unique_rows(310)
    test_file = write_jsonl(tmp_path / "test.jsonl", rows[:5])  # five training rows reappear in test
    val_file = write_jsonl(tmp_path / "val.jsonl", rows[300:])
    rows = rows[:300]
    cfg = make_config(rows, data={"val_file": str(val_file), "test_file": str(test_file)},
                      train={"max_steps": None, "epochs": 6})
    findings = findings_for(cfg)
    assert "6.0 passes over" in by_topic(findings, "epochs")[0].message
    assert "only 10 validation rows" in by_topic(findings, "validation")[0].message
    overlap = by_topic(findings, "test overlap")[0]
    assert overlap.severity == "warning" and overlap.message.startswith("5 training rows")
    assert "dedup" in overlap.suggestion

    cfg = make_config(rows, data={"val_size": 0, "test_size": 0}, train={"max_steps": None, "epochs": 2},
                      eval={"interval": 10})
    findings = findings_for(cfg)
    assert "no validation rows" in by_topic(findings, "validation")[0].message
    assert "no validation data" in by_topic(findings, "eval")[0].message
    assert not by_topic(findings, "epochs")


def test_eval_that_dominates_time_and_values_outside_the_usual_range(make_config):
    cfg = make_config(unique_rows(400), data={"val_size": 200, "test_size": 0},
                      train={"max_steps": None, "micro_batch_size": 2, "lr": 0.05, "max_grad_norm": 100.0},
                      method={"name": "lora", "r": 256, "alpha": 512}, eval={"interval": 1, "batch_size": 8})
    findings = findings_for(cfg)
    ev = by_topic(findings, "eval")[0]
    assert "% of the training time" in ev.message and ev.suggestion.startswith("eval.interval: ")
    assert int(ev.suggestion.split()[1]) > 100  # 200 val rows against 2 rows a step
    lr = by_topic(findings, "train.lr")[0]
    assert "0.05 is outside the usual range for lora (5e-05 to 0.001)" in lr.message
    assert {"method.r", "method.alpha", "train.max_grad_norm"} <= {f.topic for f in findings}

    cfg = make_config(unique_rows(400), method={"name": "full"}, train={"lr": 2e-4})
    assert "outside the usual range for full" in by_topic(findings_for(cfg), "train.lr")[0].message


def test_rows_longer_than_max_seq_length_and_the_context_window(make_config, tiny_tokenizer):
    import numpy as np

    rows = unique_rows(200)
    for i in range(0, 200, 10):  # one row in ten is long
        rows[i]["input"] = "word " * 60
    cfg = make_config(rows, data={"max_seq_length": 100, "overlong": "truncate"})
    finding = by_topic(findings_for(cfg), "max_seq_length")[0]
    assert finding.severity == "warning" and "are truncated" in finding.message
    keep = int(finding.suggestion.split(":")[1].split()[0])
    from tunesmith.data.pipeline import load_data_and_tokenizer

    raw = np.asarray(load_data_and_tokenizer(cfg)[2].report.splits["train"].raw_lengths)
    assert (raw <= keep).mean() >= 0.99 and (raw <= keep - 1).mean() < 0.99  # the length that keeps 99 %

    cfg = make_config(rows, data={"max_seq_length": 1024, "overlong": "drop"})  # the tiny model knows 512
    findings = findings_for(cfg)
    assert by_topic(findings, "max_seq_length")[0].severity == "ok"
    context = by_topic(findings, "context")[0]
    assert "exceeds the model's context window (512 tokens)" in context.message and context.severity == "info"


def test_precision_and_memory_on_this_device(make_config):
    cfg = make_config(unique_rows(100), train={"precision": "bf16"})
    assert "no native bf16" in by_topic(findings_for(cfg), "precision")[0].message
    native = Machine("cpu", "CPU (test)", "fp32", 64 * GiB, bf16_native=True, compiler=False)
    cfg = make_config(unique_rows(100), train={"precision": "fp32", "compile": True})
    findings = findings_for(cfg, native)
    assert by_topic(findings, "precision")[0].severity == "info"
    assert by_topic(findings, "compile")[0].severity == "error"


def test_memory_verdict_follows_the_model_and_batch(make_config, monkeypatch):
    import tunesmith.planning.estimate as estimate

    monkeypatch.setattr(estimate, "CPU_RUNTIME", 0.0)  # so the tiny model's own needs decide the verdict
    cfg = make_config(unique_rows(100), train={"micro_batch_size": 8})
    from tunesmith.planning.estimate import estimate_memory
    from tunesmith.planning.preflight import plan_for
    from tunesmith.data.pipeline import load_data_and_tokenizer

    report = load_data_and_tokenizer(cfg)[2].report
    need = estimate_memory(plan_for(cfg, shape_from_model(cfg.model.name_or_path), CPU, report)).peak
    assert need > 1e6  # the tiny model's weights, states and activations: a few MB
    roomy = Machine("cpu", "CPU (test)", "fp32", need * 1.5, bf16_native=False, compiler=True)
    assert by_topic(findings_for(cfg, roomy), "memory")[0].severity == "ok"
    tight = Machine("cpu", "CPU (test)", "fp32", need * 1.05, bf16_native=False, compiler=True)
    finding = by_topic(findings_for(cfg, tight), "memory")[0]
    assert finding.severity == "warning" and "tight" in finding.message
    short = Machine("cpu", "CPU (test)", "fp32", need * 0.5, bf16_native=False, compiler=True)
    finding = by_topic(findings_for(cfg, short), "memory")[0]
    assert finding.severity == "error" and "does not fit" in finding.message and "--ignore-checks" in finding.suggestion
    assert "train.micro_batch_size: " in finding.suggestion
    cfg.train.auto_micro_batch = True  # it would shrink the micro-batch by itself: a warning, not an error
    assert by_topic(findings_for(cfg, short), "memory")[0].severity == "warning"


def test_time_estimate_and_checkpoint_advice_use_the_measured_speed(make_config):
    cfg = make_config(unique_rows(400), data={"val_size": 60}, train={"max_steps": None, "epochs": 3},
                      checkpoint={"interval": None})
    findings = findings_for(cfg, speed=Speed(tokens_per_s=10.0, source="test"))
    time = by_topic(findings, "time")[0]
    assert "at 10 tokens/s; test" in time.message and " h of training" in time.message
    assert "no checkpoint.interval on a run of about" in by_topic(findings, "checkpoint")[0].message


def test_train_runs_the_checks_errors_block_and_ignore_checks_trains(make_config, tmp_path, monkeypatch):
    from tunesmith.errors import TunesmithError
    from tunesmith.training.loop import train

    cfg = make_config(unique_rows(100), train={"max_steps": 2, "warmup_steps": 50})
    lines: list[str] = []
    train(cfg, log=lines.append)
    assert any(line.startswith("warning warmup: train.warmup_steps (50)") for line in lines)  # printed, not blocking
    assert not any(line.startswith(("ok ", "info ")) for line in lines)  # only what needs attention

    import tunesmith.planning.preflight as preflight

    monkeypatch.setattr(preflight, "this_machine", lambda *a: Machine("cpu", "CPU (test)", "fp32", 0.3 * GiB,
                                                                      False, True))
    cfg.output.dir = str(tmp_path / "blocked")
    with pytest.raises(TunesmithError, match="pre-flight checks found 1 error"):
        train(cfg, log=lines.append)
    assert not (tmp_path / "blocked").exists()  # stopped before anything was written
    assert any("error   memory:" in line and "does not fit" in line for line in lines)
    train(cfg, log=lambda *_: None, checks="warn")  # --ignore-checks
    assert (tmp_path / "blocked" / "final").exists()


def test_doctor_command_with_a_config(make_config, tmp_path):
    from test_config_and_cli import run_cli

    cfg = make_config(unique_rows(100), train={"max_steps": 2, "warmup_steps": 50})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()), encoding="utf-8")
    done = run_cli("doctor", str(path))
    assert done.returncode == 0, done.stderr
    assert "warning warmup:" in done.stdout and "info    data: Data report" in done.stdout
    assert "memory: needs about" in done.stdout and "time: about" in done.stdout
    assert "ready to train" in done.stdout
    done = run_cli("doctor", str(path), "--train.lr=1e-8", "--data.max_seq_length=4")
    assert done.returncode == 2 and "data.max_seq_length" in done.stderr  # config errors still come first


def test_badam_warns_when_the_run_is_too_short_for_every_layer_to_train(make_config):
    """The tiny model has 2 layers: 5 steps of 4 per block give one layer a turn; 8 steps give both."""
    def turns(steps: int):
        cfg = make_config(unique_rows(100), method={"name": "full"},
                          train={"max_steps": steps, "optimizer": "badam", "badam_switch_every": 4})
        return by_topic(findings_for(cfg), "optimizer.switch_every")

    short = turns(3)
    assert short and short[0].severity == "warning" and "only 1 of them will train" in short[0].message
    assert short[0].suggestion.startswith("optimizer.switch_every: 1")
    assert turns(8) == []
