"""Text generation from a base model or a run: the prompt is built by the run's own template."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunesmith.data.templates import encode_prompt
from tunesmith.models.generation import sample_replies


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 means greedy decoding (deterministic)."""
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    def generate_kwargs(self, tokenizer) -> dict:
        kwargs = dict(max_new_tokens=self.max_new_tokens, repetition_penalty=self.repetition_penalty,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs


def generate_batch(model, tokenizer, conversations: list[list[dict[str, str]]], sampling: Sampling | None = None,
                   batch_size: int = 16) -> list[str]:
    """Replies for many conversations, left-padded in batches; each reply stops at EOS."""
    sampling = sampling or Sampling()
    prompts = [encode_prompt(tokenizer, conv) for conv in conversations]
    replies = sample_replies(model, prompts, tokenizer.pad_token_id, [tokenizer.eos_token_id], sampling.max_new_tokens,
                             sampling.temperature, sampling.top_p, sampling.top_k, sampling.repetition_penalty,
                             batch_size, keep_stop=False)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in replies]


def _until_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


@torch.no_grad()
def stream_reply(model, tokenizer, messages: list[dict[str, str]], sampling: Sampling | None = None) -> str:
    """Print the reply as it is generated (chat); returns the full reply."""
    from transformers import TextStreamer

    sampling = sampling or Sampling()
    device = next(model.parameters()).device
    ids = torch.tensor([encode_prompt(tokenizer, messages)], device=device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                         **sampling.generate_kwargs(tokenizer))
    return tokenizer.decode(_until_eos(out[0, ids.shape[1]:].tolist(), tokenizer.eos_token_id), skip_special_tokens=True)
