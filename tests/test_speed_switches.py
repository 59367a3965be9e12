"""The speed switches of `train:` change how a step is computed, never what it computes.

packing, logits_at_labels_only and bf16_frozen_weights are each checked against the plain computation.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny_model
from tunesmith.config.schema import MethodConfig
from tunesmith.data.templates import IGNORE
from tunesmith.data.token_store import Tokenized
from tunesmith.methods import get_method
from tunesmith.data.batching import collate, micro_batches, pack
from tunesmith.stages.tokens import model_inputs, token_loss_sum
from tunesmith.models.attention import use_packed_attention

VOCAB = 300


def mixed_rows() -> list[Tokenized]:
    """Rows of very different lengths; the second is trained on every token (train_on_prompt), so its
    first token has a label and packing must not let the row before it learn to predict that token."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for length, prompt in ((7, 3), (30, 0), (12, 5), (48, 20), (3, 1)):
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        rows.append(Tokenized(ids, [IGNORE] * prompt + ids[prompt:]))
    return rows


def lora_model(seed: int = 0):
    model = get_method(MethodConfig(name="lora", r=4, dropout=0.0)).build(build_tiny_model(VOCAB, seed=seed))
    with torch.no_grad():  # LoRA B starts at zero; move it so the adapter path shapes the outputs too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def per_token_losses(model, batch) -> torch.Tensor:
    """Cross-entropy at every position (IGNORE → 0), from the plain full-vocabulary logits."""
    logits = model(**model_inputs(batch)).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    return losses * (targets != IGNORE)


def loss_and_grads(model, batches, **kwargs) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    total, count = 0.0, 0
    for batch in batches:
        summed, n = token_loss_sum(model, batch, **kwargs)
        summed.backward()
        total, count = total + float(summed.detach()), count + n
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total / count, grads


def assert_same_grads(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("per_example_attention", [False, True])
def test_packed_rows_give_each_example_its_unpacked_loss(per_example_attention):
    """Packed, every example scores exactly what it scores alone: attention stays inside it (position ids
    restart), and no target crosses from one example into the next."""
    rows = mixed_rows()
    model = lora_model()
    if per_example_attention:
        use_packed_attention(model)  # tunesmith's attention; otherwise transformers' dense block-causal mask
    model.eval()
    with torch.no_grad():
        alone = [per_token_losses(model, collate([r], pad_id=2))[0].sum() for r in rows]
        batch = pack(rows)
        packed = per_token_losses(model, batch)[0]
    starts = [0]
    for r in rows:
        starts.append(starts[-1] + len(r.input_ids))
    # position t predicts token t+1, so example k's targets are the positions starts[k] .. starts[k+1]-2
    per_example = [packed[a:b - 1].sum() for a, b in zip(starts[:-1], starts[1:])]
    torch.testing.assert_close(torch.stack(per_example), torch.stack(alone), rtol=1e-5, atol=1e-5)
    assert float(packed[[b - 1 for b in starts[1:-1]]].abs().sum()) == 0  # boundary positions are not scored
    assert int((batch["labels"][:, 1:] != IGNORE).sum()) == sum(r.n_targets for r in rows)
    assert batch["input_ids"].shape == (1, sum(len(r.input_ids) for r in rows))  # no padding at all

    # Non-vacuous: the same row with positions running on (one long document) attends across examples.
    with torch.no_grad():
        run_on = {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1])[None]}
        assert not torch.allclose(per_token_losses(model, run_on)[0].sum(), packed.sum(), rtol=1e-3)


def test_packed_and_padded_steps_give_the_same_loss_and_gradients():
    rows = mixed_rows()
    padded_model, packed_model = lora_model(), lora_model()
    use_packed_attention(packed_model)
    loss_padded, grads_padded = loss_and_grads(padded_model, micro_batches(rows, 2, pad_id=2))
    loss_packed, grads_packed = loss_and_grads(packed_model, micro_batches(rows, 2, pad_id=2, packed=True))
    assert loss_packed == pytest.approx(loss_padded, rel=1e-5)
    assert_same_grads(grads_packed, grads_padded, rtol=1e-4, atol=1e-6)


def test_logits_at_labels_only_gives_the_full_head_loss_and_gradients():
    rows = mixed_rows()
    model = build_tiny_model(VOCAB)  # full fine-tuning, so the LM head's own gradient is compared too
    batches = micro_batches(rows, 3, pad_id=2)
    loss_fast, grads_fast = loss_and_grads(model, batches, labels_only=True)
    loss_full, grads_full = loss_and_grads(model, batches, labels_only=False)
    assert loss_fast == pytest.approx(loss_full, rel=1e-6)
    assert "lm_head.weight" in grads_fast
    assert_same_grads(grads_fast, grads_full, rtol=1e-5, atol=1e-7)
    reference = model(**model_inputs(batches[0]), labels=batches[0]["labels"]).loss  # transformers' own loss
    summed, n = token_loss_sum(model, batches[0])
    assert float(summed.detach()) / n == pytest.approx(float(reference), rel=1e-5)


