"""Config validation, shipped configs, model resolution errors, and the CLI's contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tunesmith.config.schema import load_config, parse_overrides
from tunesmith.errors import ConfigError, ModelError

REPO = Path(__file__).resolve().parents[1]


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_unknown_key_fails_with_did_you_mean(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"data": {"train_file": "x.jsonl"}, "train": {"learning_rate": 1e-4}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "unknown key 'train.learning_rate'" in str(err.value)
    assert "Did you mean 'train.lr'?" in str(err.value)


def test_unknown_section_and_bad_values(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"data": {"train_file": "x.jsonl"}, "methdo": {"name": "lora"}})
    with pytest.raises(ConfigError, match="Did you mean 'method'"):
        load_config(path)
    path = write_yaml(tmp_path / "c.yaml", {"data": {"train_file": "x.jsonl"}, "method": {"name": "lorra"}})
    with pytest.raises(ConfigError, match="method.name"):
        load_config(path)
    path = write_yaml(tmp_path / "c.yaml", {"data": {"train_file": "x.jsonl", "val_size": 1.5}})
    with pytest.raises(ConfigError, match="data.val_size"):
        load_config(path)


def test_overrides_and_relative_paths(tmp_path):
    (tmp_path / "rows.jsonl").write_text("{}\n")
    path = write_yaml(tmp_path / "c.yaml", {"data": {"train_file": "rows.jsonl"}, "train": {"lr": 1e-4}})
    cfg = load_config(path, ["--train.lr=3e-4", "--method.name", "ia3", "--method.target_modules=[q_proj]"])
    assert cfg.train.lr == 3e-4 and cfg.method.name == "ia3" and cfg.method.target_modules == ["q_proj"]
    # a key of another method is not part of this method's section: dropped, with a warning naming its owners
    with pytest.warns(UserWarning, match="method.target_modules applies to method lora, qlora, ia3, oft, boft, not full"):
        cfg = load_config(path, ["--method.name", "full", "--method.target_modules=[q_proj]"])
    assert cfg.method.model_dump() == {"name": "full"}
    assert cfg.data.train_file == str((tmp_path / "rows.jsonl").resolve())
    with pytest.raises(ConfigError, match="did you mean|Did you mean"):
        load_config(path, ["--train.learnin_rate=1"])
    with pytest.raises(ConfigError, match="must name a section"):
        parse_overrides(["--lr=1"])


def test_every_shipped_config_validates():
    configs = sorted(REPO.glob("examples/**/*.yaml"))
    assert configs, "no configs found under examples/"
    for path in configs:
        cfg = load_config(path)
        assert Path(cfg.data.train_file).exists(), f"{path}: data file {cfg.data.train_file} missing"


def test_missing_local_model_and_offline_hub_id_are_clear_errors(tmp_path, monkeypatch):
    from tunesmith.models.loading import load_tokenizer, resolve

    with pytest.raises(ModelError, match="not found"):
        resolve(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json and no .gguf"):
        resolve(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set"):
        load_tokenizer(resolve("someone/some-model-that-is-not-cached"))


def test_gguf_file_resolves_to_its_directory(tmp_path):
    from tunesmith.models.loading import resolve

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve(str(tmp_path / "m.gguf")).kwargs() == {"gguf_file": "m.gguf"}
    assert resolve(str(tmp_path)).gguf_file == "m.gguf"


def run_cli(*args: str, cwd: Path = REPO, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", *args], capture_output=True, text=True,
                          cwd=cwd, input=stdin, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_cli_user_mistakes_give_one_line_errors_not_tracebacks(tmp_path):
    bad = write_yaml(tmp_path / "c.yaml", {"data": {"train_file": "x.jsonl"}, "train": {"epoch": 2}})
    done = run_cli("prepare", str(bad))
    assert done.returncode == 2
    assert "error:" in done.stderr and "Did you mean 'train.epochs'" in done.stderr
    assert "Traceback" not in done.stderr

    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 5}\n')
    cfg = write_yaml(tmp_path / "ok.yaml", {"model": {"name_or_path": str(tmp_path / "missing-model")},
                                            "data": {"train_file": "rows.jsonl"}})
    done = run_cli("prepare", str(cfg))
    assert done.returncode == 2 and "Traceback" not in done.stderr and "missing-model" in done.stderr


def greedy_replier(run: Path, base: Path, adapter: bool = True):
    """Greedy replies of a run's final LoRA adapter (or of its bare base), computed with plain transformers + peft,
    no tunesmith: the run's saved tokenizer renders the prompt with its own chat template."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(base)
    model = (PeftModel.from_pretrained(model, run / "final") if adapter else model).eval()

    def reply(messages: list[dict], max_new_tokens: int) -> str:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return reply


