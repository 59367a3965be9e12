"""The command line: each verb parses its arguments and calls one public function."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click
import typer

from tunesmith.console import quiet_libraries
from tunesmith.errors import TrainingStopped, TunesmithError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune open language models on your own data.")

OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}


def _choices(path: str) -> str:
    """The allowed values of a config key, for --help (the config's names, which tests/test_registries.py holds
    equal to the registries', without importing the registries' heavy modules at start-up)."""
    from tunesmith.config.explain import config_fields

    return " | ".join(str(c) for c in config_fields()[path].choices)


def _export_formats() -> list[str]:
    from tunesmith.config.explain import choices_of

    return list(choices_of("export.format"))


def _load(config: Path, overrides: list[str]):
    from tunesmith.config.schema import load_config

    return load_config(config, overrides)


def _keys_help() -> str:
    """Every config key with its one-line meaning, from the same texts as `tunesmith explain`."""
    from tunesmith.config.explain import config_fields, one_line

    lines = [f"{path}: {one_line(path)}" for path in config_fields()]
    return ("Config keys (override any with --section.key=value; `tunesmith explain KEY` says more):\n\n"
            + "\n\n".join(lines))


@app.command(context_settings=OVERRIDES, epilog=_keys_help())
def train(ctx: typer.Context, config: Path = typer.Argument(..., help="YAML config file"),
          resume: bool = typer.Option(False, "--resume", help="continue the run in output.dir from its newest "
                                      "intact checkpoint"),
          checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="with --resume: a named checkpoint, "
                                                   "e.g. step-000200"),
          force: bool = typer.Option(False, "--force", help="with --resume: resume even if batching, data or "
                                     "method changed"),
          overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing run in output.dir"),
          ignore_checks: bool = typer.Option(False, "--ignore-checks", help="train even if the pre-flight checks "
                                             "(those of `tunesmith doctor CONFIG`) find an error"),
          ) -> None:
    """Fine-tune: train CONFIG.yaml [--section.key=value ...] writes a run directory at output.dir.
    The checks of `tunesmith doctor CONFIG` run first: warnings are printed, errors stop the run."""
    args = ctx.args + (["--output.overwrite=true"] if overwrite else [])
    cfg = _load(config, args)
    if (checkpoint or force) and not resume:
        raise TunesmithError("--checkpoint and --force only make sense with --resume")
    quiet_libraries()
    from tunesmith.training.loop import train as run_training

    run_training(cfg, resume=resume, checkpoint=checkpoint, force=force, checks="warn" if ignore_checks else "block")


@app.command(context_settings=OVERRIDES)
def prepare(ctx: typer.Context, config: Path = typer.Argument(..., help="YAML config file"),
            show: int = typer.Option(0, "--show", help="print N rendered training examples token by token"),
            ) -> None:
    """Validate and tokenize the data and print the data report, without training."""
    cfg = _load(config, ctx.args)
    quiet_libraries()
    from tunesmith.data.pipeline import show_examples
    from tunesmith.data.pipeline import load_data_and_tokenizer

    _, tokenizer, data = load_data_and_tokenizer(cfg)
    print(data.report.to_text())
    if show:
        print(show_examples(tokenizer, data.train, show))


def _sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int, repetition_penalty: float):
    from tunesmith.inference.generate import Sampling

    return Sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)


@app.command()
def generate(model: str = typer.Argument(..., help="run directory, model directory, .gguf file or short name"),
             prompt: str = typer.Option(..., "--prompt", "-p"),
             system: Optional[str] = typer.Option(None, help="system message (default: the run's data.system_prompt)"),
             max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             repetition_penalty: float = 1.0, checkpoint: Optional[str] = typer.Option(None, help="e.g. step-000100")
             ) -> None:
    """Answer one prompt (greedy unless --temperature > 0) and print the reply."""
    quiet_libraries()
    from tunesmith.inference.generate import generate_batch
    from tunesmith.inference.loading import load_for_inference

    loaded = load_for_inference(model, checkpoint)
    system = system or loaded.default_system
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    sampling = _sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
    print(generate_batch(loaded.model, loaded.tokenizer, [messages], sampling)[0])


@app.command()
def chat(model: str = typer.Argument(..., help="run directory, model directory, .gguf file or short name"),
         system: Optional[str] = typer.Option(None, help="system message (default: the run's data.system_prompt)"),
         max_new_tokens: int = 512, temperature: float = 0.7, top_p: float = 0.9, top_k: int = 50,
         repetition_penalty: float = 1.1, checkpoint: Optional[str] = None) -> None:
    """Interactive chat with streamed replies. Commands: /reset clears the history, /exit quits."""
    quiet_libraries()
    from tunesmith.inference.chat import ChatSession
    from tunesmith.inference.loading import load_for_inference

    session = ChatSession(load_for_inference(model, checkpoint), system,
                          _sampling(max_new_tokens, temperature, top_p, top_k, repetition_penalty))
    print("Chat started. /reset clears the history, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            text = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        command = session.command(text)
        if command == "exit":
            return
        if command == "reset":
            session.reset()
        if command:
            continue
        print("assistant> ", end="", flush=True)
        session.ask(text, stream=True)


@app.command("eval")
def eval_(run: str = typer.Argument(..., help="run directory (or a base model, to compare)"),
          data: Optional[Path] = typer.Option(None, help="rows to evaluate; default: the run's test split"),
          as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last line"),
          limit: Optional[int] = typer.Option(None, help="evaluate only the first N rows"),
          batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                                   help="rows per batch; default: the run's eval.batch_size"),
          max_new_tokens: int = 256, checkpoint: Optional[str] = None,
          compare_base: bool = typer.Option(False, "--compare-base", help="score the run's base model too, side by side"),
          json_schema: Optional[Path] = typer.Option(None, "--json-schema", help="match answers against this JSON "
                                                     "schema; default: the run's eval.json_schema"),
          report: bool = typer.Option(False, "--report", help="write report.md and report.html into the run dir")) -> None:
    """Loss, perplexity, exact match, token F1, ROUGE-L, BLEU and JSON validity of greedy answers on held-out
    rows; with --compare-base the base model's beside them, with --report a report in the run dir."""
    quiet_libraries()
    from tunesmith.evaluation.evaluate import evaluate_file
    from tunesmith.evaluation.report import compare_with_base, short_table, write_report
    from tunesmith.inference.loading import load_for_inference
    from tunesmith.run.run_dir import is_run_dir

    if data is None:
        data = Path(run) / "data" / "test.jsonl"
        if not data.exists() or not data.read_text(encoding="utf-8").strip():
            raise TunesmithError(f"{run} has no test split; pass --data FILE (or set data.test_size when training)")
    if (compare_base or report) and not is_run_dir(run):
        raise TunesmithError(f"{run} is not a run directory: --compare-base and --report need one")
    options = dict(limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                   json_schema=str(json_schema) if json_schema else None)
    result = (compare_with_base(run, data, checkpoint, **options) if compare_base
              else evaluate_file(load_for_inference(run, checkpoint), data, **options))
    if report:
        md, page = write_report(run, result, data)
    samples = result.pop("samples", [])
    result.pop("base_samples", None)
    if isinstance(result.get("base"), dict):
        result["base"].pop("samples", None)
    if as_json:
        print(json.dumps(result))
        return
    for s in samples[:5]:
        reference = s["reference"] if isinstance(s["reference"], str) else json.dumps(s["reference"])
        print(f"prompt:     {s['prompt'][:200]}\nreference:  {reference[:200]}\nprediction: {s['prediction'][:200]}\n")
    print(f"n {result['n']}")
    print(short_table(result))
    if report:
        print(f"report: {md} and {page}")


