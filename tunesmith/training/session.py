"""Everything a run sets up before its first step: data, run directory, model, method, placement, speed
switches, optimizer, schedule, and (on resume) the exact state of a checkpoint. The step loop
(training/loop.py) then only runs steps; `Session.checkpoint` and `Session.finish` are the writes it asks for.
"""

from __future__ import annotations

import hashlib
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from tunesmith import __version__
from tunesmith.config.schema import Config
from tunesmith.data.batching import RowStream
from tunesmith.data.pipeline import PreparedData, load_data_and_tokenizer
from tunesmith.data.reading import document_files
from tunesmith.errors import TunesmithError
from tunesmith.methods import METHODS, Method, describe_counts, get_method, parameter_counts
from tunesmith.methods.runs import load_model_or_run, load_run_model, run_tokenizer
from tunesmith.models.attention import use_packed_attention
from tunesmith.models.device import pick_device, pick_precision
from tunesmith.models.layers import causal_lm
from tunesmith.models.loading import load_causal_lm
from tunesmith.optim import saving
from tunesmith.optim.build import build_optimizer
from tunesmith.optim.schedule import build_scheduler, total_steps
from tunesmith.planning.preflight import check_before_training
from tunesmith.run.checkpoint import (best_checkpoint, check_resumable, clean_temporary, find_checkpoint, fingerprint,
                                      load_checkpoint, mark_best, read_state, save_checkpoint, sha256_file)
from tunesmith.run.metrics import truncate_metrics
from tunesmith.run.run_dir import RunDir, is_run_dir, write_json
from tunesmith.stages import Stage, get_stage
from tunesmith.stages.reward import load_head
from tunesmith.training.validation import Answers, Watch, generated


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_run_files(run: RunDir, cfg: Config, source, tokenizer, data: PreparedData) -> None:
    run.config.write_text(cfg.to_yaml(), encoding="utf-8")
    tokenizer.save_pretrained(run.tokenizer)  # carries the chat template used for training
    data.copy_splits(run.data)
    write_json(run.data_report, data.report.to_dict())
    write_json(run.info, {
        "tunesmith_version": __version__, "status": "running", "method": cfg.method.name, "stage": cfg.stage.name,
        "template": cfg.data.template, "data_format": data.format,
        "base_model": {"path": source.path, "gguf_file": source.gguf_file},
    })


def data_hashes(cfg: Config) -> dict[str, str | None]:
    """Content hashes of the data files, so a resume can tell that the data changed underneath the run."""
    hashes = {}
    for key in ("train_file", "val_file", "test_file"):
        path = getattr(cfg.data, key)
        if path and Path(path).is_dir():  # a folder of documents: its files' names and contents
            files = document_files(Path(path))
            joined = "".join(f"{f.relative_to(path)}\0{sha256_file(f)}\n" for f in files)
            hashes[key] = hashlib.sha256(joined.encode("utf-8")).hexdigest()
        else:
            hashes[key] = sha256_file(Path(path)) if path else None
    return hashes


def open_run_dir(cfg: Config, resume: bool) -> RunDir:
    """A new run directory, or (resume) the existing one; an existing run is never silently replaced."""
    if not resume:
        return RunDir.create(cfg)
    run = RunDir(cfg.output.dir)
    if cfg.output.overwrite:
        raise TunesmithError("--resume and --overwrite contradict each other: resume continues the run, "
                             "overwrite deletes it")
    if not run.exists():
        raise TunesmithError(f"nothing to resume: {run.path} is not a tunesmith run directory")
    clean_temporary(run.path)
    return run


# ---------------------------------------------------------------------------------------------- speed switches


