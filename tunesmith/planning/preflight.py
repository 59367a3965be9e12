"""`tunesmith doctor CONFIG`: the config read against its data, its model and this machine, before training.

Every check returns findings with a severity and a concrete change to make. `tunesmith train` runs the
same checks once the data is prepared (before the model is loaded): warnings are printed, errors stop
the run unless `--ignore-checks` is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
import numpy as np

from tunesmith.config.schema import Config
from tunesmith.data.formats import FORMATS
from tunesmith.data.pipeline import DataReport
from tunesmith.planning.doctor import Finding
from tunesmith.planning.speed import duration
from tunesmith.methods import METHODS
from tunesmith.optim.registry import OPTIMIZERS
from tunesmith.stages import STAGES
from tunesmith.planning.estimate import (CUDA_RUNTIME, ModelShape, Plan, estimate_memory, gib,
                                         parse_size, shape_from_model, shape_from_params, trainable_params)

CHECKPOINT_WRITE_BYTES_PER_S = 0.5e9  # a local SSD, with safetensors and the optimizer state
CPU_SHARE_OF_PEAK, GPU_SHARE_OF_PEAK = 0.30, 0.35  # measured training FLOP/s over matmul peak, when unmeasured


@dataclass
class Machine:
    device: str  # "cpu" | "cuda"
    name: str
    precision: str  # what train.precision resolves to here
    memory: float | None  # bytes available to training
    bf16_native: bool
    compiler: bool


@dataclass
class Speed:
    tokens_per_s: float
    source: str


def this_machine(wanted_device: str = "auto", wanted_precision: str = "auto") -> Machine:
    """The device train.device picks here, what train.precision resolves to on it, and the memory a run in
    this process could use (the runtime already loaded counts as usable: the estimate adds it itself)."""
    import warnings

    import torch

    from tunesmith.planning.speed import device_name
    from tunesmith.models.device import available_ram, bf16_supported, has_cpp_compiler, pick_device, pick_precision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the device and precision findings below say it better
        device = pick_device(wanted_device)
        precision = pick_precision(wanted_precision, device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info()  # this creates the CUDA context, which the estimate counts
        memory: float | None = float(free + torch.cuda.memory_reserved()) + CUDA_RUNTIME
    else:
        memory = available_ram()
    return Machine(device.type, device_name(device), precision, memory, bf16_supported(device), has_cpp_compiler())


# The Plan's name for each method key (a method's section has only its own keys; the Plan's defaults stand in).
PLAN_KEYS = {"lora_r": "r", "bits": "bits", "lora_targets": "target_modules", "trainable_layers": "trainable_layers",
             "block_size": "block_size", "adapter_layers": "adapter_layers", "adapter_len": "adapter_len",
             "virtual_tokens": "num_virtual_tokens"}


def plan_for(cfg: Config, shape: ModelShape, machine: Machine, report: DataReport | None = None) -> Plan:
    """The memory plan of a config; with a data report, at the longest real row and the real labelled share."""
    seq, share = cfg.data.max_seq_length, 1.0
    train = report.splits.get("train") if report else None
    if train is not None and train.lengths:
        seq = min(seq, max(train.lengths))
        share = train.trained_tokens / max(sum(train.lengths), 1) if cfg.train.logits_at_labels_only else 1.0
    new = getattr(cfg.stage, "max_new_tokens", 0)  # an online stage's rows are its prompts and the answers it samples
    if new:
        seq += new
        share = new / seq if cfg.train.logits_at_labels_only else 1.0
    return Plan(shape, method=cfg.method.name, precision="bf16" if machine.precision == "bf16" else "fp32",
                micro_batch=cfg.train.micro_batch_size * STAGES[cfg.stage.name].rows_per(cfg.stage),
                grad_accum=cfg.train.grad_accum_steps, seq=seq, stage=cfg.stage.name,
                device="cuda" if machine.device == "cuda" else "cpu",
                device_memory=machine.memory, gradient_checkpointing=cfg.train.gradient_checkpointing,
                **{plan_key: getattr(cfg.method, key) for plan_key, key in PLAN_KEYS.items()
                   if hasattr(cfg.method, key)},
                bf16_frozen_weights=cfg.train.bf16_frozen_weights, optimizer=cfg.optimizer.name,
                galore_rank=getattr(cfg.optimizer, "rank", Plan.galore_rank),
                labelled_share=share, stage_settings=tuple(
                    (k, v) for k, v in cfg.stage.model_dump().items() if isinstance(v, (str, int, float, bool))))


def training_speed(plan: Plan, machine: Machine, model: str | None, measure: bool) -> Speed | None:
    """Tokens/s of a plan here: from a `tunesmith bench` record when there is one (of the same model and
    method, else its FLOP/s carried over), else (measure) the device's matmul peak times the share training
    usually reaches, else None."""
    from tunesmith.planning.speed import known_speed, matmul_peak, training_flops_per_token

    shape = plan.shape
    per_token = training_flops_per_token(shape.params, trainable_params(plan), shape.embedding)
    entry = known_speed(machine.name, plan.precision, model, plan.method, plan.micro_batch, plan.seq,
                        plan.gradient_checkpointing)
    if entry and entry.get("model") == model and entry.get("method") == plan.method:
        return Speed(entry["tokens_per_s"], f"measured by `tunesmith bench` on {entry.get('when', 'an earlier run')}")
    if entry:
        return Speed(entry["achieved_tflops"] * 1e12 / per_token,
                     f"from the FLOP/s `tunesmith bench` measured here for {entry.get('model')}")
    if not measure:
        return None
    import torch

    peak = matmul_peak(torch.device(machine.device), plan.precision)
    share = GPU_SHARE_OF_PEAK if machine.device == "cuda" else CPU_SHARE_OF_PEAK
    return Speed(peak * share / per_token, f"rough: {100 * share:.0f} % of this device's measured matmul peak; "
                 "`tunesmith bench CONFIG` measures it")


# ----------------------------------------------------------------------------------------------- checks


def steps_and_batch(cfg: Config, n_train: int) -> list[Finding]:
    from tunesmith.optim.schedule import total_steps

    tc = cfg.train
    batch = tc.micro_batch_size * tc.grad_accum_steps
    per_epoch = math.ceil(n_train / batch)
    steps = total_steps(cfg, n_train)
    out = [Finding("info", "steps", f"effective batch {batch} rows ({tc.micro_batch_size} × {tc.grad_accum_steps} "
                   f"accumulation); {per_epoch:,} steps per epoch over {n_train:,} training rows; "
                   f"{steps:,} steps in all" + (f" ({steps * batch / n_train:.2f} epochs)" if tc.max_steps else ""))]
    if batch > n_train:
        out.append(Finding("warning", "batch", f"the effective batch ({batch}) is larger than the training data "
                           f"({n_train} rows): each step repeats rows",
                           f"train.grad_accum_steps: {max(1, n_train // (4 * tc.micro_batch_size))} or fewer"))
    if steps < 30:
        if tc.max_steps:
            fix = "train.max_steps: 50 or more"
        else:
            rows = max(1, math.floor(n_train * tc.epochs / 50))  # the effective batch that gives ~50 steps
            fix = (f"an effective batch of about {rows} rows (micro_batch_size × grad_accum_steps), more epochs "
                   "or more data" if rows < batch else "more training data, or more epochs")
        out.append(Finding("warning", "steps", f"only {steps} optimizer steps: too few updates to learn much", fix))
    warm = tc.warmup_steps
    if warm >= steps:
        out.append(Finding("warning", "warmup", f"train.warmup_steps ({warm}) ≥ the run's {steps} steps: the "
                           "learning rate never reaches train.lr", f"train.warmup_steps: {steps // 20}"))
    elif warm > 0.2 * steps:
        out.append(Finding("warning", "warmup", f"warmup is {100 * warm / steps:.0f} % of the run ({warm} of "
                           f"{steps} steps); a few percent is usual", f"train.warmup_steps: {steps // 20}"))
    return out


def overfitting(cfg: Config, n_train: int, steps: int) -> list[Finding]:
    tc = cfg.train
    epochs = tc.epochs if not tc.max_steps else steps * tc.micro_batch_size * tc.grad_accum_steps / n_train
    if epochs >= 5 or (epochs > 3 and n_train < 2000):
        return [Finding("warning", "epochs", f"{epochs:.1f} passes over {n_train:,} rows: the model may memorise "
                        "them (val_loss rises while loss keeps falling)",
                        "1-3 epochs is usual; keep a validation split and watch val_loss"
                        + ("; method.dropout 0.05-0.1 helps LoRA" if cfg.method.name == "lora" else ""))]
    return []


def tokens_per_step(cfg: Config, report: DataReport) -> float:
    """Real tokens in one optimizer step, at the training rows' mean length."""
    train = report.splits["train"]
    return cfg.train.micro_batch_size * cfg.train.grad_accum_steps * sum(train.lengths) / max(train.kept, 1)


