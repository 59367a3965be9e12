"""QLoRA: the base model loaded in 4-bit (NF4 or FP4, optionally double-quantized) or 8-bit through
bitsandbytes, frozen, with LoRA (or DoRA) adapters trained on top in higher precision.

The adapter is saved like LoRA's. Merging cannot go into 4-bit weights without a second rounding, so the
merged model is the full-precision base plus the adapter: it differs slightly from what was trained,
whose base was the quantized one (the quantization gap).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from tunesmith.methods.lora import LoraMethod


class QloraMethod(LoraMethod):
    name = "qlora"
    quantized = True

    def load_kwargs(self, device: torch.device) -> dict:
        from transformers import BitsAndBytesConfig

        cfg = self.cfg
        if cfg.bits == 8:
            quantization = BitsAndBytesConfig(load_in_8bit=True)
        else:
            quantization = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type, bnb_4bit_use_double_quant=cfg.double_quant,
                bnb_4bit_compute_dtype=torch.bfloat16 if cfg.compute_dtype == "bf16" else torch.float32)
        kwargs: dict = {"quantization_config": quantization}
        if device.type == "cuda":  # bitsandbytes quantizes while placing the weights
            kwargs["device_map"] = {"": device.index or 0}
        return kwargs

    def build(self, model: nn.Module) -> nn.Module:
        from peft import prepare_model_for_kbit_training

        # Norms and embeddings to fp32 and input gradients on; checkpointing stays train.gradient_checkpointing's.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return super().build(model)

    def load(self, load_base, saved_dir):
        self._load_base = load_base  # merge needs the base again, in full precision
        return super().load(load_base, saved_dir)

    def merge(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        load_base = getattr(self, "_load_base", None)
        if load_base is None:
            raise RuntimeError("QloraMethod.merge needs a model from QloraMethod.load")
        warnings.warn("qlora: the adapter was trained on a 4-bit base and is merged into the full-precision "
                      "base, so the merged model's outputs differ slightly from the trained one's "
                      "(the quantization gap); --format adapter keeps the exact trained pair", stacklevel=2)
        full = get_peft_model(load_base(quantized=False), model.peft_config["default"])
        set_peft_model_state_dict(full, get_peft_model_state_dict(model))
        return full.merge_and_unload()