def test_cli_full_cycle_on_the_tiny_model(tmp_path, tiny_model_dir):
    """train → prepare --show → generate → eval --json → chat → export, through the real command line."""
    from conftest import alpaca_rows, write_jsonl

    write_jsonl(tmp_path / "rows.jsonl", alpaca_rows(30))
    cfg = write_yaml(tmp_path / "c.yaml", {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train_file": "rows.jsonl", "val_size": 4, "test_size": 4},
        "train": {"max_steps": 2, "micro_batch_size": 4, "precision": "fp32", "lr": 1e-3},
        "output": {"dir": str(tmp_path / "run")},
    })
    shown = run_cli("prepare", str(cfg), "--show", "1")
    assert shown.returncode == 0, shown.stderr
    assert "Data report" in shown.stdout and "trained tokens in [brackets]" in shown.stdout

    trained = run_cli("train", str(cfg), "--train.max_steps=3")
    assert trained.returncode == 0, trained.stderr
    assert "trainable parameters" in trained.stdout
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(x["step"] for x in steps) == 3
    run = tmp_path / "run"

    # generate prints exactly the greedy reply that plain transformers + peft give on the run's weights and template
    reference = greedy_replier(run, tiny_model_dir)
    asked = [{"role": "user", "content": "Shout this. cat ok"}]
    want = reference(asked, 6)
    assert want.strip(), "the reference reply is empty: the test would not see a missing reply"
    assert want != greedy_replier(run, tiny_model_dir, adapter=False)(asked, 6), "guard: the adapter changes the reply"
    gen = run_cli("generate", str(run), "--prompt", "Shout this. cat ok", "--max-new-tokens", "6")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout == want + "\n"

    ev = run_cli("eval", str(run), "--json", "--max-new-tokens", "4")
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    assert {"loss", "perplexity", "exact_match", "n"} <= result.keys() and result["n"] == 4

    # chat (greedy here) prints each streamed reply after "assistant> ", and the second turn sees the first
    hello, ok = {"role": "user", "content": "hello"}, {"role": "user", "content": "ok"}
    first = reference([hello], 6)
    second = reference([hello, {"role": "assistant", "content": first}, ok], 6)
    assert first.strip() and second.strip(), "the reference replies are empty: the test would not see a missing reply"
    # guards (pick other prompts if the tiny model's replies ever coincide): a chat that dropped its replies from
    # the history, or the whole history, would print something else
    assert second not in (reference([hello, ok], 6), reference([ok], 6))
    chat = run_cli("chat", str(run), "--max-new-tokens", "6", "--temperature", "0", "--repetition-penalty", "1",
                   stdin="hello\nok\n/exit\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == f"you> assistant> {first}\nyou> assistant> {second}\nyou> ", (first, second)

    out = run_cli("export", str(run), "--format", "adapter", "--out", str(tmp_path / "adapter"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_optimizer_settings_are_checked_when_the_config_loads(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"data": {"train_file": "x.jsonl"}, "train": {"adam_betas": [0.9, 1.5]}})
    with pytest.raises(ConfigError, match=r"train.adam_betas.*each beta must be in \[0, 1\)"):
        load_config(path)
    path = write_yaml(tmp_path / "c.yaml", {"data": {"train_file": "x.jsonl"}, "train": {"adam_eps": 0}})
    with pytest.raises(ConfigError, match="train.adam_eps"):
        load_config(path)


def test_a_relative_template_file_is_found_next_to_the_config(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mine.jinja").write_text("{{ messages }}")
    path = write_yaml(tmp_path / "conf" / "c.yaml", {"data": {"train_file": "x.jsonl", "template": "mine.jinja"}})
    monkeypatch.chdir(tmp_path)  # run from elsewhere: the path must still point next to the config
    assert load_config(path).data.template == str((tmp_path / "conf" / "mine.jinja").resolve())
