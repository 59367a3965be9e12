"""train.optimizer galore* and badam: what each keeps in memory, what it trains, that it learns, and that a run
interrupted anywhere (a GaLore projection update, a BAdam block switch) resumes bit-identically."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_tiny_model
from test_faults import RESUMABLE, assert_same_run, final_weights, losses, quiet, val_losses
from tunesmith.config.schema import OptimizerConfig, TrainConfig
from tunesmith.errors import ConfigError, TrainingStopped, TunesmithError
from tunesmith.optim.block_coordinate import BlockAdamW, active_block, block_order
from tunesmith.run.checkpoint import _optimizer_from_files, _optimizer_to_files, fingerprint
from tunesmith.training.loop import train
from tunesmith.optim.build import build_optimizer
from tunesmith.optim.schedule import build_scheduler

GALORE = ["galore", "galore_8bit", "galore_adafactor"]
LAYER_MATRICES = {f"model.layers.{i}.{m}.weight" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def tiny_llama(layers: int = 2, hidden: int = 32, intermediate: int = 64, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))


def backward(model, seed: int) -> None:
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()


def moment_shape(state: dict) -> tuple[int, ...]:
    """The shape of the optimizer's moments, whichever optimizer keeps them."""
    if "exp_avg" in state:
        return tuple(state["exp_avg"].shape)
    if "state1" in state:  # bitsandbytes
        return tuple(state["state1"].shape)
    if "exp_avg_sq_row" in state:  # Adafactor's factored second moment: a row and a column
        return (state["exp_avg_sq_row"].numel(), state["exp_avg_sq_col"].numel())
    return tuple(state["exp_avg_sq"].shape)


def run_config(make_config, tmp_path, name: str, method=None, **train_settings):
    settings = {**RESUMABLE, "train": {**RESUMABLE["train"], **train_settings}}
    return make_config(method=method or {"name": "full"}, output={"dir": str(tmp_path / name)}, **settings)


# --------------------------------------------------------------------------- GaLore


@pytest.mark.parametrize("optimizer", GALORE)
def test_galore_projects_the_layer_matrices_only(optimizer):
    model = tiny_llama()
    named = list(model.named_parameters())
    names = {id(p): n for n, p in named}
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    opt = OptimizerConfig(name=optimizer, rank=4, update_interval=3, scale=0.5, proj_type="std")
    notes = []
    grouped = build_optimizer(named, cfg, model=model, log=notes.append, optimizer=opt).param_groups
    projected = {names[id(p)] for g in grouped if "rank" in g for p in g["params"]}
    assert projected == LAYER_MATRICES
    assert all((g["rank"], g["update_proj_gap"], g["scale"], g["proj_type"]) == (4, 3, 0.5, "std")
               for g in grouped if "rank" in g)
    for g in grouped:  # the weight-decay exemptions are kept
        assert g["weight_decay"] == (0.0 if any("norm" in names[id(p)] for p in g["params"]) else 0.1)
    assert any("14 weight matrices get rank-4 moments" in n for n in notes)

    cfg.weight_decay = 0.0  # so the change of a weight is the projected update alone
    optimizer_ = build_optimizer(named, cfg, model=model, log=quiet, optimizer=opt)
    before = {n: p.detach().clone() for n, p in named}
    backward(model, seed=0)
    optimizer_.step()
    assert len(optimizer_.state) == len(named)
    for p, state in optimizer_.state.items():
        name, shape = names[id(p)], moment_shape(state)
        if name in LAYER_MATRICES:
            assert min(shape) == 4 and max(shape) == max(p.shape), (name, shape)  # r × n or m × r
            assert torch.linalg.matrix_rank(p.detach() - before[name]) <= 4, name
            basis = state["projector"].ortho_matrix  # only the rank-4 basis is held, not the whole SVD factor
            assert type(state["projector"]).__name__ == "CompactProjector"
            assert basis.untyped_storage().nbytes() == basis.numel() * basis.element_size() == 4 * min(p.shape) * 4
        else:
            assert shape == tuple(p.shape), (name, shape)
            assert "projector" not in state


def test_galore_8bit_keeps_8bit_low_rank_moments():
    model = tiny_llama(layers=1, hidden=128, intermediate=256)  # gate_proj 256 × 128: rank 32 → 256 × 32 moments
    named = list(model.named_parameters())
    optimizer = build_optimizer(named, TrainConfig(), model=model, log=quiet,
                                optimizer=OptimizerConfig(name="galore_8bit", rank=32))
    backward(model, seed=0)
    optimizer.step()
    state = optimizer.state[model.model.layers[0].mlp.gate_proj.weight]
    assert state["state1"].shape == (256, 32) and state["state1"].dtype == torch.uint8


