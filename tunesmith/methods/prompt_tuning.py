"""Soft prompts through peft, with the whole model frozen.

prompt: `num_virtual_tokens` learned embeddings put before every input (optionally started from the
embeddings of a text, which trains faster than random ones). prefix: learned keys and values in every
attention layer (prefix tuning). Neither can be merged into the weights; both travel as a PEFT adapter.

Their extra positions live inside peft's forward, so the loss runs through it (stages/tokens.py)."""

from __future__ import annotations

import torch.nn as nn

from tunesmith.config.schema import PrefixSection, PromptSection
from tunesmith.errors import ConfigError
from tunesmith.methods.peft_adapter import PeftAdapterMethod


class PromptTuningMethod(PeftAdapterMethod):
    name = "prompt"
    config = PromptSection
    mergeable = False
    soft_prompt = True
    init_values = {"train.lr": 3e-2}

    @staticmethod
    def trainable_count(shape, plan) -> int:  # one embedding per virtual token
        return plan.virtual_tokens * shape.hidden

    def peft_config(self, model: nn.Module):
        from peft import PromptTuningConfig, PromptTuningInit

        cfg = self.cfg
        if cfg.prompt_init_text:
            path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
            if not path:
                raise ConfigError("method.prompt_init_text needs the model's tokenizer, and this model has no path")
            return PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type="CAUSAL_LM",
                                      prompt_tuning_init=PromptTuningInit.TEXT,
                                      prompt_tuning_init_text=cfg.prompt_init_text, tokenizer_name_or_path=path)
        return PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type="CAUSAL_LM")


class PrefixTuningMethod(PeftAdapterMethod):
    name = "prefix"
    config = PrefixSection
    mergeable = False
    soft_prompt = True
    init_values = {"train.lr": 1e-2}

    @staticmethod
    def trainable_count(shape, plan) -> int:  # a key and a value per virtual token in every layer
        return plan.virtual_tokens * shape.layers * 2 * shape.kv_heads * shape.head_dim

    def peft_config(self, model: nn.Module):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(num_virtual_tokens=self.cfg.num_virtual_tokens, task_type="CAUSAL_LM")
