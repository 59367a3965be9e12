"""The loss, batching, optimizer, schedule and a whole run on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_model
from tunesmith.config.schema import TrainConfig
from tunesmith.data.token_store import Tokenized
from tunesmith.data.templates import IGNORE
from tunesmith.data.batching import RowStream, micro_batches
from tunesmith.optim.schedule import lr_factor
from tunesmith.optim.groups import param_groups


def rows_of_different_lengths(vocab: int, shapes=((5, 2), (40, 30), (9, 3), (23, 20))) -> list[Tokenized]:
    """Rows of (length, prompt length); the prompt is masked from the loss."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for length, prompt in shapes:
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        rows.append(Tokenized(ids, [IGNORE] * prompt + ids[prompt:]))
    return rows


EIGHT_SHAPES = ((5, 2), (40, 30), (9, 3), (23, 20), (3, 1), (31, 4), (14, 13), (7, 0))  # 1 to 27 targets a row;
# the last row has no prompt (a text row): its first token is still no target


def loop_step(model, rows: list[Tokenized], micro: int, labels_only: bool = True
              ) -> tuple[float, dict[str, torch.Tensor]]:
    """One optimizer step's loss and gradients, computed by the training loop's own accumulate() with the SFT
    stage, as train() runs it."""
    from types import SimpleNamespace

    from tunesmith.config.schema import config_from_dict
    from tunesmith.stages import get_stage
    from tunesmith.training.loop import accumulate

    cfg = config_from_dict({"data": {"train_file": "rows.jsonl"}, "train": {"logits_at_labels_only": labels_only}})
    session = SimpleNamespace(stage=get_stage(cfg), model=model, micro=micro, pad_id=2, packed=False,
                              device=torch.device("cpu"), precision="fp32", cfg=cfg)
    model.zero_grad(set_to_none=True)
    loss, used = accumulate(session, rows, print)
    assert used == micro
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference_step(model, rows: list[Tokenized], per_row_mean: bool = False
                   ) -> tuple[float, dict[str, torch.Tensor]]:
    """The same step by hand: each row alone, unpadded, through transformers' own loss (its shift, its mean over
    the row's label tokens); weighted by the row's label count over the whole step's count (DESIGN rule 1), or,
    with per_row_mean, the mean of the rows' means (the common bug)."""
    model.zero_grad(set_to_none=True)
    counts = [sum(1 for x in r.labels[1:] if x != IGNORE) for r in rows]
    total = 0.0
    for row, n in zip(rows, counts):
        mean = model(input_ids=torch.tensor([row.input_ids]), labels=torch.tensor([row.labels])).loss
        part = mean / len(rows) if per_row_mean else mean * n / sum(counts)
        part.backward()
        total += float(part.detach())
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("labels_only", [True, False])
def test_grad_accumulation_matches_one_big_batch(labels_only):
    """accumulate: 8 rows × 1 micro-batch, 1 × 8 and an uneven 3+3+2 split give the same loss and
    gradients, and both are the global token mean computed by hand."""
    model = build_tiny_model(vocab_size=300)
    rows = rows_of_different_lengths(300, EIGHT_SHAPES)
    want_loss, want_grads = reference_step(model, rows)
    assert want_grads
    for micro in (8, 1, 3):
        loss, grads = loop_step(model, rows, micro, labels_only)
        assert loss == pytest.approx(want_loss, rel=1e-5), micro
        assert grads.keys() == want_grads.keys(), micro
        for name in grads:
            torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=f"{micro} {name}")
    # Non-vacuous: on these rows the mean of per-row means (what 1 × 8 gives if each micro-batch divides by its
    # own count) is a clearly different loss, with clearly different gradients.
    naive_loss, naive_grads = reference_step(model, rows, per_row_mean=True)
    assert abs(naive_loss - want_loss) > 1e-3 * want_loss  # about 1 % here: 1000 times the tolerance above
    diff = sum(float((naive_grads[n] - want_grads[n]).norm()) for n in want_grads)
    assert diff > 0.05 * sum(float(g.norm()) for g in want_grads.values())


