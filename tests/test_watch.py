"""What a run watches while it trains: eval.metric (early stopping), checkpoint.best_by (the best checkpoint,
kept through rotation) and checkpoint.final: best; generated metrics scored on greedy answers; the JSON
schema match; the pre-flight findings for settings that cannot work."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import alpaca_rows, write_jsonl
from test_preflight import by_topic, findings_for, unique_rows
from tunesmith.stages.sft import SftStage
from tunesmith.training.loop import train
from tunesmith.training.validation import Tracker, Watch


def quiet(*_):
    pass


# ---------------------------------------------------------------------------------------------- the trackers


def test_tracker_directions_nan_and_state():
    loss = Tracker("val_loss")
    assert [loss.update(s, {"val_loss": v}) for s, v in ((2, 3.0), (4, 2.5), (6, 2.7), (8, float("nan")))] == \
        [True, True, False, False]
    assert (loss.best, loss.step, loss.stale) == (2.5, 4, 2)
    match = Tracker("exact_match")
    assert [match.update(s, {"exact_match": v}) for s, v in ((1, 0.2), (2, 0.1), (3, 0.4))] == [True, False, True]
    with pytest.raises(Exception, match="does not measure; it measures: val_loss"):
        Tracker("val_reward").update(1, {"val_loss": 1.0})

    from tunesmith.config.schema import config_from_dict

    cfg = config_from_dict({"data": {"train_file": "x.jsonl"}, "eval": {"metric": "exact_match", "early_stopping_patience": 2},
                            "checkpoint": {"best_by": "val_loss"}}, "t")
    watch = Watch.of(cfg)
    assert watch.update(2, {"val_loss": 2.0, "exact_match": 0.5}) == (True, None)
    assert watch.update(4, {"val_loss": 1.0, "exact_match": 0.5}) == (True, None)
    improved, why = watch.update(6, {"val_loss": 1.5, "exact_match": 0.4})
    assert not improved and "exact_match has not improved for 2 evaluations" in why and "0.5 at step 2" in why
    again = Watch.of(cfg)
    again.restore(json.loads(json.dumps(watch.state())))  # it travels in trainer_state.json
    assert again == watch


# ---------------------------------------------------------------------------------------------- in a run


def scripted_eval(monkeypatch, values: list[float]):
    """val_loss follows `values` (one per evaluation), so which step is best is known in advance."""
    calls = []

    def evaluate(self, model, rows, batch_size, pad_id, precision, max_batches):
        calls.append(len(calls))
        return {"val_loss": values[min(len(calls) - 1, len(values) - 1)], "val_perplexity": 1.0}

    monkeypatch.setattr(SftStage, "evaluate", evaluate)
    return calls


def adapter(path):
    return load_file(str(path / "adapter_model.safetensors"))


def test_best_checkpoint_survives_rotation_and_becomes_final(make_config, monkeypatch):
    scripted_eval(monkeypatch, [3.0, 1.0, 2.0, 2.5, 2.2, 2.4])  # best at the 2nd evaluation: step 4
    cfg = make_config(train={"max_steps": 12, "lr": 1e-2}, eval={"interval": 2},
                      checkpoint={"interval": 2, "keep_last": 1, "best_by": "val_loss", "final": "best"})
    run = train(cfg, log=quiet)
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert ckpts == ["step-000004", "step-000010"]  # the newest (keep_last 1) and the best
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best == {"checkpoint": "step-000004", "step": 4, "metric": "val_loss", "value": 1.0}
    final, at_best = adapter(run / "final"), adapter(run / "checkpoints" / "step-000004")
    assert all(torch.equal(final[k], at_best[k]) for k in at_best)
    assert not all(torch.equal(final[k], v) for k, v in adapter(run / "checkpoints" / "step-000010").items())
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and info["final_from"].startswith("step-000004 (val_loss 1")
    assert info["best"] == "val_loss 1 at step 4" and info["stopped_early"] is None


def test_final_last_keeps_the_last_weights(make_config, monkeypatch):
    scripted_eval(monkeypatch, [3.0, 1.0, 2.0])
    cfg = make_config(train={"max_steps": 6, "lr": 1e-2}, checkpoint={"interval": None, "best_by": "val_loss"})
    run = train(cfg, log=quiet)
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000004"]  # saved for being best
    assert not all(torch.equal(adapter(run / "final")[k], v) for k, v in adapter(run / "checkpoints" / "step-000004").items())
    assert json.loads((run / "run.json").read_text())["final_from"] is None


def test_early_stopping_completes_the_run_and_says_why(make_config, monkeypatch, capsys):
    calls = scripted_eval(monkeypatch, [3.0, 2.0, 2.5, 2.1, 1.0])  # no improvement at the 3rd and 4th: stop at step 8
    cfg = make_config(train={"max_steps": 20}, eval={"interval": 2, "early_stopping_patience": 2},
                      checkpoint={"interval": 4})
    run = train(cfg, log=quiet)
    assert len(calls) == 4
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and info["steps"] == 8
    assert "stopped early after step 8: val_loss has not improved for 2 evaluations" in info["stopped_early"]
    assert "best val_loss 2 at step 4" in info["stopped_early"]
    assert "stopped early after step 8" in capsys.readouterr().err
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 8 and (run / "final" / "adapter_model.safetensors").exists()


def test_early_stopping_state_survives_a_resume(make_config, monkeypatch, tmp_path):
    from tunesmith.errors import TrainingStopped

    values = [3.0, 2.0, 2.5, 2.6, 2.7, 1.0]

    def run_once(out, stop_at=None, resume=False):
        scripted_eval(monkeypatch, values if not resume else values[2:])  # a resumed run continues the script
        cfg = make_config(train={"max_steps": 20}, eval={"interval": 2, "early_stopping_patience": 3},
                          checkpoint={"interval": 2}, output={"dir": str(out)})
        return train(cfg, log=quiet, stop_at_step=stop_at, resume=resume)

    whole = json.loads((run_once(tmp_path / "a") / "run.json").read_text())
    with pytest.raises(TrainingStopped):
        run_once(tmp_path / "b", stop_at=4)
    resumed = json.loads((run_once(tmp_path / "b", resume=True) / "run.json").read_text())
    assert whole["steps"] == resumed["steps"] == 10  # the counter of stale evaluations came back with the checkpoint
    assert whole["stopped_early"] == resumed["stopped_early"]


def test_a_generated_metric_is_measured_on_greedy_answers(make_config, tmp_path):
    """eval.metric exact_match: the answers the run scores are the ones `tunesmith eval` would generate."""
    from tunesmith.data.pipeline import load_data_and_tokenizer
    from tunesmith.inference.generate import Sampling, generate_batch
    from tunesmith.inference.loading import load_for_inference
    from tunesmith.scoring import text_metrics
    from tunesmith.training.validation import Answers

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["a"]}))
    cfg = make_config(train={"max_steps": 4}, eval={"interval": 2, "metric": "token_f1", "max_new_tokens": 8,
                                                     "json_schema": str(schema)},
                      checkpoint={"best_by": "exact_match"})
    run = train(cfg, log=quiet)
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert [e["step"] for e in evals] == [2, 4]
    assert all({"exact_match", "token_f1", "rouge_l", "bleu", "json_valid", "json_schema_match"} <= e.keys() for e in evals)

    loaded = load_for_inference(run)
    _, tokenizer, data = load_data_and_tokenizer(cfg)
    answers = Answers(cfg, run / "data" / "val.jsonl", data.format, tokenizer)
    got = answers(loaded.model, "fp32")
    from tunesmith.data.pipeline import load_examples

    _, pairs = load_examples(str(run / "data" / "val.jsonl"), cfg.data, data.format, [])
    preds = generate_batch(loaded.model, loaded.tokenizer, [ex.prompt_messages for _, ex in pairs],
                           Sampling(max_new_tokens=8), batch_size=4)
    want = text_metrics(preds, [ex.reference for _, ex in pairs], json.loads(schema.read_text()))
    assert got == pytest.approx(want)
    assert evals[-1]["token_f1"] == pytest.approx(want["token_f1"])  # final/ is the last step's weights



def test_eval_matches_answers_against_the_runs_schema_or_the_one_given(make_config, tmp_path, monkeypatch):
    import tunesmith.evaluation.evaluate as evaluate
    from tunesmith.inference.loading import load_for_inference

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}))
    run = train(make_config(train={"max_steps": 1}, eval={"json_schema": str(schema)}), log=quiet)
    answers = ['{"a": 1}', '{"b": 2}', "not json", '{"a": "one"}']  # what the model "says" to the 4 test rows
    monkeypatch.setattr(evaluate, "generate_batch", lambda model, tok, prompts, *a, **k: answers[:len(prompts)])
    loaded = load_for_inference(run)
    got = evaluate.evaluate_file(loaded, run / "data" / "test.jsonl")
    assert got["json_valid"] == 0.75 and got["json_schema_match"] == 0.25
    loose = tmp_path / "any.json"
    loose.write_text("{}")  # --json-schema overrides the run's: any JSON value passes
    assert evaluate.evaluate_file(loaded, run / "data" / "test.jsonl", json_schema=str(loose))["json_schema_match"] == 0.75


def test_json_schema_match_counts_only_answers_the_schema_accepts(tmp_path):
    from tunesmith.errors import ConfigError
    from tunesmith.scoring import load_json_schema, text_metrics

    path = tmp_path / "s.json"
    path.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}))
    schema = load_json_schema(path)
    m = text_metrics(['{"n": 3}', '{"n": "3"}', '{"m": 1}', "n = 3"], ["x"] * 4, schema)
    assert m["json_valid"] == 0.75 and m["json_schema_match"] == 0.25
    path.write_text(json.dumps({"type": "no-such-type"}))
    with pytest.raises(ConfigError, match="is not a valid JSON schema"):
        load_json_schema(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_json_schema(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------- pre-flight


def test_watch_settings_that_cannot_work_are_errors(make_config, tmp_path):
    from tunesmith.errors import ConfigError

    def errors(cfg, topic):
        return [f for f in by_topic(findings_for(cfg), topic) if f.severity == "error"]

    typo = errors(make_config(unique_rows(100), eval={"metric": "exact_mach"}), "eval.metric")
    assert typo and typo[0].suggestion.startswith("eval.metric: exact_match")
    no_schema = errors(make_config(unique_rows(100), checkpoint={"best_by": "json_schema_match"}), "checkpoint.best_by")
    assert "needs a schema" in no_schema[0].message
    no_val = errors(make_config(unique_rows(100), data={"val_size": 0}, eval={"early_stopping_patience": 2}),
                    "eval.early_stopping_patience")
    assert "there is none" in no_val[0].message
    once = by_topic(findings_for(make_config(unique_rows(100), eval={"interval": None, "early_stopping_patience": 2})),
                    "eval.interval")
    assert once and once[0].severity == "error"
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document number {i} " * 5} for i in range(60)])
    cfg = make_config(unique_rows(10), eval={"metric": "rouge_l"}, stage={"name": "pretrain"})
    cfg.data.train_file = str(docs)
    assert "text rows have none" in errors(cfg, "eval.metric")[0].message
    with pytest.raises(ConfigError, match="checkpoint.final: best needs checkpoint.best_by"):
        make_config(checkpoint={"final": "best"})
    assert not [f for f in findings_for(make_config(unique_rows(100), eval={"metric": "exact_match",
                                                                            "early_stopping_patience": 3},
                                                    checkpoint={"best_by": "val_loss"}))
                if f.topic in ("eval.metric", "checkpoint.best_by", "eval.interval", "eval.early_stopping_patience")]