@app.command()
def export(run: str = typer.Argument(..., help="run directory"),
           format: str = typer.Option("merged", "--format", help=" | ".join(_export_formats())),
           out: Path = typer.Option(..., "--out", help="directory to write (must not exist or be empty); "
                                                       "for gguf, the .gguf file"),
           quant: Optional[str] = typer.Option(None, "--quant", help="gguf/ollama weights: f32, f16 (gguf default), "
                                               "bf16, q8_0 (ollama default), q4_0, q4_1"),
           checkpoint: Optional[str] = None) -> None:
    """Write the trained model as merged safetensors weights, a PEFT adapter, a GGUF file for llama.cpp, or a
    GGUF with an Ollama Modelfile."""
    quiet_libraries()
    from tunesmith.export import export_run

    print(export_run(run, format, out, checkpoint, quant=quant))


@app.command(context_settings=OVERRIDES)
def bench(ctx: typer.Context, config: Path = typer.Argument(..., help="YAML config file"),
          steps: int = typer.Option(10, "--steps", min=1, help="optimizer steps to measure (after one warm-up step)"),
          as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last line"),
          ) -> None:
    """Measure how fast CONFIG.yaml trains here: tokens/s, peak memory, FLOP/s against this device's peak,
    and the time the whole run would take. Trains a few steps in a scratch directory; output.dir is untouched."""
    cfg = _load(config, ctx.args)
    quiet_libraries()
    from tunesmith.training.bench import bench as run_bench
    from tunesmith.planning.speed import result_json

    result = run_bench(cfg, steps, log=lambda *_: None)
    print(result.to_text())
    if as_json:
        print(result_json(result))


@app.command()
def explain(topic: str = typer.Argument("all", help="a key (train.lr or just lr), a section (train), a concept "
                                         "(perplexity, overfitting, ...) or all")) -> None:
    """Explain a config key, a section, or a word from the output, in plain language."""
    from tunesmith.config.explain import explain as explain_topic

    print(explain_topic(topic))


