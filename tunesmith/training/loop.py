"""The training loop. Read it top to bottom: it runs optimizer steps and says what happened, nothing else.

One optimizer step = `grad_accum_steps` micro-batches of `micro_batch_size` rows. The stage gives each
micro-batch's loss as a sum; the step's loss is those sums divided by the stage's count for the whole step
(label tokens for SFT), so a short row weighs as much per token as a long one, whatever the batching
(DESIGN rule 1). The count is an integer a multi-process runtime can all-reduce before dividing.

Set-up (data, model, method, placement, optimizer, resume) is in session.py; what the loop reports goes out
as events (events.py) to sinks: the progress bar, metrics.jsonl and TensorBoard, and any the caller adds.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch

from tunesmith.config.schema import Config
from tunesmith.errors import TrainingStopped, TunesmithError
from tunesmith.models.device import autocast
from tunesmith.optim import begin_step
from tunesmith.run.metrics import plot_losses
from tunesmith.training import events as ev
from tunesmith.training.interrupts import StopOnSignal
from tunesmith.training.session import Session, open_session


def train(cfg: Config, log=print, resume: bool = False, checkpoint: str | None = None, force: bool = False,
          stop_at_step: int | None = None, checks: str = "block", on_event: ev.Sink | None = None,
          stop: Callable[[], bool] | None = None) -> Path:
    """Run one fine-tuning job described by `cfg`; returns the run directory.

    resume: continue the run in `output.dir` from its newest intact checkpoint (or `checkpoint`, by name);
    force: resume even if settings that change the run (batching, data, method) differ;
    stop_at_step: stop after this step as if preempted (checkpoint, then TrainingStopped);
    checks: the pre-flight checks of `tunesmith doctor CONFIG` print their warnings and errors, and errors
    stop the run ("block"), or not ("warn"), or the checks are skipped ("off");
    on_event: called with every event (training/events.py) besides the bar and the metrics file;
    stop: a StopRequest (or any callable) that, once true, stops the run cleanly after the current step.
    """
    session = open_session(cfg, log, resume, checkpoint, force, checks)
    sinks = [ev.ProgressBar(cfg.train.log_interval), ev.MetricsFile(session.run.path, session.start + 1 if resume else None)]
    events = ev.Events(sinks + ([on_event] if on_event else []))
    request = stop if isinstance(stop, ev.StopRequest) else ev.StopRequest()  # signals request through it too
    wanted = stop if stop is not None and stop is not request else (lambda: False)
    started = time.perf_counter()
    try:
        with StopOnSignal(request, events.note):
            last, early = run_steps(session, events, lambda step: request() or wanted() or step == stop_at_step,
                                    request)
        train_time = round(time.perf_counter() - started, 1)  # the steps, not the writes below
        # ---- outputs: final weights/adapter (or the best checkpoint's), loss curve, status
        final_from = session.finish(last)
        if final_from:
            events.note(f"final/ holds {final_from} (checkpoint.final: best)")
        plot_losses(session.run.metrics, session.run.loss_plot)
        watched = session.watch.best
        session.run.update_info(status="complete", steps=last, skipped_steps=session.skipped,
                                train_time_s=train_time, device=session.device.type, precision=session.precision,
                                stopped_early=early, final_from=final_from,
                                best=watched.describe() if watched and watched.best is not None else None)
        events.emit(ev.Done(session.run.path, last, session.skipped, train_time, early))
    except TrainingStopped:
        raise
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        session.run.update_info(status=status, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        events.emit(ev.Error(None, exc))
        raise
    finally:
        events.close()
    log(f"done: {session.run.final}  (loss curve: {session.run.loss_plot})")
    return session.run.path


def run_steps(s: Session, events: ev.Events, should_stop: Callable[[int], bool],
              request: ev.StopRequest) -> tuple[int, str | None]:
    """Steps start+1 .. steps: accumulate, clip, step, evaluate, checkpoint; stop cleanly when asked.
    Returns the last step taken and, when the watched metric stopped the run early, why."""
    cfg, tc = s.cfg, s.cfg.train
    events.emit(ev.Started(s.start, s.steps, s.run.path))
    s.model.train()
    for step in range(s.start + 1, s.steps + 1):
        t0 = time.perf_counter()
        begin_step(s.optimizer, step)  # BAdam: the block this step trains (a function of the step)
        rows = [s.data.train[i] for i in s.stream.take(s.stage.rows_wanted(step, s.rows_per_step))]
        rows = s.stage.collect(s.model, rows, step)  # online stages (GRPO): answers sampled for these prompts
        loss, s.micro = accumulate(s, rows, events.note)
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in s.params], tc.max_grad_norm or float("inf")))
        lr = s.scheduler.get_last_lr()[0]
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            s.optimizer.step()
        elif tc.on_nan == "stop":
            raise TunesmithError(non_finite_advice(s, step, loss, grad_norm))
        else:
            s.skipped += 1
            events.note(f"step {step}: non-finite loss or gradients; update skipped ({s.skipped} so far)")
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        events.emit(ev.Step(step, s.stream.epoch, loss, lr, grad_norm, not finite, time.perf_counter() - t0,
                            s.stage.step_metrics(rows)))

        last, saved, early = step == s.steps, None, None
        if s.data.val and ((cfg.eval.interval and step % cfg.eval.interval == 0) or last):
            metrics = s.evaluate()
            events.emit(ev.Eval(step, metrics))
            best, early = s.watch.update(step, metrics)
            if best:  # checkpoint.best_by improved: this point is kept as the best checkpoint
                saved = s.checkpoint(step, best=True)
                events.emit(ev.Checkpoint(step, saved))
            if early:  # eval.early_stopping_patience: the run ends here, complete
                events.note(early)
                return step, early
        stopping = not last and should_stop(step)
        if saved is None and (stopping or (not last and cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0)):
            saved = s.checkpoint(step)
            events.emit(ev.Checkpoint(step, saved))
        if stopping:
            reason = request.reason or "stop requested"
            events.emit(ev.Stopping(step, saved, reason))
            s.run.update_info(status="interrupted", step=step)
            raise TrainingStopped(f"stopped after step {step}; checkpoint {saved}. Continue with: "
                                  f"tunesmith train CONFIG --resume --output.dir={s.run.path}", request.exit_code)
    return s.steps, None


def accumulate(s: Session, rows: list, note: Callable[[str], None]) -> tuple[float, int]:
    """Forward and backward over one optimizer step's rows in micro-batches; returns (loss, micro-batch size).

    Every micro-batch's summed loss is divided by the count of the whole step (DESIGN rule 1). On
    out-of-memory with train.auto_micro_batch, the same rows are re-split into halved micro-batches: the
    step's content and loss are unchanged, only the split is.
    """
    count, micro = s.stage.count(rows), s.micro
    while True:
        try:
            total = 0.0
            for batch in s.stage.batches(rows, micro, s.pad_id, s.packed):
                batch = {k: v.to(s.device) for k, v in batch.items()}
                with autocast(s.device, s.precision):
                    summed, _ = s.stage.loss_sum(s.model, batch)
                (summed / count).backward()  # normalised over the whole step, not per micro-batch
                total += float(summed.detach())
            return total / count, micro
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(exc):
                raise
            s.model.zero_grad(set_to_none=True)  # drop the partial gradients of this attempt
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
            if not s.cfg.train.auto_micro_batch or micro == 1:
                raise TunesmithError(f"out of memory with micro-batches of {micro} rows (longest row "
                                     f"{max(len(r) for r in rows)} tokens). {OOM_ADVICE}") from None
            micro = max(1, micro // 2)
            note(f"out of memory: retrying this step with micro-batches of {micro} rows "
                 "(same rows per optimizer step, so the training is unchanged)")


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


OOM_ADVICE = ("Lower train.micro_batch_size (raise train.grad_accum_steps to keep the effective batch), "
              "lower data.max_seq_length, or use LoRA instead of full fine-tuning; "
              "train.auto_micro_batch: true finds a micro-batch that fits by itself.")


def non_finite_advice(s: Session, step: int, loss: float, grad_norm: float) -> str:
    last = sorted(s.run.checkpoints.glob("step-*"))
    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
    return (f"step {step}: the {what} is {value}. Usual causes: a learning rate too high (train.lr is "
            f"{s.cfg.train.lr}), an overflow in low precision (try train.precision: fp32), or a bad data row. "
            f"The last good checkpoint is {last[-1] if last else 'none (set checkpoint.interval)'}; "
            "train.on_nan: skip skips such steps instead.")
