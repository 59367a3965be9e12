"""The Stage protocol's first two stages (sft, pretrain) and the events a run emits, with clean stops
requested by a caller rather than a signal."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.errors import TrainingStopped, TunesmithError
from tunesmith.training import events as ev
from tunesmith.training.loop import train


def quiet(*_):
    pass


def text_rows(n: int) -> list[dict]:
    words = ["river", "stone", "cloud", "ember", "moss", "tide", "lark", "fern"]
    return [{"text": " ".join(words[(i + k) % len(words)] for k in range(5 + i % 7))} for i in range(n)]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "adapter_model.safetensors"))


def test_pretrain_and_sft_train_text_rows_bit_identically(make_config, tmp_path):
    """Continued pre-training is SFT's loss on all-target rows: when every document is exactly one block long
    (so cutting into blocks changes nothing), the same text trains the same weights, bit for bit, through
    either stage name (and run.json records which)."""
    rows = [{"text": (r["text"] * 9)[:60]} for r in text_rows(24)]  # 60 bytes + EOS = 61 tokens each
    runs = {}
    for stage in ("sft", "pretrain"):
        cfg = make_config(rows, stage={"name": stage}, output={"dir": str(tmp_path / stage)},
                          data={"max_seq_length": 61},
                          train={"max_steps": 4, "lr": 1e-2, "micro_batch_size": 2, "grad_accum_steps": 2})
        runs[stage] = train(cfg, log=quiet)
        assert json.loads((runs[stage] / "run.json").read_text())["stage"] == stage
    a, b = adapter(runs["sft"]), adapter(runs["pretrain"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
              for run in runs.values()]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_pretrain_refuses_rows_that_are_not_text(make_config):
    with pytest.raises(TunesmithError, match=r"stage pretrain trains on text rows.*alpaca rows"):
        train(make_config(stage={"name": "pretrain"}), log=quiet)


def test_the_stage_loss_is_the_token_loss_the_loop_always_used(tiny_model_dir, make_config):
    """SftStage.loss_sum is token_loss_sum with the run's logits_at_labels_only, on the stage's own batches."""
    from tunesmith.data.pipeline import load_data_and_tokenizer
    from tunesmith.models.loading import ModelSource, load_causal_lm
    from tunesmith.stages import get_stage
    from tunesmith.stages.tokens import token_loss_sum

    for labels_only in (True, False):
        cfg = make_config(train={"logits_at_labels_only": labels_only})
        _, tokenizer, data = load_data_and_tokenizer(cfg)
        model = load_causal_lm(ModelSource(str(tiny_model_dir)))
        stage = get_stage(cfg)
        rows = [data.train[i] for i in range(6)]
        assert stage.count(rows) == sum(r.n_targets for r in rows)
        for batch in stage.batches(rows, 4, tokenizer.pad_token_id, packed=False):
            summed, n = stage.loss_sum(model, batch)
            expected, m = token_loss_sum(model, batch, labels_only)
            assert torch.equal(summed, expected) and n == m


def test_events_arrive_in_order_and_match_metrics_jsonl(make_config):
    seen: list = []
    run = train(make_config(train={"max_steps": 4}, eval={"interval": 2}, checkpoint={"interval": 2}),
                log=quiet, on_event=seen.append)
    kinds = [type(e).__name__ for e in seen]
    assert kinds == ["Started", "Step", "Step", "Eval", "Checkpoint", "Step", "Step", "Eval", "Done"]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e.record() for e in seen if isinstance(e, (ev.Step, ev.Eval))] == records
    checkpoint = next(e for e in seen if isinstance(e, ev.Checkpoint))
    assert checkpoint.step == 2 and checkpoint.path == run / "checkpoints" / "step-000002" and checkpoint.path.is_dir()
    done = seen[-1]
    assert done.run_dir == run and done.steps == 4 and done.skipped_steps == 0
    assert ev.as_dict(done)["event"] == "done" and ev.as_dict(seen[1])["loss"] == seen[1].loss


def test_a_caller_stops_a_run_cleanly_and_it_resumes_exactly(make_config, tmp_path):
    """A StopRequest (from another thread, as a server or the board would) stops after the current step with a
    checkpoint; resuming gives the weights of an uninterrupted run."""
    request = ev.StopRequest()
    seen: list = []

    def watch(event):
        seen.append(event)
        if isinstance(event, ev.Step) and event.step == 3:
            t = threading.Thread(target=request.request, args=("stopped from the board",))
            t.start()
            t.join()

    cfg = make_config(train={"max_steps": 6}, checkpoint={"interval": None})
    with pytest.raises(TrainingStopped, match="stopped after step 3") as stopped:
        train(cfg, log=quiet, on_event=watch, stop=request)
    assert stopped.value.exit_code == 0
    stopping = [e for e in seen if isinstance(e, ev.Stopping)]
    assert len(stopping) == 1 and stopping[0].step == 3 and stopping[0].reason == "stopped from the board"
    assert stopping[0].checkpoint.name == "step-000003" and not any(isinstance(e, ev.Done) for e in seen)
    run = Path(cfg.output.dir)
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"

    resumed = train(cfg, log=quiet, resume=True)
    straight = train(make_config(train={"max_steps": 6}, checkpoint={"interval": None},
                                 output={"dir": str(tmp_path / "straight")}), log=quiet)
    a, b = adapter(resumed), adapter(straight)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_any_callable_can_ask_for_the_stop(make_config):
    steps: list[int] = []
    with pytest.raises(TrainingStopped, match="stopped after step 2"):
        train(make_config(train={"max_steps": 5}), log=quiet,
              on_event=lambda e: steps.append(e.step) if isinstance(e, ev.Step) else None,
              stop=lambda: len(steps) >= 2)
    assert steps == [1, 2]


def test_a_failed_run_emits_an_error_event(make_config, monkeypatch):
    from tunesmith.stages import sft

    def broken(*args):
        raise RuntimeError("the loss broke")

    monkeypatch.setattr(sft, "token_loss_sum", broken)
    seen: list = []
    with pytest.raises(RuntimeError, match="the loss broke"):
        train(make_config(), log=quiet, on_event=seen.append)
    assert isinstance(seen[-1], ev.Error) and "the loss broke" in str(seen[-1].error)


# --------------------------------------------------------------------------------------------- the SFT loss
# Fast tests (no training) that `tools/mutation.py loss` runs against stages/tokens.py and stages/sft.py.


def _rows(n: int = 6):
    from test_training import EIGHT_SHAPES, rows_of_different_lengths

    return rows_of_different_lengths(300, EIGHT_SHAPES)[:n]


def _stage(**train):
    from tunesmith.config.schema import config_from_dict
    from tunesmith.stages import get_stage

    return get_stage(config_from_dict({"data": {"train_file": "rows.jsonl"}, "train": train}))


def test_the_stage_batches_are_the_loops_micro_batches_padded_or_packed():
    from tunesmith.data.batching import micro_batches

    rows = _rows()
    for packed in (False, True):
        got, want = _stage().batches(rows, 4, 2, packed), micro_batches(rows, 4, 2, packed)
        assert len(got) == len(want) == 2
        for a, b in zip(got, want):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert ("position_ids" in got[0]) == packed


def test_step_metrics_count_all_tokens_and_the_trained_ones():
    rows = _rows()
    assert _stage().step_metrics(rows) == {"tokens": sum(len(r.input_ids) for r in rows),
                                           "trained_tokens": sum(sum(1 for x in r.labels[1:] if x != -100)
                                                                 for r in rows)}


def test_evaluation_runs_in_the_runs_precision_and_caps_perplexity(monkeypatch):
    from conftest import build_tiny_model
    from tunesmith.stages import sft
    from tunesmith.stages.tokens import mean_loss

    model, rows = build_tiny_model(vocab_size=300), _rows()
    got = _stage().evaluate(model, rows, 4, 2, "bf16", None)["val_loss"]
    assert got == mean_loss(model, rows, 4, 2, "bf16")[0] != mean_loss(model, rows, 4, 2, "fp32")[0]
    monkeypatch.setattr(sft, "mean_loss", lambda *a: (60.5, 10))
    assert _stage().evaluate(model, rows, 4, 2, "fp32", None)["val_perplexity"] == math.exp(50)


def test_a_soft_capped_model_is_scored_with_its_capping():
    """Gemma-2 caps its logits (tanh) in its own forward: the loss must go through it even with
    logits_at_labels_only, and equal transformers' own loss."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from tunesmith.stages.tokens import token_loss_sum

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           final_logit_softcapping=0.5, initializer_range=0.5))
    rows = _rows(1)
    batch = _stage().batches(rows, 1, 2, False)[0]
    summed, n = token_loss_sum(model, batch, labels_only=True)
    want = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert n == rows[0].n_targets and float(summed / n) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_soft_prompt_positions_are_not_scored(kind):
    """Through peft's forward (which puts the soft prompt first), the summed loss over the row's own labels is
    peft's mean loss times the label count: the virtual positions are skipped, not scored."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    from conftest import build_tiny_model
    from tunesmith.stages.tokens import token_loss_sum, virtual_tokens

    base = build_tiny_model(vocab_size=300)
    config = (PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM") if kind == "prompt"
              else PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    model = get_peft_model(base, config)
    assert virtual_tokens(model) == (4 if kind == "prompt" else 0) and virtual_tokens(base) is None
    rows = _rows(1)
    batch = _stage().batches(rows, 1, 2, False)[0]
    summed, n = token_loss_sum(model, batch)
    want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert n == rows[0].n_targets and float(summed / n) == pytest.approx(float(want), rel=1e-5)
