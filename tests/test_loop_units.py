"""The training loop (training/loop.py) on a fake session: a one-weight linear model, a stage whose loss is
a token-weighted squared error, a real SGD optimizer and schedule. Every expectation is computed by hand, so
these run in milliseconds (the end-to-end runs live in test_training.py and test_faults.py)."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from tunesmith.errors import TrainingStopped, TunesmithError
from tunesmith.training import events as ev
from tunesmith.training import loop
from tunesmith.training.validation import Watch

pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\(\)`")

W0 = 0.5  # the model: pred = W0 * x


class Row:
    """One example: `tokens` label tokens that all have the error (W * x - y)."""

    def __init__(self, x: float, y: float, tokens: int):
        self.x, self.y, self.tokens = x, y, tokens
        self.input_ids = list(range(tokens + 3))  # the prompt is 3 tokens longer than the labels

    def __len__(self) -> int:
        return len(self.input_ids)


ROWS = [Row(1.0, 2.0, 1), Row(2.0, 0.0, 3), Row(-1.0, 1.0, 2), Row(3.0, 2.0, 4), Row(0.5, -1.0, 5),
        Row(-2.0, 0.5, 1), Row(1.5, 1.5, 2), Row(4.0, -3.0, 3)]


def expected_loss(rows, w: float = W0) -> float:
    """The step's loss: every label token weighs the same, whatever row it is in."""
    return sum(r.tokens * (w * r.x - r.y) ** 2 for r in rows) / sum(r.tokens for r in rows)


def expected_grad(rows, w: float = W0) -> float:
    return sum(r.tokens * 2 * (w * r.x - r.y) * r.x for r in rows) / sum(r.tokens for r in rows)


class Carried:
    """A batch tensor that records the device it is sent to (so a test on the CPU can ask for any device)."""

    def __init__(self, tensor: torch.Tensor, sent: list):
        self.tensor, self.sent = tensor, sent

    def to(self, device):
        self.sent.append(device)
        return self.tensor


class Clock:
    """perf_counter for the loop: time passes only when the fake does work."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class InfiniteSlope(torch.autograd.Function):
    """Zero, with an infinite gradient: a finite loss whose backward pass overflows."""

    @staticmethod
    def forward(ctx, x):
        return x * 0

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


class LinearStage:
    def __init__(self, clock: Clock | None = None, out_of_memory=None, weird=None):
        self.clock = clock
        self.out_of_memory = out_of_memory  # batch -> bool: raise torch.OutOfMemoryError for it
        self.weird = weird  # "nan": the loss is NaN; "inf-grad": the loss is finite, its gradient is not
        self.batch_calls, self.evals, self.sent, self.seen, self.forward = [], [], [], [], []

    def rows_wanted(self, step, rows_per_step):
        return rows_per_step

    def collect(self, model, rows, step):
        return rows

    def count(self, rows):
        return sum(r.tokens for r in rows)

    def batches(self, rows, micro, pad_id, packed):
        self.batch_calls.append((len(rows), micro, pad_id, packed))
        for i in range(0, len(rows), micro):
            part = rows[i:i + micro]
            yield {"x": Carried(torch.tensor([[r.x] for r in part]), self.sent),
                   "y": Carried(torch.tensor([r.y for r in part]), self.sent),
                   "w": Carried(torch.tensor([float(r.tokens) for r in part]), self.sent),
                   "rows": Carried(torch.tensor([ROWS.index(r) for r in part]), self.sent)}

    def loss_sum(self, model, batch):
        self.forward.append((model.training, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        if self.out_of_memory and self.out_of_memory(batch):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.seen.append(batch["rows"].tolist())
        if self.clock:
            self.clock.now += 0.33
        pred = model(batch["x"]).squeeze(-1)
        if self.weird == "inf-grad":
            return InfiniteSlope.apply(model.weight).sum() + 0 * pred.sum(), None
        summed = (batch["w"] * (pred - batch["y"]) ** 2).sum()
        return (summed * float("nan") if self.weird == "nan" else summed), None

    def step_metrics(self, rows):
        return {"tokens": float(self.count(rows))}

    def evaluate(self, model, val, batch_size, pad_id, precision, max_batches):
        self.evals.append((model, len(val), batch_size, pad_id, precision, max_batches))
        return {"val_loss": 0.25}


class Stream:
    def __init__(self, n: int):
        self.n, self.position, self.epoch = n, 0, 0

    def take(self, k: int) -> list[int]:
        out = [(self.position + i) % self.n for i in range(k)]
        self.position += k
        self.epoch = self.position // self.n
        return out


class FakeRun:
    def __init__(self, path: Path):
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints = path / "checkpoints"
        self.metrics, self.loss_plot, self.final = path / "metrics.jsonl", path / "loss.png", path / "final"
        self.infos: list[dict] = []

    def update_info(self, **fields):
        self.infos.append(fields)


class Hooked(torch.optim.SGD):
    """An optimizer with BAdam's begin_step hook."""

    def begin_step(self, step):
        self.begun.append(step)


