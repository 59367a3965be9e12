"""LoRA through peft: low-rank updates beside frozen weights; saved as a standard PEFT adapter.

Options: DoRA (a learned magnitude per output, `use_dora`), rank-stabilised scaling alpha/sqrt(r)
(`use_rslora`), the initialisation, LoRA+ (the B matrices learn `lora_plus_ratio` times faster), and
modules trained fully beside the adapters (`modules_to_save`, e.g. the LM head for new tokens).

PiSSA and OLoRA start A and B from a decomposition of each weight and subtract that part from the frozen
weight, so training runs on a rewritten base. Each save therefore writes two things: the adapter as trained
(for resume, onto a base rewritten the same way) and, as the adapter proper, its conversion to an ordinary
LoRA of rank 2r on the original weights (trained minus initial), which chat, eval, export and plain peft load
like any other."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from tunesmith.config.schema import LoraSection
from tunesmith.methods.peft_adapter import PeftAdapterMethod, default_targets

INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": True}
REWRITES_BASE = ("pissa", "olora")
AS_TRAINED = "adapter_as_trained.safetensors"
"""PiSSA/OLoRA: the adapter as trained, on the rewritten base (what resume puts back)."""


def rewrites_base(model: nn.Module) -> bool:
    config = getattr(model, "peft_config", {}).get("default")
    return str(getattr(config, "init_lora_weights", "")) in REWRITES_BASE


class LoraMethod(PeftAdapterMethod):
    name = "lora"
    config = LoraSection
    init_values = {"method.r": 16, "method.alpha": 32, "train.lr": 2e-4}

    @staticmethod
    def trainable_count(shape, plan) -> int:
        return shape.lora_params(plan.lora_r, plan.lora_targets)

    def peft_config(self, model: nn.Module):
        from peft import LoraConfig

        cfg = self.cfg
        return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=default_targets(cfg.target_modules), use_dora=cfg.use_dora,
                          use_rslora=cfg.use_rslora, init_lora_weights=INIT[cfg.init],
                          modules_to_save=list(cfg.modules_to_save) or None, task_type="CAUSAL_LM")

    @property
    def build_on_device(self) -> bool:
        return self.cfg.init in REWRITES_BASE

    def build(self, model: nn.Module) -> nn.Module:
        model = super().build(model)
        if rewrites_base(model):
            # The starting adapter, kept for converting every save to an ordinary LoRA (peft reads it from disk).
            scratch = Path(tempfile.mkdtemp(prefix="tunesmith-initial-adapter-"))
            atexit.register(shutil.rmtree, scratch, True)
            model.save_pretrained(scratch / "initial")
            self._initial = scratch / "initial"
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        if not rewrites_base(model):
            return super().save(model, out_dir)
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        initial = getattr(self, "_initial", None)
        if initial is None:
            raise RuntimeError("LoraMethod.save: a PiSSA/OLoRA model must come from this method's build()")
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()},
                  str(out_dir / AS_TRAINED))
        # peft loads the initial adapter to convert: that initialises layers from the global RNG and puts the
        # model in eval mode. A checkpoint must change neither, or dropout would differ (or stop) afterwards.
        device, training = next(model.parameters()).device, model.training
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=str(initial))
        model.train(training)

    def restore(self, model: nn.Module, saved_dir: Path) -> None:
        if not rewrites_base(model):
            return super().restore(model, saved_dir)
        from tunesmith.errors import ConfigError

        if not (saved_dir / AS_TRAINED).exists():
            raise ConfigError(f"{saved_dir}: no {AS_TRAINED}; this checkpoint was not saved by a {self.cfg.init} run")
        self.restore_file(model, saved_dir / AS_TRAINED)

    def lr_multiplier(self, name: str) -> float:
        # LoRA+: B starts at zero and carries the update's output side; a higher rate for it learns faster.
        return self.cfg.lora_plus_ratio if self.cfg.lora_plus_ratio and "lora_B" in name else 1.0
