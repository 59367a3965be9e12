"""Held-out evaluation: token loss and perplexity, and the text metrics (scoring/text.py) of greedy answers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


import torch

from tunesmith.data.pipeline import load_examples, tokenize_split
from tunesmith.scoring import exact_match, load_json_schema, text_metrics  # noqa: F401 (exact_match: the demo's)
from tunesmith.data.token_store import Pair
from tunesmith.inference.generate import Sampling, generate_batch
from tunesmith.stages.preference import pair_batch
from tunesmith.stages.reward import rewards
from tunesmith.stages.rewards import exact_match as exact_match_reward
from tunesmith.stages.rewards import Rewards, nanmean, score
from tunesmith.stages.tokens import mean_loss, sequence_logps


@torch.no_grad()
def pairwise(model, pairs: list[Pair], batch_size: int, pad_id: int, head=None) -> dict[str, float]:
    """Share of pairs whose chosen reply scores higher, and the mean difference: scored by the summed
    log-probability, or for a reward model (`head`) by its reward."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    wins, margins = 0, 0.0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        batch = {k: v.to(device) for k, v in pair_batch(chunk, pad_id).items()}
        scores = rewards(model, head, batch, pad_id) if head is not None else sequence_logps(model, batch)[0]
        chosen, rejected = scores.chunk(2)
        wins += int((chosen > rejected).sum())
        margins += float((chosen - rejected).sum())
    model.train(was_training)
    margin = "reward_margin" if head is not None else "logp_margin"
    return {"pairwise_accuracy": wins / max(len(pairs), 1), margin: margins / max(len(pairs), 1)}


def evaluate_file(loaded, data_file: str | Path, limit: int | None = None, batch_size: int | None = None,
                  max_new_tokens: int = 256, rewards_of=None, json_schema: str | None = None) -> dict[str, Any]:
    """Loss, perplexity and exact match of `loaded` (see run_dir.load_for_inference) on a data file, in
    batches of `batch_size` rows (default: the run's eval.batch_size). Prompt rows are scored by the reward
    functions of `rewards_of` (a grpo or ppo stage section: score a base model as its tuned run is scored),
    else of the loaded run. Answers are matched against `json_schema` (a file; default: the run's
    eval.json_schema) too."""
    from tunesmith.config.schema import DataConfig, EvalConfig

    own = loaded.config.eval if loaded.config else EvalConfig()
    batch_size = batch_size or own.batch_size
    json_schema = json_schema or own.json_schema
    schema = load_json_schema(json_schema) if json_schema else None

    cfg = loaded.config.data.model_copy() if loaded.config else DataConfig(train_file=str(data_file))
    cfg.on_bad_row = "error"
    _, pairs = load_examples(str(data_file), cfg, cfg.format if loaded.config else None, [])
    examples = [ex for _, ex in pairs][:limit]
    if examples and examples[0].fields is not None:  # prompt rows (grpo): nothing to score but the answers
        return evaluate_prompts(loaded, examples, batch_size, max_new_tokens, rewards_of, schema)
    tokenized, report = tokenize_split("eval", examples, loaded.tokenizer, cfg)
    paired = bool(tokenized) and isinstance(tokenized[0], Pair)
    # Preference pairs: the loss and perplexity are the chosen replies'; pairwise accuracy says how often the
    # model gives the chosen reply a higher log-probability than the rejected one.
    scored = [p.chosen for p in tokenized] if paired else tokenized
    loss, n_tokens = mean_loss(loaded.model, scored, batch_size, loaded.tokenizer.pad_token_id)
    result: dict[str, Any] = {"loss": loss, "perplexity": math.exp(loss) if loss == loss else float("nan"),
                              "tokens": n_tokens, "n": len(examples), "scored_rows": report.kept}
    if paired:
        result.update(pairwise(loaded.model, tokenized, batch_size, loaded.tokenizer.pad_token_id, loaded.head))
    chats = [ex for ex in examples if ex.messages is not None]
    if chats:
        preds = generate_batch(loaded.model, loaded.tokenizer, [ex.prompt_messages for ex in chats],
                               Sampling(max_new_tokens=max_new_tokens), batch_size=batch_size)
        result.update(text_metrics(preds, [ex.reference for ex in chats], schema))
        result["samples"] = [{"prompt": ex.prompt_messages[-1]["content"], "reference": ex.reference, "prediction": p}
                             for ex, p in zip(chats, preds)]
    else:
        result.update(text_metrics([], [], schema))
    return result


def evaluate_prompts(loaded, examples, batch_size: int, max_new_tokens: int, section=None,
                     schema=None) -> dict[str, Any]:
    """Prompt rows have no reply to score a loss on: greedy answers, scored by reward functions (`section`'s,
    or the run's stage.rewards, else exact_match against an `answer` field), and their exact match."""
    from tunesmith.config.schema import GrpoStageSection

    own = loaded.config.stage if loaded.config and getattr(loaded.config.stage, "rewards", None) else None
    section = section or own or GrpoStageSection()
    rewards = Rewards(section)
    preds = generate_batch(loaded.model, loaded.tokenizer, [ex.prompt_messages for ex in examples],
                           Sampling(max_new_tokens=max_new_tokens), batch_size=batch_size)
    ids = [loaded.tokenizer(p, add_special_tokens=False)["input_ids"] for p in preds]
    fields = [ex.fields for ex in examples]
    table, total = rewards([ex.prompt for ex in examples], preds, ids, fields)
    answers = [f.get(section.answer_field) for f in fields]
    with_answer = [(p, a) for p, a in zip(preds, answers) if a is not None]
    match = score([("exact_match", exact_match_reward(section))], ["p"] * len(with_answer),
                  [p for p, _ in with_answer], [[]] * len(with_answer),
                  [{section.answer_field: a} for _, a in with_answer]) if with_answer else []
    texts = [(p, a if isinstance(a, str) else json.dumps(a)) for p, a in with_answer]
    others = {k: v for k, v in text_metrics([p for p, _ in texts], [a for _, a in texts], schema).items()
              if k != "exact_match"}
    return {"loss": float("nan"), "perplexity": float("nan"), "tokens": 0, "n": len(examples), **others,
            "reward": nanmean(total),
            **{f"rewards/{name}": nanmean(table[:, i]) for i, name in enumerate(rewards.names)},
            "exact_match": sum(m[0] for m in match) / len(match) if match else None,
            "samples": [{"prompt": ex.prompt_messages[-1]["content"], "reference": a, "prediction": p}
                        for ex, a, p in zip(examples, answers, preds)]}

