"""The loss, batching, optimizer, schedule and a whole run on the tiny model."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import build_tiny_model, build_tiny_tokenizer
from tunesmith.config import TrainConfig
from tunesmith.data.token_store import Tokenized
from tunesmith.data.templates import IGNORE
from tunesmith.training.batching import RowStream, collate, micro_batches
from tunesmith.training.loss import token_loss_sum
from tunesmith.training.optim import lr_factor, param_groups


def rows_of_different_lengths(vocab: int) -> list[Tokenized]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for length, prompt in ((5, 2), (40, 30), (9, 3), (23, 20)):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        rows.append(Tokenized(ids, [IGNORE] * prompt + ids[prompt:]))
    return rows


def step_loss_and_grads(model, rows: list[Tokenized], micro: int) -> tuple[float, dict[str, torch.Tensor]]:
    """One optimizer step's loss and gradients computed the way the loop does it."""
    model.zero_grad()
    batches = [collate(rows[i:i + micro], pad_id=2) for i in range(0, len(rows), micro)]
    n_targets = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    total = 0.0
    for batch in batches:
        summed, _ = token_loss_sum(model, batch)
        (summed / n_targets).backward()
        total += float(summed.detach())
    return total / n_targets, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_accumulation_matches_one_big_batch():
    model = build_tiny_model(vocab_size=300)
    rows = rows_of_different_lengths(300)
    loss_4x1, grads_4x1 = step_loss_and_grads(model, rows, micro=4)
    loss_1x4, grads_1x4 = step_loss_and_grads(model, rows, micro=1)
    assert loss_4x1 == pytest.approx(loss_1x4, rel=1e-5)
    assert grads_4x1.keys() == grads_1x4.keys() and grads_4x1
    for name in grads_4x1:
        torch.testing.assert_close(grads_4x1[name], grads_1x4[name], rtol=1e-4, atol=1e-6, msg=name)
    # Non-vacuous: averaging per-micro-batch means (the common bug) gives different gradients on these rows.
    model.zero_grad()
    for r in rows:
        (token_loss_sum(model, collate([r], 2))[0] / r.n_targets / len(rows)).backward()
    naive = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    diff = sum(float((naive[n] - grads_4x1[n]).norm()) for n in naive)
    assert diff > 1e-3 * sum(float(g.norm()) for g in grads_4x1.values())


def test_row_stream_is_seeded_covers_each_epoch_and_resumes_from_its_position():
    def take(seed: int, n: int, position: int = 0) -> list[int]:
        return RowStream(10, seed, position).take(n)

    first = take(1, 25)
    assert first == take(1, 25) and first != take(2, 25)
    assert sorted(first[:10]) == sorted(first[10:20]) == list(range(10))  # each epoch sees every row once
    assert first[:10] != first[10:20]  # in a fresh order
    assert take(1, 12, position=13) == first[13:25]  # the position alone restores the stream
    stream = RowStream(10, 1)
    stream.take(7)
    assert (stream.position, stream.epoch) == (7, 0) and stream.take(6) == first[7:13] and stream.epoch == 1


def test_length_grouped_steps_pad_less_and_still_cover_each_epoch():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(400)]
    grouped = RowStream(400, seed=3, lengths=lengths, group=8)
    plain = RowStream(400, seed=3)

    def padding(stream) -> int:
        total = 0
        for _ in range(50):
            step = [lengths[i] for i in stream.take(8)]
            total += sum(max(step) - n for n in step)
        return total

    first_epoch = RowStream(400, seed=3, lengths=lengths, group=8).take(400)
    assert sorted(first_epoch) == list(range(400))
    assert first_epoch == RowStream(400, seed=3, lengths=lengths, group=8).take(400)
    assert padding(grouped) < 0.2 * padding(plain)
    # steps are still in random length order, not sorted from long to short across the epoch
    step_max = [max(lengths[i] for i in first_epoch[k:k + 8]) for k in range(0, 400, 8)]
    assert step_max != sorted(step_max, reverse=True)


def test_micro_batches_split_a_step():
    rows = [Tokenized([3] * n, [3] * n) for n in (2, 5, 3, 4, 1)]
    batches = micro_batches(rows, 2, pad_id=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 5), (2, 4), (1, 1)]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    from tunesmith.config import MethodConfig
    from tunesmith.methods import get_method
    from tunesmith.training.loop import enable_gradient_checkpointing

    rows = rows_of_different_lengths(300)
    results = []
    for checkpointing in (False, True):
        model = get_method(MethodConfig(name="lora", r=4)).build(build_tiny_model(300))
        with torch.no_grad():  # LoRA B starts at zero; move it so its gradient path is exercised too
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert model.get_base_model().is_gradient_checkpointing
        model.train()
        results.append(step_loss_and_grads(model, rows, micro=2))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7, msg=name)


