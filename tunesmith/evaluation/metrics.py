"""Text metrics of generated answers against references: exact match, token F1, ROUGE-L (rouge-score),
BLEU (sacrebleu) and JSON validity. Each is a mean over rows, in [0, 1], except BLEU, which is on
sacrebleu's 0-100 scale as papers report it."""

from __future__ import annotations

import json
import re
from collections import Counter

TEXT_METRICS = ("exact_match", "token_f1", "rouge_l", "bleu", "json_valid")


def _tokens(text: str) -> list[str]:
    # SQuAD's normalisation: lower case, punctuation removed, split on whitespace.
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def exact_match(predictions: list[str], references: list[str]) -> float:
    """The share of answers equal to their reference, whitespace at the ends aside."""
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / max(len(references), 1)


def token_f1(prediction: str, reference: str) -> float:
    """The harmonic mean of token precision and recall (the SQuAD F1)."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def is_json(text: str) -> bool:
    """The answer as written is one JSON value (no fence, no prose around it)."""
    try:
        json.loads(text.strip())
        return True
    except ValueError:
        return False


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float | None]:
    """Every metric of TEXT_METRICS over the rows (None when there are none)."""
    if not references:
        return {name: None for name in TEXT_METRICS}
    import sacrebleu
    from rouge_score import rouge_scorer

    n = len(references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return {
        "exact_match": exact_match(predictions, references),
        "token_f1": sum(token_f1(p, r) for p, r in zip(predictions, references)) / n,
        "rouge_l": sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / n,
        "bleu": float(sacrebleu.corpus_bleu(predictions, [references]).score),
        "json_valid": sum(is_json(p) for p in predictions) / n,
    }