def enable_gradient_checkpointing(model) -> None:
    # Non-reentrant checkpointing needs no input that requires grad, so it works with frozen embeddings (LoRA).
    causal_lm(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def store_frozen_weights_in_bf16(model) -> int:
    """Hold frozen linear weights in bf16; returns how many tensors changed.

    Under bf16 autocast every linear layer casts its weight to bf16 on each forward anyway, so this gives the
    same numbers while saving the fp32 copy and the per-step casts. Embeddings (and an LM head tied to them)
    and norms stay fp32: autocast leaves them in fp32, so their precision is kept.
    """
    embedding = causal_lm(model).get_input_embeddings().weight
    changed = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        for p in (module.weight, module.bias):
            if p is not None and not p.requires_grad and p is not embedding and p.dtype == torch.float32:
                p.data = p.data.to(torch.bfloat16)
                changed += 1
    return changed


def compile_decoder(model) -> None:
    # In place (nn.Module.compile), so parameter names, state dicts and checkpoints are unchanged. Row lengths
    # vary from step to step, so shapes are marked dynamic rather than recompiled per length.
    causal_lm(model).get_decoder().compile(dynamic=True)


def apply_speed_switches(model, method: Method, tc, precision: str, log, stage: Stage | None = None) -> bool:
    """The train.* switches that change how a step is computed, not what it computes (tests pin each).
    Returns whether micro-batches are packed."""
    if tc.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if stage is not None and stage.needs_packed_attention:
        if method.soft_prompt or not use_packed_attention(model):
            raise TunesmithError(f"stage {stage.name} keeps each document to itself inside a block, which needs "
                                 "packed attention, and this model or method (soft prompts) cannot take it; set "
                                 "stage.cross_document_attention: true")
        packed = True
    else:
        wanted = tc.packing or (stage is not None and stage.packs_by_default)
        packed = (wanted and not method.soft_prompt and (stage is None or stage.can_pack)
                  and use_packed_attention(model))
    if tc.packing and not packed:
        log("note: packing is off: this model's attention cannot keep packed examples apart, or the method adds "
            "soft prompts; micro-batches are padded instead")
    if precision == "bf16" and tc.bf16_frozen_weights and not method.saves_base_weights:
        store_frozen_weights_in_bf16(model)
    if tc.compile:
        compile_decoder(model)
    return packed


# ---------------------------------------------------------------------------------------------- the session


@dataclass
class Session:
    """A run ready to take its next step; the loop changes only `micro`, `skipped` and the stream's position."""

    cfg: Config
    run: RunDir
    data: PreparedData
    pad_id: int
    stage: Stage
    method: Method
    model: torch.nn.Module
    params: list[tuple[str, torch.nn.Parameter]]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    stream: RowStream
    device: torch.device
    precision: str
    packed: bool
    steps: int
    start: int
    micro: int
    skipped: int
    identity: dict[str, Any]
    watch: Watch
    answers: Answers | None = None
    """Greedy answers to the validation rows, when a watched metric is scored on them (exact_match, …)."""

    @property
    def rows_per_step(self) -> int:
        return self.cfg.train.micro_batch_size * self.cfg.train.grad_accum_steps

    def evaluate(self) -> dict[str, Any]:
        """The stage's held-out numbers, and the generated metrics the run watches."""
        cfg = self.cfg.eval
        metrics = self.stage.evaluate(self.model, self.data.val, cfg.batch_size, self.pad_id, self.precision,
                                      cfg.max_batches)
        if self.answers is not None:
            metrics.update(self.answers(self.model, self.precision))
        return metrics

    def checkpoint(self, step: int, best: bool = False) -> Path:
        """A resumable checkpoint; `best`: it is the best so far by checkpoint.best_by, and is kept as such."""
        with saving(self.optimizer):  # BAdam: the method saves every layer, not only the active one
            path = save_checkpoint(self.run.path, step, self.method, self.model, self.optimizer, self.scheduler, {
                "data_position": self.stream.position, "epoch": self.stream.epoch, "micro_batch_size": self.micro,
                "skipped_steps": self.skipped, "fingerprint": self.identity, "watch": self.watch.state()},
                self.cfg.checkpoint.keep_last, self.stage)
        if best:
            tracker = self.watch.best
            mark_best(self.run.path, path, tracker.metric, tracker.best, self.cfg.checkpoint.keep_last)
        return path

    def finish(self, step: int) -> str | None:
        """final/ appears complete or not at all (a resumed run replaces it only once the new one is written).
        With checkpoint.final: best it holds the best checkpoint's weights; returns where they came from then."""
        source = None
        best = best_checkpoint(self.run.path) if self.cfg.checkpoint.final == "best" else None
        if best is not None and best["step"] != step:
            path = self.run.checkpoints / best["checkpoint"]
            self.method.restore(self.model, path)
            self.stage.restore(path)
            source = f"{best['checkpoint']} ({best['metric']} {best['value']:.4g}, the best)"
        with saving(self.optimizer):
            save_final(self.method, self.model, self.run, self.stage)
        return source


def save_final(method: Method, model, run: RunDir, stage: Stage | None = None) -> None:
    tmp, final, old = run.path / ".final.tmp", run.final, run.path / ".final.old"
    shutil.rmtree(tmp, ignore_errors=True)
    method.save(model, tmp)
    if stage is not None:
        stage.save(tmp)  # what the stage trains itself (rm's head)
    shutil.copy2(run.config, tmp / "config.yaml")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def stage_models(cfg: Config, tokenizer, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    """The models a stage's settings name, loaded frozen on the training device: stage.reference (a model or
    a run dir) and stage.reward_model (a run trained with stage rm: its body and scalar head)."""
    out: dict[str, Any] = {}
    reference = getattr(cfg.stage, "reference", None)
    if reference:
        model, other = load_model_or_run(reference)
        check_same_vocabulary(other, tokenizer, "stage.reference", reference)
        out["reference"] = model.to(device).requires_grad_(False)
        log(f"reference: {reference} (frozen)")
    scorer = getattr(cfg.stage, "reward_model", None)
    if scorer:
        if not is_run_dir(scorer):
            raise TunesmithError(f"stage.reward_model: {scorer} is not a tunesmith run directory; train one with "
                                 "stage.name: rm and give its output.dir")
        model, method, scorer_cfg, weights = load_run_model(scorer, device=device)
        if scorer_cfg.stage.name != "rm":
            raise TunesmithError(f"stage.reward_model: {scorer} was trained with stage {scorer_cfg.stage.name}, not "
                                 "rm, so it has no reward head")
        check_same_vocabulary(run_tokenizer(scorer), tokenizer, "stage.reward_model", scorer)
        if not method.quantized:
            model.to(device)
        head = load_head(model, weights)
        out["reward_model"] = (model.requires_grad_(False), head.requires_grad_(False))
        log(f"reward model: {scorer} ({scorer_cfg.method.name}, frozen)")
    return out


def check_same_vocabulary(other, tokenizer, key: str, name: str) -> None:
    # Log-probabilities and rewards are read token by token, so both models must split text the same way.
    if other.get_vocab() != tokenizer.get_vocab():
        raise TunesmithError(f"{key}: {name} has another vocabulary ({len(other)} tokens) than the model being "
                             f"trained ({len(tokenizer)}); it must share the tokenizer")


def open_session(cfg: Config, log: Callable[[str], None], resume: bool = False, checkpoint: str | None = None,
                 force: bool = False, checks: str = "block") -> Session:
    tc = cfg.train
    seed_everything(tc.seed)
    device = pick_device(tc.device)
    precision = pick_precision(tc.precision, device)
    stage = get_stage(cfg)

    # ---- data: read, split, render, tokenize (the report is printed before any model is loaded)
    source, tokenizer, data = load_data_and_tokenizer(cfg)
    log(data.report.to_text())
    problem = stage.check_data(data.format, cfg.data.train_file)
    if problem:
        raise TunesmithError(problem)
    if stage.name not in METHODS[cfg.method.name].stages:
        raise TunesmithError(f"method {cfg.method.name} does not support stage {stage.name}")
    if checks != "off":
        check_before_training(cfg, data.report, log, checks)
    run = open_run_dir(cfg, resume)
    if not resume:
        write_run_files(run, cfg, source, tokenizer, data)
    identity = fingerprint(cfg, data_hashes(cfg))

    # ---- model: load the base, let the method decide what trains and where it lives
    method = get_method(cfg.method)
    base = load_causal_lm(source, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision,
                          **method.load_kwargs(device))
    method.place_base(base, device)
    model = method.build(base)
    packed = apply_speed_switches(model, method, tc, precision, log, stage)
    method.place(model, device)
    stage.tokenizer = tokenizer
    stage.models = stage_models(cfg, tokenizer, device, log)  # stage.reference, stage.reward_model
    stage.prepare(model, method, data, device, precision, tokenizer.pad_token_id)  # DPO's reference
    params = method.trainable_parameters(model) + stage.parameters()  # rm's head trains beside any method
    log(f"method {method.name}: {describe_counts(model)}")

    steps = total_steps(cfg, len(data.train))
    optimizer = build_optimizer(params, tc, method.lr_multiplier, model, log, cfg.optimizer)
    scheduler = build_scheduler(optimizer, steps, tc)
    stream = RowStream(len(data.train), tc.seed, lengths=data.train_lengths if tc.group_by_length else None,
                       group=tc.micro_batch_size * tc.grad_accum_steps)
    session = Session(cfg, run, data, tokenizer.pad_token_id, stage, method, model, params, optimizer, scheduler,
                      stream, device, precision, packed, steps, start=0, micro=tc.micro_batch_size, skipped=0,
                      identity=identity, watch=Watch.of(cfg))
    if generated(cfg) and data.val:
        session.answers = Answers(cfg, run.data / "val.jsonl", data.format, tokenizer)

    # ---- resume: weights, optimizer, schedule, data position and RNG exactly as they were
    if resume:
        ckpt = find_checkpoint(run.path, checkpoint)
        state = read_state(ckpt)
        for change in check_resumable(state["fingerprint"], identity, force):
            log(f"warning (--force): {change}")
        load_checkpoint(ckpt, state, method, model, optimizer, scheduler, stage)
        session.start, stream.position = state["step"], state["data_position"]
        session.micro, session.skipped = state["micro_batch_size"], state["skipped_steps"]
        session.watch.restore(state.get("watch", {}))
        truncate_metrics(run.metrics, session.start)  # later lines came from the lost part of the run
        log(f"resuming from {ckpt.name}: step {session.start} of {steps}, epoch {stream.epoch}")
    if session.start >= steps:
        raise TunesmithError(f"the checkpoint is at step {session.start} and the run has {steps} steps; "
                             "raise train.max_steps (or train.epochs) to train further")
    trainable, total = parameter_counts(model)
    run.update_info(status="running", parameters={
        "total": total, "trainable": trainable, "embedding": causal_lm(model).get_input_embeddings().weight.numel()},
        **({"resumed_from": f"step-{session.start:06d}"} if resume else {}))
    log(f"training {steps} steps of {session.rows_per_step} rows ({tc.micro_batch_size} × {tc.grad_accum_steps} "
        f"accumulation) on {device.type} in {precision}; run dir {run.path}")
    return session