def intervals(cfg: Config, steps: int, report: DataReport, speed: Speed | None, trainable: int) -> list[Finding]:
    out = []
    val = report.splits.get("val")
    step_tokens = tokens_per_step(cfg, report)
    if cfg.eval.interval:
        if not val or not val.kept:
            out.append(Finding("warning", "eval", "eval.interval is set but there is no validation data",
                               "data.val_size: 0.1 (or a row count such as 200), or a data.val_file"))
        elif cfg.eval.interval >= steps:
            out.append(Finding("warning", "eval", f"eval.interval {cfg.eval.interval} ≥ the run's {steps} steps: "
                               "validation runs only at the end",
                               f"eval.interval: {steps // 10}" if steps >= 20 else "eval.interval: null (end only)"))
        else:
            rows = min(val.kept, (cfg.eval.max_batches or 10**9) * cfg.eval.batch_size)
            # A forward pass costs about a third (full) to a half (adapters) of a training step per token.
            cost = rows * sum(val.lengths) / val.kept * (1 / 3 if cfg.method.name == "full" else 1 / 2)
            share = cost / (cost + cfg.eval.interval * step_tokens)
            if share > 0.25:
                better = math.ceil(9 * cost / step_tokens)
                out.append(Finding("warning", "eval", f"validation every {cfg.eval.interval} steps takes about "
                                   f"{100 * share:.0f} % of the training time",
                                   f"eval.interval: {better} (about 10 %), or eval.max_batches to evaluate fewer rows"))
    ckpt = cfg.checkpoint.interval
    hours = steps * step_tokens / speed.tokens_per_s / 3600 if speed else None
    if ckpt and ckpt >= steps:
        out.append(Finding("warning", "checkpoint", f"checkpoint.interval {ckpt} ≥ the run's {steps} steps: no "
                           "checkpoint before the end, so a crash loses the run",
                           f"checkpoint.interval: {steps // 5}" if steps >= 10 else
                           "checkpoint.interval: null (a run this short needs none)"))
    elif ckpt and speed:
        save_s = trainable * 12 / CHECKPOINT_WRITE_BYTES_PER_S  # weights, and AdamW's two moments
        train_s = ckpt * step_tokens / speed.tokens_per_s
        if save_s > 0.2 * (save_s + train_s):
            better = math.ceil(9 * save_s * speed.tokens_per_s / step_tokens)
            out.append(Finding("warning", "checkpoint", f"saving every {ckpt} steps (~{save_s:.0f} s each) takes "
                               f"about {100 * save_s / (save_s + train_s):.0f} % of the time",
                               f"checkpoint.interval: {better}"))
    elif not ckpt and hours is not None and hours > 1:
        out.append(Finding("warning", "checkpoint", f"no checkpoint.interval on a run of about {hours:.1f} h: a "
                           "crash or a preemption loses all of it",
                           f"checkpoint.interval: {max(1, int(steps / hours / 2))} (about every 30 minutes)"))
    return out


