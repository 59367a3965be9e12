"""Base versus tuned on the same held-out rows, and the report of it: `report.md` and `report.html` in the
run dir, with a bar chart of the metrics (`report_metrics.png`), the run's loss curves (`loss.png`), and the
rows the fine-tune fixed and the rows it broke (by exact match)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from tunesmith.scoring import GENERATED_METRICS

SHOWN = ("loss", "perplexity", *GENERATED_METRICS, "pairwise_accuracy", "reward")
"""The metrics a report lists, in this order, where the rows give them."""


def compare_with_base(run: str | Path, data_file: str | Path, checkpoint: str | None = None, **options) -> dict:
    """The run's metrics on `data_file` with its base model's under "base" (samples kept under "samples" and
    "base_samples"). The base is scored as the run is: the same rows, generation settings and, for prompt
    rows, the run's reward functions."""
    from tunesmith.evaluation.evaluate import evaluate_file
    from tunesmith.inference.loading import load_for_inference

    loaded = load_for_inference(run, checkpoint)
    if loaded.config is None:
        raise ValueError(f"{run} is not a run directory: --compare-base compares a run with its base model")
    tuned = evaluate_file(loaded, data_file, **options)
    stage = loaded.config.stage if getattr(loaded.config.stage, "rewards", None) else None
    base_model = loaded.config.model.name_or_path
    options["json_schema"] = options.get("json_schema") or loaded.config.eval.json_schema  # the same schema for both
    del loaded
    base = evaluate_file(load_for_inference(base_model), data_file, rewards_of=stage, **options)
    tuned["base_samples"] = base.pop("samples", [])
    tuned["base"] = base
    return tuned


def changed_rows(tuned: list[dict], base: list[dict]) -> tuple[list[dict], list[dict]]:
    """(rows the fine-tune fixed: the base's answer was not exact and the tuned one is; rows it broke)."""
    def exact(sample) -> bool:
        reference = sample["reference"] if isinstance(sample["reference"], str) else json.dumps(sample["reference"])
        return sample["prediction"].strip() == reference.strip()

    fixed, broken = [], []
    for t, b in zip(tuned, base):
        if exact(t) and not exact(b):
            fixed.append({**t, "base_prediction": b["prediction"]})
        elif exact(b) and not exact(t):
            broken.append({**t, "base_prediction": b["prediction"]})
    return fixed, broken


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def metric_rows(result: dict) -> list[tuple[str, Any, Any]]:
    base = result.get("base") or {}
    return [(name, base.get(name), result.get(name)) for name in SHOWN
            if result.get(name) is not None or base.get(name) is not None]


def short_table(result: dict) -> str:
    """What `tunesmith eval` prints: one line a metric, base beside tuned when there is a base."""
    rows = metric_rows(result)
    if "base" in result:
        lines = [f"{'metric':<20}{'base':>12}{'tuned':>12}"] + [f"{n:<20}{_fmt(b):>12}{_fmt(t):>12}" for n, b, t in rows]
    else:
        lines = [f"{'metric':<20}{'value':>12}"] + [f"{n:<20}{_fmt(t):>12}" for n, _, t in rows]
    return "\n".join(lines)


def plot_metrics(result: dict, out_png: Path) -> None:
    """Bars of the [0, 1] metrics (BLEU scaled to it), base beside tuned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, _, _ in metric_rows(result) if n not in ("loss", "perplexity")]
    scale = {"bleu": 0.01}
    tuned = [(result.get(n) or 0.0) * scale.get(n, 1) for n in names]
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(names)), 3.5))
    xs = range(len(names))
    if "base" in result:
        base = [(result["base"].get(n) or 0.0) * scale.get(n, 1) for n in names]
        ax.bar([x - 0.2 for x in xs], base, 0.4, label="base")
        ax.bar([x + 0.2 for x in xs], tuned, 0.4, label="tuned")
        ax.legend()
    else:
        ax.bar(list(xs), tuned, 0.6, label="tuned")
    ax.set_xticks(list(xs), [n + (" / 100" if n == "bleu" else "") for n in names], rotation=20)
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def write_report(run_dir: str | Path, result: dict, data_file: str | Path) -> tuple[Path, Path]:
    """report.md and report.html in the run dir (and the chart they show); returns their paths."""
    run_dir = Path(run_dir)
    plot_metrics(result, run_dir / "report_metrics.png")
    fixed, broken = changed_rows(result.get("samples", []), result.get("base_samples", []))
    has_base = "base" in result
    rows = metric_rows(result)
    md = [f"# Evaluation of {run_dir.name}", "", f"Rows: {result['n']} from `{data_file}`.", ""]
    md += (["| metric | base | tuned |", "| --- | ---: | ---: |"] + [f"| {n} | {_fmt(b)} | {_fmt(t)} |" for n, b, t in rows]
           if has_base else ["| metric | value |", "| --- | ---: |"] + [f"| {n} | {_fmt(t)} |" for n, _, t in rows])
    md += ["", "![metrics](report_metrics.png)", ""]
    if (run_dir / "loss.png").exists():
        md += ["![loss curves](loss.png)", ""]
    if has_base:
        for title, items in ((f"Fixed by the fine-tune ({len(fixed)})", fixed), (f"Broken by it ({len(broken)})", broken)):
            md += [f"## {title}", ""]
            for item in items[:20]:
                md += [f"- **prompt:** {item['prompt'][:300]}", f"  - reference: `{_plain(item['reference'])[:300]}`",
                       f"  - base: `{item['base_prediction'][:300]}`", f"  - tuned: `{item['prediction'][:300]}`"]
            md += ["" if items else "none", ""]
    (run_dir / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")

    cells = "".join(f"<tr><td>{n}</td>" + (f"<td>{_fmt(b)}</td>" if has_base else "") + f"<td>{_fmt(t)}</td></tr>"
                    for n, b, t in rows)
    head = "<tr><th>metric</th>" + ("<th>base</th><th>tuned</th>" if has_base else "<th>value</th>") + "</tr>"
    changed = ""
    if has_base:
        for title, items in ((f"Fixed by the fine-tune ({len(fixed)})", fixed), (f"Broken by it ({len(broken)})", broken)):
            lis = "".join(f"<li><b>prompt:</b> {html.escape(i['prompt'][:300])}<br>reference: <code>"
                          f"{html.escape(_plain(i['reference'])[:300])}</code><br>base: <code>"
                          f"{html.escape(i['base_prediction'][:300])}</code><br>tuned: <code>"
                          f"{html.escape(i['prediction'][:300])}</code></li>" for i in items[:20])
            changed += f"<h2>{title}</h2><ul>{lis or '<li>none</li>'}</ul>"
    loss = '<img src="loss.png" alt="loss curves">' if (run_dir / "loss.png").exists() else ""
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Evaluation of {html.escape(run_dir.name)}"
            f"</title><style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:.2em 1em;"
            f"text-align:right}}td:first-child,th:first-child{{text-align:left}}</style></head><body>"
            f"<h1>Evaluation of {html.escape(run_dir.name)}</h1><p>Rows: {result['n']} from "
            f"<code>{html.escape(str(data_file))}</code>.</p><table>{head}{cells}</table>"
            f"<img src='report_metrics.png' alt='metrics'>{loss}{changed}</body></html>")
    (run_dir / "report.html").write_text(page, encoding="utf-8")
    return run_dir / "report.md", run_dir / "report.html"


def _plain(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)