def test_bf16_frozen_weights_change_nothing_under_bf16_autocast():
    from tunesmith.training.session import store_frozen_weights_in_bf16

    rows = mixed_rows()
    batches = micro_batches(rows, 3, pad_id=2)
    fp32_model, bf16_model = lora_model(), lora_model()
    changed = store_frozen_weights_in_bf16(bf16_model)
    base = bf16_model.get_base_model()
    assert changed == 7 * 2 + 1  # q, k, v, o, gate, up, down in each of the two layers, and the LM head
    assert base.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert base.lm_head.weight.dtype == torch.bfloat16  # a Linear under autocast like the others
    assert base.model.embed_tokens.weight.dtype == torch.float32  # looked up, not multiplied: keeps fp32
    assert base.model.norm.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for n, p in bf16_model.named_parameters() if p.requires_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_a, grads_a = loss_and_grads(fp32_model, batches)
        loss_b, grads_b = loss_and_grads(bf16_model, batches)
    # Bit for bit: autocast rounds fp32 weights to bf16 exactly as the stored copy was rounded.
    assert loss_b == loss_a
    assert_same_grads(grads_b, grads_a, rtol=0, atol=0)


def test_an_lm_head_tied_to_the_embeddings_stays_fp32():
    from tunesmith.training.session import store_frozen_weights_in_bf16

    model = lora_model()
    base = model.get_base_model()
    base.lm_head.weight = base.model.embed_tokens.weight  # tied, as in SmolLM2
    assert store_frozen_weights_in_bf16(model) == 7 * 2
    assert base.lm_head.weight.dtype == torch.float32 and base.lm_head.weight is base.model.embed_tokens.weight


def record_packing(monkeypatch) -> list[bool]:
    """Which micro-batches the loop builds packed."""
    from tunesmith.stages import sft

    seen: list[bool] = []
    real = sft.micro_batches

    def recording(rows, size, pad_id, packed=False):
        seen.append(packed)
        return real(rows, size, pad_id, packed)

    monkeypatch.setattr(sft, "micro_batches", recording)
    return seen


def step_losses(run) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def val_losses(run) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


# 32 training rows of 1 to 6 words (conftest's alpaca_rows: lengths vary a lot), 8 rows per optimizer step in
# micro-batches of 4, so every padded micro-batch carries padding and every packed one joins 4 examples.
PACKING_RUN = dict(train={"max_steps": 8, "micro_batch_size": 4, "grad_accum_steps": 2, "lr": 5e-3,
                          "lr_scheduler": "cosine", "warmup_steps": 2},
                   eval={"interval": 4}, checkpoint={"interval": None})


def packing_run(make_config, tmp_path, name: str, packing: bool, precision: str = "fp32", **extra):
    """Train through train(); returns the run dir and, for each micro-batch the loop built, whether it was packed."""
    from tunesmith.training.loop import train

    sections = {k: dict(v) for k, v in PACKING_RUN.items()}
    sections["train"].update(packing=packing, precision=precision)
    for k, v in extra.items():
        sections.setdefault(k, {}).update(v)
    with pytest.MonkeyPatch.context() as mp:
        seen = record_packing(mp)
        run = train(make_config(**sections, output={"dir": str(tmp_path / name)}), log=lambda *_: None)
    return run, seen


@pytest.mark.parametrize("train_on_prompt", [False, True], ids=["prompt-masked", "train-on-prompt"])
def test_packed_and_padded_runs_give_the_same_losses_at_every_step(make_config, tmp_path, train_on_prompt):
    """Through train(): the same rows per step, packed or padded, give the same loss at every step and the same
    validation losses, so packing changes how a step is computed, never what it computes. fp32 tolerance: rel
    1e-6 (measured 5e-8: a different summation order, compounded over 8 updates); attention leaking across
    the packed examples moves the losses by 6e-3. With train_on_prompt every example's first token has a
    label, so a packed row that let one example learn to predict the next one's first token would show too."""
    data = {"data": {"train_on_prompt": train_on_prompt}}
    padded, seen_padded = packing_run(make_config, tmp_path, "padded", packing=False, **data)
    packed, seen_packed = packing_run(make_config, tmp_path, "packed", packing=True, **data)
    assert seen_packed and all(seen_packed) and seen_padded and not any(seen_padded)  # really packed / padded
    lengths = json.loads((packed / "data" / "data_report.json").read_text())["splits"]["train"]["length"]
    assert lengths["max"] >= 2 * lengths["min"]  # rows of very different lengths: padding would show
    got, want = step_losses(packed), step_losses(padded)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 9))
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6, abs=0)
    assert want[-1][1] < want[0][1]  # and it is training, not a flat line that would match anyway
    assert [v for _, v in val_losses(packed)] == pytest.approx([v for _, v in val_losses(padded)], rel=1e-6)


