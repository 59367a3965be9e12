"""Text metrics of generated answers against references: exact match, token F1, ROUGE-L (rouge-score),
BLEU (sacrebleu) and JSON validity. Each is a mean over rows, in [0, 1], except BLEU, which is on
sacrebleu's 0-100 scale as papers report it; with a JSON schema (eval.json_schema), json_schema_match is the
share of answers that are JSON and valid under it (jsonschema)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError

TEXT_METRICS = ("exact_match", "token_f1", "rouge_l", "bleu", "json_valid")
GENERATED_METRICS = TEXT_METRICS + ("json_schema_match",)
"""What greedy answers are scored by; the rest of a run's metrics (val_loss, val_reward, …) come from its stage."""

LOWER_IS_BETTER = ("loss", "perplexity", "val_loss", "val_perplexity")


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


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


def load_json_schema(path: str | Path) -> dict[str, Any]:
    """A JSON schema file, checked to be a valid schema, so a typo fails before training rather than at scoring."""
    try:
        import jsonschema
    except ImportError:
        raise ConfigError("eval.json_schema needs the jsonschema package: pip install 'tunesmith[schema]'") from None
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"eval.json_schema: {path} does not exist") from None
    except ValueError as exc:
        raise ConfigError(f"eval.json_schema: {path} is not JSON ({exc})") from None
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ConfigError(f"eval.json_schema: {path} is not a valid JSON schema: {exc.message}") from None
    return schema


def schema_matches(text: str, schema: dict[str, Any]) -> bool:
    """The answer is one JSON value that the schema accepts."""
    import jsonschema

    try:
        value = json.loads(text.strip())
    except ValueError:
        return False
    return jsonschema.validators.validator_for(schema)(schema).is_valid(value)


def text_metrics(predictions: list[str], references: list[str],
                 schema: dict[str, Any] | None = None) -> dict[str, float | None]:
    """Every metric of TEXT_METRICS over the rows (None when there are none), and json_schema_match when a
    schema is given."""
    if not references:
        return {name: None for name in TEXT_METRICS + (("json_schema_match",) if schema is not None else ())}
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
        **({"json_schema_match": sum(schema_matches(p, schema) for p in predictions) / n} if schema is not None else {}),
    }
