"""LoRA through peft: low-rank updates beside frozen weights; saved as a standard PEFT adapter.

Options: DoRA (a learned magnitude per output, `use_dora`), rank-stabilised scaling alpha/sqrt(r)
(`use_rslora`), the initialisation, LoRA+ (the B matrices learn `lora_plus_ratio` times faster), and
modules trained fully beside the adapters (`modules_to_save`, e.g. the LM head for new tokens)."""

from __future__ import annotations

import torch.nn as nn

from tunesmith.methods.peft_adapter import PeftAdapterMethod, default_targets

INIT = {"default": True, "gaussian": "gaussian"}


class LoraMethod(PeftAdapterMethod):
    name = "lora"

    def peft_config(self, model: nn.Module):
        from peft import LoraConfig

        cfg = self.cfg
        return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=default_targets(cfg.target_modules), use_dora=cfg.use_dora,
                          use_rslora=cfg.use_rslora, init_lora_weights=INIT[cfg.init],
                          modules_to_save=list(cfg.modules_to_save) or None, task_type="CAUSAL_LM")

    def lr_multiplier(self, name: str) -> float:
        # LoRA+: B starts at zero and carries the update's output side; a higher rate for it learns faster.
        return self.cfg.lora_plus_ratio if self.cfg.lora_plus_ratio and "lora_B" in name else 1.0
