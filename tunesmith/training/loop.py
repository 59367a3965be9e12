"""The training loop. Read it top to bottom: every hyperparameter of `train:` is used here.

One optimizer step = `grad_accum_steps` micro-batches of `micro_batch_size` rows. Its loss is the sum of
token losses over all those micro-batches divided by the number of label tokens in the whole step, so a
short row weighs as much per token as a long one, whatever the batching (DESIGN rule 1).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tunesmith import __version__
from tunesmith.config import Config
from tunesmith.data.pipeline import PreparedData, prepare_data
from tunesmith.data.templates import IGNORE, install_template, resolve_template
from tunesmith.device import autocast, pick_device, pick_precision
from tunesmith.errors import TrainingStopped, TunesmithError
from tunesmith.evaluate import mean_loss
from tunesmith.methods import describe_counts, get_method, parameter_counts
from tunesmith.models import load_causal_lm, load_tokenizer, resolve
from tunesmith.preflight import check_before_training
from tunesmith.run_dir import is_run_dir, prepare_run_dir, update_run_info, write_json
from tunesmith.training.batching import RowStream, micro_batches
from tunesmith.training.block_coordinate import BlockAdamW, trainable_as_built
from tunesmith.training.checkpoint import (check_resumable, clean_temporary, find_checkpoint, fingerprint,
                                           load_checkpoint, read_state, save_checkpoint, sha256_file)
from tunesmith.training.interrupts import EXIT_CODES, StopOnSignal
from tunesmith.training.loss import causal_lm, token_loss_sum, virtual_tokens
from tunesmith.training.metrics import MetricsLog, plot_losses, truncate_metrics
from tunesmith.training.optim import build_optimizer, build_scheduler
from tunesmith.training.attention import use_packed_attention


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def total_steps(cfg: Config, n_train: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    rows_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    return max(1, math.ceil(cfg.train.epochs * n_train / rows_per_step))


def load_data_and_tokenizer(cfg: Config):
    """Tokenizer with the run's template installed, and the prepared data (shared by `prepare` and `train`)."""
    source = resolve(cfg.model.name_or_path, cfg.model.gguf_file)
    tokenizer = load_tokenizer(source, cfg.model.trust_remote_code, cfg.model.revision)
    install_template(tokenizer, resolve_template(cfg.data.template, tokenizer))
    return source, tokenizer, prepare_data(cfg.data, tokenizer)