def ranges(cfg: Config) -> list[Finding]:
    """Values outside the usual range for the method, from the `range` entries of explanations.yaml."""
    from tunesmith.config.explain import texts

    out = []
    method = cfg.method.name
    for path, entry in texts()["fields"].items():
        bounds = (entry.get("range") or {}).get(method)
        section, key = path.split(".")
        value = getattr(getattr(cfg, section), key, None)  # a method key of another method: absent
        if bounds is None or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        low, high = bounds
        if value < low or value > high:
            why = entry.get("too_high" if value > high else "too_low", "")
            first = " ".join(why.split()).split(". ")[0].rstrip(".") if why else ""
            out.append(Finding("warning", path, f"{value:g} is outside the usual range for {method} "
                               f"({low:g} to {high:g})" + (f": {first[0].lower() + first[1:]}" if first else ""),
                               f"{path}: a value in {low:g}-{high:g} (`tunesmith explain {path}`)"))
    return out


def lengths(cfg: Config, report: DataReport, shape: ModelShape | None) -> list[Finding]:
    out = []
    train = report.splits["train"]
    limit = cfg.data.max_seq_length
    raw = np.asarray(train.raw_lengths)
    if not len(raw):
        return out
    over = int((raw > limit).sum())
    keep99 = int(np.quantile(raw, 0.99, method="inverted_cdf"))  # the shortest limit keeping 99 %
    verb = "truncated" if cfg.data.overlong == "truncate" else "dropped"
    text = (f"{over:,} of {len(raw):,} training rows ({100 * over / len(raw):.1f} %) are longer than "
            f"max_seq_length {limit} and are {verb}; lengths p50 {int(np.median(raw))}, p99 {keep99}, "
            f"max {int(raw.max())}")
    if over / len(raw) > 0.01:
        out.append(Finding("warning", "max_seq_length", text, f"data.max_seq_length: {keep99} keeps 99 % of rows "
                           "whole (memory grows with it: see the memory finding)"))
    else:
        out.append(Finding("ok" if not over else "info", "max_seq_length", text))
    if shape and shape.context and limit > shape.context:
        longest = int(raw.max())
        severity = "warning" if longest > shape.context else "info"
        out.append(Finding(severity, "context", f"max_seq_length {limit} exceeds the model's context window "
                           f"({shape.context} tokens)" + (f"; the longest row has {longest}" if severity == "warning"
                                                          else "; no row is that long"),
                           f"data.max_seq_length: {shape.context} (positions beyond the window were never trained)"))
    return out


