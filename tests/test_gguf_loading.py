"""The GGUF loading path, offline, on a tiny Llama GGUF written here with gguf's GGUFWriter.

The file is laid out as llama.cpp's converter writes one: `llama` architecture metadata, a GPT-2 style
byte-level BPE tokenizer (tokens, token types, merges, special ids, chat template) like SmolLM2's, and
tensors under llama.cpp's names -- 2-D weights in F16, norms in F32, the FFN down projections in Q8_0 (bytes
packed by this file's own quantizer), and Q/K rows permuted the way llama.cpp permutes them for its rotary
layout. The expectations are the arrays and ids this file defined, not anything read back through the
library under test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import TINY_TEMPLATE, alpaca_rows, write_jsonl

gguf = pytest.importorskip("gguf")

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # unk, bos, eos (= pad, as in SmolLM2)
MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"), ("l", "d"), ("Ġw", "or"),
          ("Ġwor", "ld")]


def byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes (printable ASCII as itself, space as 'Ġ', ...)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelled[b] = chr(b)
        else:
            spelled[b] = chr(256 + extra)
            extra += 1
    return [spelled[b] for b in range(256)]


TOKENS = SPECIALS + byte_alphabet() + [a + b for a, b in MERGES]
VOCAB = len(TOKENS)
ID = {t: i for i, t in enumerate(TOKENS)}
UNK, BOS, EOS = 0, 1, 2


# ----------------------------------------------------------------------------- writing the file


def hf_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """The model in transformers' names and layout: what loading the file must give back."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    out = {"model.embed_tokens.weight": w(VOCAB, HIDDEN), "model.norm.weight": 1 + w(HIDDEN),
           "lm_head.weight": w(VOCAB, HIDDEN)}
    for b in range(LAYERS):
        p = f"model.layers.{b}."
        out.update({
            p + "input_layernorm.weight": 1 + w(HIDDEN), p + "post_attention_layernorm.weight": 1 + w(HIDDEN),
            p + "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": w(HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": w(INTERMEDIATE, HIDDEN), p + "mlp.up_proj.weight": w(INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": w(HIDDEN, INTERMEDIATE),
        })
    return out


GGUF_NAME = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
GGUF_LEAF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAME:
        return GGUF_NAME[hf_name]
    parts = hf_name.split(".")  # model.layers.B.<module path>.weight
    return f"blk.{parts[2]}.{GGUF_LEAF['.'.join(parts[3:-1])]}.weight"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q and K rows (interleaved rotary pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def q8_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the Q8_0 bytes of w, the values they stand for): blocks of 32, an f16 scale then 32 int8."""
    rows, cols = w.shape
    blocks = w.reshape(-1, 32).astype(np.float32)
    scale = (np.abs(blocks).max(axis=1, keepdims=True) / 127).astype(np.float16)
    q = np.clip(np.rint(blocks / scale.astype(np.float32)), -127, 127).astype(np.int8)
    packed = np.concatenate([scale.view(np.uint8), q.view(np.uint8)], axis=1).reshape(rows, cols // 32 * 34)
    values = (scale.astype(np.float32) * q.astype(np.float32)).reshape(rows, cols)
    return packed, values


def write_tiny_llama_gguf(path: Path, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Write the file; returns what each weight must load as (F16 rounding and Q8_0 included)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS)
                           + [gguf.TokenType.NORMAL] * (VOCAB - len(SPECIALS)))
    writer.add_token_merges([f"{a} {b}" for a, b in MERGES])
    writer.add_unk_token_id(UNK)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_pad_token_id(EOS)
    writer.add_chat_template(TINY_TEMPLATE)

    expected = {}
    for name, w in weights.items():
        stored = w
        if "self_attn.q_proj" in name:
            stored = llama_cpp_permute(w, HEADS)
        elif "self_attn.k_proj" in name:
            stored = llama_cpp_permute(w, KV_HEADS)
        if w.ndim == 1:  # norms stay F32, as llama.cpp writes them
            writer.add_tensor(gguf_name(name), stored)
            expected[name] = w
        elif "down_proj" in name:
            packed, values = q8_0(stored)
            writer.add_tensor(gguf_name(name), packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            expected[name] = values
        else:
            writer.add_tensor(gguf_name(name), stored.astype(np.float16))
            expected[name] = w.astype(np.float16).astype(np.float32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F16.gguf"
    expected = write_tiny_llama_gguf(path, hf_weights())
    return path, expected


@pytest.fixture(scope="module")
def loaded(tiny_gguf):
    from tunesmith.models.loading import load_causal_lm, load_tokenizer, resolve

    path, _ = tiny_gguf
    source = resolve(str(path))
    return source, load_causal_lm(source), load_tokenizer(source)


# ----------------------------------------------------------------------------- loading


def test_resolve_points_at_the_file(tiny_gguf):
    from tunesmith.models.loading import resolve

    path, _ = tiny_gguf
    source = resolve(str(path))
    assert (source.path, source.gguf_file) == (str(path.parent), path.name)
    by_dir = resolve(str(path.parent))  # a directory holding one GGUF means that file
    assert (by_dir.path, by_dir.gguf_file) == (str(path.parent), path.name)


def test_weights_load_as_written(tiny_gguf, loaded):
    _, expected = tiny_gguf
    _, model, _ = loaded
    config = model.config
    assert (config.model_type, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (
        "llama", HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB)
    assert config.tie_word_embeddings is False  # the file has its own output.weight
    state = model.state_dict()
    assert set(state) == set(expected)
    for name, want in expected.items():
        got = state[name]
        assert got.dtype == torch.float32, name
        assert torch.equal(got, torch.from_numpy(want)), name
    # The Q8_0 tensors really were quantized: their values moved off the float weights they came from.
    original = hf_weights()["model.layers.0.mlp.down_proj.weight"]
    assert not np.array_equal(expected["model.layers.0.mlp.down_proj.weight"], original)
    np.testing.assert_allclose(expected["model.layers.0.mlp.down_proj.weight"], original, atol=2e-3)


def test_forward_matches_a_model_built_from_the_same_weights(tiny_gguf, loaded):
    """Loaded from GGUF, the model computes what a LlamaForCausalLM holding the expected weights computes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, expected = tiny_gguf
    _, model, _ = loaded
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                       num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                       num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False))
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in expected.items()})
    ids = torch.tensor([[BOS, ID["hello"], ID["Ġworld"], ID["!"], EOS]])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, ref.eval()(input_ids=ids).logits)