@app.command()
def init(out: Path = typer.Argument(..., help="the YAML file to write (must not exist)"),
         model: str = typer.Option("smollm2-135m-instruct", "--model", help="short name, directory, .gguf or hub id"),
         method: str = typer.Option("lora", "--method", help=_choices("method.name")),
         data: str = typer.Option("data/train.jsonl", "--data", help="the training file (JSON or JSONL rows)"),
         optimizer: str = typer.Option("adamw", "--optimizer", help=_choices("optimizer.name")),
         stage: str = typer.Option("sft", "--stage", help=_choices("stage.name")),
         ) -> None:
    """Write a complete config with every key explained in a comment above it."""
    from tunesmith.planning.init_config import init_config

    if out.exists():
        raise TunesmithError(f"{out} exists; tunesmith init never overwrites a file")
    try:
        text = init_config(model, method, data, output_dir=f"runs/{out.stem}", optimizer=optimizer, stage=stage)
    except ValueError as exc:
        raise TunesmithError(str(exc)) from None
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}: edit data.train_file and the values you want, then `tunesmith train {out}`")


@app.command(context_settings=OVERRIDES)
def doctor(ctx: typer.Context,
           config: Optional[Path] = typer.Argument(None, help="a YAML config to check against its data and this "
                                                   "machine (without it: the environment only)")) -> None:
    """Check before you spend. Without CONFIG: Python and package versions against the tested ones, GPU or CPU
    (bf16, memory), compiler and disk. With CONFIG: also its data (lengths against max_seq_length, splits,
    overlap), its schedule (steps, warmup, intervals, epochs), values outside the usual range for the method,
    precision on this device, memory (does it fit) and time. Exits 1 if something blocks training."""
    from tunesmith.planning.doctor import check_environment, report

    if config is None:
        findings = check_environment()
    else:
        cfg = _load(config, ctx.args)
        quiet_libraries()
        from tunesmith.planning.preflight import doctor_config

        findings = doctor_config(cfg)
    print(report(findings))
    if any(f.severity == "error" for f in findings):
        raise typer.Exit(1)


@app.command()
def estimate(
    model: Optional[str] = typer.Option(None, "--model", help="short name, directory, .gguf or hub id (its config "
                                        "is read; weights are not loaded)"),
    params: Optional[float] = typer.Option(None, "--params", help="parameter count instead of --model, e.g. 7e9"),
    method: str = typer.Option("lora", "--method", help=_choices("method.name")),
    optimizer: str = typer.Option("adamw", "--optimizer", help=_choices("optimizer.name")),
    stage: str = typer.Option("sft", "--stage", help=_choices("stage.name")),
    precision: str = typer.Option("bf16", "--precision", help="bf16 | fp32"),
    micro_batch: int = typer.Option(4, "--micro-batch", min=1, help="rows (preference pairs) per forward/backward pass"),
    seq: int = typer.Option(1024, "--seq", min=8, help="tokens per row (the longest row, at most max_seq_length)"),
    device_memory: Optional[str] = typer.Option(None, "--device-memory", help="e.g. 24GB (GB = 2^30 bytes); "
                                                "default: this machine's free GPU memory or available RAM"),
    device: str = typer.Option("auto", "--device", help="cpu | cuda | auto (this machine's)"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing"),
    lora_r: int = typer.Option(8, "--lora-r", min=1),
    trainable_layers: int = typer.Option(2, "--trainable-layers", min=0, help="freeze: how many last layers train"),
    tokens: Optional[float] = typer.Option(None, "--tokens", help="training tokens in the whole run, for a time "
                                           "estimate (e.g. 2e7)"),
    layers: Optional[int] = typer.Option(None, "--layers", help="with --params: the shape, if not the usual one"),
    hidden: Optional[int] = typer.Option(None, "--hidden"),
    intermediate: Optional[int] = typer.Option(None, "--intermediate"),
    vocab: Optional[int] = typer.Option(None, "--vocab"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object as the last line"),
) -> None:
    """Memory a training run needs, part by part (weights, gradients, optimizer states, activations with and
    without gradient checkpointing, overhead), whether it fits, what would make it fit, and how long it takes."""
    from tunesmith.planning.preflight import estimate_command

    print(estimate_command(model=model, params=params, method=method, precision=precision, micro_batch=micro_batch,
                           seq=seq, device_memory=device_memory, device=device,
                           gradient_checkpointing=gradient_checkpointing, lora_r=lora_r,
                           trainable_layers=trainable_layers, tokens=tokens, layers=layers, hidden=hidden,
                           intermediate=intermediate, vocab=vocab, as_json=as_json, optimizer=optimizer,
                           stage=stage))


@app.command()
def download(name: str = typer.Argument("smollm2-135m-instruct", help="short name or hub id")) -> None:
    """Fetch a model once into the local cache (short names are converted to safetensors)."""
    quiet_libraries()
    from tunesmith.models.loading import SHORT_NAMES, ensure_short_name, load_causal_lm, resolve

    if name.lower() in SHORT_NAMES:
        print(ensure_short_name(name.lower()))
    else:
        source = resolve(name)
        load_causal_lm(source)
        print(f"{name} is available")


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except TrainingStopped as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(exc.exit_code)
    except TunesmithError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