def test_galore_8bit_steps_like_galore_torch_adamw():
    """Our 8-bit GaLore (bitsandbytes underneath; here with 32-bit states) makes galore_torch's AdamW updates
    to the projected matrices (only they are optimized here: bitsandbytes' and galore_torch's plain AdamW
    place eps differently; a tiny eps makes that immaterial for the projected gradients too)."""
    from galore_torch import GaLoreAdamW

    from tunesmith.optim.galore import GaLoreAdamW8bit, projected_names
    from tunesmith.optim.groups import param_groups

    models = [tiny_llama(), tiny_llama()]
    optimizers = []
    for model, cls, extra in ((models[0], GaLoreAdamW, {"no_deprecation_warning": True}),
                              (models[1], GaLoreAdamW8bit, {"min_8bit_size": 1 << 30})):
        named = [(n, p) for n, p in model.named_parameters() if n in LAYER_MATRICES]
        groups = param_groups(named, 0.1, 1e-2, projected=projected_names(model, named),
                              projection={"rank": 4, "update_proj_gap": 2, "scale": 0.25, "proj_type": "std"})
        optimizers.append(cls(groups, lr=1e-2, eps=1e-12, **extra))
    for step in range(5):  # across a projection update
        for model, optimizer in zip(models, optimizers):
            backward(model, seed=step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    start = tiny_llama().state_dict()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        if name in LAYER_MATRICES:
            assert (a - start[name]).abs().max() > 1e-3, name  # it moved
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(a, start[name]) and torch.equal(b, start[name]), name


@pytest.mark.parametrize("optimizer,proj_type", [("galore", "full"), ("galore", "left"), ("galore_8bit", "std"),
                                                 ("galore_adafactor", "reverse_std")])
def test_galore_state_survives_the_checkpoint_files(tmp_path, optimizer, proj_type):
    """The projector goes to safetensors (its basis) and JSON (its settings) and comes back as a projector, so
    a restored optimizer takes the same steps as the original, through a projection update."""
    cfg = TrainConfig(lr=1e-2)
    opt = OptimizerConfig(name=optimizer, rank=4, update_interval=2, proj_type=proj_type)
    model = tiny_llama()
    original = build_optimizer(list(model.named_parameters()), cfg, model=model, log=quiet, optimizer=opt)
    for step in range(3):
        backward(model, seed=step)
        original.step()
        original.zero_grad(set_to_none=True)
    tensors, meta = _optimizer_to_files(original)
    save_file(tensors, str(tmp_path / "optimizer.safetensors"))
    (tmp_path / "optimizer.json").write_text(json.dumps(meta))
    assert any(key.endswith(".projector.ortho_matrix" + (".1" if proj_type == "full" else "")) for key in tensors)

    twin = copy.deepcopy(model)
    restored = build_optimizer(list(twin.named_parameters()), cfg, model=twin, log=quiet, optimizer=opt)
    restored.load_state_dict(_optimizer_from_files(load_file(str(tmp_path / "optimizer.safetensors")),
                                                   json.loads((tmp_path / "optimizer.json").read_text()),
                                                   restored.projector_from_state))
    projector = restored.state[twin.model.layers[0].mlp.down_proj.weight]["projector"]
    assert type(projector).__name__ == "CompactProjector" and projector.proj_type == proj_type
    assert (projector.rank, projector.update_proj_gap, projector.scale) == (4, 2, opt.scale)
    assert isinstance(projector.ortho_matrix, list) == (proj_type == "full")
    for step in range(3, 6):
        for m, optimizer_ in ((model, original), (twin, restored)):
            backward(m, seed=step)
            optimizer_.step()
            optimizer_.zero_grad(set_to_none=True)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("optimizer", GALORE)
def test_galore_trains_and_resumes_exactly(make_config, tmp_path, optimizer):
    settings = dict(optimizer=optimizer, galore_rank=4, galore_update_interval=3, galore_scale=1.0)
    whole = train(run_config(make_config, tmp_path, "whole", **settings), log=quiet)
    steps = losses(whole)
    assert min(loss for _, loss in steps[-3:]) < 0.8 * steps[0][1], steps

    cfg = run_config(make_config, tmp_path, "split", **settings)
    with pytest.raises(TrainingStopped):  # projections are renewed at steps 1, 4, 7, 10: one after the resume
        train(cfg, log=quiet, stop_at_step=5)
    saved = tmp_path / "split" / "checkpoints" / "step-000005"
    assert "__galore_projector__" in (saved / "optimizer.json").read_text()
    assert any(k.endswith(".projector.ortho_matrix") for k in load_file(str(saved / "optimizer.safetensors")))
    train(cfg, log=quiet, resume=True)
    assert_same_run(whole, tmp_path / "split")


# --------------------------------------------------------------------------- BAdam


def test_badam_block_order():
    assert [active_block(s, 3, 2, "ascending", 0) for s in range(1, 13)] == [0, 0, 1, 1, 2, 2] * 2
    assert [active_block(s, 3, 2, "descending", 0) for s in range(1, 13)] == [2, 2, 1, 1, 0, 0] * 2
    rounds = [block_order(r, 5, "random", seed=7) for r in range(6)]
    assert all(sorted(r) == list(range(5)) for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # a fresh shuffle each round
    assert rounds == [block_order(r, 5, "random", seed=7) for r in range(6)]  # from the seed alone
    assert rounds != [block_order(r, 5, "random", seed=8) for r in range(6)]
    expected = [b for r in rounds[:2] for b in r for _ in range(3)]
    assert [active_block(s, 5, 3, "random", 7) for s in range(1, 31)] == expected


def test_badam_trains_one_block_at_a_time():
    model = tiny_llama(layers=3)
    named = list(model.named_parameters())
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, warmup_steps=2)
    notes = []
    optimizer = build_optimizer(named, cfg, model=model, log=notes.append,
                                optimizer=OptimizerConfig(name="badam", switch_every=2, order="descending"))
    scheduler = build_scheduler(optimizer, 12, cfg)
    assert isinstance(optimizer, BlockAdamW) and len(optimizer.param_groups) == 2
    assert any("frozen" in n and "model.embed_tokens.weight" in n for n in notes)

    def layer(name: str) -> int | None:
        return int(name.split(".")[2]) if name.startswith("model.layers.") else None

    active, expected_lr = [], [cfg.lr * f for f in (0.5, 1.0)]
    for step in range(1, 13):
        block = optimizer.begin_step(step)
        members = {n for n, _ in named if layer(n) == block}
        before = {n: p.detach().clone() for n, p in named}
        assert {n for n, p in named if p.requires_grad} == members
        backward(model, seed=step)
        assert {n for n, p in named if p.grad is not None} == members  # no gradient held outside the block
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr[step - 1] if step <= 2
                                                                 else scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        assert {n for n, p in named if not torch.equal(p, before[n])} == members  # the others bit-identical
        assert {id(p) for p in optimizer.state} == {id(p) for n, p in named if n in members}
        # moments start afresh at each switch, also when a block comes back in the next round
        assert all(int(s["step"]) == 2 - step % 2 for s in optimizer.state.values())
        active.append(block)
    assert active == [2, 2, 1, 1, 0, 0] * 2


@pytest.mark.parametrize("method,stops", [({"name": "full"}, (6, 5)),
                                          ({"name": "freeze", "trainable_layers": 2}, (5,))])
def test_badam_resumes_exactly_at_and_across_a_block_switch(make_config, tmp_path, tiny_model_dir, method, stops):
    settings = dict(optimizer="badam", badam_switch_every=3, badam_order="random")
    whole = train(run_config(make_config, tmp_path, "whole", method, **settings), log=quiet)
    first, val = losses(whole)[0][1], [loss for _, loss in val_losses(whole)]  # one layer at a time: slower
    assert all(a > b for a, b in zip(val, val[1:])) and val[-1] < 0.85 * first, (first, val)

    # blocks switch after steps 3, 6, 9: stop at 6 resumes at a switch, stop at 5 resumes before one
    for stop in stops:
        cfg = run_config(make_config, tmp_path, f"split-{stop}", method, **settings)
        with pytest.raises(TrainingStopped):
            train(cfg, log=quiet, stop_at_step=stop)
        train(cfg, log=quiet, resume=True)
        assert_same_run(whole, tmp_path / f"split-{stop}")

    base = load_file(str(tiny_model_dir / "model.safetensors"))
    trained = final_weights(whole)
    layers = {k for k in base if k.startswith("model.layers.")}
    assert set(trained) >= layers  # every layer saved, not only the last active one
    for key in layers:
        assert not torch.equal(trained[key], base[key]), key  # each block had its turn
    for key in set(trained) - layers:  # embeddings, LM head and final norm stay as they were
        assert torch.equal(trained[key], base[key]), key
    if method["name"] == "full":
        assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(trained)


# --------------------------------------------------------------------------- config and fingerprint


@pytest.mark.parametrize("optimizer", GALORE + ["badam"])
def test_galore_and_badam_need_full_or_freeze(make_config, optimizer):
    with pytest.raises(ConfigError, match=f"optimizer.name {optimizer} .*needs method.name full or freeze"):
        make_config(method={"name": "lora"}, train={"optimizer": optimizer})
    make_config(method={"name": "freeze", "trainable_layers": 1}, train={"optimizer": optimizer})


def test_fingerprint_holds_the_settings_of_the_optimizer_in_use(make_config):
    keys = {name: set(fingerprint(make_config(method={"name": "full"}, train={"optimizer": name}), {}))
            for name in ("adamw", "galore_8bit", "badam")}
    assert not any("galore" in k or "badam" in k for k in keys["adamw"])  # older checkpoints still match
    assert keys["galore_8bit"] - keys["adamw"] == {"optimizer.rank", "optimizer.update_interval",
                                                   "optimizer.scale", "optimizer.proj_type"}
    assert keys["badam"] - keys["adamw"] == {"optimizer.switch_every", "optimizer.order"}


@pytest.mark.parametrize("optimizer,key,value", [("galore", "rank", 8), ("badam", "order", "ascending")])
def test_resume_with_other_optimizer_settings_is_refused(make_config, tmp_path, optimizer, key, value):
    cfg = run_config(make_config, tmp_path, "run", optimizer=optimizer, galore_rank=4)
    with pytest.raises(TrainingStopped):
        train(cfg, log=quiet, stop_at_step=2)
    setattr(cfg.optimizer, key, value)
    with pytest.raises(TunesmithError, match=f"optimizer.{key}: was .*, now {value!r}"):
        train(cfg, log=quiet, resume=True)