@pytest.mark.parametrize("batch_size, max_batches", [(8, None), (3, None), (3, 2)])
def test_eval_loss_is_the_token_weighted_mean_of_transformers_losses(batch_size, max_batches):
    """The SFT stage's evaluation: each row's loss from transformers itself (its shift, its mean over the row's
    labels), weighted by the row's label count, over the rows the batches cover; perplexity is e to that."""
    import math

    from tunesmith.config.schema import config_from_dict
    from tunesmith.stages import get_stage

    model = build_tiny_model(vocab_size=300)
    rows = rows_of_different_lengths(300, EIGHT_SHAPES)
    covered = rows if max_batches is None else rows[: batch_size * max_batches]
    counts = [sum(1 for x in r.labels[1:] if x != IGNORE) for r in covered]
    with torch.no_grad():
        means = [float(model(input_ids=torch.tensor([r.input_ids]), labels=torch.tensor([r.labels])).loss)
                 for r in covered]
    want = sum(m * n for m, n in zip(means, counts)) / sum(counts)
    model.train()
    stage = get_stage(config_from_dict({"data": {"train_file": "rows.jsonl"}}))
    got = stage.evaluate(model, rows, batch_size, pad_id=2, precision="fp32", max_batches=max_batches)
    assert got["val_loss"] == pytest.approx(want, rel=1e-5)
    assert got["val_perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    assert model.training  # evaluation puts the model back in train mode
    unweighted = sum(means) / len(means)
    assert abs(unweighted - want) > 1e-3 * want  # the rows differ enough that the weighting shows


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
    from tunesmith.config.schema import MethodConfig
    from tunesmith.methods import get_method
    from tunesmith.training.session import enable_gradient_checkpointing

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
        results.append(loop_step(model, rows, micro=2))
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
    # the resolved config round-trips: every field, not one
    from tunesmith.run.run_dir import read_run_config
    assert read_run_config(run).model_dump() == cfg.model_dump()


def fixed_rows_loss(model, rows: list[Tokenized]) -> float:
    """Token-mean loss on fixed rows, by transformers' own forward with labels (one unpadded row at a time)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            n = sum(1 for x in row.labels[1:] if x != IGNORE)
            total += float(model(input_ids=torch.tensor([row.input_ids]), labels=torch.tensor([row.labels])).loss) * n
            count += n
    return total / count


def train_rows_and_base_loss(cfg, tiny_model_dir) -> tuple[list[Tokenized], float]:
    """The run's training rows (a fixed batch) and the untrained base model's loss on them."""
    from transformers import AutoModelForCausalLM

    from tunesmith.data.pipeline import load_data_and_tokenizer

    _, _, data = load_data_and_tokenizer(cfg)
    rows = [data.train[i] for i in range(len(data.train))]
    return rows, fixed_rows_loss(AutoModelForCausalLM.from_pretrained(tiny_model_dir), rows)


def test_training_lowers_the_loss_for_every_method(make_config, tmp_path, tiny_model_dir):
    from tunesmith.inference.loading import load_for_inference
    from tunesmith.training.loop import train

    rows, before = None, None
    for name in ("full", "freeze", "lora"):
        cfg = make_config(method={"name": name, "trainable_layers": 1},
                          train={"max_steps": 20, "lr": {"full": 3e-3, "freeze": 1e-2, "lora": 3e-2}[name],
                                 "micro_batch_size": 8,
                                 "lr_scheduler": "constant"},
                          eval={"interval": None}, checkpoint={"interval": None},
                          output={"dir": str(tmp_path / name)})
        if rows is None:  # the same rows for every method; each starts from the base (LoRA starts equal to it)
            rows, before = train_rows_and_base_loss(cfg, tiny_model_dir)
        run = train(cfg, log=lambda *_: None)
        after = fixed_rows_loss(load_for_inference(run).model, rows)  # the same rows, the saved final weights
        assert after < 0.8 * before, (name, before, after)


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
    from tunesmith.stages import sft

    real = sft.token_loss_sum
    monkeypatch.setattr(sft, "token_loss_sum", lambda m, b, *a: (real(m, b, *a)[0] * float("nan"), 1))
    with pytest.raises(TunesmithError, match="the loss is nan"):
        loop.train(make_config(), log=lambda *_: None)


def test_bf16_autocast_trains_with_bf16_matmuls_and_fp32_master_weights(make_config, monkeypatch, tiny_model_dir):
    """bf16 autocast works on every CPU (emulated where there is no native bf16, only slower)."""
    from safetensors.torch import load_file

    from tunesmith.inference.loading import load_for_inference
    from tunesmith.training import loop
    from tunesmith.stages import sft

    seen: dict[str, set] = {"linear_out": set(), "loss": set(), "trainable": set()}
    hooks = []
    real = sft.token_loss_sum

    def spy(model, batch, *args):
        if not hooks:
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):  # the base's projections, LoRA's A and B, the LM head
                    hooks.append(module.register_forward_hook(lambda m, i, out: seen["linear_out"].add(out.dtype)))
        summed, n = real(model, batch, *args)
        seen["loss"].add(summed.dtype)
        seen["trainable"] |= {p.dtype for p in model.parameters() if p.requires_grad}
        return summed, n

    monkeypatch.setattr(sft, "token_loss_sum", spy)
    cfg = make_config(train={"max_steps": 8, "lr": 3e-2, "micro_batch_size": 8, "precision": "bf16",
                             "lr_scheduler": "constant"}, eval={"interval": None}, checkpoint={"interval": None})
    rows, before = train_rows_and_base_loss(cfg, tiny_model_dir)
    run = loop.train(cfg, log=lambda *_: None)
    assert hooks and seen == {"linear_out": {torch.bfloat16}, "loss": {torch.float32}, "trainable": {torch.float32}}
    assert {t.dtype for t in load_file(run / "final" / "adapter_model.safetensors").values()} == {torch.float32}
    after = fixed_rows_loss(load_for_inference(run).model, rows)
    assert after < 0.9 * before, (before, after)