def splits(cfg: Config, report: DataReport) -> list[Finding]:
    out = []
    val = report.splits.get("val")
    n_val = val.kept if val else 0
    if not n_val:
        out.append(Finding("warning", "validation", "no validation rows: overfitting will not show",
                           "data.val_size: 0.1 (or a count such as 200), or data.val_file"))
    elif FORMATS.get(report.format) and FORMATS[report.format].prompts_only:  # answers are scored, not tokens
        if n_val < 16:
            out.append(Finding("warning", "validation", f"only {n_val} validation prompts: the held-out reward "
                               "will be noisy", "data.val_size: 32 or more prompts"))
    elif n_val < 20 or val.trained_tokens < 1000:
        out.append(Finding("warning", "validation", f"only {n_val} validation rows ({val.trained_tokens:,} scored "
                           "tokens): val_loss will be noisy",
                           "data.val_size: 100 or more rows (an integer is a row count)"))
    checks = report.checks
    if checks.leaked_into_test and not checks.removed:
        out.append(Finding("warning", "test overlap", f"{checks.leaked_into_test} training rows also appear in the "
                           "test split: test scores will look better than they are", "data.dedup: true"))
    if checks.leaked_into_val and not checks.removed:
        out.append(Finding("warning", "val overlap", f"{checks.leaked_into_val} training rows also appear in the "
                           "validation split: val_loss will hide overfitting", "data.dedup: true"))
    if checks.duplicates and not checks.removed:
        out.append(Finding("info", "duplicates", f"{checks.duplicates} exact duplicate training rows: they weigh "
                           "double", "data.dedup: true removes them"))
    return out


