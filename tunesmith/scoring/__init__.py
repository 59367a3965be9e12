"""How good an answer is: text metrics of generated answers against references, and which way each metric
improves. Evaluation (`tunesmith eval`) and training (`eval.metric`, `checkpoint.best_by`) both read them."""

from tunesmith.scoring.text import (GENERATED_METRICS, TEXT_METRICS, exact_match, higher_is_better, is_json,
                                    load_json_schema, schema_matches, text_metrics, token_f1)

__all__ = ["GENERATED_METRICS", "TEXT_METRICS", "exact_match", "higher_is_better", "is_json", "load_json_schema",
           "schema_matches", "text_metrics", "token_f1"]
