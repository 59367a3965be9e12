"""Export a run, one registry entry per `--format`: merged safetensors weights (plain transformers loads them),
a PEFT adapter, one GGUF file (llama.cpp), or a GGUF with an Ollama Modelfile. Each entry says which methods
it can export and writes into a staging directory (or file) that becomes `--out` only once complete."""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tunesmith.config.explain import choice
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.inference.loading import Loaded, load_for_inference
from tunesmith.run.run_dir import is_run_dir
from tunesmith.stages.base import MODULES_FILE, save_modules
from tunesmith.stages.reward import HEAD


@dataclass(frozen=True)
class ExportFormat:
    name: str
    write: Callable[..., None]
    """(loaded run, staging path, notes, **options such as quant) -> writes the export there, adding to `notes`
    what the user should read about it (the merge gap of a quantized base)."""
    refuses: Callable[[object], str | None]
    """Why this format cannot export a run of the given method (a Method), or None."""
    single_file: bool = False
    """`--out` names one file (a .gguf), not a directory."""

    def explanation(self) -> dict[str, str]:
        return choice("export.format", self.name)


def merged_model(loaded: Loaded, notes: list[str]):
    """The run's adapter merged into its base. A quantized base (qlora) is de-quantized first, which changes
    what the model computes a little: that gap is measured on the run's test split and added to `notes`."""
    merged = loaded.method.merge(loaded.model)
    if loaded.method.quantized:
        notes.append(merge_gap(loaded, merged))
    return merged


MAX_GAP_ROWS = 200


def merge_gap(loaded: Loaded, merged) -> str:
    """Test-split loss of the trained model (quantized base + adapter) beside the merged one's."""
    import math

    from tunesmith.data.pipeline import load_examples, tokenize_split
    from tunesmith.data.token_store import Pair
    from tunesmith.stages.tokens import mean_loss

    test = loaded.run_dir / "data" / "test.jsonl" if loaded.run_dir else None
    if test is None or not test.exists() or not test.read_text(encoding="utf-8").strip():
        return "merge gap: not measured (the run has no test split; set data.test_size)"
    cfg = loaded.config.data
    _, pairs = load_examples(str(test), cfg, cfg.format, [])
    rows, _ = tokenize_split("test", [ex for _, ex in pairs][:MAX_GAP_ROWS], loaded.tokenizer, cfg)
    rows = [r.chosen if isinstance(r, Pair) else r for r in rows]
    pad, size = loaded.tokenizer.pad_token_id, loaded.config.eval.batch_size
    trained, n = mean_loss(loaded.model, rows, size, pad)
    after, _ = mean_loss(merged, rows, size, pad)
    if not n or not math.isfinite(trained):
        return "merge gap: not measured (no scored tokens in the test split)"
    return (f"merge gap on {len(rows)} test rows ({n} tokens): loss {trained:.4f} trained (quantized base + adapter), "
            f"{after:.4f} merged into the de-quantized base ({after - trained:+.4f}; perplexity "
            f"{math.exp(trained):.3f} -> {math.exp(after):.3f})")


def _write_merged(loaded: Loaded, staging: Path, notes: list[str], **_) -> None:
    merged = merged_model(loaded, notes)
    if loaded.head is not None:
        return _as_sequence_classifier(merged, loaded.head, loaded.tokenizer.pad_token_id).save_pretrained(staging)
    # The run's EOS and pad must travel with the weights, so plain `generate` stops where ours does.
    merged.generation_config.eos_token_id = loaded.tokenizer.eos_token_id
    merged.generation_config.pad_token_id = loaded.tokenizer.pad_token_id
    merged.save_pretrained(staging)