def session(tmp_path, steps=4, start=0, micro=2, per_step=4, val=True, max_grad_norm=None, on_nan="stop",
            auto_micro_batch=False, eval_interval=None, checkpoint_interval=None, precision="fp32", lr=0.1,
            device=None, **stage):
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(W0)
    model.eval()  # the loop must put it in training mode itself
    optimizer = Hooked(model.parameters(), lr=lr)
    optimizer.begun = []
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 / (i + 1))
    for _ in range(start):  # a resumed run's schedule is where the checkpoint left it
        scheduler.step()
    s = SimpleNamespace(
        cfg=SimpleNamespace(
            train=SimpleNamespace(max_grad_norm=max_grad_norm, on_nan=on_nan, auto_micro_batch=auto_micro_batch,
                                  lr=lr, log_interval=7),
            eval=SimpleNamespace(interval=eval_interval, batch_size=3, max_batches=5),
            checkpoint=SimpleNamespace(interval=checkpoint_interval)),
        run=FakeRun(tmp_path / "run"), data=SimpleNamespace(train=ROWS, val=ROWS[:2] if val else []),
        pad_id=9, stage=LinearStage(**stage), model=model, params=list(model.named_parameters()),
        optimizer=optimizer, scheduler=scheduler, stream=Stream(len(ROWS)),
        device=device or torch.device("cpu"), precision=precision, packed=True, steps=steps, start=start,
        micro=micro, skipped=0, rows_per_step=per_step, saved=[], finished=0)
    if start:
        s.stream.take(start * per_step)

    def checkpoint(step):
        s.saved.append(step)
        path = s.run.checkpoints / f"step-{step:06d}"
        path.mkdir(parents=True)
        return path

    def finish(step):
        s.finished += 1
        if s.stage.clock:
            s.stage.clock.now += 10.0  # writing the final weights is not training time

    def evaluate():  # Session.evaluate with no generated metric watched
        return s.stage.evaluate(s.model, s.data.val, 3, s.pad_id, s.precision, 5)

    s.checkpoint, s.finish, s.evaluate, s.watch = checkpoint, finish, evaluate, Watch(None, None, None)
    return s


def run(s, should_stop=lambda step: False, request=None):
    seen: list = []
    loop.run_steps(s, ev.Events([seen.append]), should_stop, request or ev.StopRequest())
    return seen


def weight(s) -> float:
    return float(s.model.weight.detach())


# ----------------------------------------------------------------------------- accumulate


def test_the_step_loss_and_gradient_are_the_token_mean_over_all_micro_batches(tmp_path):
    s = session(tmp_path, micro=2)
    rows = ROWS[:5]
    loss, micro = loop.accumulate(s, rows, note=pytest.fail)
    assert micro == 2
    assert loss == pytest.approx(expected_loss(rows))
    assert float(s.model.weight.grad) == pytest.approx(expected_grad(rows))
    assert s.stage.batch_calls == [(5, 2, 9, True)]
    assert s.stage.seen == [[0, 1], [2, 3], [4]]