def test_a_packed_run_resumes_exactly(make_config, monkeypatch, tmp_path):
    """Stopped mid-run (step 5, mid-epoch, between eval intervals) and resumed, a packed run is bit-identical
    to the uninterrupted packed run: losses, validation losses and final weights."""
    import torch
    from safetensors.torch import load_file

    from tunesmith.errors import TrainingStopped
    from tunesmith.training.loop import train

    whole, seen = packing_run(make_config, tmp_path, "whole", packing=True)
    assert seen and all(seen)
    sections = {k: dict(v) for k, v in PACKING_RUN.items()}
    sections["train"]["packing"] = True
    cfg = make_config(**sections, output={"dir": str(tmp_path / "split")})
    with pytest.raises(TrainingStopped, match="stopped after step 5"):
        train(cfg, log=lambda *_: None, stop_at_step=5)
    assert [s for s, _ in step_losses(tmp_path / "split")] == [1, 2, 3, 4, 5]
    seen = record_packing(monkeypatch)
    train(cfg, log=lambda *_: None, resume=True)
    assert seen and all(seen)  # the resumed part packs too
    split = tmp_path / "split"
    assert step_losses(split) == step_losses(whole) and len(step_losses(whole)) == 8
    assert val_losses(split) == val_losses(whole) and val_losses(whole)
    wa, wb = load_file(str(whole / "final" / "adapter_model.safetensors")), load_file(
        str(split / "final" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and wa
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_packing_under_bf16_gives_the_padded_bf16_losses(make_config, tmp_path):
    """Under bf16 autocast the packed and padded runs round differently (other matmul shapes, another attention
    split), so their losses agree to rel 1e-3 (measured 6e-5; attention leaking across packed examples moves
    them by 6e-3). The control: the bf16 run differs from the fp32 one by more than fp32 rounding (measured
    2e-4), so bf16 was in effect."""
    padded, _ = packing_run(make_config, tmp_path, "padded16", packing=False, precision="bf16")
    packed, seen = packing_run(make_config, tmp_path, "packed16", packing=True, precision="bf16")
    assert seen and all(seen)
    got, want = step_losses(packed), step_losses(padded)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 9))
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-3, abs=0)
    assert [v for _, v in val_losses(packed)] == pytest.approx([v for _, v in val_losses(padded)], rel=1e-3)
    fp32, _ = packing_run(make_config, tmp_path, "packed32", packing=True)
    assert [v for _, v in got] != pytest.approx([v for _, v in step_losses(fp32)], rel=1e-5, abs=0)


def test_packing_falls_back_to_padding_for_a_model_that_cannot_keep_examples_apart(make_config, monkeypatch):
    from tunesmith.training import loop
    from tunesmith.training import session

    seen = record_packing(monkeypatch)
    monkeypatch.setattr(session, "use_packed_attention", lambda model: False)
    logs: list[str] = []
    loop.train(make_config(train={"max_steps": 2, "packing": True}, checkpoint={"interval": None}), log=logs.append)
    assert any("padded instead" in line for line in logs)
    assert seen and not any(seen)


def test_compiled_decoder_gives_the_same_loss_and_gradients():
    from tunesmith.training.session import compile_decoder

    batches = micro_batches(mixed_rows(), 3, pad_id=2)
    eager, compiled = lora_model(), lora_model()
    compile_decoder(compiled)
    assert compiled.get_base_model().get_decoder()._compiled_call_impl is not None
    loss_eager, grads_eager = loss_and_grads(eager, batches)
    loss_compiled, grads_compiled = loss_and_grads(compiled, batches)
    assert loss_compiled == pytest.approx(loss_eager, rel=1e-5)
    assert grads_compiled.keys() == grads_eager.keys() and grads_eager
    for name, grad in grads_eager.items():  # fused kernels round differently: compare whole tensors
        assert float((grads_compiled[name] - grad).norm()) <= 1e-5 * float(grad.norm()), name
    assert sorted(compiled.state_dict()) == sorted(eager.state_dict())  # checkpoints keep their names