def watching(cfg: Config, report: DataReport) -> list[Finding]:
    """eval.metric, checkpoint.best_by and early stopping: a metric the run can measure, on rows that have
    what it needs, often enough to act on."""
    import difflib

    from tunesmith.errors import ConfigError
    from tunesmith.scoring import GENERATED_METRICS, load_json_schema

    out: list[Finding] = []
    watched = [("eval.metric", cfg.eval.metric)] + ([("checkpoint.best_by", cfg.checkpoint.best_by)]
                                                    if cfg.checkpoint.best_by else [])
    for key, metric in watched:
        if metric not in GENERATED_METRICS and not metric.startswith("val_"):
            close = difflib.get_close_matches(metric, [*GENERATED_METRICS, "val_loss", "val_perplexity"], n=1)
            out.append(Finding("error", key, f"{key}: '{metric}' is not a metric a run measures",
                               f"{key}: {close[0] if close else 'val_loss'} (the stage's val_* numbers, or one of "
                               f"{', '.join(GENERATED_METRICS)})"))
        elif metric in GENERATED_METRICS and FORMATS.get(report.format) and report.format in ("text", "preference",
                                                                                             "unpaired"):
            out.append(Finding("error", key, f"{key}: {metric} scores answers against a reference reply, and "
                               f"{report.format} rows have none", f"{key}: val_loss"))
        if metric == "json_schema_match" and not cfg.eval.json_schema:
            out.append(Finding("error", key, f"{key}: json_schema_match needs a schema to match",
                               "eval.json_schema: path/to/schema.json"))
    if cfg.eval.json_schema:
        try:
            load_json_schema(cfg.eval.json_schema)
        except ConfigError as exc:
            out.append(Finding("error", "eval.json_schema", str(exc)))
    acting = [k for k, on in (("eval.early_stopping_patience", cfg.eval.early_stopping_patience),
                              ("checkpoint.best_by", cfg.checkpoint.best_by)) if on]
    val = report.splits.get("val")
    if acting and not (val and val.kept):
        out.append(Finding("error", acting[0], f"{' and '.join(acting)} compare evaluations on the validation "
                           "split, and there is none", "data.val_size: 0.1 (or a count), or data.val_file"))
    elif acting and not cfg.eval.interval:
        out.append(Finding("error" if cfg.eval.early_stopping_patience else "warning", "eval.interval",
                           f"{' and '.join(acting)} act on evaluations during training, and eval.interval is empty "
                           "(one evaluation, at the end)", "eval.interval: a tenth of the run's steps"))
    return out


def method_fits_model(cfg: Config, shape: ModelShape | None) -> list[Finding]:
    """A method that cannot be applied to this model family is an error before anything is loaded."""
    from tunesmith.errors import ConfigError
    from tunesmith.methods.llama_adapter import check_family

    if cfg.method.name in ("adapter", "adapter_v2") and shape is not None:
        try:
            check_family(shape.family, cfg.method.name)
        except ConfigError as exc:
            return [Finding("error", "method", str(exc))]
        if cfg.method.adapter_layers > shape.layers:
            return [Finding("error", "method", f"method.adapter_layers is {cfg.method.adapter_layers} but the model "
                            f"has {shape.layers} layers", f"method.adapter_layers: {shape.layers} or fewer")]
    return []


