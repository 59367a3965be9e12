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
from tunesmith.errors import TunesmithError
from tunesmith.evaluate import mean_loss
from tunesmith.methods import describe_counts, get_method
from tunesmith.models import load_causal_lm, load_tokenizer, resolve
from tunesmith.run_dir import prepare_run_dir, write_json, write_jsonl
from tunesmith.training.batching import micro_batches
from tunesmith.training.loss import token_loss_sum
from tunesmith.training.metrics import MetricsLog, plot_losses
from tunesmith.training.optim import build_optimizer, build_scheduler


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
    for name, rows in data.raw_splits.items():
        write_jsonl(run_dir / "data" / f"{name}.jsonl", rows)
    write_json(run_dir / "data" / "data_report.json", data.report.to_dict())
    write_json(run_dir / "run.json", {
        "tunesmith_version": __version__, "status": "running", "method": cfg.method.name,
        "template": cfg.data.template, "data_format": data.format,
        "base_model": {"path": source.path, "gguf_file": source.gguf_file},
    })


def save_checkpoint(method, model, run_dir: Path, step: int, keep_last: int, state: dict) -> Path:
    """Write to a temporary directory and rename, so a checkpoint directory is always complete."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    method.save(model, tmp)
    shutil.copy2(run_dir / "config.yaml", tmp / "config.yaml")  # each checkpoint says how it was made
    write_json(tmp / "trainer_state.json", state)
    tmp.rename(final)
    for old in sorted(root.glob("step-*"))[:-keep_last]:  # only after the new one is complete
        shutil.rmtree(old)
    return final


def train(cfg: Config, log=print) -> Path:
    """Run one fine-tuning job described by `cfg`; returns the run directory."""
    tc = cfg.train
    seed_everything(tc.seed)
    device = pick_device(tc.device)
    precision = pick_precision(tc.precision, device)

    # ---- data: read, split, render, tokenize (the report is printed before any model is loaded)
    source, tokenizer, data = load_data_and_tokenizer(cfg)
    log(data.report.to_text())
    run_dir = prepare_run_dir(cfg)
    write_run_files(run_dir, cfg, source, tokenizer, data)

    # ---- model: load the base, let the method decide what trains
    method = get_method(cfg.method)
    model = method.build(load_causal_lm(source, trust_remote_code=cfg.model.trust_remote_code,
                                        revision=cfg.model.revision))
    model.to(device)
    params = method.trainable_parameters(model)
    log(f"method {method.name}: {describe_counts(model)}")

    steps = total_steps(cfg, len(data.train))
    optimizer = build_optimizer(params, tc)
    scheduler = build_scheduler(optimizer, steps, tc)
    rows_per_step = tc.micro_batch_size * tc.grad_accum_steps
    log(f"training {steps} steps of {rows_per_step} rows ({tc.micro_batch_size} × {tc.grad_accum_steps} accumulation) "
        f"on {device.type} in {precision}; run dir {run_dir}")

    metrics = MetricsLog(run_dir)
    stream = micro_batches(data.train, tc.micro_batch_size, tc.seed, tokenizer.pad_token_id)
    pad_id = tokenizer.pad_token_id
    bar = tqdm(total=steps, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
    model.train()
    seen_tokens, started = 0, time.perf_counter()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        window = [next(stream) for _ in range(tc.grad_accum_steps)]
        n_targets = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for _, b in window)
        loss_sum = 0.0
        for _, batch in window:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, precision):
                summed, _ = token_loss_sum(model, batch)
            (summed / n_targets).backward()  # normalised over the whole step, not per micro-batch
            loss_sum += float(summed.detach())
        loss = loss_sum / n_targets
        if not math.isfinite(loss):
            raise TunesmithError(f"step {step}: the loss is {loss}. Usual causes: a learning rate too high "
                                 f"(train.lr is {tc.lr}), or a bad data row. Checkpoints in {run_dir} are kept.")
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], tc.max_grad_norm or float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        tokens = sum(int(b["attention_mask"].sum()) for _, b in window)
        seen_tokens += tokens
        elapsed = time.perf_counter() - t0
        metrics.write({"step": step, "epoch": window[-1][0], "loss": loss, "lr": lr,
                       "grad_norm": float(grad_norm), "tokens": tokens, "trained_tokens": n_targets,
                       "tokens_per_s": tokens / elapsed, "step_time_s": elapsed})
        bar.update(1)
        if step % tc.log_interval == 0 or step == steps:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{seen_tokens / (time.perf_counter() - started):.0f}")

        last = step == steps
        if data.val and ((cfg.eval.interval and step % cfg.eval.interval == 0) or last):
            val_loss, _ = mean_loss(model, data.val, cfg.eval.batch_size, pad_id, precision, cfg.eval.max_batches)
            metrics.write({"step": step, "val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50))})
            bar.write(f"step {step}: val_loss {val_loss:.4f}  perplexity {math.exp(min(val_loss, 50)):.2f}")
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and not last:
            save_checkpoint(method, model, run_dir, step, cfg.checkpoint.keep_last,
                            {"step": step, "loss": loss, "lr": lr})
    bar.close()
    metrics.close()

    # ---- outputs: final weights/adapter, loss curve, status
    method.save(model, run_dir / "final")
    shutil.copy2(run_dir / "config.yaml", run_dir / "final" / "config.yaml")
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    info.update(status="complete", steps=steps, train_time_s=round(time.perf_counter() - started, 1),
                device=device.type, precision=precision)
    write_json(run_dir / "run.json", info)
    log(f"done: {run_dir / 'final'}  (loss curve: {run_dir / 'loss.png'})")
    return run_dir