def test_every_micro_batch_goes_to_the_runs_device_and_precision(tmp_path):
    s = session(tmp_path, micro=2, precision="bf16", device=torch.device("cpu", 0))
    loop.accumulate(s, ROWS[:4], note=pytest.fail)
    assert s.stage.sent == [torch.device("cpu", 0)] * 8  # 4 tensors x 2 micro-batches
    assert [f[1:] for f in s.stage.forward] == [(True, torch.bfloat16)] * 2
    s = session(tmp_path / "fp32", micro=4)
    loop.accumulate(s, ROWS[:4], note=pytest.fail)
    assert [f[1] for f in s.stage.forward] == [False]


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_steps_loss_and_gradient(tmp_path):
    """The first attempt ran a backward pass before it ran out: its partial gradient must not count twice."""
    notes = []
    s = session(tmp_path, micro=5, auto_micro_batch=True,
                out_of_memory=lambda batch: len(batch["rows"]) > 2 and 6 in batch["rows"])
    rows = ROWS[:8]
    loss, micro = loop.accumulate(s, rows, notes.append)
    assert micro == 2  # 5 -> 2: the first micro-batch of 5 rows fits, the second (with row 6) does not
    assert loss == pytest.approx(expected_loss(rows))
    assert float(s.model.weight.grad) == pytest.approx(expected_grad(rows))
    assert notes == ["out of memory: retrying this step with micro-batches of 2 rows (same rows per optimizer "
                     "step, so the training is unchanged)"]
    assert [c[1] for c in s.stage.batch_calls] == [5, 2]


def test_out_of_memory_halves_down_to_one_row(tmp_path):
    notes = []
    s = session(tmp_path, micro=3, auto_micro_batch=True, out_of_memory=lambda batch: len(batch["rows"]) > 1)
    loss, micro = loop.accumulate(s, ROWS[:3], notes.append)
    assert micro == 1 and len(notes) == 1 and "micro-batches of 1 rows" in notes[0]
    assert loss == pytest.approx(expected_loss(ROWS[:3]))


def test_out_of_memory_without_auto_micro_batch_gives_advice(tmp_path):
    s = session(tmp_path, micro=4, out_of_memory=lambda batch: True)
    with pytest.raises(TunesmithError) as caught:
        loop.accumulate(s, ROWS[:4], note=pytest.fail)
    assert str(caught.value) == ("out of memory with micro-batches of 4 rows (longest row 7 tokens). "
                                 + loop.OOM_ADVICE)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert "train.micro_batch_size" in loop.OOM_ADVICE and "train.auto_micro_batch: true" in loop.OOM_ADVICE


def test_the_partial_gradients_of_a_step_that_ran_out_of_memory_are_released(tmp_path):
    """Set to None, not zeroed: the memory they hold is what the run is short of."""
    s = session(tmp_path, micro=2, out_of_memory=lambda batch: 3 in batch["rows"])
    with pytest.raises(TunesmithError, match="out of memory"):
        loop.accumulate(s, ROWS[:4], note=pytest.fail)
    assert s.stage.seen == [[0, 1]] and s.model.weight.grad is None


def test_out_of_memory_at_one_row_per_micro_batch_cannot_be_split_further(tmp_path):
    notes = []
    s = session(tmp_path, micro=1, auto_micro_batch=True, out_of_memory=lambda batch: True)
    with pytest.raises(TunesmithError, match=r"^out of memory with micro-batches of 1 rows \(longest row 4 tokens\)"):
        loop.accumulate(s, ROWS[:1], notes.append)
    assert notes == [] and s.model.weight.grad is None


