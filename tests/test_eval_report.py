"""eval's text metrics, --compare-base and --report: the metrics against their reference implementations'
known values, base beside tuned in one JSON object, and the report files with the rows fixed and broken."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.training.loop import train

REPO = Path(__file__).resolve().parents[1]


def test_text_metrics_on_known_values():
    from tunesmith.scoring.text import text_metrics, token_f1

    assert token_f1("The cat sat.", "the cat sat on the mat") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert token_f1("dog", "cat") == 0.0 and token_f1("", "") == 1.0
    m = text_metrics(['{"a": 1}', "the cat sat"], ['{"a": 1}', "the cat sat on the mat"])
    assert m["exact_match"] == 0.5
    assert m["rouge_l"] == pytest.approx((1.0 + 2 * 1.0 * 0.5 / 1.5) / 2)  # LCS 3 of 3 and of 6 tokens
    assert m["json_valid"] == 0.5
    assert text_metrics(["a b c d e"], ["a b c d e"])["bleu"] == pytest.approx(100.0)
    assert 0 < text_metrics(["the cat sat on a mat"], ["the cat sat on the mat"])["bleu"] < 100
    assert text_metrics([], [])["bleu"] is None


def test_changed_rows_are_the_ones_exact_match_flips():
    from tunesmith.evaluation.report import changed_rows

    tuned = [{"prompt": "p1", "reference": "A", "prediction": "A"}, {"prompt": "p2", "reference": "B", "prediction": "x"},
             {"prompt": "p3", "reference": {"k": 1}, "prediction": '{"k": 1}'}]
    base = [{"prompt": "p1", "reference": "A", "prediction": "no"}, {"prompt": "p2", "reference": "B", "prediction": "B"},
            {"prompt": "p3", "reference": {"k": 1}, "prediction": '{"k": 1}'}]
    fixed, broken = changed_rows(tuned, base)
    assert [r["prompt"] for r in fixed] == ["p1"] and fixed[0]["base_prediction"] == "no"
    assert [r["prompt"] for r in broken] == ["p2"]


def test_eval_compares_with_the_base_and_writes_the_report(make_config, tmp_path):
    run = train(make_config(train={"max_steps": 3}, output={"dir": str(tmp_path / "run")}), log=lambda *_: None)
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "eval", str(run), "--json", "--compare-base",
                           "--report", "--max-new-tokens", "6"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    keys = {"loss", "perplexity", "exact_match", "n", "token_f1", "rouge_l", "bleu", "json_valid"}
    assert keys <= result.keys() and keys <= result["base"].keys()
    assert result["loss"] != result["base"]["loss"]  # two different models were scored
    md, page = (run / "report.md").read_text(), (run / "report.html").read_text()
    assert "| token_f1 |" in md and "Fixed by the fine-tune" in md and "Broken by it" in md
    assert "<table>" in page and "report_metrics.png" in page
    assert (run / "report_metrics.png").stat().st_size > 1000
    short = subprocess.run([sys.executable, "-m", "tunesmith.cli", "eval", str(run), "--compare-base",
                            "--max-new-tokens", "4"], capture_output=True, text=True, cwd=REPO)
    assert short.returncode == 0 and "base" in short.stdout and "rouge_l" in short.stdout