def block_turns(cfg: Config, steps: int, shape: ModelShape | None) -> list[Finding]:
    """BAdam trains one layer at a time: a run shorter than a round leaves some layers untrained."""
    if cfg.optimizer.name != "badam" or shape is None:
        return []
    layers = shape.layers if cfg.method.name == "full" else min(cfg.method.trainable_layers, shape.layers)
    every = cfg.optimizer.switch_every
    if steps >= layers * every:
        return []
    turns = -(-steps // every)
    return [Finding("warning", "optimizer.switch_every",
                    f"badam gives each of {layers} layers {every} steps in turn, but the run has {steps} steps: only "
                    f"{turns} of them will train",
                    f"optimizer.switch_every: {max(steps // max(layers, 1), 1)} (every layer gets a turn), or "
                    "more steps")]


def packages(cfg: Config) -> list[Finding]:
    """The optional packages the method and optimizer need (the config parses without them)."""
    import importlib.util

    wanted = [(f"method {cfg.method.name}", *p) for p in METHODS[cfg.method.name].packages]
    wanted += [(f"optimizer.name {cfg.optimizer.name}", *p) for p in OPTIMIZERS[cfg.optimizer.name].packages]
    return [Finding("error", "packages", f"{who} needs {name}, which is not installed", install)
            for who, name, install in wanted if importlib.util.find_spec(name) is None]


def device_support(cfg: Config, machine: Machine) -> list[Finding]:
    out = []
    tc = cfg.train
    if tc.device == "cuda" and machine.device != "cuda":
        out.append(Finding("warning", "device", "train.device is cuda but no CUDA device is visible: the run "
                           "would use the CPU", "train.device: auto, or a machine with a GPU"))
    if tc.precision == "bf16" and not machine.bf16_native:
        out.append(Finding("warning", "precision", f"this {machine.device} has no native bf16: bf16 is emulated "
                           "and slower than fp32", "train.precision: auto (fp32 here)"))
    elif tc.precision == "fp32" and machine.bf16_native:
        out.append(Finding("info", "precision", "this device runs bf16 natively: fp32 is slower and needs more "
                           "activation memory", "train.precision: auto (bf16 here)"))
    if tc.compile and machine.device == "cpu" and not machine.compiler:
        out.append(Finding("error", "compile", "train.compile on CPU needs a C++ compiler and none was found",
                           "install g++, or train.compile: false"))
    return out


def memory(cfg: Config, plan: Plan) -> list[Finding]:
    import importlib.util

    est = estimate_memory(plan, offer_qlora=importlib.util.find_spec("bitsandbytes") is not None)
    out = []
    if plan.method == "freeze" and cfg.method.trainable_modules:
        out.append(Finding("info", "memory", "the estimate counts the trained layers, not method.trainable_modules"))
    if plan.device_memory is None:
        return out + [Finding("info", "memory", f"needs about {gib(est.peak)} (available memory unknown)")]
    share = est.peak / plan.device_memory
    where = "GPU memory" if plan.device == "cuda" else "RAM"
    text = f"needs about {gib(est.peak)} of {gib(plan.device_memory)} available {where} ({100 * share:.0f} %)"
    if share <= 0.85:
        return out + [Finding("ok", "memory", text)]
    if share <= 1.0:
        tighter = ("train.gradient_checkpointing: true" if not plan.gradient_checkpointing else
                   f"train.micro_batch_size: {max(1, plan.micro_batch // 2)}" if plan.micro_batch > 1 else
                   "a shorter data.max_seq_length")
        return out + [Finding("warning", "memory", text + ": tight", tighter)]
    if cfg.train.auto_micro_batch and estimate_memory(replace(plan, micro_batch=1)).peak <= plan.device_memory:
        return out + [Finding("warning", "memory", text + ": train.auto_micro_batch will shrink the micro-batch")]
    # The estimate is within ±25 %: only a clear excess blocks a run.
    severity = "error" if est.peak * 0.8 > plan.device_memory else "warning"
    fixes = "; ".join(est.suggestions[:3])
    return out + [Finding(severity, "memory", text + (": does not fit" if severity == "error" else ": may not fit"),
                          fixes + " (`tunesmith estimate` shows the breakdown; `--ignore-checks` trains anyway)")]


def run_time(steps: int, report: DataReport, cfg: Config, speed: Speed | None) -> list[Finding]:
    if not speed:
        return []

    tokens = steps * tokens_per_step(cfg, report)
    return [Finding("info", "time", f"about {duration(tokens / speed.tokens_per_s / 3600)} of training "
                    f"({tokens:,.0f} tokens at {speed.tokens_per_s:,.0f} tokens/s; {speed.source})")]


def check_config(cfg: Config, report: DataReport, shape: ModelShape | None, machine: Machine,
                 speed: Speed | None = None) -> list[Finding]:
    """All findings for a config; without the model's shape (unreadable config) the memory checks are skipped."""
    from tunesmith.optim.schedule import total_steps

    n_train = report.splits["train"].kept
    steps = total_steps(cfg, n_train)
    plan = plan_for(cfg, shape, machine, report) if shape else None
    trainable = trainable_params(plan) if plan else 0
    return [*packages(cfg), *method_fits_model(cfg, shape), *steps_and_batch(cfg, n_train), *run_time(steps, report, cfg, speed),
            *overfitting(cfg, n_train, steps),
            *intervals(cfg, steps, report, speed, trainable), *ranges(cfg),
            *lengths(cfg, report, shape), *splits(cfg, report), *watching(cfg, report),
            *block_turns(cfg, steps, shape),
            *device_support(cfg, machine),
            *(memory(cfg, plan) if plan else [Finding("info", "memory", "not estimated: the model's shape could "
                                                      "not be read from its config")])]


def model_shape(cfg: Config) -> ModelShape | None:
    from tunesmith.planning.estimate import shape_from_model

    try:
        return shape_from_model(cfg.model.name_or_path, cfg.model.gguf_file, cfg.model.trust_remote_code,
                                cfg.model.revision)
    except Exception:  # noqa: BLE001 - advisory: the model loader gives the real error, if there is one
        return None


def assess(cfg: Config, report: DataReport, measure: bool) -> list[Finding]:
    """check_config on this machine, for the model the config names; `measure`: without a `tunesmith bench`
    record, time the device's matmul peak for the time estimate (doctor does; train does not wait for it)."""
    shape = model_shape(cfg)
    machine = this_machine(cfg.train.device, cfg.train.precision)
    speed = training_speed(plan_for(cfg, shape, machine, report), machine, cfg.model.name_or_path,
                           measure) if shape else None
    return check_config(cfg, report, shape, machine, speed)


def doctor_config(cfg: Config) -> list[Finding]:
    """Everything `tunesmith doctor CONFIG` reports: the environment's problems, then the config's findings."""
    from tunesmith.planning.doctor import check_environment
    from tunesmith.data.pipeline import load_data_and_tokenizer

    environment = [f for f in check_environment() if f.severity in ("warning", "error")]
    _, _, data = load_data_and_tokenizer(cfg)
    head = Finding("info", "data", data.report.to_text().replace("\n", "\n          "))
    return environment + [head] + assess(cfg, data.report, measure=True)


def blocking(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def check_before_training(cfg: Config, report: DataReport, log, mode: str = "block") -> None:
    """`train`'s pre-flight: print the warnings and errors; errors stop the run when mode is "block"."""
    from tunesmith.errors import TunesmithError

    findings = [f for f in assess(cfg, report, measure=False) if f.severity in ("warning", "error")]
    for finding in findings:
        log(finding.to_text())
    errors = blocking(findings)
    if errors and mode == "block":
        raise TunesmithError(f"the pre-flight checks found {len(errors)} error(s), listed above; fix them, or pass "
                             "--ignore-checks to train anyway")


def estimate_command(*, model: str | None, params: float | None, method: str, precision: str, micro_batch: int,
                     seq: int, device_memory: str | None, device: str, gradient_checkpointing: bool, lora_r: int,
                     trainable_layers: int, tokens: float | None, layers: int | None, hidden: int | None,
                     intermediate: int | None, vocab: int | None, as_json: bool, optimizer: str = "adamw",
                     stage: str = "sft") -> str:
    """`tunesmith estimate`: the report for one plan, and the time on this machine when it is the device."""
    import json

    from tunesmith.errors import ConfigError

    if (model is None) == (params is None):
        raise ConfigError("give either --model NAME_OR_PATH or --params COUNT (e.g. --params 7e9)")
    if method not in METHODS:
        raise ConfigError(f"--method {method!r}: one of {', '.join(METHODS)}")
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"--precision {precision!r}: bf16 or fp32")
    from tunesmith.config.schema import optimizer_method_problem

    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer {optimizer!r}: one of {', '.join(OPTIMIZERS)}")
    if stage not in STAGES:
        raise ConfigError(f"--stage {stage!r}: one of {', '.join(STAGES)}")
    if optimizer_method_problem(optimizer, method):
        raise ConfigError(optimizer_method_problem(optimizer, method))
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: auto, cpu or cuda")
    if params is not None and params < 1e6:
        raise ConfigError(f"--params {params:g} looks like a count in millions or billions: write 7e9 for 7B")
    shape = (shape_from_model(model) if model else
             shape_from_params(params, layers=layers, hidden=hidden, intermediate=intermediate, vocab=vocab))
    machine = this_machine("cpu" if device == "cpu" else "auto")
    where = machine.device if device == "auto" else device
    try:
        memory = parse_size(device_memory) if device_memory else (machine.memory if where == machine.device else None)
    except ValueError as exc:
        raise ConfigError(f"--device-memory: {exc}") from None
    # --micro-batch counts training items: a preference pair is two rows in the batch
    plan = Plan(shape, method, precision, micro_batch * STAGES[stage].rows_per_item, seq, device=where,  # type: ignore[arg-type]
                device_memory=memory, gradient_checkpointing=gradient_checkpointing, lora_r=lora_r,
                trainable_layers=trainable_layers, optimizer=optimizer, stage=stage)
    result = estimate_memory(plan)
    lines = [result.to_text()]
    if where == machine.device:
        speed = training_speed(plan, machine, model, measure=True)
        if speed:
            amount = tokens or 1e6
            lines.append(f"time: {amount:,.0f} training tokens ≈ {duration(amount / speed.tokens_per_s / 3600)} at "
                         f"{speed.tokens_per_s:,.0f} tokens/s on {machine.name} ({speed.source})")
    else:
        lines.append(f"time: not estimated ({where} is not this machine's device)")
    if as_json:
        lines.append(json.dumps({"peak_bytes": result.peak, "fits": result.fits, "trainable": result.trainable,
                                 "parts": {p.name: p.bytes for p in result.parts},
                                 "activations_other_way": result.activations_other_way,
                                 "suggestions": result.suggestions}))
    return "\n".join(lines)