def write_run_files(run_dir: Path, cfg: Config, source, tokenizer, data: PreparedData) -> None:
    (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    tokenizer.save_pretrained(run_dir / "tokenizer")  # carries the chat template used for training
    data.copy_splits(run_dir / "data")
    write_json(run_dir / "data" / "data_report.json", data.report.to_dict())
    write_json(run_dir / "run.json", {
        "tunesmith_version": __version__, "status": "running", "method": cfg.method.name,
        "template": cfg.data.template, "data_format": data.format,
        "base_model": {"path": source.path, "gguf_file": source.gguf_file},
    })


def data_hashes(cfg: Config) -> dict[str, str | None]:
    """Content hashes of the data files, so a resume can tell that the data changed underneath the run."""
    hashes = {}
    for key in ("train_file", "val_file", "test_file"):
        path = getattr(cfg.data, key)
        hashes[key] = sha256_file(Path(path)) if path else None
    return hashes


def open_run_dir(cfg: Config, resume: bool) -> Path:
    """A new run directory, or (resume) the existing one; an existing run is never silently replaced."""
    run_dir = Path(cfg.output.dir)
    if not resume:
        return prepare_run_dir(cfg)
    if cfg.output.overwrite:
        raise TunesmithError("--resume and --overwrite contradict each other: resume continues the run, "
                             "overwrite deletes it")
    if not is_run_dir(run_dir):
        raise TunesmithError(f"nothing to resume: {run_dir} is not a tunesmith run directory")
    clean_temporary(run_dir)
    return run_dir


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


def apply_speed_switches(model, method, tc, precision: str, log) -> bool:
    """The train.* switches that change how a step is computed, not what it computes (tests pin each).
    Returns whether micro-batches are packed."""
    if tc.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    packed = tc.packing and use_packed_attention(model) and virtual_tokens(model) is None
    if tc.packing and not packed:
        log("note: packing is off: this model's attention cannot keep packed examples apart, or the method adds "
            "soft prompts; micro-batches are padded instead")
    if precision == "bf16" and tc.bf16_frozen_weights and not method.saves_base_weights:
        store_frozen_weights_in_bf16(model)
    if tc.compile:
        compile_decoder(model)
    return packed


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


OOM_ADVICE = ("Lower train.micro_batch_size (raise train.grad_accum_steps to keep the effective batch), "
              "lower data.max_seq_length, or use LoRA instead of full fine-tuning; "
              "train.auto_micro_batch: true finds a micro-batch that fits by itself.")


def accumulate_gradients(model, rows, micro: int, pad_id: int, device, precision: str, auto: bool, log,
                         packed: bool = False, labels_only: bool = True) -> tuple[float, int]:
    """Forward and backward over one optimizer step's rows in micro-batches; returns (loss, micro-batch size).

    The loss is summed over all micro-batches and divided by the label tokens of the whole step (DESIGN
    rule 1). On out-of-memory with `auto`, the same rows are re-split into halved micro-batches: the
    step's content and loss are unchanged, only the split is.
    """
    n_targets = sum(r.n_targets for r in rows)
    while True:
        try:
            loss_sum = 0.0
            for batch in micro_batches(rows, micro, pad_id, packed):
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast(device, precision):
                    summed, _ = token_loss_sum(model, batch, labels_only)
                (summed / n_targets).backward()  # normalised over the whole step, not per micro-batch
                loss_sum += float(summed.detach())
            return loss_sum / n_targets, micro
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(exc):
                raise
            model.zero_grad(set_to_none=True)  # drop the partial gradients of this attempt
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if not auto or micro == 1:
                raise TunesmithError(f"out of memory with micro-batches of {micro} rows "
                                     f"(longest row {max(len(r.input_ids) for r in rows)} tokens). {OOM_ADVICE}") from None
            micro = max(1, micro // 2)
            log(f"out of memory: retrying this step with micro-batches of {micro} rows "
                "(same rows per optimizer step, so the training is unchanged)")


def train(cfg: Config, log=print, resume: bool = False, checkpoint: str | None = None, force: bool = False,
          stop_at_step: int | None = None, checks: str = "block") -> Path:
    """Run one fine-tuning job described by `cfg`; returns the run directory.

    resume: continue the run in `output.dir` from its newest intact checkpoint (or `checkpoint`, by name);
    force: resume even if settings that change the run (batching, data, method) differ;
    stop_at_step: stop after this step as if preempted (checkpoint, then TrainingStopped);
    checks: the pre-flight checks of `tunesmith doctor CONFIG` print their warnings and errors, and errors
    stop the run ("block"), or not ("warn"), or the checks are skipped ("off").
    """
    tc = cfg.train
    seed_everything(tc.seed)
    device = pick_device(tc.device)
    precision = pick_precision(tc.precision, device)

    # ---- data: read, split, render, tokenize (the report is printed before any model is loaded)
    source, tokenizer, data = load_data_and_tokenizer(cfg)
    log(data.report.to_text())
    if checks != "off":
        check_before_training(cfg, data.report, log, checks)
    run_dir = open_run_dir(cfg, resume)
    if not resume:
        write_run_files(run_dir, cfg, source, tokenizer, data)
    identity = fingerprint(cfg, data_hashes(cfg))

    # ---- model: load the base, let the method decide what trains
    method = get_method(cfg.method)
    base = load_causal_lm(source, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision,
                          **method.load_kwargs(device))
    if method.build_on_device and not method.quantized:
        base.to(device)  # PiSSA/OLoRA decompose every targeted weight while building: far faster on a GPU
    model = method.build(base)
    packed = apply_speed_switches(model, method, tc, precision, log)
    if not method.quantized:  # after the bf16 cast, so the device never holds the fp32 copy of frozen weights;
        model.to(device)      # a quantized base is placed while it loads
    params = method.trainable_parameters(model)
    log(f"method {method.name}: {describe_counts(model)}")

    steps = total_steps(cfg, len(data.train))
    optimizer = build_optimizer(params, tc, method.lr_multiplier, model, log)
    scheduler = build_scheduler(optimizer, steps, tc)
    rows_per_step = tc.micro_batch_size * tc.grad_accum_steps
    stream = RowStream(len(data.train), tc.seed, lengths=data.train_lengths if tc.group_by_length else None,
                       group=rows_per_step)
    micro, start, skipped = tc.micro_batch_size, 0, 0

    # ---- resume: weights, optimizer, schedule, data position and RNG exactly as they were
    if resume:
        ckpt = find_checkpoint(run_dir, checkpoint)
        state = read_state(ckpt)
        for change in check_resumable(state["fingerprint"], identity, force):
            log(f"warning (--force): {change}")
        load_checkpoint(ckpt, state, method, model, optimizer, scheduler)
        start, stream.position = state["step"], state["data_position"]
        micro, skipped = state["micro_batch_size"], state["skipped_steps"]
        truncate_metrics(run_dir / "metrics.jsonl", start)  # later lines came from the lost part of the run
        log(f"resuming from {ckpt.name}: step {start} of {steps}, epoch {stream.epoch}")
    if start >= steps:
        raise TunesmithError(f"the checkpoint is at step {start} and the run has {steps} steps; "
                             "raise train.max_steps (or train.epochs) to train further")
    trainable, total = parameter_counts(model)
    update_run_info(run_dir, status="running", parameters={
        "total": total, "trainable": trainable, "embedding": causal_lm(model).get_input_embeddings().weight.numel()},
        **({"resumed_from": f"step-{start:06d}"} if resume else {}))
    log(f"training {steps} steps of {rows_per_step} rows ({tc.micro_batch_size} × {tc.grad_accum_steps} accumulation) "
        f"on {device.type} in {precision}; run dir {run_dir}")

    def checkpoint_now(step: int) -> Path:
        with trainable_as_built(optimizer):  # BAdam: the method saves every layer, not only the active one
            return save_checkpoint(run_dir, step, method, model, optimizer, scheduler, {
                "data_position": stream.position, "epoch": stream.epoch, "micro_batch_size": micro,
                "skipped_steps": skipped, "fingerprint": identity}, cfg.checkpoint.keep_last)

    metrics = MetricsLog(run_dir, purge_step=start + 1 if resume else None)
    pad_id = tokenizer.pad_token_id
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    model.train()
    seen_tokens, started = 0, time.perf_counter()
    try:
        with StopOnSignal() as signals:
            for step in range(start + 1, steps + 1):
                t0 = time.perf_counter()
                if isinstance(optimizer, BlockAdamW):
                    optimizer.begin_step(step)  # BAdam: the block this step trains (a function of the step)
                rows = [data.train[i] for i in stream.take(rows_per_step)]
                loss, micro = accumulate_gradients(model, rows, micro, pad_id, device, precision,
                                                   tc.auto_micro_batch, bar.write, packed,
                                                   tc.logits_at_labels_only)
                grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in params],
                                                                 tc.max_grad_norm or float("inf")))
                lr = scheduler.get_last_lr()[0]
                finite = math.isfinite(loss) and math.isfinite(grad_norm)
                if finite:
                    optimizer.step()
                elif tc.on_nan == "stop":
                    last = sorted((run_dir / "checkpoints").glob("step-*"))
                    raise TunesmithError(
                        f"step {step}: the {'loss' if not math.isfinite(loss) else 'gradient norm'} is "
                        f"{loss if not math.isfinite(loss) else grad_norm}. Usual causes: a learning rate too high "
                        f"(train.lr is {tc.lr}), an overflow in low precision (try train.precision: fp32), or a bad "
                        "data row. The last good checkpoint is "
                        f"{last[-1] if last else 'none (set checkpoint.interval)'}; train.on_nan: skip skips such "
                        "steps instead.")
                else:
                    skipped += 1
                    bar.write(f"step {step}: non-finite loss or gradients; update skipped ({skipped} so far)")
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                tokens = sum(len(r.input_ids) for r in rows)
                seen_tokens += tokens
                elapsed = time.perf_counter() - t0
                metrics.write({"step": step, "epoch": stream.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                               "tokens": tokens, "trained_tokens": sum(r.n_targets for r in rows),
                               "tokens_per_s": tokens / elapsed, "step_time_s": elapsed,
                               **({"skipped": True} if not finite else {})})
                bar.update(1)
                if step % tc.log_interval == 0 or step == steps:
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                                    tok_s=f"{seen_tokens / (time.perf_counter() - started):.0f}")

                last = step == steps
                if data.val and ((cfg.eval.interval and step % cfg.eval.interval == 0) or last):
                    val_loss, _ = mean_loss(model, data.val, cfg.eval.batch_size, pad_id, precision,
                                            cfg.eval.max_batches)
                    metrics.write({"step": step, "val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50))})
                    bar.write(f"step {step}: val_loss {val_loss:.4f}  perplexity {math.exp(min(val_loss, 50)):.2f}")
                stopping = signals.requested or step == stop_at_step
                if not last and (stopping or (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0)):
                    saved = checkpoint_now(step)
                if stopping and not last:
                    code = EXIT_CODES.get(signals.signum, 0) if signals.signum else 0
                    update_run_info(run_dir, status="interrupted", step=step)
                    raise TrainingStopped(f"stopped after step {step}; checkpoint {saved}. Continue with: "
                                          f"tunesmith train CONFIG --resume --output.dir={run_dir}", code)
    except TrainingStopped:
        raise
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        update_run_info(run_dir, status=status, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        raise
    finally:
        bar.close()
        metrics.close()

    # ---- outputs: final weights/adapter, loss curve, status
    with trainable_as_built(optimizer):
        save_final(method, model, run_dir)
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    update_run_info(run_dir, status="complete", steps=steps, skipped_steps=skipped,
                    train_time_s=round(time.perf_counter() - started, 1), device=device.type, precision=precision)
    log(f"done: {run_dir / 'final'}  (loss curve: {run_dir / 'loss.png'})")
    return run_dir


def save_final(method, model, run_dir: Path) -> None:
    """final/ appears complete or not at all (a resumed run replaces it only once the new one is written)."""
    tmp, final, old = run_dir / ".final.tmp", run_dir / "final", run_dir / ".final.old"
    shutil.rmtree(tmp, ignore_errors=True)
    method.save(model, tmp)
    shutil.copy2(run_dir / "config.yaml", tmp / "config.yaml")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
