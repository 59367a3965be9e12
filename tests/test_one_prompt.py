"""One prompt everywhere (DESIGN.md, correctness rule 3): the prompt training rendered for a row is, token for
token, what every inference path renders for the same conversation.

A tiny run is trained per case (system prompt; the model's own template; alpaca; a .jinja file; multi-turn
message rows). The expectation comes from the training side: the token ids the training loop itself consumed
(captured from `load_data_and_tokenizer` as `train` called it), cut before each trained span. Each inference
path is driven through its real entry point (the CLI verbs chat / generate / eval, `generate_batch`, and
plain transformers on the tokenizer that `export` writes); the model's `generate` is replaced by a recorder
that keeps the input ids it was given, so nothing of their prompt building is re-implemented here. The
training ids are also decoded and compared with the prompt text written out by hand for each template, so a
system prompt or template that every path dropped alike would still fail.

The tokenizer is a byte-level BPE *with merges* (GPT-2 style), so ids depend on where text is split: equal
ids mean the same tokenization, not only the same text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_TEMPLATE, build_tiny_model, write_jsonl

IGNORE = -100
SYSTEM = "Answer in capitals."
TINY_DEFAULT_SYSTEM = "You are tiny."  # what TINY_TEMPLATE inserts when a conversation has no system message
ALPACA_DEFAULT_SYSTEM = ("Below is an instruction that describes a task. "
                         "Write a response that appropriately completes the request.")

# A user's own template file: its own markers, EOS after each reply.
JINJA = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '## ' + m['content'] + '\\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\\n' }}"
    "{% else %}{{ 'Bot:\\n' + m['content'] + eos_token + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Bot:\\n' }}{% endif %}"
)
# The same without EOS in the template: training appends the EOS id after every reply itself.
JINJA_NO_EOS = JINJA.replace(" + eos_token", "")

WORDS = ["cat", "river", "blue", "seven", "mountain", "ok", "paper", "lamp"]


# ----------------------------------------------------------------------------- expected prompt text, by hand


def chatml_text(messages: list[dict]) -> str:
    """TINY_TEMPLATE, written out: ChatML with a default system message, then the generation prompt."""
    out = "" if messages[0]["role"] == "system" else f"<|im_start|>system\n{TINY_DEFAULT_SYSTEM}<|im_end|>\n"
    out += "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return out + "<|im_start|>assistant\n"


def alpaca_text(messages: list[dict]) -> str:
    out = (messages[0]["content"] if messages[0]["role"] == "system" else ALPACA_DEFAULT_SYSTEM) + "\n\n"
    for m in messages:
        if m["role"] == "user":
            out += f"### Instruction:\n{m['content']}\n\n### Response:\n"
        elif m["role"] == "assistant":
            out += m["content"] + "<|im_end|>\n\n"
    return out


def jinja_text(messages: list[dict], eos: bool = True) -> str:
    out = ""
    for m in messages:
        if m["role"] == "system":
            out += f"## {m['content']}\n"
        elif m["role"] == "user":
            out += f"User: {m['content']}\n"
        else:  # training appends the EOS id when the template has none, so it is in the ids either way
            out += f"Bot:\n{m['content']}<|im_end|>\n" if eos else f"Bot:\n{m['content']}\n<|im_end|>"
    return out + "Bot:\n"


# ----------------------------------------------------------------------------- cases


def single_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        picked = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 4))
        rows.append({"instruction": f"Shout: {picked}", "output": picked.upper()})
    return rows


def multi_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b, c = WORDS[i % 8], WORDS[(i + 3) % 8], WORDS[(i + 5) % 8]
        turns = [("user", f"Shout: {a}"), ("assistant", a.upper()),
                 ("user", f"Again: {a} {b}"), ("assistant", f"{a} {b}".upper())]
        if i % 2:
            turns += [("user", f"Last: {c}"), ("assistant", c.upper())]
        rows.append({"messages": [{"role": r, "content": t} for r, t in turns]})
    return rows


CASES = {
    # name: (data.template, data.system_prompt, rows, expected text of a prompt)
    "system_prompt": ("model", SYSTEM, "single", chatml_text),
    "model_template": ("model", None, "single", chatml_text),
    "alpaca": ("alpaca", None, "single", alpaca_text),
    "jinja_file": ("jinja", None, "single", jinja_text),
    "multi_turn_model_system": ("model", SYSTEM, "multi", chatml_text),
    "multi_turn_alpaca": ("alpaca", None, "multi", alpaca_text),
    "multi_turn_jinja": ("jinja", None, "multi", jinja_text),
    "multi_turn_jinja_no_eos": ("jinja_no_eos", None, "multi", lambda m: jinja_text(m, eos=False)),
}
ALL = list(CASES)
SYSTEM_CASES = [c for c in ALL if CASES[c][1]]


def build_bpe_tokenizer():
    """Byte-level BPE with merges learnt from text like the rows, ChatML markers as special tokens; pad == eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [chatml_text([{"role": "user", "content": r["instruction"]}]) + r["output"] for r in single_rows(16)]
    corpus += [alpaca_text([{"role": "user", "content": "Again: cat river"}]), "Bot:\nUser: Last: lamp\n"]
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 10, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = TINY_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bpe-model")
    tokenizer = build_bpe_tokenizer()
    merged = tokenizer("Shout: mountain")["input_ids"]
    assert len(merged) < len("Shout: mountain")  # the merges are real: fewer ids than bytes
    model = build_tiny_model(len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class TrainedRun:
    def __init__(self, case: str, run: Path, rows: list[dict], train_ids: list[list[int]],
                 train_labels: list[list[int]], template: str, tokenizer):
        self.case, self.run, self.rows = case, run, rows
        self.train_ids, self.train_labels, self.template, self.tokenizer = train_ids, train_labels, template, tokenizer
        self.system = CASES[case][1]
        self.expected_text = CASES[case][3]

    def conversation(self, i: int) -> list[dict]:
        """Row i of the run's train split as a user would hand it to a model: its messages, no system added."""
        row = self.rows[i]
        if "messages" in row:
            return [dict(m) for m in row["messages"]]
        return [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["output"]}]

    def with_system(self, messages: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + messages

    def prompts(self, i: int) -> list[list[int]]:
        """Training's prompt before each trained span of row i (the first one: before the first trained label)."""
        ids, labels = self.train_ids[i], self.train_labels[i]
        starts = [t for t in range(len(ids)) if labels[t] != IGNORE and (t == 0 or labels[t - 1] == IGNORE)]
        return [ids[:s] for s in starts]


def train_case(case: str, base: Path, model_dir: Path) -> TrainedRun:
    from tunesmith.config.schema import config_from_dict
    from tunesmith.training import loop
    from tunesmith.training import session

    template, system, kind, _ = CASES[case]
    work = base / case
    work.mkdir()
    if template.startswith("jinja"):
        (work / "template.jinja").write_text(JINJA if template == "jinja" else JINJA_NO_EOS, encoding="utf-8")
        template = str(work / "template.jinja")
    rows = single_rows(12) if kind == "single" else multi_rows(12)
    data = write_jsonl(work / "data.jsonl", rows)
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_file": str(data), "val_size": 2, "test_size": 2, "seed": 0, "max_seq_length": 256,
                 "template": template, **({"system_prompt": system} if system else {})},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": 3, "lr": 1e-2, "micro_batch_size": 4, "precision": "fp32", "seed": 0},
        "eval": {"interval": 10, "batch_size": 4},
        "checkpoint": {"interval": 2, "keep_last": 1},
        "output": {"dir": str(work / "run")},
    }
    cfg = config_from_dict(raw, f"{case}.yaml")
    seen = {}
    real = session.load_data_and_tokenizer

    def spy(cfg):  # keep what the training loop itself was given
        source, tokenizer, prepared = real(cfg)
        seen["tokenizer"], seen["data"] = tokenizer, prepared
        return source, tokenizer, prepared

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(session, "load_data_and_tokenizer", spy)
        run = loop.train(cfg, log=lambda *a: None)
    assert "data" in seen, "train() no longer gets its data from session.load_data_and_tokenizer; update the spy"
    prepared = seen["data"]
    ids = [[int(t) for t in item.input_ids] for item in prepared.train]
    labels = [[int(t) for t in item.labels] for item in prepared.train]
    split_rows = [json.loads(line) for line in (run / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(split_rows) == len(ids) == 8
    return TrainedRun(case, run, split_rows, ids, labels, seen["tokenizer"].chat_template, seen["tokenizer"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dir):
    base = tmp_path_factory.mktemp("one-prompt")
    cache: dict[str, TrainedRun] = {}

    def get(case: str) -> TrainedRun:
        if case not in cache:
            cache[case] = train_case(case, base, model_dir)
        return cache[case]

    return get


# ----------------------------------------------------------------------------- capturing what generate is given


class Recorder:
    """Stands in for model.generate: keeps each row's prompt ids and answers with the queued reply (or nothing)."""

    def __init__(self, tokenizer, replies: list[str] | None = None):
        self.tokenizer, self.replies, self.prompts = tokenizer, list(replies or []), []

    def __call__(self, input_ids=None, attention_mask=None, **kwargs):
        assert input_ids is not None and attention_mask is not None
        eos = self.tokenizer.eos_token_id
        outs = []
        for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            first = mask.index(1)
            assert all(mask[first:]) and not any(mask[:first]), "prompt must be left-padded, contiguous"
            self.prompts.append(row[first:])
            reply = self.replies.pop(0) if self.replies else ""
            outs.append(self.tokenizer(reply, add_special_tokens=False)["input_ids"] + [eos])
        width = max(len(o) for o in outs)
        new = torch.tensor([o + [eos] * (width - len(o)) for o in outs], dtype=input_ids.dtype)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)


@pytest.fixture()
def record(monkeypatch):
    """Every model that load_for_inference hands out gets a Recorder for its generate."""
    import tunesmith.inference.loading as run_dir

    state: dict = {"replies": [], "recorders": []}
    real = run_dir.load_for_inference

    def load(*args, **kwargs):
        loaded = real(*args, **kwargs)
        recorder = Recorder(loaded.tokenizer, state["replies"])
        state["recorders"].append(recorder)
        loaded.model.generate = recorder
        return loaded

    monkeypatch.setattr(run_dir, "load_for_inference", load)
    return state


def cli(*args: str, stdin: str | None = None):
    from typer.testing import CliRunner

    from tunesmith.cli.app import app

    result = CliRunner().invoke(app, list(args), input=stdin)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def assistant_turns(messages: list[dict]) -> list[int]:
    return [k for k, m in enumerate(messages) if m["role"] == "assistant"]


# ----------------------------------------------------------------------------- the training side itself


@pytest.mark.parametrize("case", ALL)
def test_training_prompt_is_the_chosen_template_with_the_system_prompt(trained, case):
    """The expectation's own check: training rendered the chosen template (and system prompt), by hand."""
    r = trained(case)
    for i in range(len(r.rows)):
        conv = r.with_system(r.conversation(i))
        prompts = r.prompts(i)
        turns = assistant_turns(conv)
        assert len(prompts) == len(turns)  # one trained span per reply, nothing else trained
        for prompt, k in zip(prompts, turns):
            assert r.tokenizer.decode(prompt) == r.expected_text(conv[:k])
        if r.system:
            assert SYSTEM in r.tokenizer.decode(prompts[0])


# ----------------------------------------------------------------------------- chat, generate, eval


@pytest.mark.parametrize("case", ALL)
def test_chat_renders_the_training_prompt_every_turn(trained, record, case):
    r = trained(case)
    lines, replies, expected = [], [], []
    for i in range(len(r.rows)):
        conv = r.conversation(i)
        for k in assistant_turns(conv):
            lines.append(conv[k - 1]["content"])  # the user's message typed at the prompt
            replies.append(conv[k]["content"])  # what the "model" answers, so the history matches the row
        lines.append("/reset")
        expected += r.prompts(i)
    record["replies"] = replies
    cli("chat", str(r.run), "--max-new-tokens", "4", stdin="\n".join(lines + ["/exit"]) + "\n")
    (recorder,) = record["recorders"]
    assert len(recorder.prompts) == len(expected)
    for got, want in zip(recorder.prompts, expected):
        assert got == want, (r.tokenizer.decode(got), r.tokenizer.decode(want))


@pytest.mark.parametrize("case", ALL)
def test_generate_cli_renders_the_training_prompt(trained, record, case):
    r = trained(case)
    for i in range(3):
        first_user = r.conversation(i)[0]["content"]
        cli("generate", str(r.run), "--prompt", first_user, "--max-new-tokens", "4")
        assert record["recorders"][-1].prompts == [r.prompts(i)[0]]  # before the first trained label


@pytest.mark.parametrize("case", ALL)
def test_generate_batch_renders_the_training_prompt(trained, case):
    from tunesmith.inference.generate import Sampling, generate_batch
    from tunesmith.inference.loading import load_for_inference

    r = trained(case)
    loaded = load_for_inference(r.run)
    assert loaded.default_system == r.system
    recorder = Recorder(loaded.tokenizer)
    loaded.model.generate = recorder
    convs = [r.with_system(r.conversation(i))[:-1] for i in range(len(r.rows))]
    generate_batch(loaded.model, loaded.tokenizer, convs, Sampling(max_new_tokens=4), batch_size=3)
    assert recorder.prompts == [r.prompts(i)[-1] for i in range(len(r.rows))]


@pytest.mark.parametrize("case", ALL)
def test_eval_generates_from_the_training_prompt(trained, record, case):
    r = trained(case)
    out = cli("eval", str(r.run), "--data", str(r.run / "data" / "train.jsonl"), "--json", "--max-new-tokens", "4")
    result = json.loads(out.output.strip().splitlines()[-1])
    assert result["n"] == len(r.rows)
    (recorder,) = record["recorders"]
    assert recorder.prompts == [r.prompts(i)[-1] for i in range(len(r.rows))]


# ----------------------------------------------------------------------------- the exported tokenizer


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    from tunesmith.export import export_run

    cache: dict = {}

    def get(case: str, fmt: str) -> Path:
        if (case, fmt) not in cache:
            out = tmp_path_factory.mktemp("export") / f"{case}-{fmt}"
            export_run(trained(case).run, fmt, out)
            cache[case, fmt] = out
        return cache[case, fmt]

    return get


def plain_prompt_ids(export_dir: Path, messages: list[dict]) -> list[int]:
    """What a user of plain transformers gets from the exported tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


EXPORT_CASES = [pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=(
    "multi-turn with a template that emits no EOS: training appends the EOS id after every reply, but the "
    "exported chat_template renders the history without it, so plain transformers builds a different "
    "multi-turn prompt than training saw"))) if c == "multi_turn_jinja_no_eos" else c for c in ALL]


@pytest.mark.parametrize("fmt", ["merged", "adapter"])
@pytest.mark.parametrize("case", EXPORT_CASES)
def test_exported_tokenizer_renders_the_training_prompt(trained, exported, case, fmt):
    """The system message is passed explicitly here (the exported template cannot know it; see the next test)."""
    r = trained(case)
    out = exported(case, fmt)
    for i in range(len(r.rows)):
        conv = r.with_system(r.conversation(i))
        for k, want in zip(assistant_turns(conv), r.prompts(i)):
            assert plain_prompt_ids(out, conv[:k]) == want


@pytest.mark.xfail(strict=True, reason=(
    "data.system_prompt is applied by the data pipeline and chat/generate, not by the chat template, and "
    "export writes only the template: a plain-transformers user of the export gets the template's default "
    "system message ('You are tiny.'), not the system prompt the run trained with"))
@pytest.mark.parametrize("fmt", ["merged", "adapter"])
@pytest.mark.parametrize("case", SYSTEM_CASES)
def test_exported_tokenizer_carries_the_run_system_prompt(trained, exported, case, fmt):
    r = trained(case)
    out = exported(case, fmt)
    conv = r.conversation(0)  # as a user of the exported model writes it: no system message
    assert plain_prompt_ids(out, conv[:1]) == r.prompts(0)[0]


# ----------------------------------------------------------------------------- an intermediate checkpoint


def manual_lora_logits(model_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Base weights + scale * B @ A from the adapter file, without peft: an independent path to the same model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    assert not cfg.get("use_rslora") and not cfg.get("use_dora")
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    params = dict(model.named_parameters())
    pairs = {k.split(".lora_A.")[0] for k in weights if ".lora_A." in k}
    assert len(pairs) == 2 * 7  # all-linear: 7 projections in each of 2 layers
    with torch.no_grad():
        for prefix in pairs:
            a, b = weights[f"{prefix}.lora_A.weight"], weights[f"{prefix}.lora_B.weight"]
            params[prefix.removeprefix("base_model.model.") + ".weight"].add_(scale * b @ a)
        model.eval()
        return model(input_ids=ids).logits


def test_intermediate_checkpoint_has_its_own_weights_and_the_run_template(trained, model_dir):
    from tunesmith.inference.generate import Sampling, generate_batch
    from tunesmith.inference.loading import load_for_inference

    r = trained("system_prompt")
    ckpts = sorted(p.name for p in (r.run / "checkpoints").glob("step-*"))
    assert ckpts == ["step-000002"]  # the run has 3 steps: this one is not the final weights
    ids = torch.tensor([r.prompts(0)[0]])
    at_ckpt = load_for_inference(r.run, checkpoint="step-000002")
    final = load_for_inference(r.run)
    with torch.no_grad():
        ckpt_logits = at_ckpt.model(input_ids=ids).logits
        final_logits = final.model(input_ids=ids).logits
    assert (ckpt_logits - final_logits).abs().max() > 1e-3  # a different step's weights
    torch.testing.assert_close(ckpt_logits, manual_lora_logits(model_dir, r.run / "checkpoints" / "step-000002", ids),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(final_logits, manual_lora_logits(model_dir, r.run / "final", ids),
                               rtol=1e-4, atol=1e-5)
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(input_ids=ids).logits
    assert (ckpt_logits - base_logits).abs().max() > 1e-3  # the checkpoint's adapter is not a no-op

    # the same template and system prompt as training
    assert at_ckpt.tokenizer.chat_template == r.template
    assert at_ckpt.default_system == SYSTEM
    recorder = Recorder(at_ckpt.tokenizer)
    at_ckpt.model.generate = recorder
    convs = [r.with_system(r.conversation(i))[:-1] for i in range(len(r.rows))]
    generate_batch(at_ckpt.model, at_ckpt.tokenizer, convs, Sampling(max_new_tokens=2))
    assert recorder.prompts == [r.prompts(i)[0] for i in range(len(r.rows))]