def test_weight_decay_skips_norms_and_biases():
    model = build_tiny_model(vocab_size=300)
    named = list(model.named_parameters())
    decay, no_decay = param_groups(named, 0.1, lr=1e-3)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in named}
    assert all("norm" in names[id(p)] for p in no_decay["params"]) and no_decay["params"]
    assert all(p.ndim == 2 for p in decay["params"])


@pytest.mark.parametrize("schedule,expected", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.5, 1.0, 1.0, 0.8535534, 0.5, 0.1464466]),
])
def test_warmup_then_schedule(schedule, expected):
    cfg = TrainConfig(warmup_steps=2, lr_scheduler=schedule)
    got = [lr_factor(s, 6, cfg) for s in range(6)]
    assert got == pytest.approx(expected, abs=1e-6)


def test_min_lr_ratio_floors_the_decay():
    cfg = TrainConfig(warmup_steps=0, lr_scheduler="cosine", min_lr_ratio=0.1)
    assert lr_factor(10, 10, cfg) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- a whole run


def test_train_writes_a_complete_run_dir(make_config):
    from tunesmith.training.loop import train

    cfg = make_config(train={"max_steps": 4, "micro_batch_size": 2, "grad_accum_steps": 2, "lr": 5e-3},
                      checkpoint={"interval": 1, "keep_last": 2})
    run = train(cfg, log=lambda *_: None)
    for name in ("config.yaml", "run.json", "metrics.jsonl", "loss.png", "tokenizer/tokenizer.json",
                 "data/train.jsonl", "data/val.jsonl", "data/test.jsonl", "data/data_report.json",
                 "final/adapter_model.safetensors"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").iterdir())
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4]
    assert all({"step", "loss", "lr", "tokens_per_s"} <= x.keys() for x in steps)
    assert [x["step"] for x in lines if "val_loss" in x] == [2, 4]  # eval.interval 2, plus the end
    # checkpoints every step, keep the last 2 (the final step is saved as final/ instead)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    # the resolved config round-trips
    from tunesmith.run_dir import read_run_config
    assert read_run_config(run).train.grad_accum_steps == 2


def test_training_lowers_the_loss_for_every_method(make_config, tmp_path):
    from tunesmith.training.loop import train

    for name in ("full", "freeze", "lora"):
        cfg = make_config(method={"name": name, "trainable_layers": 1},
                          train={"max_steps": 20, "lr": {"full": 3e-3, "freeze": 1e-2, "lora": 3e-2}[name],
                                 "micro_batch_size": 8,
                                 "lr_scheduler": "constant"},
                          eval={"interval": None}, checkpoint={"interval": None},
                          output={"dir": str(tmp_path / name)})
        run = train(cfg, log=lambda *_: None)
        losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, (name, losses)


def test_refuses_to_overwrite_a_run_dir(make_config):
    from tunesmith.errors import TunesmithError
    from tunesmith.training.loop import train

    cfg = make_config(train={"max_steps": 1}, eval={"interval": None}, checkpoint={"interval": None})
    run = train(cfg, log=lambda *_: None)
    with pytest.raises(TunesmithError, match="already exists"):
        train(cfg, log=lambda *_: None)
    (run / "keep.txt").write_text("user file")
    other = make_config(train={"max_steps": 1}, output={"dir": str(run / "data"), "overwrite": True})
    with pytest.raises(TunesmithError, match="not a tunesmith run directory"):
        train(other, log=lambda *_: None)
    assert (run / "keep.txt").exists()


def test_nan_loss_stops_with_a_clear_error(make_config, monkeypatch):
    from tunesmith.errors import TunesmithError
    from tunesmith.training import loop

    real = loop.token_loss_sum
    monkeypatch.setattr(loop, "token_loss_sum", lambda m, b, *a: (real(m, b, *a)[0] * float("nan"), 1))
    with pytest.raises(TunesmithError, match="the loss is nan"):
        loop.train(make_config(), log=lambda *_: None)


def test_bf16_autocast_runs_on_cpu_when_supported(make_config):
    from tunesmith.device import bf16_supported
    from tunesmith.training.loop import train

    if not bf16_supported(torch.device("cpu")):
        pytest.skip("this CPU has no bf16 support")
    run = train(make_config(train={"max_steps": 2, "precision": "bf16"}), log=lambda *_: None)
    assert json.loads((run / "run.json").read_text())["precision"] == "bf16"
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert all(math.isfinite(v) for v in losses)