def test_tokenizer_round_trips_to_the_defined_ids(loaded):
    _, _, tokenizer = loaded
    assert len(tokenizer) == VOCAB
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (EOS, EOS)
    assert tokenizer.chat_template == TINY_TEMPLATE
    cases = {
        "hello world": [ID["hello"], ID["Ġworld"]],  # every merge applied, in rank order
        "<|im_start|>hello world<|im_end|>": [BOS, ID["hello"], ID["Ġworld"], EOS],  # specials stay whole
        "held, hi!": [ID["he"], ID["ld"], ID[","], ID["Ġ"], ID["h"], ID["i"], ID["!"]],  # no 'Ġ h' merge
        "hell\no": [ID["hell"], ID["Ċ"], ID["o"]],  # newline is byte 10, spelled 'Ċ'; split off by the regex
    }
    for text, ids in cases.items():
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids, text
        assert tokenizer.decode(ids) == text
    assert tokenizer("hello world")["input_ids"] == [ID["hello"], ID["Ġworld"]]  # no BOS/EOS added around text


def test_gguf_markers_are_cleared_so_a_save_reloads_as_plain_weights(tiny_gguf, loaded, tmp_path):
    from transformers import AutoModelForCausalLM

    path, expected = tiny_gguf
    _, model, tokenizer = loaded
    # What transformers itself hands back marks the model as GGUF-quantized and refuses to save it:
    raw = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    assert raw.is_quantized and raw.hf_quantizer is not None and hasattr(raw.config, "quantization_config")
    with pytest.raises(ValueError, match="not serializable"):
        raw.save_pretrained(tmp_path / "raw")

    assert model.hf_quantizer is None and not model.is_quantized
    assert not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    saved_config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert "quantization_config" not in saved_config
    assert list((tmp_path / "saved").glob("*.safetensors"))

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert getattr(reloaded, "hf_quantizer", None) is None and not getattr(reloaded, "is_quantized", False)
    assert not hasattr(reloaded.config, "quantization_config")
    state = reloaded.state_dict()
    for name, want in expected.items():
        assert torch.equal(state[name], torch.from_numpy(want)), name


# ----------------------------------------------------------------------------- training on it


@pytest.mark.filterwarnings("ignore:Could not find a config file")  # peft, about the GGUF's folder: no config.json
def test_training_on_the_gguf_through_the_normal_config(tiny_gguf, tmp_path):
    from typer.testing import CliRunner

    from tunesmith.cli.app import app
    from tunesmith.evaluation.evaluate import evaluate_file
    from tunesmith.inference.loading import load_for_inference

    path, _ = tiny_gguf
    rows = [{"instruction": "Say hello.", "output": "hello world"}] * 4 + alpaca_rows(20)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    config = {
        "model": {"name_or_path": str(path)},
        "data": {"train_file": str(data), "val_size": 4, "test_size": 0, "seed": 0, "max_seq_length": 256},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "train": {"max_steps": 8, "lr": 1e-2, "micro_batch_size": 4, "precision": "fp32", "seed": 0},
        "eval": {"interval": 4, "batch_size": 4},
        "checkpoint": {"interval": 4, "keep_last": 1},
        "output": {"dir": str(tmp_path / "run")},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    result = CliRunner().invoke(app, ["train", str(tmp_path / "config.yaml")])
    assert result.exit_code == 0, (result.output, result.exception)

    run = tmp_path / "run"
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "complete" and info["steps"] == 8
    assert info["base_model"] == {"path": str(path.parent), "gguf_file": path.name}
    assert (run / "final" / "adapter_model.safetensors").exists()
    # the template came from the GGUF's own metadata (data.template defaults to the model's)
    assert (run / "tokenizer" / "chat_template.jinja").read_text(encoding="utf-8") == TINY_TEMPLATE
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(s["loss"]) for s in steps if "loss" in s)

    # The trained model (base re-read from the GGUF, adapter on top) fits the held-out rows better than the base.
    trained = load_for_inference(run)
    base = load_for_inference(str(path))
    assert base.tokenizer.chat_template == trained.tokenizer.chat_template  # the same rendering for both
    val = run / "data" / "val.jsonl"
    trained_loss = evaluate_file(trained, val, max_new_tokens=2)["loss"]
    base_loss = evaluate_file(base, val, max_new_tokens=2)["loss"]
    assert trained_loss < base_loss - 0.1, (trained_loss, base_loss)
