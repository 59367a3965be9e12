"""A merged model as one GGUF file (the `gguf` package writes it) that llama.cpp, Ollama and LM Studio run,
and an Ollama Modelfile beside it.

What llama.cpp needs beyond the weights is written from the run itself: the architecture's hyperparameters,
the tokenizer (BPE vocabulary, merges, token types, the pre-tokenizer's name), BOS/EOS/pad, and the chat
template the run trained with, so llama.cpp's chat mode formats prompts exactly as training did. Weights are
f32, f16, bf16, or quantized by the `gguf` package (q8_0, q4_0, q4_1); k-quants (q4_k_m, …) need llama.cpp's
own `llama-quantize`, which is said rather than writing a wrong file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tunesmith.errors import ConfigError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3"}
"""transformers architecture -> llama.cpp architecture (the families written so far)."""

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")

# llama.cpp picks its pre-tokenizer (how text is split before BPE) by name; transformers keeps no such name,
# so it is known per model family and vocabulary size (llama.cpp's converter recognises them by a hash).
PRE_TOKENIZERS = {("llama", 49152): "smollm", ("llama", 128256): "llama-bpe", ("qwen2", None): "qwen2",
                  ("qwen3", None): "qwen2"}


def _pre_tokenizer(config, vocab: int, pre: str | None) -> str:
    if pre:
        return pre
    family = config.model_type
    for key in ((family, vocab), (family, None)):
        if key in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[key]
    raise ConfigError(f"GGUF export: llama.cpp's pre-tokenizer for this tokenizer ({family}, {vocab} tokens) is not "
                      f"known to tunesmith (known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}); a GGUF with "
                      "the wrong one would split text differently from training")


def _permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's Llama q/k rows (each head's rotary halves one after the other) into llama.cpp's layout (the two
    halves interleaved), which its rotary embedding for this architecture expects."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _quantized(name: str, tensor: torch.Tensor, quant: str):
    """(data, raw type or None) of one tensor: vectors (norms, biases) stay f32, as llama.cpp keeps them."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    data = tensor.detach().to(torch.float32).cpu().numpy()
    if data.ndim == 1 or quant == "f32":
        return data, None
    if quant == "f16":
        return data.astype(np.float16), None
    kind = {"bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}[quant]
    if kind != Q.BF16 and data.shape[-1] % 32:  # block quants need rows in blocks of 32: keep such a tensor f16
        return data.astype(np.float16), None
    return quants.quantize(data, kind), kind


def _file_type(quant: str):
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0, "q4_1": F.MOSTLY_Q4_1}[quant]


def check_quant(quant: str) -> None:
    if quant in K_QUANTS:
        raise ConfigError(f"--quant {quant}: k-quants are made by llama.cpp's own quantizer, which the gguf package "
                          f"does not include. Export f16, then run: llama-quantize model-f16.gguf "
                          f"model-{quant}.gguf {quant.upper()}")
    if quant not in QUANTS:
        raise ConfigError(f"--quant {quant}: one of {', '.join(QUANTS)} (k-quants via llama-quantize)")


def write_gguf(model, tokenizer, path: Path, quant: str = "f16", name: str = "model", pre: str | None = None) -> Path:
    """Write `model` (a merged transformers causal LM) and `tokenizer` (the run's, with its chat template)."""
    import gguf

    check_quant(quant)
    config = model.config
    arch = ARCHITECTURES.get((config.architectures or [type(model).__name__])[0]) or ARCHITECTURES.get(type(model).__name__)
    if arch is None:
        raise ConfigError(f"GGUF export: {type(model).__name__} is not written yet (written: "
                          f"{', '.join(sorted(ARCHITECTURES))}); export --format merged and use llama.cpp's "
                          "convert_hf_to_gguf.py")
    if getattr(config, "rope_scaling", None) and (config.rope_scaling or {}).get("rope_type", "default") != "default":
        raise ConfigError(f"GGUF export: rope scaling {config.rope_scaling} is not written yet")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    vocab = config.vocab_size

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if rope:
        writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(vocab)
    writer.add_file_type(_file_type(quant))
    _write_tokenizer(writer, tokenizer, config, vocab, pre)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    state = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    for key, tensor in state.items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp reads the output projection from the embedding when there is none
        if key.endswith("rotary_emb.inv_freq"):
            continue
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ConfigError(f"GGUF export: no llama.cpp name for the tensor {key} of {arch}")
        if arch == "llama" and key.endswith("q_proj.weight"):
            tensor = _permute(tensor, heads)
        elif arch == "llama" and key.endswith("k_proj.weight"):
            tensor = _permute(tensor, kv_heads)
        data, raw = _quantized(target, tensor, quant)
        writer.add_tensor(target, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_tokenizer(writer, tokenizer, config, vocab: int, pre: str | None) -> None:
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else None
    if state is None or state["model"]["type"] != "BPE":
        raise ConfigError("GGUF export: only byte-level BPE tokenizers are written so far (SentencePiece ones, as "
                          "Llama 2, Mistral v0.1 and Gemma use, are not)")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    added = {a.content for a in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if i in special else
                         gguf.TokenType.USER_DEFINED if token in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(config, vocab, pre))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for value, add in ((tokenizer.bos_token_id, writer.add_bos_token_id), (tokenizer.eos_token_id, writer.add_eos_token_id),
                       (tokenizer.unk_token_id, writer.add_unk_token_id), (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if value is not None:
            add(value)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# ------------------------------------------------------------------------------------------------ Ollama


def modelfile(tokenizer, gguf_name: str, system: str | None) -> str:
    """An Ollama Modelfile for a ChatML-style template (the one the run trained with), in Ollama's Go template
    syntax, with its stop tokens and greedy-leaning defaults."""
    template = tokenizer.chat_template or ""
    if "<|im_start|>" not in template or "<|im_end|>" not in template:
        raise ConfigError("Ollama export: only ChatML-style chat templates (<|im_start|> … <|im_end|>) are "
                          "translated to Ollama's template syntax so far; use --format gguf and write the "
                          "Modelfile's TEMPLATE by hand")
    go = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
          '<|im_start|>assistant\n')
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go}"""', 'PARAMETER stop "<|im_end|>"',
             "PARAMETER temperature 0.2", "PARAMETER top_p 0.9"]
    if system is None:  # the system message the template adds by itself when a chat has none (SmolLM2's)
        shown = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False)
        head = "<|im_start|>system\n"
        if shown.startswith(head) and "<|im_end|>" in shown:
            system = shown[len(head):shown.index("<|im_end|>")]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"