def test_out_of_memory_on_a_gpu_frees_the_cached_memory_before_retrying(tmp_path, monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    s = session(tmp_path, micro=2, auto_micro_batch=True, device=SimpleNamespace(type="cuda"),
                out_of_memory=lambda batch: len(batch["rows"]) > 1)
    loop.accumulate(s, ROWS[:2], lambda text: None)
    assert emptied == [1]
    s = session(tmp_path / "cpu", micro=2, auto_micro_batch=True,
                out_of_memory=lambda batch: len(batch["rows"]) > 1)
    loop.accumulate(s, ROWS[:2], lambda text: None)
    assert emptied == [1]


def test_other_errors_pass_through_unchanged(tmp_path):
    s = session(tmp_path, auto_micro_batch=True)
    s.stage.loss_sum = lambda model, batch: (_ for _ in ()).throw(RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        loop.accumulate(s, ROWS[:2], note=pytest.fail)


def test_what_counts_as_out_of_memory():
    assert loop.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert loop.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate"))
    assert not loop.is_out_of_memory(RuntimeError("expected scalar type Float"))
    assert not loop.is_out_of_memory(ValueError("can't allocate memory"))


# ----------------------------------------------------------------------------- run_steps


def test_each_step_trains_on_the_next_rows_and_reports_them(tmp_path):
    s = session(tmp_path, steps=2, per_step=4, micro=2, val=False)
    seen = run(s)
    assert [type(e).__name__ for e in seen] == ["Started", "Step", "Step"]
    assert seen[0] == ev.Started(0, 2, s.run.path)
    assert s.stage.seen == [[0, 1], [2, 3], [4, 5], [6, 7]]
    w1 = W0 - 0.1 * expected_grad(ROWS[:4])
    first, second = seen[1], seen[2]
    assert (first.step, first.epoch, first.skipped) == (1, 0, False)
    assert first.loss == pytest.approx(expected_loss(ROWS[:4]))
    assert first.grad_norm == pytest.approx(abs(expected_grad(ROWS[:4])))
    assert first.lr == pytest.approx(0.1) and second.lr == pytest.approx(0.05)  # the rate the step used
    assert first.metrics == {"tokens": 10.0} and first.time_s >= 0
    assert second.loss == pytest.approx(expected_loss(ROWS[4:], w1)) and second.epoch == 1
    assert weight(s) == pytest.approx(w1 - 0.05 * expected_grad(ROWS[4:], w1))
    assert s.optimizer.begun == [1, 2] and s.model.weight.grad is None
    assert all(f[0] for f in s.stage.forward)  # in training mode
    assert s.saved == [] and s.stage.evals == [] and s.run.infos == []


def test_a_resumed_run_takes_the_steps_after_its_start(tmp_path):
    s = session(tmp_path, steps=4, start=2, val=False)
    seen = run(s)
    assert seen[0] == ev.Started(2, 4, s.run.path)
    assert [e.step for e in seen[1:]] == [3, 4] and s.optimizer.begun == [3, 4]
    assert s.stage.seen[0] == [0, 1]  # rows 8.. wrap around to the start
    assert seen[1].lr == pytest.approx(0.1 / 3)


def test_a_micro_batch_shrunk_for_memory_stays_shrunk(tmp_path):
    notes = []
    s = session(tmp_path, steps=2, micro=4, auto_micro_batch=True, val=False,
                out_of_memory=lambda batch: len(batch["rows"]) > 2)
    seen = run(s)
    notes = [e.text for e in seen if isinstance(e, ev.Note)]
    assert len(notes) == 1 and s.micro == 2
    assert [c[1] for c in s.stage.batch_calls] == [4, 2, 2]


def test_gradients_are_clipped_to_the_max_norm_and_the_norm_before_clipping_is_reported(tmp_path):
    s = session(tmp_path, steps=1, max_grad_norm=0.01, val=False)
    seen = run(s)
    g = expected_grad(ROWS[:4])
    assert abs(g) > 0.01 and seen[1].grad_norm == pytest.approx(abs(g))
    assert weight(s) == pytest.approx(W0 - 0.1 * 0.01 * math.copysign(1, g), rel=1e-4)


def test_a_non_finite_loss_stops_the_run_with_advice(tmp_path):
    s = session(tmp_path, steps=3, weird="nan", lr=0.003)
    for name in ("step-000002", "step-000010", "step-000004"):
        (s.run.checkpoints / name).mkdir(parents=True)
    with pytest.raises(TunesmithError) as caught:
        run(s)
    last = s.run.checkpoints / "step-000010"
    assert str(caught.value) == (
        "step 1: the loss is nan. Usual causes: a learning rate too high (train.lr is 0.003), an overflow in low "
        f"precision (try train.precision: fp32), or a bad data row. The last good checkpoint is {last}; "
        "train.on_nan: skip skips such steps instead.")
    assert weight(s) == W0


def test_a_non_finite_gradient_with_a_finite_loss_is_named_and_there_may_be_no_checkpoint(tmp_path):
    s = session(tmp_path, steps=3, weird="inf-grad")
    with pytest.raises(TunesmithError) as caught:
        run(s)
    message = str(caught.value)
    assert message.startswith("step 1: the gradient norm is inf. ")
    assert "The last good checkpoint is none (set checkpoint.interval); " in message
    assert weight(s) == W0


def test_the_skip_policy_skips_the_update_and_counts_it(tmp_path):
    s = session(tmp_path, steps=2, on_nan="skip", weird="nan", val=False)
    seen = run(s)
    assert weight(s) == W0 and s.skipped == 2 and s.model.weight.grad is None
    notes = [e.text for e in seen if isinstance(e, ev.Note)]
    assert notes == ["step 1: non-finite loss or gradients; update skipped (1 so far)",
                     "step 2: non-finite loss or gradients; update skipped (2 so far)"]
    steps = [e for e in seen if isinstance(e, ev.Step)]
    assert [e.skipped for e in steps] == [True, True] and math.isnan(steps[0].loss)
    assert steps[1].lr == pytest.approx(0.05)  # the schedule moves on


def test_a_non_finite_gradient_norm_alone_skips_the_update(tmp_path):
    s = session(tmp_path, steps=1, on_nan="skip", weird="inf-grad", val=False)
    seen = run(s)
    steps = [e for e in seen if isinstance(e, ev.Step)]
    assert weight(s) == W0 and s.skipped == 1 and steps[0].skipped and steps[0].loss == 0.0


def test_evaluation_runs_at_its_interval_and_after_the_last_step(tmp_path):
    s = session(tmp_path, steps=5, eval_interval=2, precision="fp32")
    seen = run(s)
    assert [e.step for e in seen if isinstance(e, ev.Eval)] == [2, 4, 5]
    assert s.stage.evals[0] == (s.model, 2, 3, 9, "fp32", 5)
    assert next(e for e in seen if isinstance(e, ev.Eval)) == ev.Eval(2, {"val_loss": 0.25})
    kinds = [type(e).__name__ for e in seen]
    assert kinds[kinds.index("Eval") - 1] == "Step"  # after its step
    s = session(tmp_path / "last", steps=3, eval_interval=None)
    assert [e.step for e in run(s) if isinstance(e, ev.Eval)] == [3]
    s = session(tmp_path / "none", steps=3, eval_interval=1, val=False)
    assert [e for e in run(s) if isinstance(e, ev.Eval)] == []


def test_checkpoints_are_written_at_their_interval_but_not_after_the_last_step(tmp_path):
    s = session(tmp_path, steps=6, checkpoint_interval=2, eval_interval=2)
    seen = run(s)
    assert s.saved == [2, 4]
    marks = [e for e in seen if isinstance(e, ev.Checkpoint)]
    assert marks == [ev.Checkpoint(2, s.run.checkpoints / "step-000002"),
                     ev.Checkpoint(4, s.run.checkpoints / "step-000004")]
    kinds = [type(e).__name__ for e in seen]
    assert kinds[2:5] == ["Step", "Eval", "Checkpoint"]
    s = session(tmp_path / "off", steps=3, checkpoint_interval=None)
    run(s, should_stop=lambda step: False)
    assert s.saved == []


def test_a_stop_request_checkpoints_then_stops_with_the_resume_command(tmp_path):
    s = session(tmp_path, steps=5, checkpoint_interval=None, val=False)
    request = ev.StopRequest()
    request.request("SIGTERM received", 143)
    asked = []
    with pytest.raises(TrainingStopped) as caught:
        run(s, should_stop=lambda step: asked.append(step) or step == 2, request=request)
    assert asked == [1, 2] and s.saved == [2]
    assert str(caught.value) == (f"stopped after step 2; checkpoint {s.run.checkpoints / 'step-000002'}. Continue "
                                 f"with: tunesmith train CONFIG --resume --output.dir={s.run.path}")
    assert caught.value.exit_code == 143
    assert s.run.infos == [{"status": "interrupted", "step": 2}]


def test_a_stop_without_a_reason_says_stop_requested(tmp_path):
    s = session(tmp_path, steps=5, checkpoint_interval=None, val=False)
    seen = []
    with pytest.raises(TrainingStopped) as caught:
        loop.run_steps(s, ev.Events([seen.append]), lambda step: step == 1, ev.StopRequest())
    assert seen[-2:] == [ev.Checkpoint(1, s.run.checkpoints / "step-000001"),
                         ev.Stopping(1, s.run.checkpoints / "step-000001", "stop requested")]
    assert caught.value.exit_code == 0


def test_a_stop_asked_for_at_the_last_step_just_finishes(tmp_path):
    s = session(tmp_path, steps=2, checkpoint_interval=None, val=False)
    asked = []
    seen = run(s, should_stop=lambda step: asked.append(step) or step == 2)
    assert asked == [1] and s.saved == [] and not any(isinstance(e, ev.Stopping) for e in seen)


# ----------------------------------------------------------------------------- train


class Recorder:
    made: list = []

    def __init__(self, *args):
        self.args, self.events, self.closed = args, [], False
        Recorder.made.append(self)

    def __call__(self, event):
        self.events.append(event)

    def close(self):
        self.closed = True


@pytest.fixture()
def world(tmp_path, monkeypatch):
    """train() around a fake session: records what it opened, which sinks it made and what it plotted."""
    clock = Clock()
    w = SimpleNamespace(opened=[], plotted=[], logs=[], clock=clock)
    w.session = session(tmp_path, steps=3, micro=4, val=False, clock=clock)

    def open_session(*args):
        w.opened.append(args)
        return w.session

    class Bar(Recorder):
        pass

    class Metrics(Recorder):
        pass

    Recorder.made = []
    w.bars, w.files = Bar, Metrics
    monkeypatch.setattr(loop, "open_session", open_session)
    monkeypatch.setattr(ev, "ProgressBar", Bar)
    monkeypatch.setattr(ev, "MetricsFile", Metrics)
    monkeypatch.setattr(loop, "plot_losses", lambda *args: w.plotted.append(args))
    monkeypatch.setattr(loop.time, "perf_counter", clock)
    return w


def sinks(w):
    bar = next(r for r in Recorder.made if isinstance(r, w.bars))
    metrics = next(r for r in Recorder.made if isinstance(r, w.files))
    return bar, metrics


def test_a_run_opens_its_session_trains_and_writes_its_outputs(world):
    s, seen = world.session, []
    cfg = s.cfg
    path = loop.train(cfg, log=world.logs.append, checkpoint="step-000002", force=True, checks="warn",
                      on_event=seen.append)
    assert path == s.run.path
    assert world.opened == [(cfg, world.logs.append, False, "step-000002", True, "warn")]
    bar, metrics = sinks(world)
    assert bar.args == (7,) and metrics.args == (s.run.path, None)
    assert bar.events == metrics.events == seen and bar.closed and metrics.closed
    assert [type(e).__name__ for e in seen] == ["Started", "Step", "Step", "Step", "Done"]
    assert s.finished == 1 and world.plotted == [(s.run.metrics, s.run.loss_plot)]
    # three steps of 0.33 s each; writing the final weights (10 s) is not training time
    assert s.run.infos == [{"status": "complete", "steps": 3, "skipped_steps": 0, "train_time_s": 1.0,
                            "device": "cpu", "precision": "fp32", "stopped_early": None, "final_from": None,
                            "best": None}]
    assert seen[-1] == ev.Done(s.run.path, 3, 0, 1.0)
    assert [e.time_s for e in seen if isinstance(e, ev.Step)] == pytest.approx([0.33] * 3)
    assert world.logs == [f"done: {s.run.final}  (loss curve: {s.run.loss_plot})"]


def test_by_default_a_run_starts_fresh_and_its_checks_block(world):
    log = world.logs.append
    loop.train(world.session.cfg, log=log)
    assert world.opened == [(world.session.cfg, log, False, None, False, "block")]


def test_the_train_time_is_rounded_to_a_tenth_of_a_second(world):
    world.session.steps = 2
    loop.train(world.session.cfg, log=world.logs.append)
    assert world.session.run.infos[-1]["train_time_s"] == 0.7  # 0.66 s


def test_a_resumed_run_drops_the_lost_tensorboard_events_from_its_next_step_on(world):
    world.session.start = 1
    world.session.stream.take(4)
    loop.train(world.session.cfg, log=world.logs.append, resume=True)
    assert world.opened[0][2] is True
    assert sinks(world)[1].args == (world.session.run.path, 2)


def test_a_failed_run_records_the_error_emits_it_and_closes_its_sinks(world):
    seen = []
    message = "x" * 400
    world.session.stage.loss_sum = lambda model, batch: (_ for _ in ()).throw(ValueError(message))
    with pytest.raises(ValueError) as caught:
        loop.train(world.session.cfg, log=world.logs.append, on_event=seen.append)
    assert world.session.run.infos == [{"status": "failed", "error": "ValueError: " + "x" * 300}]
    assert seen[-1] == ev.Error(None, caught.value)
    assert all(r.closed for r in Recorder.made) and world.logs == [] and world.session.finished == 0


def test_ctrl_c_marks_the_run_interrupted(world):
    world.session.stage.loss_sum = lambda model, batch: (_ for _ in ()).throw(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        loop.train(world.session.cfg, log=world.logs.append)
    assert world.session.run.infos == [{"status": "interrupted", "error": "KeyboardInterrupt: "}]


def test_a_stopped_run_is_not_a_failed_one(world):
    seen = []
    with pytest.raises(TrainingStopped, match="stopped after step 1"):
        loop.train(world.session.cfg, log=world.logs.append, stop_at_step=1, on_event=seen.append)
    assert world.session.run.infos == [{"status": "interrupted", "step": 1}]
    assert not any(isinstance(e, (ev.Error, ev.Done)) for e in seen)
    assert all(r.closed for r in Recorder.made) and world.session.finished == 0


def test_a_caller_can_stop_with_a_request_or_any_callable(world):
    request = ev.StopRequest()

    def watch(event):
        if isinstance(event, ev.Step) and event.step == 2:
            request.request("stopped from the board", 5)
    with pytest.raises(TrainingStopped) as caught:
        loop.train(world.session.cfg, log=world.logs.append, stop=request, on_event=watch)
    assert caught.value.exit_code == 5 and world.session.saved == [2]

    steps = []
    world.session = session(world.session.run.path.parent / "again", steps=4, val=False, clock=world.clock)
    with pytest.raises(TrainingStopped, match="stopped after step 1"):
        loop.train(world.session.cfg, log=world.logs.append, stop=lambda: bool(steps),
                   on_event=lambda e: steps.append(e) if isinstance(e, ev.Step) else None)


def test_a_run_with_no_stop_asked_for_runs_every_step(world):
    loop.train(world.session.cfg, log=world.logs.append, stop=None, stop_at_step=None)
    assert world.session.run.infos[-1]["status"] == "complete" and world.session.saved == []


def test_sigterm_stops_after_the_current_step_with_its_exit_code(world):
    seen = []

    def watch(event):
        seen.append(event)
        if isinstance(event, ev.Step) and event.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingStopped) as caught:
        loop.train(world.session.cfg, log=world.logs.append, on_event=watch)
    assert caught.value.exit_code == 143 and world.session.saved == [1]
    assert any(isinstance(e, ev.Note) and "SIGTERM received" in e.text for e in seen)
    assert [e.reason for e in seen if isinstance(e, ev.Stopping)] == ["SIGTERM received"]
    assert signal.getsignal(signal.SIGTERM) is before