def _as_sequence_classifier(merged, head, pad_id: int):
    """An rm run as the transformers *ForSequenceClassification model of its family (num_labels 1): the body's
    weights, the head as its `score` layer, and the pad id its pooling reads, so that it scores as training did."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(merged.config)
    config.num_labels, config.pad_token_id = 1, pad_id
    config.architectures = [type(merged).__name__.replace("ForCausalLM", "ForSequenceClassification")]
    try:
        scorer = AutoModelForSequenceClassification.from_config(config, torch_dtype=merged.dtype)
    except ValueError as exc:
        raise TunesmithError(f"transformers has no sequence-classification model for {config.model_type} ({exc}); "
                             "export the reward model with --format adapter") from None
    body = {k: v for k, v in merged.state_dict().items() if not k.startswith("lm_head.")}
    result = scorer.load_state_dict({**body, "score.weight": head.weight.detach().to(merged.dtype)}, strict=False)
    if result.missing_keys:
        raise TunesmithError(f"cannot export the reward model as {config.architectures[0]}: missing "
                             f"{result.missing_keys[:3]}; export it with --format adapter")
    return scorer


def _write_adapter(loaded: Loaded, staging: Path, notes: list[str], **_) -> None:
    loaded.method.save(loaded.model, staging)
    if loaded.head is not None:  # the reward head travels beside the adapter
        save_modules({HEAD: loaded.head}, staging / MODULES_FILE)


def _cannot_merge(method) -> str | None:
    if not method.mergeable:
        return f"method {method.name} cannot be merged into the weights; export it with --format adapter"
    return None


def _no_adapter(method) -> str | None:
    if method.saves_base_weights:  # full and freeze change the weights themselves
        return f"this run used method '{method.name}', which has no adapter; use --format merged"
    return None


def _merged_lm(loaded: Loaded, notes: list[str]):
    if loaded.head is not None:
        raise ConfigError("a reward model (stage rm) scores replies and does not generate; export it with --format "
                          "merged (a sequence classifier) or adapter, not for llama.cpp")
    return merged_model(loaded, notes).eval()


def _write_gguf(loaded: Loaded, staging: Path, notes: list[str], quant: str = "f16", **_) -> None:
    from tunesmith.export.gguf import write_gguf

    write_gguf(_merged_lm(loaded, notes), loaded.tokenizer, staging, quant,
               name=loaded.run_dir.name if loaded.run_dir else "model")


def _write_ollama(loaded: Loaded, staging: Path, notes: list[str], quant: str = "q8_0", **_) -> None:
    from tunesmith.export.gguf import modelfile, write_gguf

    staging.mkdir(parents=True)
    name = f"{loaded.run_dir.name if loaded.run_dir else 'model'}.gguf"
    text = modelfile(loaded.tokenizer, name, loaded.default_system)  # refuses a template it cannot translate first
    write_gguf(_merged_lm(loaded, notes), loaded.tokenizer, staging / name, quant, name=Path(name).stem)
    (staging / "Modelfile").write_text(text, encoding="utf-8")


FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("merged", _write_merged, _cannot_merge),
    ExportFormat("adapter", _write_adapter, _no_adapter),
    ExportFormat("gguf", _write_gguf, _cannot_merge, single_file=True),
    ExportFormat("ollama", _write_ollama, _cannot_merge),
)}


def export_run(run: str | Path, fmt: str, out: str | Path, checkpoint: str | None = None, **options) -> str:
    """Write run `run` as `fmt` to `out`; options: quant (gguf, ollama). An existing export is never replaced."""
    run, out = Path(run), Path(out)
    if fmt not in FORMATS:
        raise TunesmithError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if not is_run_dir(run):
        raise TunesmithError(f"{run} is not a run directory (no run.json/config.yaml)")
    spec = FORMATS[fmt]
    if spec.single_file and out.exists():
        raise TunesmithError(f"{out} exists; choose a new --out file")
    if not spec.single_file and out.exists() and any(out.iterdir()):
        raise TunesmithError(f"{out} exists and is not empty; choose a new --out directory")
    if "quant" in options and options["quant"] is not None:
        from tunesmith.export.gguf import check_quant

        check_quant(options["quant"])  # before minutes of loading and merging
    options = {k: v for k, v in options.items() if v is not None}
    loaded = load_for_inference(run, checkpoint)
    assert loaded.method is not None
    why = spec.refuses(loaded.method)
    if why:
        raise ConfigError(why)
    notes: list[str] = []  # what the export measured (qlora's merge gap), said with the result
    if spec.single_file:
        staging = out.with_name(out.name + ".partial")
        staging.unlink(missing_ok=True)
        spec.write(loaded, staging, notes, **options)
        staging.rename(out)
        return "\n".join([f"wrote {fmt} export to {out}", *notes])
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    spec.write(loaded, staging, notes, **options)
    if fmt != "ollama":
        loaded.tokenizer.save_pretrained(staging)  # with the chat template used in training
    if out.exists():
        out.rmdir()
    staging.rename(out)
    return "\n".join([f"wrote {fmt} export to {out}", *notes])
